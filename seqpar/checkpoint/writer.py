"""Background checkpoint writing: snapshot now, write later, at most one write in flight.

``save`` takes a snapshot of this rank's state on the calling thread (one copy of each tensor into
host memory, pinned on GPU, so training can go on changing the originals), then a worker thread
writes it to files, hashing each file while writing it (``hashio``), and drops a ``DONE`` record in
the rank's directory. Rank 0's worker waits for every rank's record, then commits
(``CheckpointStore.commit``) and applies retention. No collective runs off the main thread: ranks
meet through the shared filesystem.

Failures are loud: the worker prints the error at once, retries its own files once, and on a second
failure leaves a ``FAILED`` record (so rank 0 stops waiting for that rank) and sets ``failure``,
which the training loop puts into its per-micro-batch agreement: every rank learns of it within
one micro-batch and acts on ``checkpoint.on_write_error``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from seqpar.checkpoint import hashio
from seqpar.checkpoint.codec import encode
from seqpar.checkpoint.store import CheckpointStore, describe_files, fsync_dirs_under, make_dirs

DONE = "DONE.json"
FAILED = "FAILED.json"
WRITE_THREADS = 2  # files written (and hashed) at once per rank


def rank_dir(rank: int) -> str:
    return f"rank{rank:05d}"


class WriteFailed(RuntimeError):
    """A checkpoint could not be written (on some rank), even after a retry."""


def host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """One copy of ``t`` into (pinned, on GPU) host memory: the snapshot training may not touch."""
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
    out.copy_(t.detach(), non_blocking=pin)
    return out


@dataclass
class Snapshot:
    """One rank's state to write: {relative file stem: (skeleton, tensors)}, raw files, jobs.

    Tensors that training changes at the next micro-batch (partial gradients, RNG, counters) are
    copied when the snapshot is taken, on the training thread. Tensors that change only at the
    next optimizer step (fp32 master, Adam moments, weights: ``deferred``) are copied by the
    writer thread instead, while training goes on; the trainer waits for that copy
    (``CheckpointWriter.wait_deferred``) before its next optimizer step, so a save blocks training
    for the small part only. Every tensor is copied exactly once either way.
    """

    parts: dict[str, tuple[Any, dict[str, torch.Tensor]]] = field(default_factory=dict)
    raw: dict[str, bytes] = field(default_factory=dict)  # extra files written verbatim
    # write files under a dir (with this mode): {file: its record, or None to hash it by reading}
    jobs: list[Callable[[Path, int], dict[Path, "hashio.FileRecord | None"]]] = field(default_factory=list)
    # {name: tensors} still live (the deferred parts' tensors, and the jobs' tensor dicts)
    live: list[dict[str, torch.Tensor]] = field(default_factory=list)
    pin: bool = False

    @staticmethod
    def take(trees: dict[str, Any], pin: bool, deferred: dict[str, Any] | None = None,
             deferred_tensors: list[dict[str, torch.Tensor]] | None = None) -> "Snapshot":
        """Copy ``trees`` now; encode ``deferred`` trees (and keep ``deferred_tensors`` dicts)
        without copying: ``materialize`` copies them, in place."""
        snap = Snapshot(pin=pin)
        for name, tree in trees.items():
            snap.parts[name] = encode(tree, copy=lambda t: host_copy(t, pin))
        if pin:
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        for name, tree in (deferred or {}).items():
            snap.parts[name] = encode(tree, copy=lambda t: t.detach())
            snap.live.append(snap.parts[name][1])
        snap.live.extend(deferred_tensors or [])
        return snap

    def materialize(self) -> None:
        """Copy the still-live tensors into host memory (the writer thread, before writing). On
        GPU on a stream of its own, so the training thread's kernels go on meanwhile."""
        stream = torch.cuda.Stream() if self.pin and torch.cuda.is_available() else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for tensors in self.live:
                for k, t in tensors.items():
                    tensors[k] = host_copy(t, self.pin)
        if stream is not None:
            stream.synchronize()
        self.live = []


def _injected_failures() -> tuple[int, int, int] | None:
    """``SEQPAR_INJECT_WRITE_ERROR=rank:errno:count`` (tests, drills): the next ``count`` file
    writes of that rank fail with that errno, as a full or failing disk would."""
    spec = os.environ.get("SEQPAR_INJECT_WRITE_ERROR")
    if not spec:
        return None
    rank, err, count = (int(x) for x in spec.split(":"))
    return rank, err, count


class CheckpointWriter:
    def __init__(self, store: CheckpointStore, rank: int, world: int, background: bool,
                 commit_timeout_s: float = 3600.0, on_commit: Callable[[Path], None] | None = None,
                 mode: int = 0o600):
        self.store, self.rank, self.world = store, rank, world
        self.background = background
        self.commit_timeout_s = commit_timeout_s
        self.on_commit = on_commit
        self.mode = mode
        self._thread: threading.Thread | None = None
        self._own_done = threading.Event()  # this rank's files of the write in flight are settled
        self._own_done.set()
        self._abort = threading.Event()
        self._deferred_done = threading.Event()  # the snapshot's deferred tensors are copied
        self._deferred_done.set()
        self.deferred_wait_s = 0.0  # training time spent in wait_deferred (for logs and benchmarks)
        self.failure: str | None = None  # set by the worker the moment a write finally fails
        self.last_committed: Path | None = None
        # time.perf_counter() when the last write was submitted, its own files written, committed
        # (rank 0) and re-verified by retention: for logs and scripts/bench_checkpoint.py
        self.timings: dict[str, float] = {}
        inj = _injected_failures()
        self._inject = inj[1:] if inj and inj[0] == rank else None
        self._inject_lock = threading.Lock()

    # -- called by the training thread --------------------------------------------------------------
    def failed(self) -> bool:
        return self.failure is not None

    def wait_deferred(self) -> None:
        """Before an optimizer step: until the write in flight has copied the tensors the step
        changes (see ``Snapshot``)."""
        if not self._deferred_done.is_set():
            t0 = time.perf_counter()
            self._deferred_done.wait()
            self.deferred_wait_s += time.perf_counter() - t0

    def wait_own(self) -> None:
        """Until this rank's own files of the write in flight are written (or failed); rank 0 may
        still be waiting for the others and committing."""
        self._own_done.wait()

    def wait(self) -> float:
        """Block until the write in flight (and, on rank 0, its commit) is settled; returns seconds
        waited. Never raises: see ``failure``."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return time.perf_counter() - t0

    def abort(self) -> None:
        """Another rank failed: rank 0 stops waiting for its records (collectively agreed)."""
        self._abort.set()

    def clear(self) -> None:
        """After a failure was agreed and reported, with checkpoint.on_write_error: warn."""
        self.wait()
        self.failure = None
        self._abort.clear()

    def submit(self, tag: str, snapshot: Snapshot, meta: dict) -> None:
        """Write ``snapshot`` into the partial directory of ``tag`` (which rank 0 created)."""
        self.wait()
        self._own_done.clear()
        self.timings = {"submitted": time.perf_counter()}
        if snapshot.live:
            self._deferred_done.clear()
        if self.background:
            self._thread = threading.Thread(target=self._run, args=(tag, snapshot, meta), name="seqpar-ckpt",
                                            daemon=True)
            self._thread.start()
        else:
            self._run(tag, snapshot, meta)

    # -- the worker ---------------------------------------------------------------------------------
    def _run(self, tag: str, snapshot: Snapshot, meta: dict) -> None:
        try:
            # a synchronous write blocks training, so it may write the live tensors themselves (on
            # CPU: no copy at all); a background one copies them before the next optimizer step
            live_ok = not self.background and not snapshot.pin
            copied = live_ok or self._attempt(snapshot.materialize, tag, "copying its state to host memory",
                                              retry=False)
            self._deferred_done.set()  # training may step now (also after a failure: it is reported)
            if not copied or not self._attempt(lambda: self._write(tag, snapshot), tag, "writing its files"):
                self._own_done.set()
                self._mark_failed(tag)
                return
            self._own_done.set()
            self.timings["written"] = time.perf_counter()
            if self.rank != 0:
                return
            files: dict[str, dict] = {}
            if not self._attempt(lambda: files.update(self._gather(tag)), tag, "waiting for the other ranks",
                                 retry=False):
                return
            if not self._attempt(lambda: self._commit(tag, files, meta), tag, "committing"):
                return
            self.timings["committed"] = time.perf_counter()
            if self.on_commit is not None:  # retention: re-verifies the new checkpoint first
                self._attempt(lambda: self.on_commit(self.last_committed), tag, "verifying after commit",
                              retry=False)
                self.timings["retained"] = time.perf_counter()
        finally:
            self._deferred_done.set()
            self._own_done.set()

    def _attempt(self, fn: Callable[[], None], tag: str, what: str, retry: bool = True) -> bool:
        """Run ``fn``, once more after an OSError (``retry``); report at once. True on success."""
        for attempt in (1, 2):
            try:
                fn()
                return True
            except BaseException as e:  # noqa: BLE001 - reported, agreed, and acted on by the loop
                msg = f"rank {self.rank}: checkpoint {tag} failed while {what}: {type(e).__name__}: {e}"
                again = retry and attempt == 1 and isinstance(e, OSError) and not self._abort.is_set()
                print(f"seqpar: {msg}" + ("; retrying once" if again else ""), file=sys.stderr, flush=True)
                if not again:
                    self.failure = msg
                    return False
        return False

    def _open_fault(self) -> None:
        with self._inject_lock:  # files are written on several threads
            if not (self._inject and self._inject[1] > 0):
                return
            err, left = self._inject
            self._inject = (err, left - 1)
        raise OSError(err, os.strerror(err) + " (injected by SEQPAR_INJECT_WRITE_ERROR)")

    def _write(self, tag: str, snapshot: Snapshot) -> None:
        part = self.store.partial_dir(tag)
        mine = part / rank_dir(self.rank)
        described: dict[str, dict] = {}

        def record(path: Path, rec: hashio.FileRecord) -> None:
            described[path.relative_to(part).as_posix()] = {"size": rec.size, "sha256": rec.sha256}

        def fresh(path: Path) -> Path:  # a retry starts over
            make_dirs(path.parent)
            if path.exists():
                path.unlink()
            self._open_fault()
            return path

        def tensors_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
            record(path, hashio.write_safetensors(fresh(path), tensors, mode=self.mode))

        def job_files(job: Callable) -> None:  # writes files through another library (the HF layout)
            self._open_fault()
            for path, rec in job(part, self.mode).items():
                if rec is None:  # small files it wrote itself: hashed by reading back
                    os.chmod(path, self.mode)
                    described.update(describe_files(part, [path]))
                else:
                    record(path, rec)

        big: list[tuple[int, Callable[[], None]]] = []  # (bytes, write it)
        for name, (skeleton, tensors) in snapshot.parts.items():
            stem = part / name
            js = fresh(stem.with_suffix(".json"))
            record(js, hashio.write_bytes(js, json.dumps(skeleton).encode(), mode=self.mode))
            if tensors:
                size = sum(t.numel() * t.element_size() for t in tensors.values())
                big.append((size, lambda p=stem.with_suffix(".safetensors"), t=tensors: tensors_file(p, t)))
        for name, data in snapshot.raw.items():
            record(part / name, hashio.write_bytes(fresh(part / name), data, mode=self.mode))
        big += [(1 << 62, lambda j=job: job_files(j)) for job in snapshot.jobs]
        # Large files on WRITE_THREADS threads, largest first: sha256 runs at about one disk's
        # speed per core, so hashing two files at once keeps up with the disk.
        with ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="seqpar-ckpt-file") as pool:
            for done in [pool.submit(fn) for _, fn in sorted(big, key=lambda b: -b[0])]:
                done.result()
        make_dirs(mine)
        for d in {mine, *(part / n.split("/")[0] for n in described if "/" in n)}:
            if d.is_dir():
                fsync_dirs_under(d)  # the entries of new files and directories are durable too
        done = mine / DONE
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(described))
        tmp.replace(done)  # appears whole or not at all

    def _mark_failed(self, tag: str) -> None:
        """Tell rank 0 not to wait for this rank (best effort: the disk may be full)."""
        try:
            d = self.store.partial_dir(tag) / rank_dir(self.rank)
            make_dirs(d)
            (d / FAILED).write_text(json.dumps({"error": self.failure}))
        except OSError:
            pass  # the loop's agreement still tells rank 0 within one micro-batch

    def _gather(self, tag: str) -> dict[str, dict]:
        """Rank 0: every rank's DONE record (the files it wrote, with sizes and hashes)."""
        part = self.store.partial_dir(tag)
        deadline = time.time() + self.commit_timeout_s
        dirs = [part / rank_dir(r) for r in range(self.world)]
        while not all((d / DONE).is_file() for d in dirs):
            failed = [d.name for d in dirs if (d / FAILED).is_file()]
            if failed or self._abort.is_set():
                raise WriteFailed(f"not committed: {', '.join(failed) or 'another rank'} could not write its files")
            if time.time() > deadline:
                missing = [d.name for d in dirs if not (d / DONE).is_file()]
                raise WriteFailed(f"not committed: {missing} did not finish writing in {self.commit_timeout_s:.0f} s")
            time.sleep(0.05)
        files: dict[str, dict] = {}
        for d in dirs:
            files.update(json.loads((d / DONE).read_text()))
        for d in dirs:
            (d / DONE).unlink()  # the manifest must list every file of the checkpoint
        return files

    def _commit(self, tag: str, files: dict[str, dict], meta: dict) -> None:
        self.last_committed = self.store.commit(tag, files, meta)
