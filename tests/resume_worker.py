"""Worker for tests/test_checkpoint_resume.py (torchrun, 2 gloo processes).

Bit-exact matrix: ZeRO 0/1/2/3 x {save at a step boundary, save mid-accumulation} x {dense, MoE}
x SP {1, 2}, with activation policies at ZeRO-1/3 (``memory``) and, for MoE at ZeRO-0 and ZeRO-2,
expert parallelism over both ranks (and a capacity factor at ZeRO-2). For each cell: run A trains uninterrupted; run B trains until the save point, saves
through the real preemption path (SEQPAR_STOP_AFTER_MICRO_BATCHES) and stops; run C is a fresh
trainer that resumes from B's checkpoint and finishes. A and C must have torch.equal parameters
and optimizer state (fp32 master, Adam moments), identical per-micro-batch losses and identical
MoE routing digests. Writes one JSON line per cell to argv[1] (rank 0).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from common import every_rank, finish, report, shared_tmpdir, tiny_model
from seqpar.config import validate_config
from seqpar.engine import Trainer
from seqpar.engine import deepspeed_state as dss
from seqpar.parallel import make_topology


def memory(stage: int, moe: bool) -> dict:
    """Activation policies ride along at ZeRO-1 and ZeRO-3 (recomputation, offload and tiles must
    not change a resumed trajectory); ZeRO-0/2 keep every activation."""
    if stage not in (1, 3):
        return {}
    policy = "full" if moe else "selective"
    return {"activation_checkpointing": policy, "offload_activations": True, "tiled_mlp": True, "mlp_tile_tokens": 24}


def ep(stage: int, sp: int) -> bool:
    """MoE cells with experts split over both ranks: ZeRO-0 and 2, and ZeRO-1 without SP (its SP
    cell keeps experts whole, so whole-expert MoE stays covered below ZeRO-3 too)."""
    return stage in (0, 2) or (stage == 1 and sp == 1)


def config(run_dir: Path, stage: int, moe: bool, sp: int, sp_kind: str) -> dict:
    model = tiny_model(moe)
    if moe and stage == 2:  # dropped-pair counts are window state too (capacity factor)
        model["moe"]["capacity_factor"] = 0.75
    par = {"zero_stage": stage}
    if moe and ep(stage, sp):  # expert parallelism over both ranks (across DP, or across the SP pair)
        par["expert_degree"] = 2
    if sp == 2:
        par["ulysses_degree" if sp_kind == "ulysses" else "ring_degree"] = 2
    return {
        "model": model,
        "data": {"type": "passkey", "seq_len": 128, "passkey": {"eval_samples": 0, "key_digits": 2}},
        "parallel": par,
        "memory": memory(stage, moe),
        "train": {"max_steps": 3, "micro_batch_size": 1, "global_batch_size": 4, "lr": 1e-2,
                  "warmup_steps": 1, "grad_clip": 0.5},
        "checkpoint": {"at_end": False, "resume": "none", "async_write": True, "keep_last": 5},
        "logging": {"run_dir": str(run_dir), "progress_bar": False, "tensorboard": "off"},
    }


def flat(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from flat(v, f"{prefix}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from flat(v, f"{prefix}[{i}]")


def final_state(tr: Trainer) -> dict:
    params = {n: (p.ds_tensor if hasattr(p, "ds_tensor") else p).detach().cpu().clone()
              for n, p in tr.model.named_parameters()}
    opt = dss.capture_optimizer(tr.engine)
    return {"params": params, "opt": dict(flat(opt)), "micro_losses": list(tr.state.micro_losses),
            "routing": list(tr.state.routing), "losses": list(tr.state.losses)}


def run(cfg: dict, topo, stop_after: int | None = None) -> Trainer:
    if stop_after:
        os.environ["SEQPAR_STOP_AFTER_MICRO_BATCHES"] = str(stop_after)
    try:
        tr = Trainer(validate_config(cfg), topo)
    finally:
        os.environ.pop("SEQPAR_STOP_AFTER_MICRO_BATCHES", None)
    tr.train()
    return tr


def compare(a: dict, c: dict) -> list[str]:
    bad = [f"param {k}" for k in a["params"] if not torch.equal(a["params"][k], c["params"][k])]
    bad += [f"optimizer {k}" for k in a["opt"] if not torch.equal(a["opt"][k], c["opt"][k])]
    for key in ("micro_losses", "routing", "losses"):  # c's records start at its resume
        if a[key][len(a[key]) - len(c[key]):] != c[key] or (a[key] and not c[key]):
            bad.append(key)
    return bad


def main() -> int:
    dist.init_process_group("gloo")
    cpu = torch.device("cpu")
    topos = {1: make_topology(1, 1, cpu), ("ulysses", 2): make_topology(2, 1, cpu), ("ring", 2): make_topology(1, 2, cpu)}
    root = shared_tmpdir("seqpar-resume-")
    rows = []
    cells = [(stage, moe, sp) for stage in (0, 1, 2, 3) for moe in (False, True) for sp in (1, 2)]
    only = os.environ.get("SEQPAR_RESUME_CELLS")  # e.g. "2,3" to run some stages while debugging
    for stage, moe, sp in cells:
        if only and str(stage) not in only.split(","):
            continue
        kind = "ring" if stage in (0, 2) else "ulysses"
        topo = topos[1] if sp == 1 else topos[(kind, 2)]
        gas = 4 // (2 // sp)  # 4 sequences per step over dp = 2 / sp ranks
        name = (f"zero{stage} {'moe' if moe else 'dense'} sp{sp}{'' if sp == 1 else ' ' + kind}"
                + (" capacity0.75" if moe and stage == 2 else "") + (" ep2" if moe and ep(stage, sp) else "")
                + (f" {memory(stage, moe)['activation_checkpointing']}-offload-tiled" if memory(stage, moe) else ""))
        a = final_state(run(config(root / f"{name}-A".replace(" ", "_"), stage, moe, sp, kind), topo))
        for where, stop in (("boundary", gas), ("mid-window", gas + 1)):
            d = root / f"{name}-{where}".replace(" ", "_")
            b = run(config(d, stage, moe, sp, kind), topo, stop_after=stop)
            assert b.exit_code == 75, f"{name}: stop did not trigger"
            cfg = config(d, stage, moe, sp, kind)
            cfg["checkpoint"]["resume"] = "auto"
            c = run(cfg, topo)
            tag = c.ckpt.resumed_from
            every = every_rank(compare(a, final_state(c)))
            report({"cell": f"{name} {where}", "resumed_from": tag, "ok": not any(every),
                    "diff": {r: d for r, d in enumerate(every) if d}}, rows)
    status = finish(rows, Path(sys.argv[1]))
    dist.destroy_process_group()  # gloo's threads must not be torn down by interpreter exit
    return status


if __name__ == "__main__":
    sys.exit(main())
