"""A second copy of committed checkpoints at any fsspec URL, pushed in the background, fetched back
by ``--resume auto`` when the local directory has nothing usable (a new node after losing the old).

    <url>/              s3://bucket/run, gs://..., file:///other/fs/run, memory://run, or a path
      <tag>/            the local checkpoint's files; COMMITTED uploaded last
      superseded/       far checkpoints newer than a pushed one (the run rewound), kept, not deleted

Object stores have no atomic rename, so the marker is the commit: listed files, then
``manifest.json``, then ``COMMITTED``; readers ignore a directory without it, and deletes remove it
first. The far side is untrusted like any checkpoint: names are checked before they are joined,
and every byte is hashed against the manifest on the way up, read back after the push, and on the
way down. "Newest" is the largest ``position.consumed_samples`` of the manifest (``step``,
``micro_step`` break ties); checkpoints without a position (written before positions were
recorded) are older than all that have one and order among themselves by ``store.parse_tag``.

``fsspec`` is imported only when a mirror is configured; object stores need their backend
(``s3fs``, ``gcsfs``, ...) installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import threading
import warnings
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from seqpar.checkpoint import verify as _verify
from seqpar.checkpoint.store import (MANIFEST, MARKER, PARTIAL_PREFIX, SUPERSEDED, CheckpointStore, fsync_dir,
                                     fsync_file, parse_tag)

CHUNK = 1 << 23
MAX_MANIFEST_BYTES = 1 << 26  # far manifests and markers are read whole: bound what a hostile one costs
FETCH_PREFIX = f"{PARTIAL_PREFIX}mirror-"  # a .partial- name: the store's remove_partials cleans leftovers
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class MirrorError(RuntimeError):
    pass


def safe_rel(rel: Any, what: str = "path") -> str:
    """``rel`` if it is a relative posix path that stays inside its directory, else ``MirrorError``."""
    if (not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel
            or any(part in ("", ".", "..") for part in rel.split("/"))):
        raise MirrorError(f"unsafe {what} {rel!r}")
    return rel


def safe_tag(tag: Any) -> str:
    """A checkpoint name: one safe path component, not hidden (``.partial-``) nor ``superseded``."""
    safe_rel(tag, "checkpoint name")
    if "/" in tag or tag.startswith(".") or tag == SUPERSEDED:
        raise MirrorError(f"unsafe checkpoint name {tag!r}")
    return tag


def position_of(manifest: dict) -> dict | None:
    pos = manifest.get("position")
    ok = pos is None or (isinstance(pos, dict) and type(pos.get("consumed_samples")) is int
                         and all(type(pos.get(k, 0)) is int for k in ("step", "micro_step")))
    if not ok:
        raise MirrorError(f"malformed position {pos!r}")
    return pos


def order_key(tag: str, manifest: dict) -> tuple | None:
    """Sort key, newest last; None when the checkpoint has neither a position nor a parseable tag."""
    pos = position_of(manifest)
    if pos is not None:
        return (1, (pos["consumed_samples"], pos.get("step", 0), pos.get("micro_step", 0)), tag)
    parsed = parse_tag(tag)
    return None if parsed is None else (0, parsed, tag)


def check_manifest(tag: str, data: bytes, marker: bytes) -> dict:
    """The parsed manifest of checkpoint ``tag`` if it is committed by ``marker`` and well formed."""
    if marker.decode(errors="replace").strip() != hashlib.sha256(data).hexdigest():
        raise MirrorError(f"{tag}: {MANIFEST} does not match the {MARKER} marker")
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, absurd nesting
        raise MirrorError(f"{tag}: {MANIFEST} unreadable: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise MirrorError(f"{tag}: {MANIFEST} has no file list")
    schema = getattr(_verify, "Manifest", None)  # the local verifier's schema: versions, position, ...
    if schema is not None:
        try:
            schema.model_validate(manifest)
        except ValueError as e:  # pydantic's ValidationError is one
            raise MirrorError(f"{tag}: {MANIFEST}: {' '.join(str(e).split())}") from None
    if manifest.get("tag") != tag:
        raise MirrorError(f"{tag}: {MANIFEST} names checkpoint {manifest.get('tag')!r}")
    for rel, want in manifest["files"].items():
        if safe_rel(rel, f"file name in {tag}/{MANIFEST}:") in (MANIFEST, MARKER):
            raise MirrorError(f"{tag}: {MANIFEST} lists {rel}")
        if not (isinstance(want, dict) and type(want.get("size")) is int and want["size"] >= 0
                and isinstance(want.get("sha256"), str) and _SHA256.match(want["sha256"])):
            raise MirrorError(f"{tag}: malformed {MANIFEST} entry for {rel}: {want!r}")
    try:
        position_of(manifest)
    except MirrorError as e:
        raise MirrorError(f"{tag}: {e}") from None
    return manifest


def _copy_hashing(src: IO[bytes], dst: IO[bytes] | None, size: int) -> tuple[int, str]:
    """Stream ``src`` into ``dst`` (None: only read); (bytes, sha256) of exactly what was copied.
    Stops after ``size`` + 1 bytes: one more than expected already proves a mismatch."""
    h, n = hashlib.sha256(), 0
    while n <= size and (block := src.read(min(CHUNK, size + 1 - n))):
        h.update(block)
        n += len(block)
        if dst is not None:
            dst.write(block)
    return n, h.hexdigest()


@dataclass
class FarCheckpoint:
    tag: str
    key: tuple
    manifest: dict
    digest: str  # sha256 of manifest.json: the same digest means the same checkpoint

    @property
    def position(self) -> dict | None:
        return self.manifest.get("position")


class Mirror:
    """Push, verify, list and fetch checkpoints at ``url``; far retention keeps ``keep_last``."""

    def __init__(self, url: str, keep_last: int):
        import fsspec.core  # here, not at module level: only runs with a mirror need fsspec

        self.url, self.keep_last = url, max(keep_last, 1)
        self.fs, base = fsspec.core.url_to_fs(url)
        self.base = base.rstrip("/")
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        self._local = "file" in protocols  # a local or network filesystem: fsync for durable ordering

    def _path(self, tag: str, rel: str | None = None) -> str:
        return f"{self.base}/{safe_tag(tag)}" + (f"/{safe_rel(rel)}" if rel else "")

    def _read_small(self, path: str) -> bytes:
        with self.fs.open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise MirrorError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
        return data

    def _manifest(self, tag: str) -> tuple[dict, bytes, bytes]:
        """(manifest, its bytes, marker bytes) of a committed far checkpoint, else ``MirrorError``."""
        try:
            marker = self._read_small(self._path(tag, MARKER))
        except FileNotFoundError:
            raise MirrorError(f"{tag}: no {MARKER} marker (incomplete upload)") from None
        try:
            data = self._read_small(self._path(tag, MANIFEST))
        except FileNotFoundError:
            raise MirrorError(f"{tag}: no {MANIFEST}") from None
        return check_manifest(tag, data, marker), data, marker

    def _committed(self) -> list[FarCheckpoint]:
        """Far checkpoints with a valid marker and manifest, oldest first. Anything else (uncommitted,
        malformed, unorderable, odd names) is ignored: never fetched, never deleted."""
        try:
            entries = self.fs.ls(self.base, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            tag = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") != "directory":
                continue
            try:
                manifest, data, _ = self._manifest(safe_tag(tag))
            except MirrorError:
                continue
            if (key := order_key(tag, manifest)) is not None:
                out.append(FarCheckpoint(tag, key, manifest, hashlib.sha256(data).hexdigest()))
        return sorted(out, key=lambda c: c.key)

    # -- reading ----------------------------------------------------------------------------------
    def list(self) -> list[tuple[str, dict | None]]:
        """Committed far checkpoints as (tag, manifest position or None), oldest first."""
        return [(c.tag, c.position) for c in self._committed()]

    def verify(self, tag: str) -> list[str]:
        """Problems of far checkpoint ``tag`` (empty list = verified), as the local verifier sees
        them: marker, manifest, no unlisted file, every file's size and sha256 (read back in full)."""
        try:
            manifest, _, _ = self._manifest(tag)
            top = self._path(tag)
            found = {f[len(top) + 1:] for f in self.fs.find(top) if f.startswith(f"{top}/")}
        except (MirrorError, FileNotFoundError) as e:
            return [str(e)]
        problems = [f"{tag}: {rel} is not listed in {MANIFEST}"
                    for rel in sorted(found - set(manifest["files"]) - {MANIFEST, MARKER})]
        for rel, want in manifest["files"].items():
            if rel not in found:
                problems.append(f"{tag}: missing file {rel}")
                continue
            with self.fs.open(self._path(tag, rel), "rb") as f:
                n, sha = _copy_hashing(f, None, want["size"])
            if n != want["size"]:
                problems.append(f"{tag}: {rel} has {f'more than {n - 1}' if n > want['size'] else n} bytes, "
                                f"manifest says {want['size']}")
            elif sha != want["sha256"]:
                problems.append(f"{tag}: {rel} checksum mismatch (corrupt)")
        return problems

    def fetch(self, tag: str, local_root: Path, mode: int = 0o600) -> Path:
        """Download far checkpoint ``tag`` to ``local_root/<tag>`` and return the path. Files go to
        ``.partial-mirror-<tag>/<tag>/`` (mode ``mode``), hashed as they are written, then the
        local verifier checks the whole directory before one rename publishes it. Refuses to
        replace a local checkpoint that verifies; one that does not is moved to ``superseded/``."""
        root, tag = Path(local_root), safe_tag(tag)
        final = root / tag
        if final.exists() and not _verify.verify_checkpoint(final):
            raise FileExistsError(f"{final} exists and verifies; not fetching {tag} from {self.url}")
        manifest, data, marker = self._manifest(tag)
        stage = root / f"{FETCH_PREFIX}{tag}"
        if stage.exists():
            shutil.rmtree(stage)
        part = stage / tag  # named as the tag: the verifier checks the name against the manifest
        dirs = {part} | {(part / rel).parent for rel in manifest["files"]}  # names checked: all inside
        dirs |= {a for d in dirs for a in d.parents if a.is_relative_to(part)}
        try:
            for d in sorted(dirs, key=lambda d: len(d.parts)):
                d.mkdir(parents=True)
            for rel, want in manifest["files"].items():
                fd = os.open(part / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                with os.fdopen(fd, "wb") as out:
                    try:
                        with self.fs.open(self._path(tag, rel), "rb") as src:
                            n, sha = _copy_hashing(src, out, want["size"])
                    except FileNotFoundError:
                        raise MirrorError(f"{tag}: missing file {rel}") from None
                    out.flush()
                    os.fsync(out.fileno())
                if (n, sha) != (want["size"], want["sha256"]):
                    raise MirrorError(f"{tag}: {rel} does not match the manifest (corrupt)")
            for name, blob in ((MANIFEST, data), (MARKER, marker)):  # the marker last, as in a commit
                fd = os.open(part / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                with os.fdopen(fd, "wb") as out:
                    out.write(blob)
                fsync_file(part / name)
            for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
                os.chmod(d, mode | (mode & 0o444) >> 2)  # as the writer: directories add x where r
                fsync_dir(d)
            # hashes were checked on the very bytes written; this is everything else the resume checks
            if problems := _verify.verify_checkpoint(part, check_hashes=False):
                raise MirrorError("; ".join(problems))
            if final.exists():  # a corrupt local copy: kept aside, never deleted
                moved = CheckpointStore(root).set_aside(final)
                print(f"seqpar: {final} does not verify; moved to {moved}, fetching {tag} from the mirror",
                      file=sys.stderr, flush=True)
            os.replace(part, final)
            fsync_dir(root)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return final

    def fetch_newest(self, local_root: Path, mode: int = 0o600) -> Path | None:
        """Fetch the newest far checkpoint that downloads and verifies (older ones when it does not,
        with a warning). None only when the mirror holds no committed checkpoint: an unreadable
        mirror, or one whose every checkpoint fails, raises rather than look like a fresh start."""
        try:
            far = self._committed()
        except OSError as e:
            raise MirrorError(f"cannot list the checkpoint mirror {self.url}: {e}") from e
        problems = []
        for c in reversed(far):
            try:
                return self.fetch(c.tag, local_root, mode)
            except (MirrorError, OSError) as e:
                problems.append(f"{c.tag}: {e}")
                warnings.warn(f"mirrored checkpoint {self.url}/{c.tag} unusable ({e}); trying an older one",
                              stacklevel=2)
        if problems:
            raise MirrorError(f"no checkpoint of the mirror {self.url} could be fetched:\n  "
                              + "\n  ".join(problems) + "\n(start fresh with --checkpoint.resume none)")
        return None

    # -- writing ----------------------------------------------------------------------------------
    def push(self, local: Path) -> None:
        """Copy the committed local checkpoint ``local`` to the mirror, verify the far copy, apply
        retention there. Raises ``MirrorError`` when anything fails (a far copy that does not match
        is removed), including ``local`` being deleted meanwhile (local retention)."""
        try:
            self._push(Path(local))
        except MirrorError:
            raise
        except Exception as e:  # backend errors (network, permissions): one exception type for callers
            raise MirrorError(f"{Path(local).name}: {type(e).__name__}: {e}") from e

    def _push(self, local: Path) -> None:
        tag = safe_tag(local.name)
        try:
            data, marker = (local / MANIFEST).read_bytes(), (local / MARKER).read_bytes()
        except FileNotFoundError as e:
            raise MirrorError(f"{local} is not a committed checkpoint (deleted?): {e}") from None
        manifest = check_manifest(tag, data, marker)
        if (key := order_key(tag, manifest)) is None:
            raise MirrorError(f"{tag}: no position in its manifest and a tag store.parse_tag cannot order")
        digest = hashlib.sha256(data).hexdigest()
        same = next((c for c in self._committed() if c.tag == tag), None)
        if same is None or same.digest != digest or self.verify(tag):
            if same is not None and same.digest != digest:
                self._set_aside(tag)  # the same tag from a trajectory the run abandoned: keep it aside
            else:
                self._delete(tag)  # an interrupted upload, or a corrupt far copy of this very checkpoint
            try:
                self._upload(local, tag, manifest, data, marker)
                problems = self.verify(tag)
                if not problems and self._read_small(self._path(tag, MARKER)) != marker:
                    problems = [f"{tag}: far {MARKER} is not the one pushed"]
            except FileNotFoundError as e:
                problems = [f"{tag}: {e.filename or e} disappeared while pushing (local retention?)"]
            except MirrorError as e:
                problems = [str(e)]
            except Exception as e:
                with suppress(Exception):  # best effort: a markerless far directory is ignored anyway
                    self._delete(tag)
                raise MirrorError(f"{tag}: {type(e).__name__}: {e}") from e
            if problems:
                with suppress(Exception):
                    self._delete(tag)
                raise MirrorError("; ".join(problems))
        self._retain(tag, key)

    def _upload(self, local: Path, tag: str, manifest: dict, data: bytes, marker: bytes) -> None:
        made: set[str] = set()
        for rel, want in manifest["files"].items():
            dst = self._path(tag, rel)
            self._makedirs(dst.rsplit("/", 1)[0], made)
            with open(local / rel, "rb") as src, self.fs.open(dst, "wb") as out:
                n, sha = _copy_hashing(src, out, want["size"])
                self._sync(out)
            # checked after the upload (one pass, so the bytes sent are the bytes hashed); the far
            # directory has no marker yet and is removed by the caller
            if (n, sha) != (want["size"], want["sha256"]):
                raise MirrorError(f"{tag}: local {rel} does not match its manifest (corrupt); not mirrored")
        top = Path(self._path(tag))
        self._makedirs(str(top), made)
        for name, blob in ((MANIFEST, data), (MARKER, marker)):  # the marker last: it is the commit
            if name == MARKER and self._local:  # every file and directory entry durable before it
                dirs = {a for d in made for a in (Path(d), *Path(d).parents) if a.is_relative_to(top)}
                for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
                    fsync_dir(d)
            with self.fs.open(self._path(tag, name), "wb") as out:
                out.write(blob)
                self._sync(out)
        if self._local:
            fsync_dir(top)
            fsync_dir(top.parent)

    def _makedirs(self, path: str, made: set[str]) -> None:
        if path not in made:  # object stores ignore it; local and other hierarchical ones need it
            self.fs.makedirs(path, exist_ok=True)
            made.add(path)

    def _sync(self, f: Any) -> None:
        if self._local:
            f.flush()
            os.fsync(f.fileno())

    def _delete(self, tag: str) -> None:
        """Remove a far checkpoint, its marker first: an interrupted delete leaves it uncommitted."""
        with suppress(FileNotFoundError):
            self.fs.rm_file(self._path(tag, MARKER))
            if self._local:
                fsync_dir(Path(self._path(tag)))
        with suppress(FileNotFoundError):
            self.fs.rm(self._path(tag), recursive=True)

    def _set_aside(self, tag: str) -> str:
        """Move far checkpoint ``tag`` to ``superseded/<tag>[.n]``: a rename on a local filesystem,
        else a copy and a delete (object stores cannot rename). Returns the new location."""
        src = self._path(tag)
        dest, n = f"{self.base}/{SUPERSEDED}/{tag}", 1
        while self.fs.exists(dest):
            dest, n = f"{self.base}/{SUPERSEDED}/{tag}.{n}", n + 1
        if self._local:
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
            fsync_dir(Path(self.base))
            fsync_dir(Path(dest).parent)
            return dest
        files = sorted(self.fs.find(src), key=lambda p: p.endswith(f"/{MARKER}"))  # marker last
        made: set[str] = set()
        for f in files:
            rel = safe_rel(f[len(src) + 1:] if f.startswith(f"{src}/") else None, f"far file of {tag}:")
            self._makedirs(f"{dest}/{rel}".rsplit("/", 1)[0], made)
            self.fs.copy(f, f"{dest}/{rel}")
        self._delete(tag)
        return dest

    def _retain(self, pushed: str, key: tuple) -> None:
        """Far checkpoints newer than the one just pushed are from a trajectory the run abandoned
        (it resumed an older checkpoint, whose newer local ones went to superseded/): set them aside
        the same way. Then keep the newest ``keep_last`` including the pushed one."""
        far = self._committed()
        newer = [c.tag for c in far if c.key > key]
        if newer:
            print(f"seqpar: mirror {self.url}: moving {', '.join(newer)} to {SUPERSEDED}/ "
                  f"(newer than {pushed}, which the run produced after resuming an older checkpoint)",
                  file=sys.stderr, flush=True)
        for tag in newer:
            self._set_aside(tag)
        others = [c.tag for c in far if c.key < key and c.tag != pushed]
        for tag in others[:max(len(others) - (self.keep_last - 1), 0)]:
            self._delete(tag)


class AsyncMirror:
    """Pushes in a background thread, at most one at a time. A commit that arrives while a push is
    in flight waits; a newer one replaces it (only the newest is worth the upload). Failures are
    printed at once and kept in ``last_error``; nothing raises into the training loop."""

    def __init__(self, mirror: Mirror):
        self.mirror = mirror
        self.last_error: str | None = None
        self.last_pushed: str | None = None
        self._cv = threading.Condition()
        self._pending: Path | None = None
        self._in_flight: Path | None = None
        self._thread: threading.Thread | None = None

    def submit(self, local: Path) -> None:
        with self._cv:
            self._pending = Path(local)
            if self._thread is None:
                # a daemon: a crash or a preemption exit is not held up by an upload (an interrupted
                # one leaves no marker); call wait() where the push should finish first
                self._thread = threading.Thread(target=self._run, name="seqpar-mirror", daemon=True)
                self._thread.start()

    def protected(self) -> set[str]:
        """Tags being pushed or waiting to be: local retention should keep them until pushed."""
        with self._cv:
            return {p.name for p in (self._in_flight, self._pending) if p is not None}

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no push is in flight or pending; False if ``timeout`` passed first."""
        with self._cv:
            return self._cv.wait_for(lambda: self._thread is None, timeout)

    def close(self, timeout: float | None = None) -> bool:
        return self.wait(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._in_flight, self._pending = self._pending, None
                if self._in_flight is None:
                    self._thread = None
                    self._cv.notify_all()
                    return
                local = self._in_flight
            try:
                self.mirror.push(local)
                self.last_pushed = local.name
            except BaseException as e:  # reported, never raised: the local checkpoint is what counts
                msg = " ".join(f"{type(e).__name__}: {e}".split())
                self.last_error = f"mirror push of {local.name} to {self.mirror.url} failed: {msg}"
                print(f"seqpar: {self.last_error}", file=sys.stderr, flush=True)
