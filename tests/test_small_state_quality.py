"""Quality of the small-state modes on a text task of our own data (issue 14): the paragraphs of this
project's docs as of 2026-11-30 (tests/data/docs_train.jsonl, docs_eval.jsonl held out), bytes as
tokens. A tiny Llama trained with AdamW for 60 steps is the reference; GaLore (rank 1/4 of hidden)
and Q-GaLore (INT8 weights, INT4 projectors) must reach a held-out loss within 5% of it; LoRA
adapters trained on top of the AdamW model (its export as the frozen base) must improve its
held-out loss. The numbers go to docs/lora.md."""

from __future__ import annotations

import json

import pytest

from common import ROOT, command, run

DATA = ROOT / "tests" / "data"


def eval_loss(run_dir) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r][-1]


@pytest.mark.slow
def test_galore_matches_adamw_and_lora_improves_on_its_base(tmp_path):
    sections = {
        "model": {"hidden_size": 64, "intermediate_size": 192},
        "data": {"type": "text", "paths": [str(DATA / "docs_train.jsonl")],
                 "eval_paths": [str(DATA / "docs_eval.jsonl")], "seq_len": 256},
        "parallel": {"zero_stage": 0},
        "train": {"max_steps": 60, "micro_batch_size": 4, "global_batch_size": 8, "lr": 3e-3, "warmup_steps": 5,
                  "weight_decay": 0.0, "eval_every": 60, "eval_samples": 16},
        "checkpoint": {"every_micro_batches": 0, "every_steps": 0},
        "logging": {"log_every": 20},
    }
    adam_cmd, adam_dir = command(tmp_path, "adamw", 1, **sections)
    assert run(adam_cmd, timeout=600).returncode == 0
    galore = {**sections, "train": {**sections["train"], "optimizer": "galore",
                                    "galore": {"rank": 16, "update_interval": 20, "scale": 1.0}}}
    gal_cmd, gal_dir = command(tmp_path, "galore", 1, **galore)
    assert run(gal_cmd, timeout=600).returncode == 0
    qgalore = {**galore, "train": {**galore["train"], "optimizer": "qgalore"}}  # INT8 weights, INT4 projectors
    q_cmd, q_dir = command(tmp_path, "qgalore", 1, **qgalore)
    r = run(q_cmd, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:]
    adam, gal, qgal = eval_loss(adam_dir), eval_loss(gal_dir), eval_loss(q_dir)
    assert adam < 4.0  # it learned something (random: ~5.7 nats per byte)
    assert gal <= 1.05 * adam, (gal, adam)
    assert qgal <= 1.05 * adam, (qgal, adam)

    from seqpar import ckpt

    assert ckpt.main(["export", str(adam_dir), str(tmp_path / "base")]) == 0
    lora = {**sections, "model": {**sections["model"], "hf_path": str(tmp_path / "base"),
                                  "lora": {"rank": 8, "alpha": 16}},
            "train": {**sections["train"], "max_steps": 60, "lr": 1e-2}}
    lora_cmd, lora_dir = command(tmp_path, "lora", 1, **lora)
    r = run(lora_cmd, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:]
    tuned = eval_loss(lora_dir)
    assert tuned < 0.995 * adam, (tuned, adam)  # adapters of rank 8 on a 64-wide model: a small, real gain
    print(f"held-out loss: AdamW {adam:.4f}, GaLore {gal:.4f} ({gal / adam:.3f}x), Q-GaLore {qgal:.4f} "
          f"({qgal / adam:.3f}x), "
          f"LoRA on the AdamW model {tuned:.4f} ({tuned / adam:.3f}x)")
