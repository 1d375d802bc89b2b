"""Preemption: SIGTERM / SIGUSR1 set a flag; ranks agree at a micro-batch boundary.

A signal handler only records the signal (no I/O, no collectives). The trainer calls
``StopSignal.agreed()`` after each micro-batch: one all-reduce (MAX) tells every rank whether any
rank was signalled, so all of them save the same checkpoint and exit together.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

import torch
import torch.distributed as dist

# Exit status after a signal-triggered save: "temporary failure, run me again" (sysexits EX_TEMPFAIL).
# scripts/auto_restart.sh and the Slurm example requeue on it.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """``SEQPAR_STOP_AFTER_MICRO_BATCHES=N`` (tests, drills) acts as a signal after the N-th
    micro-batch of this process, exercising exactly the path a real preemption takes."""

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS):
        self.received: int | None = None
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)
        after = os.environ.get("SEQPAR_STOP_AFTER_MICRO_BATCHES")
        self._countdown = int(after) if after else None

    def tick(self) -> None:
        """Called after each micro-batch."""
        if self._countdown is not None:
            self._countdown -= 1
            if self._countdown == 0:
                self.received = -1  # drill

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def describe(self) -> str:
        """What asked this rank to stop, for the log."""
        if self.received is None:
            return "a signal on another rank"
        if self.received == -1:
            return "SEQPAR_STOP_AFTER_MICRO_BATCHES"
        return signal.Signals(self.received).name

    def agreed(self, device: torch.device, group=None) -> bool:
        """True on every rank if any rank has received a signal (collective)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
