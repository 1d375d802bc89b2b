"""Worker for tests/test_zero3_init.py (torchrun, 2 gloo processes).

For each case, a ZeRO-3 trainer built partitioned (``parallel.zero3_init: true``) and one built
whole then partitioned (``false``) must hold bitwise equal partitions after ``deepspeed.initialize``
and after two training steps, with identical losses. Cases: random init (dense with tied
embeddings, MoE with expert bias, bf16) and Hugging Face weights (dense, MoE). Writes one JSON line
per case to argv[1] (rank 0).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from common import every_rank, finish, report, shared_tmpdir, tiny_model
from seqpar.config import validate_config
from seqpar.engine import Trainer
from seqpar.engine.zero3_init import build_partitioned_model
from seqpar.models import build_model
from seqpar.models.hf import save_hf_checkpoint
from seqpar.parallel import make_topology


def model_cfg(moe: bool) -> dict:
    return tiny_model(moe, tie=True)


def config(run_dir: Path, model: dict, zero3_init: bool, precision: str) -> dict:
    return {
        "model": model,
        "data": {"type": "passkey", "seq_len": 128, "passkey": {"eval_samples": 0, "key_digits": 2}},
        "parallel": {"zero_stage": 3, "zero3_init": zero3_init},
        "train": {"max_steps": 2, "micro_batch_size": 1, "global_batch_size": 4, "lr": 1e-2,
                  "warmup_steps": 1, "precision": precision, "seed": 3},
        "checkpoint": {"at_end": False, "resume": "none"},
        "logging": {"run_dir": str(run_dir), "progress_bar": False, "tensorboard": "off"},
    }


def partitions(tr: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.ds_tensor.detach().cpu().clone() for n, p in tr.model.named_parameters()}


def state(tr: Trainer) -> dict[str, torch.Tensor]:
    """Everything that is not a parameter: buffers (MoE router state) and the RoPE table."""
    out = {f"buffer {n}": b.detach().cpu().clone() for n, b in tr.model.named_buffers()}
    return out | {"rope inv_freq": tr.model.rotary.inv_freq.cpu().clone()}


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    topo = make_topology(1, 1, torch.device("cpu"))
    root = shared_tmpdir("seqpar-z3init-")
    hf = {}
    if rank == 0:  # HF checkpoints to load, with weights unlike the random init (another seed)
        for moe in (False, True):
            src = build_model(validate_config({"model": model_cfg(moe)}).model, seed=11)
            for name, r in src.routers():
                r.expert_bias.uniform_(-1, 1)  # a non-trivial expert bias travels too
            save_hf_checkpoint(src.state_dict(), src.cfg, root / f"hf-{moe}")
    dist.barrier()
    for moe in (False, True):
        hf[moe] = {"hf_path": str(root / f"hf-{moe}")}
    hf[True]["moe"] = {"bias_update_rate": 0.01}  # seqpar's own key: loads the expert bias
    cases = {
        "random dense tied": (model_cfg(False), "fp32"),
        "random moe": (model_cfg(True), "fp32"),
        "random dense bf16": (model_cfg(False), "bf16"),
        # zero.Init casts every float tensor made inside it to bf16: buffers and RoPE tables must not be
        "random moe bf16": (model_cfg(True), "bf16"),
        "random dense yarn bf16": (dict(model_cfg(False), rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                           "original_max_position_embeddings": 32}), "bf16"),
        "hf dense": (hf[False], "fp32"),
        "hf moe": (hf[True], "fp32"),
    }
    rows = []
    # built partitioned: no parameter is ever whole on a rank, each holds its half
    cfg = validate_config(config(root / "direct", model_cfg(True), True, "fp32"))
    built = build_partitioned_model(cfg.model, cfg.deepspeed_config(cfg.layout(2)), 3, torch.device("cpu"))
    halves = [p.numel() == 0 and p.ds_tensor.numel() == (p.ds_numel + 1) // 2 for p in built.parameters()]
    rows.append({"case": "partitioned at build", "ok": all(halves) and len(halves) == 30})
    del built
    for case, (model, precision) in cases.items():
        runs = {}
        for z3 in (True, False):
            tr = Trainer(validate_config(config(root / f"{case}-{z3}".replace(" ", "_"), model, z3, precision)), topo)
            at_start = partitions(tr) | state(tr)
            bias = {n: r.expert_bias.clone() for n, r in tr.model.routers() if r.expert_bias is not None}
            tr.train()
            runs[z3] = (at_start, bias, partitions(tr) | state(tr), list(tr.state.losses))
        (a0, ab, a2, al), (b0, bb, b2, bl) = runs[True], runs[False]
        same = lambda x, y: x.dtype == y.dtype and torch.equal(x, y)  # noqa: E731
        bad = [f"init {n}" for n in a0 if not same(a0[n], b0[n])]
        bad += [f"bias {n}" for n in ab if not same(ab[n], bb[n])]
        bad += [f"trained {n}" for n in a2 if not same(a2[n], b2[n])]
        if al != bl:
            bad.append(f"losses {al} != {bl}")
        every = every_rank(bad)
        report({"case": case, "ok": not any(every), "diff": every, "params": len(a0),
                "nonzero_bias": any(bool(t.abs().sum() > 0) for t in ab.values()), "losses": al}, rows)
    status = finish(rows, Path(sys.argv[1]))
    dist.destroy_process_group()  # gloo's threads must not be torn down by interpreter exit
    return status


if __name__ == "__main__":
    sys.exit(main())
