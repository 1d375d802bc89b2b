"""Checkpoint directory layout, ordering, commit protocol, retention, and the directory lock.

    <dir>/
      latest                              name of the newest committed checkpoint (a hint)
      .lock                               held by the job writing here (rank 0); owner in the file
      step00000012-seq000024/             one checkpoint (docs/checkpoint-format.md): optimizer steps
        manifest.json                     done + sequences done in the open window (layout-free)
        COMMITTED                         written last; holds the manifest's sha256
        ...
      .partial-step00000013-seq000000/    being written; ignored and removed if left behind
      .deleting-step00000009-seq000000/   being deleted by retention; ignored and removed
      superseded/                         checkpoints a resume or a fresh start passed over, moved
                                          aside (never deleted) so the run can write their tags again

"Newest" is the most training done: checkpoints are ordered by their position (optimizer steps,
then sequences done in the open window) recorded in the manifest, never by the name alone (the
number of micro-steps in a window depends on the layout; an elastic resume changes it).

Commit: all ranks write into the ``.partial-`` directory and report their files' sizes and
hashes; after every rank is done, rank 0 writes the manifest and the COMMITTED marker, fsyncs,
renames the directory to its final name (atomic), then replaces ``latest`` (atomic). A kill at
any instant leaves either the previous state or a complete new checkpoint. Every directory created
is fsynced into its parent, so a committed checkpoint survives a power loss too.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from seqpar.errors import UserError

FORMAT_VERSION = 2  # 2: position in the manifest, tags by sequences done in the window
MANIFEST = "manifest.json"
MARKER = "COMMITTED"
LATEST = "latest"
LOCK = ".lock"
PARTIAL_PREFIX = ".partial-"
DELETING_PREFIX = ".deleting-"
SUPERSEDED = "superseded"
_TAG = re.compile(r"^step(\d{8})-seq(\d{6,})$")
_LEGACY_TAG = re.compile(r"^step(\d{8})-micro(\d{4})$")  # format 1: micro-steps (layout-dependent)


@dataclass(frozen=True)
class Position:
    """How much training a checkpoint holds, in layout-free units (the global batch is fixed)."""

    step: int  # optimizer steps done
    window_samples: int  # sequences done in the open accumulation window, over all DP ranks
    consumed_samples: int  # sequences consumed since the run started
    micro_step: int = 0  # micro-steps done in the window on the layout that saved (informational)

    @property
    def tag(self) -> str:
        return tag_for(self.step, self.window_samples)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def tag_for(step: int, window_samples: int) -> str:
    return f"step{step:08d}-seq{window_samples:06d}"


def parse_tag(tag: str) -> tuple[int, int] | None:
    """(step, sequences done in the window) of a tag; a format-1 tag gives (step, micro-step)."""
    m = _TAG.match(tag) or _LEGACY_TAG.match(tag)
    return (int(m.group(1)), int(m.group(2))) if m else None


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync_file(path)  # a directory fd can be fsynced on Linux; makes renames and new entries durable


def make_dirs(path: Path) -> None:
    """``mkdir -p`` that fsyncs each new directory's parent, so the new entry is durable."""
    path = Path(path)
    if path.is_dir():
        return
    make_dirs(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return
    fsync_dir(path.parent)


def fsync_dirs_under(root: Path) -> None:
    """fsync every directory below ``root`` (and ``root``): the entries of files written there."""
    for d, _, _ in os.walk(root, topdown=False):
        fsync_dir(Path(d))


def drop_cache(path: Path) -> None:
    """Ask the kernel to forget the cached pages of a (synced) file, so the next read comes from
    the disk: a re-verification should see what the disk holds, not what we wrote to memory."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def describe_files(root: Path, files: list[Path]) -> dict[str, dict]:
    """{relative path: {size, sha256}} for files under ``root`` (fsyncs each one)."""
    out = {}
    for f in files:
        fsync_file(f)
        out[f.relative_to(root).as_posix()] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    return out


@dataclass
class CheckpointInfo:
    tag: str
    path: Path
    step: int
    order: tuple  # sort key: position from the manifest, else from the tag

    def __str__(self) -> str:
        return self.tag


class DirLockedError(UserError, RuntimeError):
    """Another job holds the checkpoint directory."""


_HELD: dict[str, int] = {}  # realpath of a checkpoint root -> fd holding its lock (this process)


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write a small file with exactly ``mode`` (checkpoints may hold data other users must not read)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    def __init__(self, root: Path, mode: int = 0o600):
        self.root = Path(root)
        self.mode = mode  # of every file the store writes (checkpoint.file_mode)
        self.eval_set: str | None = None  # what this run's eval_loss measures (evaluation.eval_identity)

    # -- the lock: one writing job per directory ---------------------------------------------------
    def lock(self, wait_s: float = 120.0, log=print) -> bool:
        """Take the exclusive lock of this checkpoint directory (rank 0, for the process lifetime).
        Another job holding it: wait up to ``wait_s`` (a job being replaced may still be saving),
        then raise ``DirLockedError`` naming the holder. Returns False when the filesystem cannot
        lock (warned once: then nothing stops two jobs from writing here)."""
        make_dirs(self.root)
        key = os.path.realpath(self.root)
        if key in _HELD:  # this process already holds it (several trainers in one process)
            return True
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise DirLockedError(
                        f"checkpoint directory {self.root} is in use by another job ({holder}); stop that "
                        "job, or give this one another logging.run_dir / checkpoint.dir") from None
                if not told:
                    log(f"checkpoint directory {self.root} is locked by {holder}; waiting up to {wait_s:.0f} s "
                        "for it to finish (checkpoint.lock_wait_s)")
                    told = True
                time.sleep(0.5)
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                os.close(fd)
                print(f"seqpar: warning: {self.root} cannot be locked on this filesystem ({e.strerror}): make "
                      "sure no other job writes checkpoints there", file=sys.stderr, flush=True)
                return False
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                 **{k: os.environ[k] for k in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "HOSTNAME")
                    if k in os.environ}}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)
        _HELD[key] = fd
        return True

    def unlock(self) -> None:
        fd = _HELD.pop(os.path.realpath(self.root), None)
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    # -- writing ----------------------------------------------------------------------------------
    def partial_dir(self, tag: str) -> Path:
        return self.root / f"{PARTIAL_PREFIX}{tag}"

    def final_dir(self, tag: str) -> Path:
        return self.root / tag

    def begin(self, tag: str) -> Path:
        """Fresh partial directory for ``tag`` (rank 0, before the others write). A checkpoint of
        the same position (left by an earlier timeline of this run) is moved aside first."""
        if self.final_dir(tag).exists():
            dest = self.set_aside(self.final_dir(tag))
            print(f"checkpoint {tag} already existed (an earlier attempt at the same position); moved to {dest}",
                  flush=True)
        part = self.partial_dir(tag)
        if part.exists():
            shutil.rmtree(part)
        make_dirs(part)
        return part

    def commit(self, tag: str, files: dict[str, dict], meta: dict) -> Path:
        """Rank 0, after every rank wrote and described its files: manifest, marker, rename, latest."""
        part = self.partial_dir(tag)
        manifest = {"format_version": FORMAT_VERSION, "tag": tag, "created": time.time(), **meta,
                    "files": dict(sorted(files.items()))}
        write_private(part / MANIFEST, json.dumps(manifest, indent=1), self.mode)
        write_private(part / MARKER, sha256_file(part / MANIFEST) + "\n", self.mode)
        fsync_dir(part)
        final = self.final_dir(tag)
        os.replace(part, final)
        fsync_dir(self.root)
        tmp = self.root / f"{LATEST}.tmp"
        write_private(tmp, tag + "\n", self.mode)
        os.replace(tmp, self.root / LATEST)
        fsync_dir(self.root)
        return final

    # -- reading ----------------------------------------------------------------------------------
    def list(self) -> list[CheckpointInfo]:
        """Checkpoint directories by position (least training first); includes uncommitted ones
        only if they have a final name (use ``verify`` to know)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            parsed = parse_tag(p.name)
            if p.is_dir() and not p.is_symlink() and parsed:
                out.append(CheckpointInfo(p.name, p, parsed[0], self._order(p, parsed)))
        return sorted(out, key=lambda c: c.order)

    @staticmethod
    def _order(path: Path, parsed: tuple[int, int]) -> tuple:
        """Position recorded in the manifest; a format-1 checkpoint (no position) sorts by its
        tag before any format-2 one of the same step (written after it by an upgraded run)."""
        try:
            pos = json.loads((path / MANIFEST).read_text())["position"]
            return (int(pos["step"]), 1, int(pos["window_samples"]))
        except (OSError, ValueError, KeyError, TypeError):
            return (parsed[0], 1 if _TAG.match(path.name) else 0, parsed[1])

    def latest_hint(self) -> str | None:
        f = self.root / LATEST
        tag = f.read_text().strip() if f.is_file() and not f.is_symlink() else None
        return tag if tag and parse_tag(tag) else None

    def verify(self, path: Path, check_hashes: bool = True) -> list[str]:
        """Problems of one checkpoint (empty list = verified); see ``verify.verify_checkpoint``."""
        from seqpar.checkpoint.verify import verify_checkpoint

        return verify_checkpoint(Path(path), check_hashes)

    def manifest(self, path: Path) -> dict:
        return json.loads((Path(path) / MANIFEST).read_text())

    # -- housekeeping -----------------------------------------------------------------------------
    def remove_partials(self) -> list[Path]:
        """Delete leftovers of interrupted writes and deletes (rank 0, when no write is in flight)."""
        gone = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith((PARTIAL_PREFIX, DELETING_PREFIX)) or p.name == f"{LATEST}.tmp":
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                    gone.append(p)
        return gone

    def set_aside(self, path: Path) -> Path:
        """Move one checkpoint into ``superseded/`` (numbered if the name is taken); returns where."""
        dest = self.root / SUPERSEDED / path.name
        n = 1
        while dest.exists():
            dest, n = self.root / SUPERSEDED / f"{path.name}.{n}", n + 1
        make_dirs(dest.parent)
        os.replace(path, dest)
        fsync_dir(self.root)
        fsync_dir(dest.parent)
        return dest

    def set_aside_newer(self, resumed: str) -> list[Path]:
        """Move checkpoints with more training than ``resumed`` (corrupt, or refused for this run)
        into ``superseded/``: the resumed run will write those positions again, and nothing is
        overwritten or deleted. Rank 0, before training starts. Returns the new paths."""
        ckpts = self.list()
        cut = next((c.order for c in ckpts if c.tag == resumed), None)
        if cut is None:
            return []
        return [self.set_aside(c.path) for c in ckpts if c.order > cut]

    def set_aside_all(self) -> list[Path]:
        """A fresh start (``--resume none``) in a directory holding checkpoints: move them all into
        ``superseded/`` so two runs never mix (retention and ``auto`` would see the old ones)."""
        moved = [self.set_aside(c.path) for c in self.list()]
        if moved and (self.root / LATEST).exists():
            (self.root / LATEST).unlink()
            fsync_dir(self.root)
        return moved

    def delete(self, path: Path) -> None:
        """Rename to ``.deleting-<tag>`` first (atomic): an interrupted delete never leaves a half
        checkpoint that still looks committed; the leftover is removed by ``remove_partials``."""
        doomed = self.root / f"{DELETING_PREFIX}{path.name}"
        os.replace(path, doomed)
        fsync_dir(self.root)
        shutil.rmtree(doomed)

    def reverify(self, path: Path) -> list[str]:
        """Verify a just-committed checkpoint from the disk (sizes + hashes, page cache dropped)."""
        try:
            files = self.manifest(path).get("files", {})
            for rel in files:
                f = path / rel
                if f.is_file() and not f.is_symlink():
                    drop_cache(f)
        except (OSError, ValueError, AttributeError):
            pass  # verify reports it
        return self.verify(path)

    def best(self) -> tuple[str, float] | None:
        """(tag, eval loss) of the committed checkpoint with the lowest finite held-out loss, if any;
        with ``eval_set`` set, among those scored on that held-out data (or not saying which)."""
        scored = []
        for c in self.list():
            try:
                manifest = json.loads((c.path / MANIFEST).read_text())
                loss = manifest.get("eval_loss")
                if self.eval_set is not None and manifest.get("eval_set", self.eval_set) != self.eval_set:
                    continue  # scored on other held-out data (a resume changed it): not comparable
            except (OSError, ValueError, AttributeError):
                continue
            # a NaN loss (older manifests) compares false with everything: min() could keep it as the best
            if isinstance(loss, (int, float)) and math.isfinite(loss) and (c.path / MARKER).is_file():
                scored.append((float(loss), c.order, c.tag))
        return (min(scored)[2], min(scored)[0]) if scored else None

    def retain(self, keep_last: int, protect: set[str], committed_now: Path | None = None,
               keep_best: bool = False) -> list[Path]:
        """Keep the ``keep_last`` committed checkpoints with the most training, plus ``protect`` (and
        with ``keep_best`` the one with the lowest ``eval_loss`` in its manifest); delete the others. ``committed_now`` (the checkpoint just written) is re-verified from the
        disk first: if it does not verify, nothing is deleted and ``RuntimeError`` says why.

        The newest committed checkpoint is never deleted, whatever ``keep_last`` says. Uncommitted
        checkpoint directories (renamed but marker missing cannot happen; a corrupt one can) are
        left for the operator.
        """
        if committed_now is not None:
            problems = self.reverify(committed_now)
            if problems:
                raise RuntimeError(f"checkpoint {committed_now.name} does not verify after commit, so no older "
                                   "checkpoint was deleted: " + "; ".join(problems[:3]))
        committed = [c for c in self.list() if (c.path / MARKER).is_file()]
        keep = {c.tag for c in committed[-max(keep_last, 1):]} | protect
        if committed_now is not None:
            keep.add(committed_now.name)
        if keep_best and (best := self.best()):
            keep.add(best[0])  # the lowest held-out loss so far (checkpoint.keep_best)
        gone = []
        for c in committed:
            if c.tag not in keep:
                self.delete(c.path)
                gone.append(c.path)
        return gone
