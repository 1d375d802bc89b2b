"""``train.compile`` through the trainer (issue 11): the compiled run resumes bitwise from a
checkpoint inside an accumulation window, and its losses equal the eager run's closely."""

from __future__ import annotations

import json

import pytest

from common import ENV, command, final_hashes, run


@pytest.mark.slow
def test_compiled_layers_train_like_eager_and_resume_bitwise(tmp_path):
    common = {"train": {"max_steps": 3}, "checkpoint": {"every_micro_batches": 0}, "logging": {"log_every": 1}}
    eager_cmd, eager_dir = command(tmp_path, "eager", 1, **common)
    comp = {**common, "train": {**common["train"], "compile": True}}
    full_cmd, full_dir = command(tmp_path, "compiled", 1, **comp)
    stop_cmd, stop_dir = command(tmp_path, "stopped", 1, **comp)
    eager, full = run(eager_cmd, timeout=600), run(full_cmd, timeout=600)
    assert eager.returncode == 0 and full.returncode == 0, (eager.stdout + full.stdout)[-3000:]
    assert "compiled layers" in full.stdout and "compiled layers" not in eager.stdout

    def losses(d):
        return [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    a, b = losses(eager_dir), losses(full_dir)
    assert len(a) == len(b) == 3 and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)
    stopped = run(stop_cmd + ["--resume", "none"], timeout=600, env={**ENV, "SEQPAR_STOP_AFTER_MICRO_BATCHES": "6"})
    assert stopped.returncode == 75, stopped.stdout[-3000:]
    resumed = run(stop_cmd + ["--resume", "auto"], timeout=600)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-3000:]
    assert final_hashes(stop_dir) == final_hashes(full_dir)
