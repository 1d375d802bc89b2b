"""Worker for tests/test_ep_elastic.py: elastic resume across expert-parallel degrees (torchrun, gloo).

Roles (argv[2:], run in order): ``source``: for each source layout with this world size, one
uninterrupted 4-step run (the reference) and, per stop point its cells use, a run stopped through
the preemption path after step 2 (and some micro-steps of step 3), whose full optimizer state is
dumped with every expert gathered. ``target``: for each cell whose target has this world size,
resume that checkpoint on the other layout, dump the same state before training (must equal the
source's bitwise), train to step 4. Results go to ``<out>/<name>.pt`` (rank 0).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from common import tiny_model
from elastic_worker import full_state, window_sums

from seqpar.checkpoint import codec
from seqpar.checkpoint.store import tag_for
from seqpar.config import validate_config
from seqpar.engine import Trainer
from seqpar.engine.reshard import EXPERT_MARK
from seqpar.parallel import make_topology

Layout = tuple[int, int, int, int, int, bool, bool]  # (world, zero, ulysses, ring, expert degree, offload, bf16)
STEP = 2  # optimizer steps done at every stop
# name: (source layout, target layout, micro-steps into step 3's window at the stop: 0 = boundary).
# Global batch 4 sequences of 1: dp 2 runs windows of 2 micro-steps, dp 1 windows of 4. MoE with 4
# experts: EP 2 holds 2 per rank. Mid-window cells move every partial-gradient form into every
# accumulator form: ZeRO-2 reduced partitions (copy) and ZeRO-1 local gradients (sum), into ZeRO-2
# partitions and ZeRO-0/1 local gradients, with the experts' holders changing; and ZeRO-2 offload's
# CPU gradient buffers (memory.offload_optimizer) in both directions, and a ZeRO-3 target.
CELLS: dict[str, tuple[Layout, Layout, int]] = {
    "ep2-zero2_to_dp1-zero0": ((2, 2, 1, 1, 2, False, False), (1, 0, 1, 1, 1, False, False), 0),
    "mid-ep2-zero2_to_dp1-zero1": ((2, 2, 1, 1, 2, False, False), (1, 1, 1, 1, 1, False, False), 1),
    "mid-ep2-zero1_to_ep1-zero2": ((2, 1, 1, 1, 2, False, False), (2, 2, 1, 1, 1, False, False), 1),
    "mid-ep2-zero1_to_ulysses2-zero1": ((2, 1, 1, 1, 2, False, False), (2, 1, 2, 1, 1, False, False), 1),
    "mid-ep2-zero2-offload_to_dp1-zero2-offload": ((2, 2, 1, 1, 2, True, False), (1, 2, 1, 1, 1, True, False), 1),
    "mid-ep2-zero1_to_dp1-zero3": ((2, 1, 1, 1, 2, False, False), (1, 3, 1, 1, 1, False, False), 1),
    "dp1-zero2_to_ep2-zero1": ((1, 2, 1, 1, 1, False, False), (2, 1, 1, 1, 2, False, False), 0),
    "mid-dp1-zero2_to_ep2-zero1": ((1, 2, 1, 1, 1, False, False), (2, 1, 1, 1, 2, False, False), 2),
    "mid-ep1-zero1_to_ep2-zero2": ((2, 1, 1, 1, 1, False, False), (2, 2, 1, 1, 2, False, False), 1),
    "mid-ep1-zero1_to_ring2-ep2-zero1": ((2, 1, 1, 1, 1, False, False), (2, 1, 1, 2, 2, False, False), 1),
    "mid-dp1-zero2-offload_to_ep2-zero2-offload": ((1, 2, 1, 1, 1, True, False), (2, 2, 1, 1, 2, True, False), 2),
    # from ZeRO-0 with split experts (ranks 0..P-1 saved one optimizer copy each; fp32 masters from
    # the export, bf16 ones from the copies), and into it
    "ep2-zero0_to_dp1-zero1": ((2, 0, 1, 1, 2, False, False), (1, 1, 1, 1, 1, False, False), 0),
    "mid-ep2-zero0_to_dp1-zero2": ((2, 0, 1, 1, 2, False, False), (1, 2, 1, 1, 1, False, False), 1),
    "ep2-zero0_to_ep2-zero2": ((2, 0, 1, 1, 2, False, False), (2, 2, 1, 1, 2, False, False), 0),
    "mid-ep2-zero0_to_ep2-zero1": ((2, 0, 1, 1, 2, False, False), (2, 1, 1, 1, 2, False, False), 1),
    "dp1-zero2_to_ep2-zero0": ((1, 2, 1, 1, 1, False, False), (2, 0, 1, 1, 2, False, False), 0),
    "mid-ep1-zero1_to_ep2-zero0": ((2, 1, 1, 1, 1, False, False), (2, 0, 1, 1, 2, False, False), 1),
    "mid-ep2-zero0-bf16_to_dp1-zero0-bf16": ((2, 0, 1, 1, 2, False, True), (1, 0, 1, 1, 1, False, True), 1),
    "ep2-zero0-bf16_to_ep2-zero2-bf16": ((2, 0, 1, 1, 2, False, True), (2, 2, 1, 1, 2, False, True), 0),
}


def key(layout: Layout) -> str:
    return "src-w{}-z{}-u{}-r{}-ep{}".format(*layout) + ("-offload" if layout[5] else "") + ("-bf16" if layout[6] else "")


def dp(layout: Layout) -> int:
    return layout[0] // (layout[2] * layout[3])


def checkpoint(out: Path, cell: str) -> Path:
    """The source's stop checkpoint for ``cell``: step 2 + the window's sequences (micro x dp)."""
    src, _, micro = CELLS[cell]
    return out / f"{key(src)}-m{micro}" / "checkpoints" / tag_for(STEP, micro * dp(src))


def config(run_dir: Path, layout: Layout, resume: str) -> dict:
    _, stage, ulysses, ring, ep, offload, bf16 = layout
    return {
        "model": tiny_model(True),
        "data": {"type": "passkey", "seq_len": 128, "passkey": {"eval_samples": 0, "key_digits": 2}},
        "parallel": {"zero_stage": stage, "ulysses_degree": ulysses, "ring_degree": ring, "expert_degree": ep},
        "memory": {"offload_optimizer": offload},
        "train": {"max_steps": 4, "micro_batch_size": 1, "global_batch_size": 4, "lr": 1e-2,
                  "warmup_steps": 1, "grad_clip": 0.5, "precision": "bf16" if bf16 else "fp32"},
        "checkpoint": {"at_end": False, "resume": resume, "async_write": False, "keep_last": 5},
        "logging": {"run_dir": str(run_dir), "progress_bar": False, "tensorboard": "off"},
    }


def trainer(run_dir: Path, layout: Layout, resume: str = "none") -> Trainer:
    return Trainer(validate_config(config(run_dir, layout, resume)), make_topology(layout[2], layout[3],
                                                                                   torch.device("cpu")))


def whole_state(tr: Trainer) -> dict[str, torch.Tensor]:
    """``full_state`` (DeepSpeed's gathered fp32 master and moments) with each expert tensor
    made whole: the slices of the first EP group's ranks, in rank order (collective)."""
    state = full_state(tr)
    ep = tr.expert_parallel
    if ep is None:
        return state
    for k in sorted(k for k in state if EXPERT_MARK in k):
        parts = [torch.empty_like(state[k]) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, state[k].contiguous())
        state[k] = torch.cat(parts[: ep.degree])
    return state


def sources(out: Path, world: int) -> None:
    layouts = sorted({src for src, _, _ in CELLS.values() if src[0] == world})
    for layout in layouts:
        tr = trainer(out / key(layout), layout)  # uninterrupted: the original layout's trajectory
        tr.train()
        record = {"losses": list(tr.state.losses), "final": whole_state(tr)}
        for micro in sorted({m for src, _, m in CELLS.values() if src == layout}):
            os.environ["SEQPAR_STOP_AFTER_MICRO_BATCHES"] = str(STEP * 4 // dp(layout) + micro)
            try:
                tr = trainer(out / f"{key(layout)}-m{micro}", layout)
            finally:
                del os.environ["SEQPAR_STOP_AFTER_MICRO_BATCHES"]
            tr.train()
            assert tr.exit_code == 75 and (tr.state.step, tr.state.micro_step) == (STEP, micro), tr.state
            record[micro] = {"state": whole_state(tr), "window": window_sums(tr, tr._acc if micro else None)}
        if dist.get_rank() == 0:
            torch.save(record, out / f"{key(layout)}.pt")


def targets(out: Path, world: int) -> None:
    for cell, (_, layout, _) in CELLS.items():
        if layout[0] != world:
            continue
        tr = trainer(out / cell, layout, str(checkpoint(out, cell)))
        record = {"resumed_from": tr.ckpt.resumed_from, "state": whole_state(tr),
                  "window": window_sums(tr, tr._resumed_acc)}
        tr.train()
        record["losses"] = list(tr.state.losses)
        record["final"] = whole_state(tr)
        if dist.get_rank() == 0:
            torch.save(record, out / f"{cell}.pt")


def main() -> int:
    out, roles = Path(sys.argv[1]), sys.argv[2:]
    codec.LAZY_MIN_NUMEL = 1  # tiny tensors too: every saved tensor the move reads goes the lazy way
    dist.init_process_group("gloo")
    for role in roles:
        (sources if role == "source" else targets)(out, dist.get_world_size())
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
