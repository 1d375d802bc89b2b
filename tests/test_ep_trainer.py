"""Expert parallelism through the trainer (issue 13), 2 gloo processes: EP 2 trains like EP 1 (same
losses and final weights within fp32 reduction-order noise) at ZeRO-0 (seqpar's own clipping), 1 and 2, the checkpoint's
Hugging Face export holds every expert, and the start-up summary says how experts are split.
(Bitwise resume with EP 2: the resume matrix, tests/resume_worker.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from common import command, run, tiny_model


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_expert_parallel_trains_like_one_expert_group(tmp_path, stage):
    from seqpar.config import ModelConfig
    from seqpar.models import build_model
    from seqpar.models.hf import load_hf_checkpoint

    model = tiny_model(True)
    model["moe"]["num_experts"] = 8
    runs = {}
    for ep in (1, 2):
        cmd, run_dir = command(tmp_path, f"ep{ep}", 2, model=model,
                               parallel={"zero_stage": stage, "expert_degree": ep},
                               train={"max_steps": 4, "global_batch_size": 4},
                               checkpoint={"every_micro_batches": 0}, logging={"log_every": 1})
        r = run(cmd, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        runs[ep] = (run_dir, r.stdout)
    assert "(4 per rank, expert-parallel over 2)" in runs[2][1]
    assert "memory  predicted peak" in runs[2][1]  # the planner's line in the start-up summary
    a, b = losses(runs[1][0]), losses(runs[2][0])
    assert len(a) == len(b) == 4 and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)
    weights = []
    for ep in (1, 2):
        ck = runs[ep][0] / "checkpoints"
        full = build_model(ModelConfig(**model), seed=0)
        load_hf_checkpoint(full, ck / (ck / "latest").read_text().strip() / "model")  # strict: every expert
        weights.append(dict(full.named_parameters()))
    for n, w in weights[0].items():
        torch.testing.assert_close(weights[1][n], w, rtol=1e-4, atol=1e-5, msg=n)

