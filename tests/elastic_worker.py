"""Worker for tests/test_elastic_resume.py: one role per launch (torchrun, gloo).

``source``: for each cell whose source layout has this world size, train 2 of 4 steps (and for
``mid-`` cells a micro-step or two of the third) and stop through the preemption path, dump the full per-parameter state gathered with DeepSpeed's own
``safe_get_full_*`` API, then resume on the same layout and train to step 4 (the reference run).
``target``: for each cell whose target layout has this world size, resume that checkpoint on the
other layout, dump the same full state before training (must equal the source's bitwise) and
train to step 4 (losses and weights must stay close to the reference: only the reduction order
differs). Results go to ``<out>/<cell>.<role>.pt`` (rank 0).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from seqpar.checkpoint import codec
from seqpar.checkpoint.manager import ResumeError
from seqpar.checkpoint.store import tag_for
from common import tiny_model
from seqpar.config import validate_config
from seqpar.engine import Trainer
from seqpar.parallel import make_topology

# name: (source (world, zero, ulysses, ring), target (world, zero, ulysses, ring), moe, precision,
#        micro-steps into step 3's window at which the source stops: 0 = a step boundary)
# Global batch 4 sequences of 1: dp 2 runs windows of 2 micro-steps, dp 1 windows of 4.
CELLS = {
    "dp2-zero2_to_dp1-zero1": ((2, 2, 1, 1), (1, 1, 1, 1), False, "fp32", 0),
    "ring2-zero3-moe_to_dp1-zero0": ((2, 3, 1, 2), (1, 0, 1, 1), True, "fp32", 0),
    "dp2-zero1-bf16_to_dp1-zero3": ((2, 1, 1, 1), (1, 3, 1, 1), False, "bf16", 0),
    "dp1-zero3_to_dp2-zero2": ((1, 3, 1, 1), (2, 2, 1, 1), False, "fp32", 0),
    "dp1-zero0-moe_to_ulysses2-zero3": ((1, 0, 1, 1), (2, 3, 2, 1), True, "fp32", 0),
    "dp1-zero0-bf16_to_dp2-zero2": ((1, 0, 1, 1), (2, 2, 1, 1), False, "bf16", 0),
    # inside a window: partial gradients of every saved form (local stage 0/1, stage 2, stage 3)
    # into every accumulator form; the window goes on at the same sample on the new layout
    "mid-dp2-zero2_to_dp1-zero1": ((2, 2, 1, 1), (1, 1, 1, 1), False, "fp32", 1),
    "mid-dp2-zero0-moe_to_dp1-zero3": ((2, 0, 1, 1), (1, 3, 1, 1), True, "fp32", 1),
    "mid-ring2-zero3_to_dp1-zero2": ((2, 3, 1, 2), (1, 2, 1, 1), False, "fp32", 1),
    "mid-dp2-zero1-bf16_to_dp1-zero0": ((2, 1, 1, 1), (1, 0, 1, 1), False, "bf16", 1),
    "mid-dp1-zero3_to_dp2-zero0": ((1, 3, 1, 1), (2, 0, 1, 1), False, "fp32", 2),
    "mid-dp1-zero2-bf16_to_dp2-zero1": ((1, 2, 1, 1), (2, 1, 1, 1), False, "bf16", 2),
    "mid-dp2-zero0_to_ulysses2-zero3": ((2, 0, 1, 1), (2, 3, 2, 1), False, "fp32", 1),
    "mid-dp2-zero1_to_ring2-zero0": ((2, 1, 1, 1), (2, 0, 1, 2), False, "fp32", 1),
    "mid-step0-dp2-zero1_to_dp1-zero2": ((2, 1, 1, 1), (1, 2, 1, 1), False, "fp32", 1),
}
STOP_STEP = {"mid-step0-dp2-zero1_to_dp1-zero2": 0}  # inside the first window: no optimizer state yet


def tag(cell: str) -> str:
    """The source's stop checkpoint: steps done + sequences done in the window (micro-steps x dp)."""
    world, _, ulysses, ring = CELLS[cell][0]
    return tag_for(STOP_STEP.get(cell, 2), CELLS[cell][4] * world // (ulysses * ring))


def config(run_dir: Path, layout: tuple[int, int, int, int], moe: bool, max_steps: int, resume: str,
           precision: str = "fp32") -> dict:
    _, stage, ulysses, ring = layout
    model = tiny_model(moe)
    return {
        "model": model,
        "data": {"type": "passkey", "seq_len": 128, "passkey": {"eval_samples": 0, "key_digits": 2}},
        "parallel": {"zero_stage": stage, "ulysses_degree": ulysses, "ring_degree": ring},
        "train": {"max_steps": max_steps, "micro_batch_size": 1, "global_batch_size": 4, "lr": 1e-2,
                  "warmup_steps": 1, "grad_clip": 0.5, "precision": precision},
        "checkpoint": {"at_end": True, "resume": resume, "async_write": False, "keep_last": 5},
        "logging": {"run_dir": str(run_dir), "progress_bar": False, "tensorboard": "off"},
    }


def full_state(tr: Trainer) -> dict[str, torch.Tensor]:
    """fp32 master and Adam moments of every parameter, gathered by DeepSpeed (collective)."""
    out = {}
    opt = tr.engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 link the moments to the parameters at the first step, before torch's Adam has
        # created them (it does so lazily): link again now that they exist
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    # ZeRO-0: bf16 keeps an fp32 copy per parameter, fp32 uses the parameter itself
    hp_of = {id(lp): hp for lps, hps in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
             for lp, hp in zip(lps, hps)}
    for name, p in tr.model.named_parameters():
        master = safe_get_full_fp32_param(p)
        if master is None:
            hp = hp_of.get(id(p), p)
            out[f"{name}.fp32"] = hp.detach().float().clone()
            state = (opt.optimizer if hp is not p else opt).state[hp]
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{name}.{key}"] = state[key].clone()
            continue
        out[f"{name}.fp32"] = master.detach().cpu().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{key}"] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
    return out


def window_sums(tr: Trainer, carried: dict | None) -> dict[str, torch.Tensor]:
    """What the open window has summed so far over all ranks (collective): loss, the aux loss in
    units of the window's normalisation, MoE token counts. ``carried``: the per-rank sums."""
    acc = carried or {"ce": 0.0, "aux": 0.0}
    lay = tr.layout
    sums = torch.tensor([float(acc["ce"]), float(acc["aux"]) / (lay.grad_accum_steps * lay.world_size)],
                        dtype=torch.float64)
    dist.all_reduce(sums)
    out = {"ce": sums[0], "aux": sums[1]}
    for name, r in tr.model.routers():
        counts = r.tokens_per_expert.detach().clone()
        dist.all_reduce(counts)
        out[name] = counts
    return out


REFUSALS = (2, 2, 1, 1)  # layout of the run whose checkpoints the refusal checks resume


def refusals(out: Path, role: str) -> dict[str, str]:
    """Source (2 ranks): checkpoints after steps 1 and 2 and one mid-window (step 2, micro 1).
    Target (1 rank): what an elastic resume refuses, and what ``auto`` falls back to."""
    run_dir = out / "refusals"
    if role == "source":
        cfg = config(run_dir, REFUSALS, False, 4, "none")
        cfg["checkpoint"]["every_steps"] = 1
        os.environ["SEQPAR_STOP_AFTER_MICRO_BATCHES"] = "5"  # 2 micro-batches per step on dp 2
        Trainer(validate_config(cfg), make_topology(1, 1, torch.device("cpu"))).train()
        del os.environ["SEQPAR_STOP_AFTER_MICRO_BATCHES"]
        return {}
    topo, ckpts, found = make_topology(1, 1, torch.device("cpu")), run_dir / "checkpoints", {}
    one = (1, 2, 1, 1)
    # 2 of the window's 4 sequences were done: micro-batches of 4 cannot go on from there
    for name, resume, change in (
        ("mid_window", str(ckpts / "step00000002-seq000002"), {"micro_batch_size": 4}),
        ("global_batch", str(ckpts / "step00000002-seq000000"), {"global_batch_size": 8}),
        ("elastic_off", "auto", {"elastic": False}),
    ):
        cfg = config(out / f"refusal-{name}", one, False, 4, resume)
        cfg["checkpoint"]["dir"] = str(ckpts)
        cfg["checkpoint"].update({k: v for k, v in change.items() if k == "elastic"})
        cfg["train"].update({k: v for k, v in change.items() if k != "elastic"})
        try:
            Trainer(validate_config(cfg), topo)
            found[name] = "accepted"
        except ResumeError as e:
            found[name] = str(e)
    cfg = config(out / "refusal-auto", one, False, 4, "auto")
    cfg["checkpoint"]["dir"] = str(ckpts)
    cfg["train"]["micro_batch_size"] = 4
    tr = Trainer(validate_config(cfg), topo)
    found["auto_resumed"] = tr.ckpt.resumed_from
    found["superseded"] = " ".join(sorted(p.name for p in (ckpts / "superseded").iterdir()))
    tr.train()
    found["auto_final_step"] = str(tr.state.step)
    return found


def main() -> int:
    role, out = sys.argv[1], Path(sys.argv[2])
    codec.LAZY_MIN_NUMEL = 1  # tiny tensors too: every saved tensor the move reads goes the lazy way
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == (REFUSALS[0] if role == "source" else 1):
        found = refusals(out, role)
        if rank == 0 and found:
            torch.save(found, out / "refusals.target.pt")
    for cell, (src, dst, moe, precision, micro) in CELLS.items():
        layout = src if role == "source" else dst
        if layout[0] != world:
            continue
        topo = make_topology(layout[2], layout[3], torch.device("cpu"))
        record: dict = {}
        if role == "source":
            run_dir = out / cell / "source"
            dp = world // (layout[2] * layout[3])
            step = STOP_STEP.get(cell, 2)
            os.environ["SEQPAR_STOP_AFTER_MICRO_BATCHES"] = str(step * 4 // dp + micro)
            tr = Trainer(validate_config(config(run_dir, layout, moe, 4, "none", precision)), topo)
            del os.environ["SEQPAR_STOP_AFTER_MICRO_BATCHES"]
            tr.train()
            assert tr.exit_code == 75 and (tr.state.step, tr.state.micro_step) == (step, micro), tr.state
            record["state"] = full_state(tr) if step else {}
            record["window"] = window_sums(tr, tr._acc if micro else None)
            tr = Trainer(validate_config(config(run_dir, layout, moe, 4, "auto", precision)), topo)
        else:
            ckpt = out / cell / "source" / "checkpoints" / tag(cell)
            tr = Trainer(validate_config(config(out / cell / "target", layout, moe, 4, str(ckpt), precision)), topo)
            record["resumed_from"] = tr.ckpt.resumed_from
            record["state"] = full_state(tr) if STOP_STEP.get(cell, 2) else {}
            record["window"] = window_sums(tr, tr._resumed_acc)
        tr.train()
        record["losses"] = list(tr.state.losses)
        record["final"] = full_state(tr)
        if rank == 0:
            torch.save(record, out / f"{cell}.{role}.pt")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
