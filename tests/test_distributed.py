"""Multi-process runs on CPU (gloo): ZeRO-2/3 with 2 ranks follow the 1-rank loss curve exactly,
and the three launchers (python, torchrun, deepspeed) all work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import free_port, write_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "seqpar" / "train.py")

TINY = {
    "model": {"arch": "llama", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "data": {"type": "passkey", "seq_len": 128, "passkey": {"eval_samples": 4}},
    "train": {"max_steps": 6, "micro_batch_size": 1, "global_batch_size": 4, "lr": 3e-3,
              "warmup_steps": 1, "grad_clip": 1.0},
    "logging": {"progress_bar": False, "log_every": 1},
}
MOE = {
    "arch": "qwen2_moe", "tie_word_embeddings": True,
    "moe": {"num_experts": 4, "top_k": 2, "intermediate_size": 32, "shared_expert_intermediate_size": 32,
            "shared_expert_gate": True, "aux_loss_coef": 0.01, "bias_update_rate": 0.001},
}


def launch(tmp: Path, name: str, nproc: int, launcher: str, model: dict | None = None, **sections) -> list[dict]:
    """Run one training job; return its metrics.jsonl records."""
    r, run_dir = run_job(tmp, name, nproc, launcher, model, **sections)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_job(tmp: Path, name: str, nproc: int, launcher: str, model: dict | None = None,
            **sections) -> tuple[subprocess.CompletedProcess, Path]:
    """Run one training job (``TINY`` with ``model`` and ``sections`` over it); (result, run dir)."""
    path, run_dir = write_config(tmp, name, TINY, **({"model": model} if model else {}), **sections)
    port = free_port()
    if launcher == "python":
        cmd = [sys.executable, TRAIN]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={port}", TRAIN]
    else:
        cmd = ["deepspeed", f"--num_gpus={nproc}", f"--master_port={port}", TRAIN]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(cmd + ["--config", str(path)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp)
    return r, run_dir


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


def assert_same_curve(ref: list[float], got: list[float], rtol: float = 1e-5) -> None:
    assert len(ref) == len(got) > 0
    worst = max(abs(a - b) / abs(a) for a, b in zip(ref, got))
    assert worst <= rtol, f"relative loss difference {worst:.2e} > {rtol}: {ref} vs {got}"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dense", "moe"])
def test_zero2_and_zero3_two_ranks_match_one_rank(tmp_path, model):
    """Same global batch (4 sequences): 1 rank x 4 micro-steps vs 2 ranks x 2 micro-steps."""
    m = MOE if model == "moe" else None
    ref = losses(launch(tmp_path, "ref", 1, "python", m, parallel={"zero_stage": 0}))
    assert ref[-1] < ref[0] * 0.9, f"loss did not fall: {ref}"
    for stage in (2, 3):
        got = losses(launch(tmp_path, f"z{stage}", 2, "torchrun", m, parallel={"zero_stage": stage}))
        assert_same_curve(ref, got)


@pytest.mark.slow
def test_deepspeed_launcher_bf16_activation_checkpointing(tmp_path):
    """`deepspeed --num_gpus 2 seqpar/train.py`, bf16 + activation checkpointing + ZeRO-1: trains,
    logs every operator metric, and reports passkey accuracy."""
    recs = launch(tmp_path, "bf16", 2, "deepspeed", MOE, parallel={"zero_stage": 1},
                  train={"precision": "bf16", "max_steps": 6}, memory={"activation_checkpointing": "full"})
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    for key in ("lr", "tok_s", "step_time_s", "mem_gib", "grad_norm", "aux_loss", "moe_max_load"):
        assert key in steps[-1], key
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert 0.0 <= recs[-1]["passkey_accuracy"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dense", "moe"])
def test_sequence_parallel_training_matches_sp1(tmp_path, model):
    """20 optimizer steps: Ulysses 2 (ZeRO-2), ring 2 (ZeRO-3) and 2x2 hybrid (ZeRO-3, 4 ranks)
    follow the single-rank loss curve within 1e-4 (same global batch of 4 sequences)."""
    m = MOE if model == "moe" else None
    steps = {"max_steps": 20, "warmup_steps": 2}
    ref = losses(launch(tmp_path, "ref", 1, "python", m, parallel={"zero_stage": 0}, train=steps))
    assert ref[-1] < ref[0] * 0.8, f"loss did not fall: {ref}"
    for name, nproc, par in [
        ("u2z2", 2, {"ulysses_degree": 2, "zero_stage": 2}),
        ("r2z3", 2, {"ring_degree": 2, "zero_stage": 3}),
        ("u2r2z3", 4, {"ulysses_degree": 2, "ring_degree": 2, "zero_stage": 3}),
    ]:
        got = losses(launch(tmp_path, name, nproc, "torchrun", m, parallel=par, train=steps))
        assert_same_curve(ref, got, rtol=1e-4)


@pytest.mark.slow
def test_two_ranks_tokenize_once(tmp_path):
    """torchrun, 2 ranks, jsonl text: rank 0 tokenizes into the cache and says so, rank 1 waits on
    the gloo control group and reads the same entry; a bad record stops both ranks with its line."""
    # enough that rank 0 is still tokenizing when rank 1 arrives (a rank that did not wait would tokenize too)
    docs = [{"text": f"document {i}: " + "long context " * (i % 7 + 3)} for i in range(60_000)]
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(d) + "\n" for d in docs))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + json.dumps({"txt": "no text field"}) + "\n")
    cache = tmp_path / "cache"
    text = {"type": "text", "seq_len": 64, "cache_dir": str(cache)}
    train = {"max_steps": 1, "global_batch_size": 2, "warmup_steps": 0}
    r, _ = run_job(tmp_path, "bad", 2, "torchrun", data={**text, "paths": [str(bad)]}, train=train)
    assert r.returncode != 0 and f"{bad}:60001: missing field 'text'" in r.stderr, r.stderr[-3000:]
    assert not cache.exists() or not any(cache.iterdir())

    r, run_dir = run_job(tmp_path, "good", 2, "torchrun", data={**text, "paths": [str(good)]}, train=train)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("seqpar: tokenizing data.paths (1 file") == 1, r.stdout  # the first rank's
    assert "seqpar: rank 1:" not in r.stdout, r.stdout  # rank 1 waited, then read rank 0's entry
    assert r.stdout.count("seqpar: tokenized ") == 1 and "(60,000 documents)" in r.stdout
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1]
    (entry,) = cache.iterdir()  # one entry, no temporary folder left by either rank
    assert entry.name.startswith("text-") and (entry / "meta.json").is_file()
