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



@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_expert_parallel_with_lora_adapters(tmp_path, stage):
    """LoRA with adapters on the routed experts under EP 2: trains like EP 1 (the frozen base
    experts are not overwritten by rank 0's at start-up), the adapter file holds every expert's
    adapters, a resume mid-window is bitwise, and (ZeRO-2) elastic onto EP 1 continues the losses."""
    from safetensors.torch import load_file

    from common import ENV, final_hashes

    model = {**tiny_model(True), "lora": {"rank": 4, "experts": True}}
    model["moe"] = {**model["moe"], "num_experts": 8}

    def cmd_for(name, ep):
        return command(tmp_path, name, 2, model=model, parallel={"zero_stage": stage, "expert_degree": ep},
                       train={"max_steps": 4, "global_batch_size": 4},
                       checkpoint={"every_micro_batches": 0, "keep_last": 3}, logging={"log_every": 1})

    def go(name, ep, env=None, resume=False):
        cmd, run_dir = cmd_for(name, ep)
        r = run(cmd + (["--resume", "auto"] if resume else []), timeout=600, env=env)
        return r, run_dir

    runs = {}
    for ep in (1, 2):
        r, run_dir = go(f"ep{ep}", ep)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        runs[ep] = run_dir
    a, b = losses(runs[1]), losses(runs[2])
    assert len(a) == len(b) == 4 and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)
    files = []
    for ep in (1, 2):
        ck = runs[ep] / "checkpoints"
        files.append(load_file(str(ck / (ck / "latest").read_text().strip() / "adapter" / "trainable.safetensors")))
    assert set(files[0]) == set(files[1]) and any(".mlp.experts." in k for k in files[0])
    for k, v in files[0].items():
        assert v.shape == files[1][k].shape, k  # every expert's adapters in the file
        torch.testing.assert_close(files[1][k], v, rtol=1e-4, atol=1e-5, msg=k)
    stopped, stop_dir = go("stopped", 2, env={**ENV, "SEQPAR_STOP_AFTER_MICRO_BATCHES": "3"})
    assert "stop requested (SEQPAR_STOP_AFTER_MICRO_BATCHES): saved" in stopped.stdout, stopped.stdout[-3000:]
    if stage == 2:  # the same checkpoint resumed elastically without EP continues the trajectory
        import shutil

        _, moved_dir = cmd_for("moved", 1)
        shutil.copytree(stop_dir / "checkpoints", moved_dir / "checkpoints")
        moved, _ = go("moved", 1, resume=True)
        assert moved.returncode == 0 and "onto a new layout" in moved.stdout, (moved.stdout + moved.stderr)[-3000:]
        got = losses(moved_dir)[-3:]
        assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(b[1:], got)), (b, got)
    resumed, _ = go("stopped", 2, resume=True)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, (resumed.stdout + resumed.stderr)[-3000:]
    assert final_hashes(stop_dir) == final_hashes(runs[2])
