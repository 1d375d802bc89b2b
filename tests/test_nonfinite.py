"""Steps whose gradients are not finite (seqpar/engine/nonfinite.py): never applied on any
optimizer path, counted, resumed bitwise, and a run that keeps producing them stops as diverged."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from common import BASE, ENV, ROOT, final_hashes, read_rows, run, torchrun, write_config

from seqpar.checkpoint.runstate import classify, read_run_state


def test_older_checkpoints_and_clipping_by_an_infinite_norm():
    """A trainer state saved before the skip counters existed loads with them at 0; clipping by a
    norm that is not finite makes the gradients NaN (never 0: the optimizer would step on zeros)."""
    import torch

    from seqpar.engine.trainer import TrainState
    from seqpar.optim.clip import clip_to_norm_

    saved = TrainState(step=7, micro_step=2).state_dict()
    old = {k: v for k, v in saved.items() if k not in ("skipped_steps", "skips_in_a_row")}
    st = TrainState(skipped_steps=3)
    st.load_state_dict(old)
    assert (st.step, st.micro_step, st.skipped_steps) == (7, 2, 3)  # missing: kept as constructed
    with pytest.raises(KeyError):  # anything else missing is still an error
        TrainState().load_state_dict({k: v for k, v in saved.items() if k != "step"})
    grads = [torch.ones(3), torch.full((2,), 2.0)]
    clip_to_norm_(grads, torch.tensor(float("inf")), 1.0)
    assert all(torch.isnan(g).all() for g in grads)
    grads = [torch.ones(4)]
    clip_to_norm_(grads, torch.tensor(4.0), 1.0)  # finite norms clip as before
    assert torch.allclose(grads[0], torch.full((4,), 0.25), atol=1e-6)


@pytest.mark.slow
def test_skipped_on_every_optimizer_path(tmp_path):
    r = torchrun(2, "nonfinite_worker.py", str(tmp_path / "rows.jsonl"), cwd=tmp_path, timeout=900)
    rows = read_rows(tmp_path / "rows.jsonl")
    assert r.returncode == 0 and rows, r.stdout[-4000:] + r.stderr[-4000:]
    assert {row["case"] for row in rows} >= {"zero0-fp32", "zero3-fp32", "qgalore-zero0", "experts-split-zero0",
                                             "fp32 paths agree", "diverged"}
    bad = [row for row in rows if not row["ok"]]
    assert not bad, bad
    # both ways of deciding are exercised: seqpar's own check and DeepSpeed's
    decides = {row["case"]: row["deepspeed_decides"] for row in rows if "deepspeed_decides" in row}
    assert not decides["zero0-fp32"] and decides["zero2-fp32"]


def _nan_run(tmp_path, name, steps: str, *extra: str, **over) -> tuple[subprocess.CompletedProcess, object]:
    path, run_dir = write_config(tmp_path, name, BASE, **over)
    cmd = [sys.executable, str(ROOT / "tests" / "nonfinite_main.py"), "--config", str(path), *extra]
    env = {**ENV, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "SEQPAR_TEST_NAN_STEPS": steps}
    return run(cmd, env=env), run_dir


@pytest.mark.slow
def test_diverged_run_stops_and_resume_is_bitwise(tmp_path):
    # every step from the fourth on is NaN: two are skipped, the third in a row stops the run
    r, run_dir = _nan_run(tmp_path, "div", "3,4,5,6,7", train={**BASE["train"], "max_skipped_steps": 2})
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "seqpar: training diverged: gradients were not finite at steps 4-6 (3 in a row" in r.stderr
    assert "the newest checkpoint is step00000006-seq" not in r.stderr  # nothing saved at the stop itself
    assert "WARNING: step 4/8: gradients are not finite (loss nan); the update was skipped" in r.stdout
    assert "2 in a row (the run stops at 3: train.max_skipped_steps=2)" in r.stdout
    rec = read_run_state(run_dir / "run_state.json")
    assert rec["state"] == "diverged" and rec["step"] == 6 and rec["checkpoint"].startswith("step00000005")
    assert classify(rec, 1)[0] == 2  # restart wrappers do not retry it
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [x.get("skipped_steps") for x in rows] == [None, None, None, 1, 2, 3]  # the stopping step too
    assert rows[3]["loss"] is None and rows[3]["grad_norm"] is None  # strict JSON: NaN / inf as null
    # a higher limit is accepted on resume without allow_changes; the run goes on skipping
    r = run(r.args + ["--train.max_skipped_steps", "10"], env={**ENV, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
                                                                "SEQPAR_TEST_NAN_STEPS": "3,4,5,6,7"})
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]

    # one skipped step (the third), resumed mid-window after it: bitwise the uninterrupted run
    over = {"checkpoint": {**BASE["checkpoint"], "keep_last": 100}}
    r, full = _nan_run(tmp_path, "full", "2", **over)
    assert r.returncode == 0 and "WARNING: step 3/8" in r.stdout, r.stderr[-3000:]
    assert "done: 8 steps, loss" in r.stdout and ", 1 skipped (gradients not finite)" in r.stdout
    tag = next(p for p in sorted((full / "checkpoints").iterdir()) if p.name.startswith("step00000004-seq000003"))
    r, resumed = _nan_run(tmp_path, "resumed", "2", "--resume", str(tag), **over)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    a, b = final_hashes(full), final_hashes(resumed)
    assert a == b
    rows = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rows and all(x.get("skipped_steps") == 1 for x in rows)  # the count came with the checkpoint
