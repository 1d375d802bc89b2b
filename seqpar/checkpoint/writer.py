"""Background checkpoint writing: snapshot now, write later, at most one write in flight.

``save`` takes a snapshot of this rank's state on the calling thread (tensors copied to host
memory, pinned on GPU, so training can go on changing the originals), then a worker thread encodes
it to files, fsyncs and hashes them, and drops a ``DONE`` record in the rank's directory. Rank 0's
worker waits for every rank's record, then commits (``CheckpointStore.commit``) and applies
retention. No collective runs off the main thread: ranks meet through the shared filesystem.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from seqpar.checkpoint.codec import encode
from seqpar.checkpoint.store import CheckpointStore, describe_files

DONE = "DONE.json"


def rank_dir(rank: int) -> str:
    return f"rank{rank:05d}"


@dataclass
class Snapshot:
    """Encoded host copies of one rank's trees: {relative file stem: (skeleton, tensors)}."""

    parts: dict[str, tuple[Any, dict[str, torch.Tensor]]] = field(default_factory=dict)
    raw: dict[str, bytes] = field(default_factory=dict)  # extra files written verbatim
    jobs: list[Callable[[Path], list[Path]]] = field(default_factory=list)  # write files under a dir

    @staticmethod
    def take(trees: dict[str, Any], pin: bool) -> "Snapshot":
        snap = Snapshot()
        for name, tree in trees.items():
            skeleton, tensors = encode(tree)
            if pin:
                tensors = {k: t.pin_memory() for k, t in tensors.items()}
            snap.parts[name] = (skeleton, tensors)
        return snap


class CheckpointWriter:
    def __init__(self, store: CheckpointStore, rank: int, world: int, background: bool,
                 commit_timeout_s: float = 3600.0, on_commit: Callable[[Path], None] | None = None):
        self.store, self.rank, self.world = store, rank, world
        self.background = background
        self.commit_timeout_s = commit_timeout_s
        self.on_commit = on_commit
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_committed: Path | None = None

    def wait(self) -> float:
        """Block until the write in flight (and, on rank 0, its commit) is done; returns seconds waited."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError("checkpoint write failed") from err
        return time.perf_counter() - t0

    def submit(self, tag: str, snapshot: Snapshot, meta: dict) -> None:
        """Write ``snapshot`` into the partial directory of ``tag`` (which rank 0 created)."""
        self.wait()
        if self.background:
            self._thread = threading.Thread(target=self._run, args=(tag, snapshot, meta), name="seqpar-ckpt")
            self._thread.start()
        else:
            self._write(tag, snapshot, meta)

    def _run(self, tag: str, snapshot: Snapshot, meta: dict) -> None:
        try:
            self._write(tag, snapshot, meta)
        except BaseException as e:  # surfaced by the next wait()
            self._error = e

    def _write(self, tag: str, snapshot: Snapshot, meta: dict) -> None:
        part = self.store.partial_dir(tag)
        files: list[Path] = []
        for name, (skeleton, tensors) in snapshot.parts.items():
            stem = part / name
            stem.parent.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".json").write_text(json.dumps(skeleton))
            files.append(stem.with_suffix(".json"))
            if tensors:
                save_file(tensors, str(stem.with_suffix(".safetensors")))
                files.append(stem.with_suffix(".safetensors"))
        for name, data in snapshot.raw.items():
            (part / name).parent.mkdir(parents=True, exist_ok=True)
            (part / name).write_bytes(data)
            files.append(part / name)
        for job in snapshot.jobs:
            files.extend(job(part))
        described = describe_files(part, files)
        done = part / rank_dir(self.rank) / DONE
        done.parent.mkdir(parents=True, exist_ok=True)
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(described))
        tmp.replace(done)  # appears whole or not at all
        if self.rank == 0:
            self._commit(tag, meta)

    def _commit(self, tag: str, meta: dict) -> None:
        part = self.store.partial_dir(tag)
        deadline = time.time() + self.commit_timeout_s
        records = [part / rank_dir(r) / DONE for r in range(self.world)]
        while not all(r.is_file() for r in records):
            if time.time() > deadline:
                missing = [r.parent.name for r in records if not r.is_file()]
                raise TimeoutError(f"checkpoint {tag}: ranks {missing} did not finish writing")
            time.sleep(0.05)
        files: dict[str, dict] = {}
        for r in records:
            files.update(json.loads(r.read_text()))
            r.unlink()
        self.last_committed = self.store.commit(tag, files, meta)
        if self.on_commit is not None:
            self.on_commit(self.last_committed)
