"""Periodic held-out evaluation (train.eval_every): per held-out file, by position in the document,
the same under sequence parallelism, without effect on training, and keeping the best checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

from common import ROOT, command, run
from seqpar.data.packing import IGNORE_INDEX
from seqpar.engine.evaluation import HeldOutResult, position_buckets, position_sums


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
    """The held-out loss, also by position, of 2 Ulysses ranks (each scoring its shard) and of 2
    zigzag-ring ranks (shards of reordered chunks) equals one process's; so does that of 2
    data-parallel ranks scoring 3 sequences (the second rank's second turn is padding: not counted)."""
    losses = {}
    for name, nproc, par in (("one", 1, {}), ("sp2", 2, {"ulysses_degree": 2, "zero_stage": 3}),
                             ("ring2", 2, {"ring_degree": 2}), ("dp2", 2, {})):
        cmd, run_dir = command(tmp_path, name, nproc, train={"max_steps": 2, "eval_every": 2, "eval_samples": 3,
                                                             "eval_by_position": [32, 64]},
                               checkpoint={"every_micro_batches": 0}, parallel=par)
        r = run(cmd)
        assert r.returncode == 0, r.stderr[-3000:]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [{k: v for k, v in rec.items() if k.startswith("eval_loss")} for rec in records
                        if "eval_loss" in rec]
        # each rank scored its shard of the positions: the buckets still hold every labelled token
        assert "| by position 0-32 " in r.stdout and ", 64-128 " in r.stdout, r.stdout[-2000:]
    assert len(losses["one"]) == 1 and set(losses["one"][0]) == {
        "eval_loss", "eval_loss_by_position/0-32", "eval_loss_by_position/32-64", "eval_loss_by_position/64-128"}
    for sp in ("sp2", "ring2", "dp2"):
        assert list(losses[sp][0]) == list(losses["one"][0]), losses
        for key, value in losses["one"][0].items():
            assert losses[sp][0][key] == pytest.approx(value, rel=1e-4), (sp, key, losses)


@pytest.mark.slow
def test_eval_per_file_and_by_position_added_on_resume_leave_training_bitwise_the_same(tmp_path):
    """Evaluation settings are not part of what a run computes: a run resumed with held-out sets
    added (one per file, by position) continues bitwise the same training as the run without them,
    and a per-file set scores what that file alone as data.eval_paths scores."""
    lines = (ROOT / "tests" / "data" / "docs_eval.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "books.jsonl").write_text("".join(lines[:9]))
    (tmp_path / "web.jsonl").write_text("".join(lines[9:]))
    data = {"type": "text", "paths": [str(ROOT / "tests" / "data" / "docs_train.jsonl")], "seq_len": 128}
    base = {"model": {"hidden_size": 32}, "data": data, "train": {"max_steps": 4, "global_batch_size": 4},
            "checkpoint": {"every_micro_batches": 0, "every_steps": 1, "keep_last": 4}, "logging": {"log_every": 1}}
    cmd, plain = command(tmp_path, "plain", 1, **base)
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    step2 = plain / "checkpoints" / next(p.name for p in (plain / "checkpoints").glob("step00000002*"))

    def resumed(name: str, **evaluation) -> tuple[dict[int, dict], str]:
        cmd, run_dir = command(tmp_path, name, 1, **{
            **base, "data": {**data, **evaluation.pop("data")},
            "train": {**base["train"], "eval_every": 1, "eval_samples": 2, **evaluation},
            "checkpoint": {"every_micro_batches": 0, "every_steps": 0, "resume": str(step2)}})
        r = run(cmd)
        assert r.returncode == 0, r.stderr[-3000:]
        rows: dict[int, dict] = {}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            rows.setdefault(rec["step"], {}).update(rec)
        return rows, r.stdout

    both, out = resumed("both", data={"eval_paths": [str(tmp_path / "books.jsonl"), str(tmp_path / "web.jsonl")],
                                         "eval_per_file": True}, eval_by_position=[32, 64])
    reference = {rec["step"]: rec["loss"] for rec in map(json.loads, (plain / "metrics.jsonl").read_text().splitlines())
                 if "loss" in rec}
    assert {s: both[s]["loss"] for s in (3, 4)} == {s: reference[s] for s in (3, 4)}  # bitwise: == on floats
    keys = {"eval_loss", "eval_loss/books", "eval_loss/web", "eval_loss_by_position/0-32",
            "eval_loss_by_position/32-64", "eval_loss_by_position/64-128"}
    assert keys <= set(both[3]) and keys <= set(both[4]), both
    m = both[4]
    assert min(m["eval_loss/books"], m["eval_loss/web"]) < m["eval_loss"] < max(m["eval_loss/books"], m["eval_loss/web"])
    line = next(x for x in out.splitlines() if x.startswith("eval step 4/4"))
    assert line == (f"eval step 4/4 | held-out loss {m['eval_loss']:.4f} (4 sequences) | books {m['eval_loss/books']:.4f}, "
                    f"web {m['eval_loss/web']:.4f} | by position 0-32 {m['eval_loss_by_position/0-32']:.4f}, 32-64 "
                    f"{m['eval_loss_by_position/32-64']:.4f}, 64-128 {m['eval_loss_by_position/64-128']:.4f}"), line
    books, _ = resumed("books", data={"eval_paths": [str(tmp_path / "books.jsonl")]})
    assert books[3]["eval_loss"] == pytest.approx(both[3]["eval_loss/books"], rel=1e-12)
    assert not any(k.startswith("eval_loss/") for k in books[3])


def test_position_sums_count_every_labelled_token_in_its_bucket():
    g = torch.Generator().manual_seed(0)
    pos = torch.cat([torch.arange(50), torch.arange(30), torch.arange(20)])  # three packed documents
    labels = torch.randint(0, 9, (100,), generator=g)
    labels[[0, 49, 79, 99]] = IGNORE_INDEX
    losses = torch.rand(100, generator=g)
    edges = [8, 32]
    got = position_sums(losses, pos, labels, torch.tensor(edges))
    for b, (lo, hi) in enumerate(zip([0, *edges], [*edges, 10**9])):
        sel = [i for i in range(100) if lo <= pos[i] < hi and labels[i] != IGNORE_INDEX]
        assert got[b, 1].item() == len(sel)
        assert got[b, 0].item() == pytest.approx(sum(losses[i].item() for i in sel), rel=1e-12)
    assert position_sums(losses, pos, labels, torch.tensor([], dtype=torch.int64)).tolist() == [[
        pytest.approx(losses[labels != IGNORE_INDEX].double().sum().item()), 96.0]]
    assert position_buckets([4096, 16384], 32768) == ["0-4K", "4K-16K", "16K-32K"]
    assert position_buckets([1000], 2**20) == ["0-1000", "1000-1M"]


def test_held_out_result_logs_and_says_each_set_and_bucket():
    r = HeldOutResult(2.5, 8, {"books": 2.0, "web": 3.0}, {"0-4K": 2.75, "4K-8K": math.nan})
    assert r.metrics() == {"eval_loss": 2.5, "eval_loss/books": 2.0, "eval_loss/web": 3.0,
                           "eval_loss_by_position/0-4K": 2.75}  # a bucket no token reached is left out
    assert r.line(3, 10) == ("eval step 3/10 | held-out loss 2.5000 (8 sequences) | books 2.0000, web 3.0000 "
                             "| by position 0-4K 2.7500, 4K-8K -")
    assert HeldOutResult(1.0, 4, {}, {}).line(1, 2) == "eval step 1/2 | held-out loss 1.0000 (4 sequences)"


def test_passkey_summary_names_the_chance_level():
    from seqpar.evaluate import passkey_summary

    assert passkey_summary(0.8125, 64, 3) == "passkey accuracy 81.2% on 64 held-out 3-digit keys (chance 0.1%)"
    assert passkey_summary(0.0, 64, 5).endswith("(chance 0.001%)")
