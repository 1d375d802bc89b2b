"""Operator output: start-up summary, rank-0 progress (a bar or plain lines), metrics.jsonl and
TensorBoard; and keeping DeepSpeed's own start-up chatter out of it (``quiet_deepspeed``).

Progress: with ``logging.progress_bar`` and stderr on a terminal, a tqdm bar, created when
training starts (after the start-up summary). While it is shown, every other line of the process
(``print`` to stdout or stderr, warnings, logging handlers on those streams) is written above it:
the bar is cleared, the line written, the bar redrawn, so no line is ever glued to a frame.
Otherwise (``progress_bar: false``, or output going to a file) one plain line per record.
Rates and the ETA count only the steps this process trained (a resumed run does not count the
resumed steps as done in no time).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch

from seqpar.checkpoint.signals import EXIT_PREEMPTED
from seqpar.errors import UserError

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) for MFU; anything else: set
# logging.peak_tflops. Keys are matched against torch.cuda.get_device_name().
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}

# Shown on the bar (and the plain line) from a step record, in this order.
_SHOWN = {"loss": "{:.4f}", "lr": "{:.2e}", "tok_s": "{:,.0f}", "mfu": "{:.1%}", "mem_gib": "{:.1f}"}


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or this process's resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def duration(seconds: float) -> str:
    """``41s``, ``2m41s``, ``1h02m``, ``3d04h``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def checkpoint_line_mode(setting: str | int, every_micro_batches: int, grad_accum_steps: int) -> str | int:
    """What ``logging.checkpoint_lines`` means for this run: ``"every"``, ``"none"``, ``"first"``
    or N (every N-th save). ``auto``: a line per save when saves are at most one per optimizer
    step (``checkpoint.every_steps``, or ``every_micro_batches`` >= the accumulation steps); with
    more frequent saves only the first, and the progress line sums up the others."""
    if setting != "auto":
        return setting
    if every_micro_batches and every_micro_batches < grad_accum_steps:
        return "first"
    return "every"


class _AboveBar:
    """Stands in for sys.stdout / sys.stderr while a bar is shown: whole lines are written above
    the bar (``RunLogger._emit``); a partial line waits for its newline (or ``close``)."""

    def __init__(self, target: TextIO, owner: RunLogger):
        self._target, self._owner, self._pending = target, owner, ""

    def write(self, s: str) -> int:
        with self._owner._lock():
            head, sep, self._pending = (self._pending + s).rpartition("\n")
            if sep:
                self._owner._emit(self._target, head + "\n")
        return len(s)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._target.flush()

    def drain(self) -> None:
        with self._owner._lock():
            if self._pending:
                self._owner._emit(self._target, self._pending)
                self._pending = ""

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, isatty, buffer, ...
        return getattr(self._target, name)


WANDB_ID_FILE = "wandb_run_id"


def import_wandb():
    """The ``wandb`` module, or one line saying how to get it (logging.wandb is set)."""
    try:
        import wandb
    except ImportError:
        raise UserError("logging.wandb is set but wandb is not installed: pip install wandb, or remove "
                        "logging.wandb") from None
    return wandb


class RunLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing.

    ``progress``: a tqdm bar when ``stream`` (default sys.stderr) is a terminal, else plain lines;
    ``progress=False``: plain lines. ``checkpoint_lines``: ``logging.checkpoint_lines``; with
    ``"auto"``, ``save_every_micro_batches`` and ``grad_accum_steps`` decide (``checkpoint_line_mode``).
    ``clock`` (seconds, monotonic) is for tests."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, progress: bool, tensorboard: str, *,
                 checkpoint_lines: str | int = "every", save_every_micro_batches: int = 0,
                 grad_accum_steps: int = 1, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self.total_steps = total_steps
        self.bar = None  # the bar shown now: training's, then the final evaluation's
        self.tb = None
        self.wandb = None  # the W&B run (open_wandb), rank 0
        self._wandb_run_id: str | None = None
        self.jsonl = None
        self._stream = stream
        self._clock = clock
        self._use_bar = False
        self._ckpt_mode = checkpoint_line_mode(checkpoint_lines, save_every_micro_batches, grad_accum_steps)
        self._saves = 0  # checkpoints saved by this process
        self._quiet_saves = 0  # ... not printed since the last progress record, and their block time
        self._quiet_block_s = 0.0
        self._start: tuple[float, int] | None = None  # (clock, step) when this process started training
        self._train_bar_done = False
        self._swapped: list[tuple[Any, str, Any, Any]] = []  # what _install replaced, to put back
        self._closed = False
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                if tensorboard == "on":
                    raise ImportError(
                        "logging.tensorboard='on' but tensorboard is not installed: "
                        "pip install tensorboard, or set logging.tensorboard: auto"
                    ) from None
        if progress:
            out = self._stream if self._stream is not None else sys.stderr
            try:
                self._use_bar = bool(out.isatty())
            except (AttributeError, ValueError):
                self._use_bar = False

    # -- output around the bar ------------------------------------------------------------------
    def _lock(self):
        from tqdm import tqdm

        return tqdm.get_lock()

    def _emit(self, target: TextIO, text: str) -> None:
        """Write ``text`` to ``target``; a bar shown now is cleared first and redrawn below it."""
        with self._lock():
            bar = self.bar
            if bar is not None:
                bar.clear(nolock=True)
                self._flush(bar.fp)
            target.write(text)
            self._flush(target)
            if bar is not None:
                bar.refresh(nolock=True)

    @staticmethod
    def _flush(f: Any) -> None:
        try:
            f.flush()
        except (AttributeError, ValueError, OSError):
            pass

    def _new_bar(self, **kw: Any):
        from tqdm import tqdm

        if not self._swapped:
            self._install()
        return tqdm(file=self._orig_stream("stderr") if self._stream is None else self._stream,
                    dynamic_ncols=True, miniters=1, **kw)

    def _orig_stream(self, name: str) -> TextIO:
        for obj, attr, old, _ in self._swapped:
            if obj is sys and attr == name:
                return old
        return getattr(sys, name)

    def _install(self) -> None:
        """Route sys.stdout / sys.stderr (and logging handlers writing to them) above the bar."""
        proxies = {}
        for name in ("stdout", "stderr"):
            old = getattr(sys, name)
            if old is None:
                continue
            proxies[id(old)] = new = _AboveBar(old, self)
            setattr(sys, name, new)
            self._swapped.append((sys, name, old, new))
        loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                           if isinstance(lg, logging.Logger)]
        for lg in loggers:
            for h in lg.handlers:
                if type(h) is logging.StreamHandler and id(h.stream) in proxies:
                    old = h.stream
                    h.setStream(proxies[id(old)])
                    self._swapped.append((h, "stream", old, proxies[id(old)]))
        atexit.register(self.close)

    def _uninstall(self) -> None:
        for obj, attr, old, new in reversed(self._swapped):
            if isinstance(new, _AboveBar):
                new.drain()
            if getattr(obj, attr, None) is new:  # unless someone replaced it since
                if isinstance(obj, logging.Handler):
                    obj.setStream(old)
                else:
                    setattr(obj, attr, old)
        self._swapped = []
        atexit.unregister(self.close)

    def _end_training_bar(self) -> None:
        """The training bar's final frame, shown once: when training output ends."""
        if self.bar is not None and not self._train_bar_done:
            with self._lock():
                self.bar.close()
                self.bar = None
        self._train_bar_done = True

    # -- API used by the trainer --------------------------------------------------------------------
    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._swapped:
            self._emit(self._orig_stream("stdout"), text + "\n")
        else:
            print(text, flush=True)

    def start_at(self, step: int) -> None:
        """Training starts (after the summary) at ``step``: rates count from here."""
        if not self.enabled:
            return
        self._start = (self._clock(), step)
        if self._use_bar and self.bar is None and not self._train_bar_done:
            self.bar = self._new_bar(total=self.total_steps, initial=step, desc="train", unit="step")

    def log(self, step: int, metrics: dict[str, Any], progress: bool = False) -> None:
        """A record for metrics.jsonl / TensorBoard; ``progress``: a step's record, also shown."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        # strict JSON: a NaN loss or inf grad_norm (a skipped step) is written as null
        self.jsonl.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                     for k, v in record.items()}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self._wandb_call(self.wandb.log, {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                             step=step)
        if progress:
            self._progress(step, metrics)

    def open_wandb(self, cfg, run_dir: Path, saved_id: str | None, newest: bool, config: dict[str, Any]) -> None:
        """Start the W&B run of ``logging.wandb`` (``cfg``), or continue the one the resumed
        checkpoint recorded (``saved_id``): only for ``--resume auto`` (``newest``: preemption,
        extension) and when this run_dir's W&B run (``run_dir/wandb_run_id``) is that one. A
        rollback to a chosen older checkpoint, another run's checkpoint, or a fresh start opens a
        new W&B run (W&B keeps only increasing steps: continuing would drop the repeated ones; the
        new run's config names the one it resumed from). W&B failing (at start or later) is a
        warning: training goes on, metrics.jsonl keeps every record."""
        if not self.enabled or cfg is None:
            return
        wandb = import_wandb()
        id_file = run_dir / WANDB_ID_FILE
        mine = id_file.read_text().strip() if id_file.is_file() else None
        run_id = saved_id if saved_id and newest and mine in (None, saved_id) else None
        if run_id is None:
            run_id = wandb.util.generate_id()
            if saved_id:
                config = {**config, "resumed_from_wandb_run": saved_id}
        id_file.write_text(run_id + "\n")
        self._wandb_run_id = run_id  # kept when the W&B client fails: a resume continues this run
        self.wandb = self._wandb_call(wandb.init, project=cfg.project, entity=cfg.entity,
                                      name=cfg.name or run_dir.name, group=cfg.group, tags=list(cfg.tags) or None,
                                      mode=cfg.mode, dir=str(run_dir), id=run_id, resume="allow", config=config,
                                      allow_val_change=True)

    @property
    def wandb_id(self) -> str | None:
        """The W&B run's id (recorded in checkpoints), rank 0; None without one."""
        return self._wandb_run_id

    def _wandb_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A W&B call; on failure one warning line and no more W&B for this run (a preemption
        also stops W&B's own service process: its failure must not cost the stop's checkpoint)."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of the W&B client
            self.wandb = None
            self.print(f"WARNING: W&B logging stopped ({type(e).__name__}: {e}); metrics.jsonl keeps every record")
            return None

    def _progress(self, step: int, metrics: dict[str, Any]) -> None:
        if self._start is None:
            self.start_at(step)
        # checkpoints saved since the last record without a line of their own: their blocking time
        saves, blocked = self._quiet_saves, self._quiet_block_s
        self._quiet_saves, self._quiet_block_s = 0, 0.0
        if self.bar is not None and not self._train_bar_done:
            shown = [f"{k}={fmt.format(metrics[k])}" for k, fmt in _SHOWN.items() if metrics.get(k) is not None]
            if saves:
                shown.append(f"ckpt_block={blocked:.2f}s")
            with self._lock():
                self.bar.set_postfix_str(" ".join(shown), refresh=False)
                self.bar.update(step - self.bar.n)
                if self.bar.last_print_n != self.bar.n:  # update() draws at most every 0.1 s
                    self.bar.refresh(nolock=True)
            return
        line = self.progress_line(step, metrics)
        if saves:
            line += f" | {blocked:.2f} s blocked by {saves} checkpoint{'s' if saves > 1 else ''}"
        self.print(line)

    def progress_line(self, step: int, metrics: dict[str, Any]) -> str:
        """``step 10/200 | loss 5.7819 | lr 3.00e-03 | 12,345 tok/s | mfu 41.2% | mem 1.2 GiB | eta 2m41s``"""
        parts = [f"step {step}/{self.total_steps}"]
        if metrics.get("loss") is not None:
            parts.append(f"loss {metrics['loss']:.4f}")
        if metrics.get("lr") is not None:
            parts.append(f"lr {metrics['lr']:.2e}")
        if metrics.get("tok_s") is not None:
            parts.append(f"{metrics['tok_s']:,.0f} tok/s")
        if metrics.get("mfu") is not None:
            parts.append(f"mfu {metrics['mfu']:.1%}")
        if metrics.get("mem_gib") is not None:
            parts.append(f"mem {metrics['mem_gib']:.1f} GiB")
        eta = self.eta_s(step)
        if eta is not None and step < self.total_steps:
            parts.append(f"eta {duration(eta)}")
        return " | ".join(parts)

    def steps_per_s(self, step: int) -> float | None:
        """Steps this process trained per second since it started training (None before one)."""
        if self._start is None:
            return None
        t0, s0 = self._start
        dt = self._clock() - t0
        return (step - s0) / dt if step > s0 and dt > 0 else None

    def eta_s(self, step: int) -> float | None:
        rate = self.steps_per_s(step)
        return (self.total_steps - step) / rate if rate else None

    def checkpoint(self, step: int, tag: str, block_s: float, background: bool, ends_run: bool = False) -> None:
        """A checkpoint was saved: its record, and its line per ``logging.checkpoint_lines``.
        ``ends_run`` (a stop's or the final save) always prints."""
        if not self.enabled:
            return
        self._saves += 1
        mode = self._ckpt_mode
        shown = ends_run or mode == "every" or (mode == "first" and self._saves == 1) or (
            isinstance(mode, int) and self._saves % mode == 0)
        if shown:
            how = "background" if background else "synchronous"
            line = f"checkpoint {tag}: training blocked {block_s:.3f} s ({how} write)"
            if mode == "first" and self._saves == 1 and not ends_run:
                line += ("; the next saves are summed up on the progress line "
                         "(logging.checkpoint_lines: every prints each)")
            self.print(line)
        else:
            self._quiet_saves += 1
            self._quiet_block_s += block_s
        self.log(step, {"ckpt_block_s": block_s, "ckpt_tag": tag})

    def counted(self, fn: Callable[..., Any], total: int, label: str) -> Callable[..., Any]:
        """``fn``, counting its calls on screen as ``label n/total`` (e.g. the final evaluation's
        forward passes). Ends the training bar (its final frame stays)."""
        if not self.enabled or total <= 0:
            return fn
        self._end_training_bar()
        if self._use_bar:
            self.bar = self._new_bar(total=total, desc=label, unit="sample", leave=False)
        else:
            self.print(f"{label}: {total} samples")

        def call(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            bar = self.bar
            if bar is not None and self._train_bar_done:
                with self._lock():
                    bar.update(1)
                    if bar.n >= total:
                        bar.close()
                        self.bar = None
            return out

        return call

    def close(self, exit_code: int = 0) -> None:
        """Flush and close every output; ``exit_code``: the run's (75: W&B marks it preempted)."""
        if self._closed:
            return
        self._closed = True
        self._end_training_bar()
        if self.bar is not None:  # an evaluation cut short
            with self._lock():
                self.bar.close()
                self.bar = None
        if self._swapped:
            self._uninstall()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            run = self.wandb
            if exit_code == EXIT_PREEMPTED and hasattr(run, "mark_preempting"):
                self._wandb_call(run.mark_preempting)
            self._wandb_call(run.finish, exit_code=exit_code)
            self.wandb = None
        if self.jsonl is not None:
            self.jsonl.close()


# -- DeepSpeed's start-up chatter ---------------------------------------------------------------------
def quiet_deepspeed(announce: Callable[[str], None] | None = None) -> None:
    """Call before DeepSpeed initializes (idempotent). Its logger in this process stays at WARNING
    or above, and ``DeepSpeed ... built successfully`` (printed on every start by its shared-memory
    communication op) is dropped; when that op really has to be compiled (the first start on a
    machine, about a minute, then cached in ~/.cache/torch_extensions), one line says so first.

    The INFO lines of the ``deepspeed`` launcher come from the launcher's own process: pass it
    ``--log_level=warning`` (``deepspeed --log_level=warning seqpar/train.py ...``)."""
    announce = announce or (lambda line: print(line, flush=True))
    ds_log = logging.getLogger("DeepSpeed")
    try:
        import deepspeed.utils.logging  # noqa: F401  (creates DeepSpeed's logger and handler)
    except ImportError:
        return
    if ds_log.getEffectiveLevel() < logging.WARNING:
        ds_log.setLevel(logging.WARNING)
        for h in ds_log.handlers:
            h.setLevel(logging.WARNING)
    try:  # (``import deepspeed.comm.torch as m`` would give torch itself: deepspeed.comm has a ``torch`` name)
        ds_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    original = getattr(ds_torch, "build_shm_op", None)
    if original is None or getattr(original, "_seqpar_quiet", False):
        return

    def build_shm_op():
        first_rank = os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0"
        name, where = _op_build_target()
        announced = False
        if first_rank and where is not None and not (where / f"{name}.so").exists():
            announce(f"compiling a DeepSpeed op ({name}; once per machine, about a minute; cached in {where})")
            announced = True
        captured = io.StringIO()
        t0 = time.monotonic()
        try:
            with contextlib.redirect_stdout(captured):
                return original()
        finally:
            took = time.monotonic() - t0
            rest = "".join(line for line in captured.getvalue().splitlines(keepends=True)
                           if "built successfully" not in line)
            if rest:
                sys.stdout.write(rest)
                sys.stdout.flush()
            if first_rank and not announced and took > 20:
                announce(f"compiled a DeepSpeed op ({name}) in {took:.0f} s (once; cached in {where})")

    build_shm_op._seqpar_quiet = True
    ds_torch.build_shm_op = build_shm_op


def _op_build_target() -> tuple[str, Path | None]:
    """The name of DeepSpeed's shared-memory op and where torch caches its build (None: unknown)."""
    name = "deepspeed_shm_comm"
    try:
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        name = getattr(builder, "name", None) or name
        from torch.utils.cpp_extension import _get_build_directory

        return name, Path(_get_build_directory(name, verbose=False))
    except Exception:  # the cache location is a private torch detail: only the announcement needs it
        return name, None
