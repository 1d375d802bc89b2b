"""A torch.profiler trace of a few optimizer steps (``logging.profile``): where a step's time goes.

Each tracing rank writes, under ``run_dir/profile/steps<first>-<last>/``:

- ``rank<r>.trace.json.gz``: the timeline (operators, CUDA kernels, collectives, checkpoint
  writes), for https://ui.perfetto.dev or chrome://tracing; every micro-batch is a labelled range;
- ``rank<r>.txt``: operators by self time (device time on CUDA), the table to read first;
- with ``memory: true`` on CUDA, ``rank<r>.memory.pickle``: the allocation history for
  https://pytorch.org/memory_viz (what holds the peak). It is torch's own snapshot format, an
  output for the viewer; nothing here ever reads it back.

Steps are numbered as the log numbers them (step 1 is the first optimizer step). A trace is a
diagnostic, not training state: nothing of it is checkpointed; a stop or an error ends the trace
with the steps it has, and a run resumed inside the range traces what is left of it into
``rank<r>.2.*`` (an earlier trace is never overwritten).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from seqpar.config import ProfileConfig


class StepProfiler:
    """Starts torch.profiler before the first micro-batch of ``steps[0]`` and writes the trace after
    the last micro-batch of ``steps[1]`` (or at ``finish``, whichever comes first)."""

    def __init__(self, cfg: ProfileConfig | None, run_dir: Path, rank: int, device: torch.device,
                 say: Callable[[str], None]):
        self.cfg, self.rank, self.device, self.say = cfg, rank, device, say
        self.on = cfg is not None and rank in cfg.ranks
        self.dir = run_dir / "profile" / f"steps{cfg.steps[0]}-{cfg.steps[1]}" if cfg is not None else None
        self._prof: torch.profiler.profile | None = None
        self._range: Any = None  # the open micro-batch's record_function
        self._traced: list[int] = []  # optimizer steps (1-based) seen while tracing
        self._t0 = 0.0
        self._done = False

    def describe(self, max_steps: int) -> str:
        """``; profile of steps 5-6 (ranks 0) in <dir>`` for the summary's output line ('' when off)."""
        if self.cfg is None:
            return ""
        first, last = self.cfg.steps
        late = f" (never reached: train.max_steps is {max_steps})" if first > max_steps else ""
        return f"; profile of steps {first}-{last} (ranks {','.join(map(str, self.cfg.ranks))}) in {self.dir}{late}"

    @property
    def active(self) -> bool:
        return self._prof is not None

    def before(self, step: int, micro_step: int) -> None:
        """A micro-batch of optimizer step ``step + 1`` is about to run (``step`` steps are done)."""
        if not self.on or self._done:
            return
        first, last = self.cfg.steps
        if self._prof is None and first <= step + 1 <= last:
            self._start()
        if self._prof is not None:
            if not self._traced or self._traced[-1] != step + 1:
                self._traced.append(step + 1)
            self._range = torch.profiler.record_function(f"step {step + 1} micro-batch {micro_step + 1}")
            self._range.__enter__()

    def after(self, step: int) -> None:
        """The micro-batch ended; ``step`` optimizer steps are now done."""
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if self._prof is not None and step >= self.cfg.steps[1]:
            self.finish()

    def _start(self) -> None:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
            if self.cfg.memory:
                # Python frames only: symbolising C++ frames at the dump takes minutes on a large model
                torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)
        self._prof = torch.profiler.profile(activities=acts, record_shapes=self.cfg.shapes,
                                            profile_memory=self.cfg.memory)
        self._prof.start()
        self._t0 = time.perf_counter()

    def finish(self, final_step: int | None = None) -> None:
        """Stop tracing and write the files (idempotent; never raises: a failed trace must not turn
        a stop, an error or a finished run into another exit). ``final_step``: the run completed
        there; a range it never reached is said, so an empty profile directory is no mystery."""
        if self._range is not None:  # an exception inside the micro-batch
            self._range.__exit__(None, None, None)
            self._range = None
        if self._prof is None:
            if self.on and not self._done and final_step is not None and final_step < self.cfg.steps[0]:
                self.say(f"logging.profile: steps {self.cfg.steps[0]}-{self.cfg.steps[1]} not traced: the run "
                         f"ended at step {final_step}")
            self._done = True
            return
        prof, self._prof, self._done = self._prof, None, True
        cuda = self.device.type == "cuda"
        steps = f"{self._traced[0]}-{self._traced[-1]}" if self._traced else "none"
        try:
            if cuda:
                torch.cuda.synchronize(self.device)
            prof.stop()
            wall = time.perf_counter() - self._t0
            self.dir.mkdir(parents=True, exist_ok=True)
            stem = self._free_stem()
            # each file under a temporary name first: a rank killed while writing leaves no torn trace
            self._write(f"{stem}.trace.json.gz", prof.export_chrome_trace, suffix=".gz")
            sort = "self_device_time_total" if cuda else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60)
            self._write(f"{stem}.txt", lambda tmp: Path(tmp).write_text(
                f"# rank {self.rank}, optimizer steps {steps} ({wall:.2f} s wall under the profiler, which "
                f"slows the host side), sorted by {sort}\n{table}\n"))
            if cuda and self.cfg.memory:
                self._write(f"{stem}.memory.pickle", torch.cuda.memory._dump_snapshot)
        except Exception as e:  # noqa: BLE001  (reported, never raised: see the docstring)
            self.say(f"logging.profile: the trace of steps {steps} was not written: {type(e).__name__}: {e}")
            return
        finally:
            if cuda and self.cfg.memory:
                try:
                    torch.cuda.memory._record_memory_history(enabled=None)
                except Exception:  # noqa: BLE001  (a CUDA context already broken by the error being raised)
                    pass
        self.say(f"profile of steps {steps}: {stem}.trace.json.gz (open in https://ui.perfetto.dev), "
                 f"{stem.name}.txt (operators by self time)")

    @staticmethod
    def _write(path: str, write: Callable[[str], Any], suffix: str = "") -> None:
        """``write(tmp)`` then rename to ``path`` (``suffix``: an ending the writer needs to see)."""
        tmp = f"{path}.partial{suffix}"
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):  # the write failed part-way: no torn file is left behind
                os.remove(tmp)

    def _free_stem(self) -> Path:
        """``rank<r>``, or ``rank<r>.2``, ``.3``...: a resumed run tracing the rest of the range (or
        the same range again) never overwrites an earlier trace. Each rank names only its own files."""
        n = 1
        while True:
            stem = self.dir / (f"rank{self.rank}" + (f".{n}" if n > 1 else ""))
            if not any(Path(f"{stem}{ext}").exists() for ext in (".trace.json.gz", ".txt", ".memory.pickle")):
                return stem
            n += 1
