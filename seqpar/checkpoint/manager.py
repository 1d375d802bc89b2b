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
from seqpar.checkpoint.store import CheckpointStore, tag_for
from seqpar.checkpoint.writer import CheckpointWriter, Snapshot, rank_dir
from seqpar.config import CheckpointConfig

# Keys that describe the resume itself.
RESUME_KEYS = ("checkpoint.resume", "checkpoint.allow_changes")
# Keys that never change what is computed: accepted silently (reported in the resume line).
NEUTRAL_CHANGES = ("logging.*", "checkpoint.*", "data.passkey.eval_samples", "data.cache_dir",
                   "parallel.zero3_init")
# Deliberate changes a resumed run may make, each only when named in checkpoint.allow_changes
# (e.g. extending a run: train.max_steps also stretches the LR decay). Anything else is refused.
SAFE_CHANGES = ("train.max_steps", "train.lr", "train.min_lr_ratio", "train.decay", "train.warmup_steps")
# How the computation is laid out on ranks. Accepted here: the trainer compares the saved and
# current layouts themselves and allows a change only as an elastic resume (the same global
# batch, checkpoint.elastic on; mid-window: a window position the new micro-steps can continue).
LAYOUT_CHANGES = ("parallel.zero_stage", "parallel.ulysses_degree", "parallel.ring_degree", "parallel.backend",
                  "train.micro_batch_size", "train.grad_accum_steps", "train.global_batch_size")
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.yaml"


class ResumeError(RuntimeError):
    pass


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


def check_resume_config(saved: dict, current: dict, allowed: list[str]) -> list[str]:
    """Raise ``ResumeError`` listing refused changes; return the allowed ones (for the log)."""
    refused, accepted = [], []
    for key, old, new in config_changes(saved, current):
        if key in RESUME_KEYS:
            continue
        safe = any(fnmatch.fnmatch(key, pat) for pat in SAFE_CHANGES)
        line = f"{key}: {old!r} -> {new!r}"
        if any(fnmatch.fnmatch(key, pat) for pat in NEUTRAL_CHANGES) or key in LAYOUT_CHANGES:
            accepted.append(line)
        elif safe and any(fnmatch.fnmatch(key, pat) for pat in allowed):
            accepted.append(line)
        elif safe:
            refused.append(f"{line}  (safe: allow it with --checkpoint.allow_changes '[{key}]')")
        else:
            refused.append(f"{line}  (changes what training computes; start a new run instead)")
    if refused:
        raise ResumeError("the config differs from the checkpoint's:\n  " + "\n  ".join(refused))
    return accepted


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, run_dir: Path, rank: int, world: int, pin: bool):
        self.cfg = cfg
        self.store = CheckpointStore(cfg.dir or Path(run_dir) / "checkpoints")
        self.rank, self.world, self.pin = rank, world, pin
        self.resumed_from: str | None = None
        self.writer = CheckpointWriter(self.store, rank, world, cfg.async_write, on_commit=self._retain)
        self.last_block_s = 0.0

    # -- saving -----------------------------------------------------------------------------------
    def due(self, step: int, micro_step: int, micro_batches_done: int) -> bool:
        c = self.cfg
        if c.every_micro_batches and micro_batches_done % c.every_micro_batches == 0:
            return True
        return bool(c.every_steps) and micro_step == 0 and step % c.every_steps == 0

    def save(self, step: int, micro_step: int, rank_trees: dict[str, Any], rank0_raw: dict[str, bytes],
             jobs: list, meta: dict) -> str:
        """Collective: every rank calls it at the same micro-batch boundary. ``rank_trees`` go to
        this rank's directory; ``rank0_raw`` files (rank 0 only) and ``jobs`` to the top level."""
        t0 = time.perf_counter()
        self.writer.wait()  # at most one write in flight
        tag = tag_for(step, micro_step)
        if self.rank == 0:
            self.store.remove_partials()
            self.store.begin(tag)
        if dist.is_initialized():
            dist.barrier()
        trees = {f"{rank_dir(self.rank)}/{k}": v for k, v in rank_trees.items()}
        snap = Snapshot.take(trees, self.pin)
        if self.rank == 0:
            snap.raw.update(rank0_raw)
        snap.jobs.extend(jobs)
        self.writer.submit(tag, snap, meta)
        self.last_block_s = time.perf_counter() - t0
        return tag

    def finish(self) -> float:
        return self.writer.wait()

    def _retain(self, committed: Path) -> None:
        protect = {self.resumed_from} if self.resumed_from else set()
        self.store.retain(self.cfg.keep_last, protect)

    # -- resuming ---------------------------------------------------------------------------------
    def find_resume(self, spec: str, refuse: Callable[[Path], str | None] = lambda p: None) -> Path | None:
        """``auto``: newest checkpoint that verifies (older ones if the newest is corrupt), or
        None when there is none; ``none``: None; else the given path, which must verify.
        ``refuse(path)`` names why this run cannot resume a (verified) checkpoint, or returns None;
        ``auto`` then tries older ones, and fails when every checkpoint was refused."""
        if spec == "none":
            return None
        if spec != "auto":
            path = Path(spec)
            problems = self.store.verify(path) if path.is_dir() else [f"{path} is not a directory"]
            if not problems and (why := refuse(path)):
                problems = [why]
            if problems:
                raise ResumeError(f"cannot resume from {path}:\n  " + "\n  ".join(problems))
            return path
        refused = []
        for ck in reversed(self.store.list()):
            problems = self.store.verify(ck.path)
            if not problems and (why := refuse(ck.path)):
                refused.append(f"{ck.path.name}: {why}")
                warnings.warn(f"cannot resume checkpoint {ck.path}: {why}; trying an older one", stacklevel=2)
                continue
            if not problems:
                if refused and self.rank == 0:
                    print(f"resuming the older checkpoint {ck.path.name} (newer ones refused above)", flush=True)
                return ck.path
            warnings.warn(
                f"checkpoint {ck.path} does not verify ({'; '.join(problems[:3])}); trying an older one",
                stacklevel=2,
            )
        if refused:  # never start from scratch when checkpoints exist but this run may not use them
            raise ResumeError("no checkpoint this run can resume:\n  " + "\n  ".join(refused)
                              + "\n(start a new run with --checkpoint.resume none and another checkpoint.dir)")
        return None

    def read_shared(self, path: Path) -> tuple[dict, dict]:
        """(trainer state, saved config) of a checkpoint."""
        state = json.loads((path / TRAINER_STATE).read_text())
        saved_cfg = yaml.safe_load((path / CONFIG_FILE).read_text())
        return state, saved_cfg

    def read_tree(self, path: Path, name: str, rank: int | None = None, lazy: bool = False) -> Any:
        base = path / (f"{rank_dir(rank)}/{name}" if rank is not None else name)
        return load_tree(base, lazy) if base.with_suffix(".json").exists() else None
