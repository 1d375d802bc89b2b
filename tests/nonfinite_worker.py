"""Worker for tests/test_nonfinite.py (torchrun, 2 processes): steps whose gradients are not finite.

For each optimizer path (plain ZeRO-0 fp32, DeepSpeed's bf16 wrapper, ZeRO-1/2/3, GaLore, Q-GaLore's
INT8 weights, split experts clipped by seqpar) a tiny model trains 5 steps; at step 2 the first
micro-batch of rank 1 only gets a NaN embedding output (a forward hook). Checks, per path: the
step's update is not applied (weights and every optimizer tensor bitwise unchanged), the LR
schedule still follows the step number, later steps train (finite, changing weights), the state
counts the skip and metrics.jsonl records it; across the fp32 paths the final weights agree (one
rule on every layout). Then a run whose every step from step 3 on is NaN stops with ``Diverged``
on both ranks once ``train.max_skipped_steps`` is passed. One JSON row per check on stdout (rank 0).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from common import finish, report, shared_tmpdir, tiny_model
from seqpar.config import validate_config
from seqpar.engine import Trainer
from seqpar.engine import deepspeed_state as dss
from seqpar.engine.nonfinite import Diverged
from seqpar.parallel import make_topology

STEPS = 5
CASES = {  # name: (model, parallel, train)
    "zero0-fp32": (tiny_model(False), {"zero_stage": 0}, {}),
    "zero0-bf16": (tiny_model(False), {"zero_stage": 0}, {"precision": "bf16"}),
    "zero1-fp32": (tiny_model(False), {"zero_stage": 1}, {}),
    "zero2-fp32": (tiny_model(False), {"zero_stage": 2}, {}),
    "zero3-fp32": (tiny_model(False), {"zero_stage": 3}, {}),
    "galore-zero0": (tiny_model(False), {"zero_stage": 0},
                     {"optimizer": "galore", "galore": {"rank": 8, "update_interval": 2}}),
    "qgalore-zero0": (tiny_model(False), {"zero_stage": 0},
                      {"optimizer": "qgalore", "precision": "bf16",
                       "galore": {"rank": 8, "update_interval": 2, "quant_group": 16}}),
    "experts-split-zero0": (tiny_model(True), {"zero_stage": 0, "expert_degree": 2}, {}),
}
FP32_SAME = ("zero0-fp32", "zero1-fp32", "zero2-fp32", "zero3-fp32")  # one trajectory, skip included


def trainer(name: str, root: Path, model: dict, parallel: dict, train: dict, **more) -> Trainer:
    cfg = validate_config({
        "model": model, "parallel": parallel,
        "data": {"type": "passkey", "seq_len": 128, "passkey": {"eval_samples": 0, "key_digits": 2}},
        "train": {"max_steps": STEPS, "micro_batch_size": 1, "global_batch_size": 4, "lr": 1e-2, "warmup_steps": 1,
                  **train, **more},
        "checkpoint": {"every_micro_batches": 0, "at_end": False},
        "logging": {"run_dir": str(root / name), "progress_bar": False, "tensorboard": "off", "log_every": 1},
    })
    return Trainer(cfg, make_topology(1, 1, torch.device("cpu")), config_path=name)


def inject_nan(tr: Trainer, steps: set[int]) -> None:
    """NaN embeddings in rank 1's first micro-batch of each step in ``steps`` (0-based)."""
    def hook(module, args, out):
        hit = tr.state.step in steps and tr.state.micro_step == 0 and dist.get_rank() == 1
        return out * float("nan") if hit else out
    tr.model.model.embed_tokens.register_forward_hook(hook)


def weights(tr: Trainer) -> list[torch.Tensor]:
    params = list(tr.model.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        out = [p.detach().float().clone() for p in params]
    # buffers too (the MoE router bias), but not the routing digest: a record of each step's routing
    return out + [b.detach().float().clone() for n, b in tr.model.named_buffers() if not n.endswith("routing_digest")]


def optimizer_tensors(tr: Trainer) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            found.append(x.detach().clone())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(dss.capture_optimizer(tr.engine)["optimizer"])
    return found


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def run_case(name: str, root: Path, rows: list[dict]) -> list[torch.Tensor]:
    tr = trainer(name, root, *CASES[name])
    inject_nan(tr, {2})
    tr.engine.train()
    problems: list[str] = []
    before_w, before_o = weights(tr), optimizer_tensors(tr)
    for step in range(1, STEPS + 1):
        while True:
            tr.train_micro_batch()
            if tr.state.micro_step == 0:
                break
        w, o = weights(tr), optimizer_tensors(tr)
        lr_step = tr.engine.lr_scheduler.last_epoch
        if lr_step != step:
            problems.append(f"step {step}: the LR scheduler is at {lr_step}")
        if step == 3:  # the NaN step (0-based 2)
            if not same(w, before_w):
                problems.append("the skipped step changed the weights")
            if not same(o, before_o):
                problems.append("the skipped step changed the optimizer state")
            if (tr.state.skipped_steps, tr.state.skips_in_a_row) != (1, 1):
                problems.append(f"counters after the skip: {tr.state.skipped_steps}, {tr.state.skips_in_a_row}")
        else:
            if same(w, before_w):
                problems.append(f"step {step} did not change the weights")
            if not all(torch.isfinite(t).all() for t in w):
                problems.append(f"weights not finite after step {step}")
        before_w, before_o = w, o
    if tr.state.skips_in_a_row != 0 or tr.state.skipped_steps != 1:
        problems.append(f"final counters {tr.state.skipped_steps}, {tr.state.skips_in_a_row}")
    if not all(x == x for x in tr.state.losses[3:]):
        problems.append(f"losses after the skip are not finite: {tr.state.losses}")
    tr.ckpt.finish()
    tr.logger.close()
    if dist.get_rank() == 0:
        recs = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
        logged = {r["step"]: r.get("skipped_steps") for r in recs if "loss" in r}
        if logged != {1: None, 2: None, 3: 1, 4: 1, 5: 1}:
            problems.append(f"metrics.jsonl skipped_steps by step: {logged}")
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, problems)
    report({"case": name, "ok": not any(ranks), "problems": ranks,
            "deepspeed_decides": tr.nonfinite.deepspeed_decides}, rows)
    return weights(tr) if name in FP32_SAME else []


def diverge(root: Path, rows: list[dict]) -> None:
    tr = trainer("diverge", root, *CASES["zero2-fp32"], max_skipped_steps=1)
    inject_nan(tr, {2, 3, 4})
    tr.engine.train()
    message, step = "", None
    try:
        while tr.state.step < STEPS:
            tr.train_micro_batch()
    except Diverged as e:
        message, step = str(e), tr.state.step
    tr.ckpt.finish()
    tr.logger.close()
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, (step, message))
    ok = all(s == 4 for s, _ in got) and "gradients were not finite at steps 3-4 (2 in a row" in got[0][1] \
        and "train.max_skipped_steps=1" in got[0][1]
    report({"case": "diverged", "ok": ok, "got": got}, rows)


def main() -> int:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    root = shared_tmpdir("seqpar-nonfinite-")
    rows: list[dict] = []
    finals = {name: run_case(name, root, rows) for name in CASES}
    ref = finals[FP32_SAME[0]]
    far = {n: max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(finals[n], ref))
           for n in FP32_SAME[1:]}
    report({"case": "fp32 paths agree", "ok": all(v <= 1e-5 for v in far.values()), "rel": far}, rows)
    diverge(root, rows)
    return finish(rows, out)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
