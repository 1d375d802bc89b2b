"""logging.profile: a torch.profiler trace of the steps asked for, on the ranks asked for, which
changes nothing in training and never overwrites an earlier trace."""

from __future__ import annotations

import gzip
import json
import re

import pytest
import torch

from common import ENV, command, final_hashes, run
from seqpar.config import ConfigError, load_config
from seqpar.engine.profiling import StepProfiler


def ranges(trace) -> list[str]:
    """The labelled micro-batch ranges of a chrome trace, in order."""
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    names = {e["name"] for e in events if e.get("name", "").startswith("step ")}
    key = lambda n: tuple(int(x) for x in re.findall(r"\d+", n))  # noqa: E731
    return sorted(names, key=key)


def micro_batch(step: int, micro: int) -> None:
    a = torch.randn(32, 32, requires_grad=True)
    (a @ a).sum().backward()


def test_profiler_traces_exactly_the_range_and_keeps_earlier_traces(tmp_path):
    """In process, no trainer: steps 2-3 of a 4-step run at 2 micro-batches per step; a second
    profiler over the same range (a resumed run) writes rank0.2.*, and a range the run never
    reaches is said at the end instead of leaving an empty directory."""
    cfg = load_config(None, ["--logging.profile", "{steps: [2, 3], memory: true, shapes: true}"]).logging.profile
    said: list[str] = []

    def drive(profiler, first_step=0, first_micro=0, steps=4):
        step, micro = first_step, first_micro
        while step < steps:
            profiler.before(step, micro)
            micro_batch(step, micro)
            micro = (micro + 1) % 2
            step += micro == 0
            profiler.after(step)
        profiler.finish(step)

    drive(StepProfiler(cfg, tmp_path, 0, torch.device("cpu"), said.append))
    out = tmp_path / "profile" / "steps2-3"
    assert sorted(p.name for p in out.iterdir()) == ["rank0.trace.json.gz", "rank0.txt"]
    assert ranges(out / "rank0.trace.json.gz") == [f"step {s} micro-batch {m}" for s in (2, 3) for m in (1, 2)]
    table = (out / "rank0.txt").read_text()
    assert table.startswith("# rank 0, optimizer steps 2-3 (") and "aten::mm" in table and "CPU Mem" in table
    assert said == [f"profile of steps 2-3: {out}/rank0.trace.json.gz (open in https://ui.perfetto.dev), "
                    "rank0.txt (operators by self time)"]

    # resumed at step 3, second micro-batch (2 steps and 1 micro-batch done): traces the rest, new names
    drive(StepProfiler(cfg, tmp_path, 0, torch.device("cpu"), said.append), first_step=2, first_micro=1)
    assert ranges(out / "rank0.2.trace.json.gz") == ["step 3 micro-batch 2"]
    assert ranges(out / "rank0.trace.json.gz")[0] == "step 2 micro-batch 1"  # the first trace is intact
    assert said[-1].startswith("profile of steps 3-3: ") and "rank0.2.txt" in said[-1]

    # another rank does not trace (ranks: [0]); a range past the end is said, once
    assert not StepProfiler(cfg, tmp_path, 1, torch.device("cpu"), said.append).on
    late = cfg.model_copy(update={"steps": [9, 9]})
    n = len(said)
    late_profiler = StepProfiler(late, tmp_path, 0, torch.device("cpu"), said.append)
    assert late_profiler.describe(4) == (f"; profile of steps 9-9 (ranks 0) in {tmp_path}/profile/steps9-9 "
                                         "(never reached: train.max_steps is 4)")
    assert StepProfiler(None, tmp_path, 0, torch.device("cpu"), said.append).describe(4) == ""
    drive(late_profiler)
    assert said[n:] == ["logging.profile: steps 9-9 not traced: the run ended at step 4"]
    assert not (tmp_path / "profile" / "steps9-9").exists()


def test_profile_settings_are_checked():
    for bad, msg in [("{steps: [3, 2]}", "1 <= first <= last"), ("{steps: [0, 1]}", "1 <= first <= last"),
                     ("{steps: [1]}", "at least 2 items"), ("{steps: [1, 2], ranks: [-1]}", "ranks are 0 or more"),
                     ("{steps: [1, 2], rank: [1]}", "logging.profile.rank: unknown key; did you mean '--logging.profile.ranks'")]:
        with pytest.raises(ConfigError, match=re.escape(msg)) as e:
            load_config(None, ["--logging.profile", bad])
        assert "logging.profile" in str(e.value)
    cfg = load_config(None, ["--logging.profile", "{steps: [1, 2], ranks: [2, 0, 2]}"])
    assert cfg.logging.profile.ranks == [0, 2]
    cfg.layout(4)
    with pytest.raises(ConfigError, match=r"logging.profile.ranks: rank 2 does not exist in a world of 2 "
                                          r"processes: name ranks 0-1"):
        cfg.layout(2)


@pytest.mark.slow
@pytest.mark.xdist_group("references")  # shares the uninterrupted 2-rank run with the fault tests
def test_profiled_run_trains_bitwise_like_the_plain_run(tmp_path, references):
    """torchrun, 2 ranks, both tracing steps 2-3 (4 micro-batches per step); stopped after 10
    micro-batches (inside step 3), then resumed: each rank wrote the first part of the range and,
    after the resume, the rest under new names; the final state is bitwise the unprofiled run's."""
    profile = {"profile": {"steps": [2, 3], "ranks": [0, 1]}}
    cmd, run_dir = command(tmp_path, "run", 2, checkpoint={"every_micro_batches": 0}, logging=profile)
    stopped = run(cmd, env={**ENV, "SEQPAR_STOP_AFTER_MICRO_BATCHES": "10"})
    # the ranks exit 75 (saved); torchrun itself reports any non-zero worker as 1
    assert stopped.returncode == 1 and "exitcode  : 75" in stopped.stderr, stopped.stderr[-3000:]
    assert re.search(r"output  .*; profile of steps 2-3 \(ranks 0,1\) in .*profile/steps2-3", stopped.stdout)
    assert "rank 1: profile of steps 2-3: " in stopped.stdout  # a non-first rank says its own files
    resumed = run(cmd)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    out = run_dir / "profile" / "steps2-3"
    for r in (0, 1):
        assert ranges(out / f"rank{r}.trace.json.gz") == [
            *(f"step 2 micro-batch {m}" for m in (1, 2, 3, 4)), "step 3 micro-batch 1", "step 3 micro-batch 2"]
        assert ranges(out / f"rank{r}.2.trace.json.gz") == ["step 3 micro-batch 3", "step 3 micro-batch 4"]
        assert (out / f"rank{r}.2.txt").read_text().startswith(f"# rank {r}, optimizer steps 3-3 (")
    assert final_hashes(run_dir) == references[(2, 8)]


def test_a_trace_that_cannot_be_written_is_said_not_raised(tmp_path):
    """finish() runs in the trainer's finally (a stop, an error): a failed write must not replace
    the run's own exit with another exception; no partial file is left under a final name."""
    cfg = load_config(None, ["--logging.profile", "{steps: [1, 1]}"]).logging.profile
    (tmp_path / "profile").write_text("a file where the directory should go")
    said: list[str] = []
    prof = StepProfiler(cfg, tmp_path, 0, torch.device("cpu"), said.append)
    prof.before(0, 0)
    micro_batch(0, 0)
    prof.after(1)  # the range ends: finish() writes, fails, says so
    assert len(said) == 1 and said[0].startswith("logging.profile: the trace of steps 1-1 was not written: ")
    assert not prof.active
    prof.finish(1)  # idempotent: nothing more is said
    assert len(said) == 1
