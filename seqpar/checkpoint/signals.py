"""Preemption: SIGTERM / SIGUSR1 / SIGINT set a flag; ranks agree at a micro-batch boundary.

A signal handler only records the signal (no I/O, no collectives). The trainer calls
``StopSignal.agree()`` after each micro-batch: one all-reduce (MAX) tells every rank whether any
rank was signalled (or lost its launcher, or failed to write a checkpoint), so all of them act on
the same micro-batch: save the same checkpoint, wait until it is committed, and exit together. The
same all-reduce carries whether any rank's ``checkpoint.every_minutes`` clock says a save is due.

The handler is installed at the very top of ``train.main()`` (``install()``), so a signal that
arrives while the run is still starting up is not lost: the run exits with ``EXIT_PREEMPTED``
before its first micro-batch.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

# Exit statuses (scripts/auto_restart.sh, the sbatch example and the Kubernetes Job act on them).
EXIT_PREEMPTED = 75  # a checkpoint was committed at the stop: run again with --resume auto (EX_TEMPFAIL)
EXIT_USAGE = 2  # config, data or resume mistake, or the checkpoint dir is in use: retrying cannot help
EXIT_IO = 74  # a checkpoint could not be written, even after a retry (EX_IOERR)
# SIGINT (Ctrl-C) too: the first one stops like SIGTERM (a checkpoint after this micro-batch),
# a second one aborts at once (KeyboardInterrupt), without saving.
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
DRILL = -1  # SEQPAR_STOP_AFTER_MICRO_BATCHES
LAUNCHER_GONE = -2

# What a launcher process looks like in /proc/<pid>/cmdline: torchrun's agent, the deepspeed
# runner and its per-node launcher. Ranks watch these ancestors: torchrun starts each worker in a
# session of its own, so a SIGKILLed agent would leave its ranks training on unseen.
_LAUNCHERS = ("torch.distributed.run", "torchrun", "deepspeed.launcher", "bin/deepspeed")


class StopSignal:
    """``SEQPAR_STOP_AFTER_MICRO_BATCHES=N`` (tests, drills) acts as a signal after the N-th
    micro-batch of this process, exercising exactly the path a real preemption takes."""

    _installed: "StopSignal | None" = None

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS):
        self.received: int | None = None
        self.interrupts = 0  # SIGINTs seen: the second one aborts
        self.gone: str | None = None  # which launcher disappeared
        self._previous = {}
        for s in signals:
            if s == signal.SIGINT and signal.getsignal(s) == signal.SIG_IGN:
                continue  # started with Ctrl-C ignored (a background job of a script): keep it so
            self._previous[s] = signal.signal(s, self._handle)
        self._countdown: int | None = None
        self._launchers: list[tuple[int, float, str]] = []
        self.arm()

    @classmethod
    def install(cls) -> "StopSignal":
        """The process-wide handler (created on first use, so start-up signals are kept)."""
        if cls._installed is None:
            cls._installed = cls()
        return cls._installed

    def arm(self) -> None:
        """A trainer starts: read the drill setting, find the launchers to watch. A signal already
        received (during start-up) is kept."""
        after = os.environ.get("SEQPAR_STOP_AFTER_MICRO_BATCHES")
        self._countdown = int(after) if after else None
        self._launchers = _launcher_ancestors()

    def consume(self) -> None:
        """The stop was acted on (saved and returned): a later trainer in this process starts clean."""
        self.received, self.gone, self.interrupts = None, None, 0

    def tick(self) -> None:
        """Called after each micro-batch: drills, and whether a launcher has gone."""
        if self._countdown is not None:
            self._countdown -= 1
            if self._countdown == 0 and self.received is None:
                self.received = DRILL
        if self.received is None and (gone := self._launcher_gone()):
            self.gone, self.received = gone, LAUNCHER_GONE

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:  # pressed again: abort now, nothing saved
                raise KeyboardInterrupt
        if self.received is None or self.received < 0:
            self.received = signum
        if signum == signal.SIGINT:
            try:  # one write(2), no buffered I/O in a handler: a micro-batch can take minutes to end
                os.write(2, b"\nseqpar: interrupted: stopping after this micro-batch with a checkpoint "
                            b"(Ctrl-C again to abort without one)\n")
            except OSError:  # stderr gone (a pipe whose reader the same Ctrl-C ended): the flag is set
                pass

    def describe(self) -> str:
        """What asked this rank to stop, for the log."""
        if self.received is None:
            return "a signal on another rank"
        if self.received == DRILL:
            return "SEQPAR_STOP_AFTER_MICRO_BATCHES"
        if self.received == LAUNCHER_GONE:
            return f"its launcher {self.gone} exited"
        return signal.Signals(self.received).name

    def agree(self, write_failed: bool = False, save_due: bool = False, group=None) -> tuple[bool, bool, bool]:
        """(stop, a checkpoint write failed, a timed save is due) on every rank if true on any rank
        (collective over ``group``, a gloo group: the flags are CPU tensors, so no GPU work is
        waited for). One all-reduce carries all three: ranks' clocks differ, so a time-based save
        is decided here, like a stop, not by each rank alone."""
        import torch
        import torch.distributed as dist

        flags = torch.tensor([float(self.received is not None), float(write_failed), float(save_due)])
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        stop, failed, due = flags.tolist()
        return bool(stop), bool(failed), bool(due)

    def _launcher_gone(self) -> str | None:
        for pid, created, name in self._launchers:
            if not _alive(pid, created):
                return f"{name} (pid {pid})"
        return None

    def previous(self, sig: signal.Signals):
        """The handler ``sig`` had before this one (None: this one never took it)."""
        return self._previous.get(sig)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        if StopSignal._installed is self:
            StopSignal._installed = None


def _alive(pid: int, created: float) -> bool:
    import psutil

    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _launcher_ancestors() -> list[tuple[int, float, str]]:
    """(pid, start time, name) of each launcher process above this one (none under a plain
    ``python`` or srun). The start time guards against a reused pid."""
    try:
        import psutil

        out, p = [], psutil.Process().parent()
        while p is not None and p.pid > 1:
            cmd = " ".join(p.cmdline())
            hit = next((n for n in _LAUNCHERS if n in cmd), None)
            if hit:
                out.append((p.pid, p.create_time(), "torchrun" if "torch" in hit else "deepspeed"))
            p = p.parent()
        return out
    except Exception:  # noqa: BLE001 - no /proc or psutil: nothing to watch (signals still work)
        return []
