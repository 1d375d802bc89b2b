"""Checkpoint directory layout, commit protocol, verification, retention.

    <dir>/
      latest                              name of the newest committed checkpoint (a hint)
      step00000012-micro0003/             one checkpoint (docs/checkpoint-format.md)
        manifest.json                     every file: size + sha256
        COMMITTED                         written last; holds the manifest's sha256
        ...
      .partial-step00000013-micro0000/    being written; ignored and removed if left behind
      superseded/                         newer checkpoints a resume skipped (corrupt or refused),
                                          moved aside so the resumed run can write their tags again

Commit: all ranks write into the ``.partial-`` directory and report their files' sizes and
hashes; after every rank is done, rank 0 writes the manifest and the COMMITTED marker, fsyncs,
renames the directory to its final name (atomic), then replaces ``latest`` (atomic). A kill at
any instant leaves either the previous state or a complete new checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MARKER = "COMMITTED"
LATEST = "latest"
PARTIAL_PREFIX = ".partial-"
SUPERSEDED = "superseded"
_TAG = re.compile(r"^step(\d{8})-micro(\d{4})$")


def tag_for(step: int, micro_step: int) -> str:
    return f"step{step:08d}-micro{micro_step:04d}"


def parse_tag(tag: str) -> tuple[int, int] | None:
    m = _TAG.match(tag)
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
    fsync_file(path)  # a directory fd can be fsynced on Linux; makes renames durable


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
    micro_step: int

    def __str__(self) -> str:
        return self.tag


class CheckpointStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    # -- writing ----------------------------------------------------------------------------------
    def partial_dir(self, tag: str) -> Path:
        return self.root / f"{PARTIAL_PREFIX}{tag}"

    def final_dir(self, tag: str) -> Path:
        return self.root / tag

    def begin(self, tag: str) -> Path:
        """Fresh partial directory for ``tag`` (rank 0, before the others write)."""
        if self.final_dir(tag).exists():
            raise FileExistsError(f"checkpoint {self.final_dir(tag)} already exists; refusing to overwrite it")
        part = self.partial_dir(tag)
        if part.exists():
            shutil.rmtree(part)
        part.mkdir(parents=True)
        return part

    def commit(self, tag: str, files: dict[str, dict], meta: dict) -> Path:
        """Rank 0, after every rank wrote and described its files: manifest, marker, rename, latest."""
        part = self.partial_dir(tag)
        manifest = {"format_version": FORMAT_VERSION, "tag": tag, "created": time.time(), **meta,
                    "files": dict(sorted(files.items()))}
        (part / MANIFEST).write_text(json.dumps(manifest, indent=1))
        fsync_file(part / MANIFEST)
        (part / MARKER).write_text(sha256_file(part / MANIFEST) + "\n")
        fsync_file(part / MARKER)
        fsync_dir(part)
        final = self.final_dir(tag)
        os.replace(part, final)
        fsync_dir(self.root)
        tmp = self.root / f"{LATEST}.tmp"
        tmp.write_text(tag + "\n")
        fsync_file(tmp)
        os.replace(tmp, self.root / LATEST)
        fsync_dir(self.root)
        return final

    # -- reading ----------------------------------------------------------------------------------
    def list(self) -> list[CheckpointInfo]:
        """Checkpoint directories by (step, micro_step), oldest first; includes uncommitted ones
        only if they have a final name (use ``verify`` to know)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            parsed = parse_tag(p.name)
            if p.is_dir() and parsed:
                out.append(CheckpointInfo(p.name, p, *parsed))
        return sorted(out, key=lambda c: (c.step, c.micro_step))

    def latest_hint(self) -> str | None:
        f = self.root / LATEST
        return f.read_text().strip() if f.is_file() else None

    def verify(self, path: Path, check_hashes: bool = True) -> list[str]:
        """Problems of one checkpoint (empty list = verified); see ``verify.verify_checkpoint``."""
        from seqpar.checkpoint.verify import verify_checkpoint

        return verify_checkpoint(Path(path), check_hashes)

    def manifest(self, path: Path) -> dict:
        return json.loads((Path(path) / MANIFEST).read_text())

    # -- housekeeping -----------------------------------------------------------------------------
    def remove_partials(self) -> list[Path]:
        """Delete leftovers of interrupted writes (rank 0, when no write is in flight)."""
        gone = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(PARTIAL_PREFIX) or p.name == f"{LATEST}.tmp":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    gone.append(p)
        return gone

    def set_aside_newer(self, resumed: str) -> list[Path]:
        """Move checkpoints newer than ``resumed`` (corrupt, or refused for this run) into
        ``superseded/``: the resumed run will write those tags again, and nothing is overwritten or
        deleted. Rank 0, before training starts. Returns the new paths."""
        cut = parse_tag(resumed)
        moved = []
        for c in self.list():
            if cut is not None and (c.step, c.micro_step) > cut:
                dest = self.root / SUPERSEDED / c.tag
                n = 1
                while dest.exists():
                    dest, n = self.root / SUPERSEDED / f"{c.tag}.{n}", n + 1
                dest.parent.mkdir(exist_ok=True)
                os.replace(c.path, dest)
                moved.append(dest)
        if moved:
            fsync_dir(self.root)
        return moved

    def retain(self, keep_last: int, protect: set[str]) -> list[Path]:
        """Keep the newest ``keep_last`` committed checkpoints plus ``protect``; delete older ones.

        The newest committed checkpoint is never deleted, whatever ``keep_last`` says. Uncommitted
        checkpoint directories (renamed but marker missing cannot happen; a corrupt one can) are
        left for the operator.
        """
        committed = [c for c in self.list() if (c.path / MARKER).is_file()]
        keep = {c.tag for c in committed[-max(keep_last, 1):]} | protect
        gone = []
        for c in committed:
            if c.tag not in keep:
                shutil.rmtree(c.path)
                gone.append(c.path)
        return gone
