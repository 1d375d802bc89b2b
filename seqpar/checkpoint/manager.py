"""When to save, which checkpoint to resume from, and whether a config may resume it.

The manager knows nothing of what the trees it saves contain: the trainer hands it named trees
(per rank, and rank-0-only ones) and gets the same names back on resume.
"""

from __future__ import annotations

import fnmatch
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml

from seqpar.checkpoint.codec import load_tree
from seqpar.checkpoint.mirror import AsyncMirror, Mirror, MirrorError
from seqpar.checkpoint.store import CheckpointStore, DirLockedError, Position, sha256_file
from seqpar.checkpoint.verify import NotACheckpoint, UnsafePath, resolve_checkpoints, safe_member
from seqpar.checkpoint.writer import CheckpointWriter, Snapshot, WriteFailed, rank_dir
from seqpar.config import CheckpointConfig
from seqpar.errors import UserError

# Keys that describe the resume itself.
RESUME_KEYS = ("checkpoint.resume", "checkpoint.allow_changes")
# Keys that never change what is computed: accepted silently (reported in the resume line).
NEUTRAL_CHANGES = ("logging.*", "checkpoint.*", "data.passkey.eval_samples", "data.cache_dir",
                   "parallel.zero3_init", "train.galore.shard_state", "train.max_skipped_steps",
                   # held-out evaluation only reads the weights (tests/test_evaluation.py: bitwise the same training)
                   "train.eval_every", "train.eval_samples", "train.eval_by_position", "data.eval_paths",
                   "data.eval_per_file")
# Deliberate changes a resumed run may make, each only when named in checkpoint.allow_changes
# (e.g. extending a run: train.max_steps also stretches the LR decay). Anything else is refused.
SAFE_CHANGES = ("train.max_steps", "train.lr", "train.min_lr_ratio", "train.decay", "train.warmup_steps",
                "train.cooldown_ratio", "train.epochs")
# How the computation is laid out on ranks. Accepted here: the trainer compares the saved and
# current layouts themselves and allows a change only as an elastic resume (the same global
# batch, checkpoint.elastic on; mid-window: a window position the new micro-steps can continue).
LAYOUT_CHANGES = ("parallel.zero_stage", "parallel.ulysses_degree", "parallel.ring_degree", "parallel.backend",
                  "train.micro_batch_size", "train.grad_accum_steps", "train.global_batch_size",
                  "memory.offload_optimizer", "memory.offload_params", "parallel.expert_degree")
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.yaml"


class ResumeError(UserError, RuntimeError):
    """This run cannot resume what was asked (or found); the message says why and what to do."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    a, b = _flatten(saved), _flatten(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resume_config(saved: dict, current: dict, allowed: list[str], saved_step: int | None = None) -> list[str]:
    """Raise ``ResumeError`` listing refused changes (one line); return the allowed ones (for the
    log). ``saved_step``: the checkpoint's optimizer steps (a max_steps at or below it is no
    extension: the run would just be over)."""
    refused, accepted = [], []
    fresh = "to start over: --resume none or a new logging.run_dir"
    if any(fnmatch.fnmatch("train.epochs", pat) for pat in allowed):
        allowed = [*allowed, "train.max_steps"]  # set by train.epochs: allowing one allows the other
    for key, old, new in config_changes(saved, current):
        if key in RESUME_KEYS:
            continue
        safe = any(fnmatch.fnmatch(key, pat) for pat in SAFE_CHANGES)
        line = f"{key}: {old!r} -> {new!r}"
        if any(fnmatch.fnmatch(key, pat) for pat in NEUTRAL_CHANGES) or key in LAYOUT_CHANGES:
            accepted.append(line)
        elif safe and any(fnmatch.fnmatch(key, pat) for pat in allowed):
            accepted.append(line)
        elif key == "train.max_steps" and saved_step is not None and isinstance(new, int) and new <= saved_step:
            refused.append(f"{line} (the checkpoint is already at step {saved_step}; {fresh})")
        elif safe:
            refused.append(f"{line} (to change this run: --checkpoint.allow_changes '[{key}]'; {fresh})")
        elif key in ("data.seq_len", "model.rope_theta", "model.max_position_embeddings") or key.startswith(
                "model.rope_scaling"):
            refused.append(f"{line} (changes what training computes; to extend the context in a new stage, "
                           f"export this run's checkpoint (python -m seqpar.ckpt export) and start a new run "
                           f"from it with model.hf_path and a new logging.run_dir; --resume none would start "
                           f"over from the original weights)")
        else:
            refused.append(f"{line} (changes what training computes; {fresh})")
    if refused:
        raise ResumeError("the config differs from the checkpoint's: " + "; ".join(refused))
    return accepted


def _clock() -> float:
    """Seconds for ``checkpoint.every_minutes`` (a function of its own: tests move it)."""
    return time.monotonic()


def _collect(value: Any) -> list[Any]:
    """Every rank's ``value`` (collective; [value] without a process group)."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def from_rank0(value: Any, group: Any = None) -> Any:
    """Rank 0's ``value`` on every rank (collective over ``group``, default: all ranks)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, run_dir: Path, rank: int, world: int, pin: bool):
        self.cfg = cfg
        self.store = CheckpointStore(cfg.dir or Path(run_dir) / "checkpoints", mode=int(cfg.file_mode, 8))
        self.rank, self.world, self.pin = rank, world, pin
        self.resumed_from: str | None = None
        self.writer = CheckpointWriter(self.store, rank, world, cfg.async_write, on_commit=self._retain,
                                       mode=self.store.mode)
        self.last_block_s = 0.0
        self._since_save = _clock()  # checkpoint.every_minutes counts from here (restart_clock: training starts)
        # off-node copies (rank 0): fsspec is imported only when a mirror is configured
        self.mirror = AsyncMirror(self._far()) if cfg.mirror and rank == 0 else None

    def _far(self) -> Mirror:
        return Mirror(self.cfg.mirror, self.cfg.mirror_keep_last or self.cfg.keep_last)

    def lock(self, log: Callable[[str], None] = print) -> None:
        """Collective: rank 0 takes the checkpoint directory's lock (waiting ``lock_wait_s`` for a
        job being replaced); if another job holds it, every rank raises ``DirLockedError``."""
        error = None
        if self.rank == 0:
            try:
                self.store.lock(self.cfg.lock_wait_s, log)
            except DirLockedError as e:
                error = str(e)
        if (error := from_rank0(error)) is not None:
            raise DirLockedError(error)

    # -- saving -----------------------------------------------------------------------------------
    def restart_clock(self) -> None:
        """``checkpoint.every_minutes`` counts from now (training starts, or a save was handed off)."""
        self._since_save = _clock()

    def interval_elapsed(self) -> bool:
        """This rank's clock says a ``checkpoint.every_minutes`` save is due (ranks agree on it in
        ``StopSignal.agree``)."""
        return bool(self.cfg.every_minutes) and _clock() - self._since_save >= 60 * self.cfg.every_minutes

    def due(self, step: int, micro_step: int, micro_batches_done: int) -> bool:
        c = self.cfg
        if c.every_micro_batches and micro_batches_done % c.every_micro_batches == 0:
            return True
        return bool(c.every_steps) and micro_step == 0 and step % c.every_steps == 0

    def agreed_failure(self) -> str | None:
        """Collective: the failures of the write in flight on any rank (one line each), or None."""
        failures = [f for f in _collect(self.writer.failure) if f]
        return "\n".join(failures) if failures else None

    def save(self, pos: Position, rank_trees: dict[str, Any], rank0_raw: dict[str, bytes],
             jobs: list, meta: dict, deferred: dict[str, Any] | None = None,
             deferred_tensors: list[dict[str, Any]] | None = None) -> str:
        """Collective: every rank calls it at the same micro-batch boundary. ``rank_trees`` (and
        ``deferred`` trees, which change only at the next optimizer step: see ``Snapshot``) go to
        this rank's directory; ``rank0_raw`` files (rank 0 only) and ``jobs`` (writing the live
        ``deferred_tensors`` dicts) to the top level. Raises ``WriteFailed`` on every rank if the
        previous write failed on any."""
        t0 = time.perf_counter()
        self.writer.wait_own()  # at most one write in flight
        if (failure := self.agreed_failure()) is not None:
            self.writer.abort()
            self.writer.wait()
            raise WriteFailed(failure)
        self.writer.wait()  # rank 0: the previous commit (every rank's files are there now)
        tag = pos.tag
        error = None
        if self.rank == 0:
            try:
                self.store.remove_partials()
                self.store.begin(tag)
            except OSError as e:
                error = f"rank 0: checkpoint {tag} could not be started: {type(e).__name__}: {e}"
        if (error := from_rank0(error)) is not None:  # also the barrier before any rank writes
            raise WriteFailed(error)
        mine = f"{rank_dir(self.rank)}/"
        snap = Snapshot.take({mine + k: v for k, v in rank_trees.items()}, self.pin,
                             {mine + k: v for k, v in (deferred or {}).items()}, deferred_tensors)
        if self.rank == 0:
            snap.raw.update(rank0_raw)
        snap.jobs.extend(jobs)
        self.writer.submit(tag, snap, {**meta, "position": pos.as_dict()})
        self.last_block_s = time.perf_counter() - t0
        self.restart_clock()
        return tag

    def settle(self) -> None:
        """Collective: wait for the write in flight to be committed; ``WriteFailed`` on every rank
        if it failed on any. A preemption save calls it so that no rank exits before the commit."""
        self.writer.wait_own()
        failure = self.agreed_failure()  # a rank could not write its files
        if failure is not None:
            self.writer.abort()
        self.writer.wait()
        failure = failure or from_rank0(self.writer.failure if self.rank == 0 else None)  # or commit
        if failure is not None:
            raise WriteFailed(failure)

    def finish(self, mirror_wait_s: float | None = None) -> float:
        """Wait for the write in flight (not collective: also on the way out of an exception), and
        up to ``mirror_wait_s`` for the mirror's upload (None: until done)."""
        waited = self.writer.wait()
        if self.mirror is not None:
            self.mirror.close(timeout=mirror_wait_s)
        return waited

    def _retain(self, committed: Path) -> None:
        """After each commit (writer thread): retention, then the copy to the mirror."""
        protect = {self.resumed_from} if self.resumed_from else set()
        if self.mirror is not None:
            protect |= self.mirror.protected()  # a checkpoint being uploaded is not deleted under it
        self.store.retain(self.cfg.keep_last, protect, committed_now=committed, keep_best=self.cfg.keep_best)
        if self.mirror is not None:
            self.mirror.submit(committed)

    # -- resuming ---------------------------------------------------------------------------------
    def find_resume(self, spec: str, refuse: Callable[[Path], str | None] = lambda p: None,
                    reads: Callable[[Path], Callable[[str], bool]] = lambda p: (lambda rel: True),
                    log: Callable[[str], None] = print, from_mirror: bool = False) -> Path | None:
        """Collective: the checkpoint every rank resumes, decided once for all of them.

        ``auto``: the checkpoint with the most training that verifies and that ``refuse`` does not
        refuse (older ones if the newest is corrupt), or None when there is none; ``none``: None
        (checkpoints already in the directory are moved to ``superseded/`` so two runs never mix);
        else the given path, which must verify. With ``checkpoint.mirror``, ``auto`` fetches the
        newest checkpoint of the mirror when none here is usable. Rank 0 proposes candidates (structure, marker,
        ``refuse``); then every rank hashes only the files it will read (``reads(path)(relative
        name)``) and all agree: a corrupt file anywhere makes every rank fall back together; a file
        a rank cannot read makes every rank fail with one message."""
        if spec == "none":
            if self.rank == 0 and (moved := self.store.set_aside_all()):
                log(f"--resume none: the {len(moved)} checkpoint(s) already in {self.store.root} were moved to "
                    f"{moved[0].parent} (kept, not resumed)")
            from_rank0(None)  # barrier: moved before anyone lists
            return None
        explicit = spec != "auto"
        # rank 0 lists: every rank considers the same candidates in the same order
        candidates, error = from_rank0(self._candidates(spec, log) if self.rank == 0 else None)
        if error:
            raise ResumeError(error)
        refused: list[str] = []
        for path in candidates:
            problems: list[str] = []
            why = None
            if self.rank == 0:
                problems = (self.store.verify(path, check_hashes=False) if path.is_dir()
                            else [f"{path} is not a directory"])
                if not problems and (why := refuse(path)):
                    refused.append(f"{path.name}: {why}")  # this run may not use it (rank 0's list)
                    problems = [why]
            problems, why = from_rank0((problems, why))
            if not problems:
                problems, unreadable = self._hash_my_files(path, reads(path))
                unreadable = [u for u in _collect(unreadable) if u]
                if unreadable:
                    raise ResumeError(f"cannot read checkpoint {path}: " + "; ".join(unreadable[:4])
                                      + " (fix the filesystem or move the checkpoint aside, then resume again)")
                problems = sum(_collect(problems), [])
            if not problems:
                if refused and self.rank == 0:
                    log(f"resuming the older checkpoint {path.name} (newer ones refused above)")
                return path
            if explicit:
                raise ResumeError(f"cannot resume from {path}:\n  " + "\n  ".join(problems))
            if self.rank == 0:
                warnings.warn(f"cannot resume checkpoint {path}: {why}; trying an older one" if why else
                              f"checkpoint {path} does not verify ({'; '.join(problems[:3])}); trying an older one",
                              stacklevel=2)
        if refused := from_rank0(refused):  # checkpoints exist but this run may not use them: no fresh start
            raise ResumeError("no checkpoint this run can resume:\n  " + "\n  ".join(refused)
                              + "\n(start a new run with --checkpoint.resume none and another checkpoint.dir)")
        if not explicit and self.cfg.mirror and not from_mirror:
            # nothing usable here (a new node after losing the old one): bring the newest from the mirror
            fetched, error = None, None
            if self.rank == 0:
                try:
                    fetched = self._far().fetch_newest(self.store.root, mode=self.store.mode)
                except MirrorError as e:
                    error = f"no local checkpoint verifies, and the mirror {self.cfg.mirror} failed: {e}"
                if fetched:
                    log(f"no usable local checkpoint: fetched {fetched.name} from the mirror {self.cfg.mirror}")
            fetched, error = from_rank0((fetched, error))
            if error:
                raise ResumeError(error)
            if fetched:
                return self.find_resume(spec, refuse, reads, log, from_mirror=True)
        return None

    def _candidates(self, spec: str, log: Callable[[str], None]) -> tuple[list[Path], str | None]:
        """Rank 0: the checkpoints to try, newest first, or why ``spec`` names none. An explicit
        path may be one checkpoint, a ``latest`` file, or a run / checkpoints directory (its
        checkpoint ``latest`` names, else its newest), as ``python -m seqpar.ckpt`` takes them."""
        if spec == "auto":
            return [c.path for c in reversed(self.store.list())], None
        try:
            (path,) = resolve_checkpoints(Path(spec), newest=True)
        except (NotACheckpoint, OSError) as e:  # OSError: unreadable; said on every rank, not raised on rank 0 alone
            return [], (f"--checkpoint.resume {spec}: {e}; pass a checkpoint directory (.../checkpoints/step...), a run "
                        "or checkpoints directory, or auto (this run's newest that verifies)")
        if path != Path(spec):
            log(f"--checkpoint.resume {spec}: resuming {path}")
        return [path], None

    def _hash_my_files(self, path: Path, mine: Callable[[str], bool]) -> tuple[list[str], str | None]:
        """(corruption problems, why a file could not be read) for the files this rank reads."""
        try:
            files = self.store.manifest(path)["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return [], f"rank {self.rank}: {path / 'manifest.json'}: {e}"
        problems = []
        for rel, want in files.items():
            if not mine(rel):
                continue
            try:
                got = sha256_file(safe_member(path, rel))
            except FileNotFoundError:
                problems.append(f"{path.name}: missing file {rel}")
                continue
            except UnsafePath as e:
                problems.append(f"{path.name}: {e}")
                continue
            except OSError as e:
                return [], f"rank {self.rank}: {rel}: {e.strerror or e}"
            if got != want.get("sha256"):
                problems.append(f"{path.name}: {rel} checksum mismatch (corrupt)")
        return problems, None

    def read_shared(self, path: Path) -> tuple[dict, dict]:
        """(trainer state, saved config) of a checkpoint."""
        state = json.loads((path / TRAINER_STATE).read_text())
        saved_cfg = yaml.safe_load((path / CONFIG_FILE).read_text())
        return state, saved_cfg

    def read_tree(self, path: Path, name: str, rank: int | None = None, lazy: bool = False) -> Any:
        base = path / (f"{rank_dir(rank)}/{name}" if rank is not None else name)
        return load_tree(base, lazy) if base.with_suffix(".json").exists() else None
