"""checkpoint.every_minutes: a save after the first micro-batch that ends that long after the last
save (or the start), agreed by all ranks like a stop."""

from __future__ import annotations

import sys

import pytest
import torch

from common import BASE, TRAIN, final_hashes, run, write_config
from seqpar.checkpoint.manager import CheckpointManager
from seqpar.checkpoint.signals import StopSignal
from seqpar.checkpoint.store import Position, parse_tag
from seqpar.config import CheckpointConfig


def test_the_clock_counts_from_the_last_save(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("seqpar.checkpoint.manager._clock", lambda: now[0])
    off = CheckpointManager(CheckpointConfig(), tmp_path / "a", 0, 1, pin=False)
    timed = CheckpointManager(CheckpointConfig(every_minutes=2), tmp_path / "b", 0, 1, pin=False)
    now[0] += 500.0  # start-up and the resume load do not count: the trainer restarts the clock
    timed.restart_clock()
    now[0] += 119.9
    assert not timed.interval_elapsed()
    now[0] += 0.1
    assert timed.interval_elapsed() and not off.interval_elapsed()
    # a save (whatever triggered it) restarts the clock once its snapshot is handed to the writer
    tag = timed.save(Position(1, 0, 8), {"model": {"w": torch.ones(3)}}, {}, [], {})
    timed.finish()
    assert tag == "step00000001-seq000000" and not timed.interval_elapsed()
    now[0] += 120.0
    assert timed.interval_elapsed()
    # one all-reduce carries it with the stop and write-failure flags (here without a process group)
    stop = StopSignal(signals=())  # no handlers: the test process keeps its own
    assert stop.agree(False, True) == (False, False, True)
    assert stop.agree(True, False) == (False, True, False)
    with pytest.raises(Exception, match="greater than or equal to 0"):
        CheckpointConfig(every_minutes=-1)


@pytest.mark.slow
def test_timed_saves_land_mid_window_and_resume_bitwise(tmp_path):
    """One process, 8 micro-batches per step: with a 6 ms interval nearly every micro-batch ends
    past it, so saves land inside accumulation windows; the last mid-window one resumes to the
    uninterrupted run's state. With a long interval, only the final save happens."""
    steps = {"max_steps": 2}
    path, run_dir = write_config(tmp_path, "timed", BASE, train=steps,
                                 checkpoint={"every_micro_batches": 0, "every_minutes": 1e-4, "keep_last": 100})
    r = run([sys.executable, TRAIN, "--config", str(path)])
    assert r.returncode == 0, r.stderr[-3000:]
    tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step"))
    mid = [t for t in tags if parse_tag(t)[1]]  # inside an accumulation window
    assert mid and len(tags) <= 16, tags

    path, long_dir = write_config(tmp_path, "long", BASE, train=steps,
                                  checkpoint={"every_micro_batches": 0, "every_minutes": 60})
    r = run([sys.executable, TRAIN, "--config", str(path)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in (long_dir / "checkpoints").iterdir() if p.name.startswith("step")] == \
        ["step00000002-seq000000"]
    # resume from the last mid-window save: the final state is bitwise the uninterrupted run's
    r = run([sys.executable, TRAIN, "--config", str(path), "--resume",
             str(run_dir / "checkpoints" / mid[-1]), "--logging.run_dir", str(tmp_path / "resumed")])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    assert final_hashes(tmp_path / "resumed") == final_hashes(long_dir)
