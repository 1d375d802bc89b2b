"""Periodic held-out evaluation (train.eval_every) and keeping the best checkpoint by it."""

from __future__ import annotations

import json

import pytest

from common import command, run


@pytest.mark.slow
def test_eval_every_logs_held_out_loss_and_keep_best_keeps_the_lowest(tmp_path):
    cmd, run_dir = command(tmp_path, "eval", 1, train={"max_steps": 4, "eval_every": 1, "eval_samples": 4},
                           checkpoint={"every_micro_batches": 0, "keep_last": 1, "keep_best": True},
                           data={"passkey": {"eval_samples": 2, "key_digits": 2}})
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    done = next(line for line in r.stdout.splitlines() if line.startswith("done: 4 steps"))
    assert "held-out 2-digit keys (chance 1.0%)" in done and "on 2 held-out" in done, done
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {rec["step"]: rec["eval_loss"] for rec in records if "eval_loss" in rec}
    assert sorted(evals) == [1, 2, 3, 4] and all(0 < v < 10 for v in evals.values()), evals
    for step, loss in evals.items():  # shown as they happen, and the last one at the end
        assert f"eval step {step}/4 | held-out loss {loss:.4f} (4 sequences)" in r.stdout, r.stdout[-2000:]
    assert f"held-out loss {evals[4]:.4f} at step 4" in done, done
    ck = run_dir / "checkpoints"
    kept = {p.name: json.loads((p / "manifest.json").read_text()) for p in ck.glob("step*")}
    best_step = min(evals, key=evals.get)
    assert {m["position"]["step"] for m in kept.values()} == {best_step, 4}, kept.keys()
    assert all(m["eval_loss"] == evals[m["position"]["step"]] for m in kept.values())
    best_tag = next(t for t, m in kept.items() if m["position"]["step"] == best_step)
    assert f"best held-out loss {evals[best_step]:.4f}: {ck / best_tag}" in r.stdout, r.stdout[-2000:]
    bad = run(cmd + ["--train.eval_every", "0"])
    assert bad.returncode == 2 and "checkpoint.keep_best" in bad.stderr and "train.eval_every" in bad.stderr


@pytest.mark.slow
def test_eval_loss_is_the_same_under_sequence_parallelism(tmp_path):
    """The held-out loss of 2 Ulysses ranks (each scoring its shard) equals one process's."""
    losses = {}
    for name, nproc, par in (("one", 1, {}), ("sp2", 2, {"ulysses_degree": 2, "zero_stage": 3})):
        cmd, run_dir = command(tmp_path, name, nproc, train={"max_steps": 2, "eval_every": 2, "eval_samples": 3},
                               checkpoint={"every_micro_batches": 0}, parallel=par)
        r = run(cmd)
        assert r.returncode == 0, r.stderr[-3000:]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [rec["eval_loss"] for rec in records if "eval_loss" in rec]
    assert len(losses["one"]) == 1 and losses["sp2"] == pytest.approx(losses["one"], rel=1e-4), losses


def test_passkey_summary_names_the_chance_level():
    from seqpar.evaluate import passkey_summary

    assert passkey_summary(0.8125, 64, 3) == "passkey accuracy 81.2% on 64 held-out 3-digit keys (chance 0.1%)"
    assert passkey_summary(0.0, 64, 5).endswith("(chance 0.001%)")
