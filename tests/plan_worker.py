"""Worker for tests/test_plan.py: what a real DeepSpeed engine (CPU, one process) holds per rank.

For each ZeRO stage and precision given on the command line: build the engine the trainer builds
(``Config.deepspeed_config``), run one micro-batch, and measure the tensors the planner counts:
the gradient reduce bucket and the gradients while the backward runs (probed when the last
parameter's gradient arrives), the fp32 master + AdamW moments and the parameters after the step.
Prints one JSON object per line (rank 0). Run in a subprocess (DeepSpeed keeps process-wide
state), alone or under torchrun.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
LAUNCHED = "WORLD_SIZE" in os.environ  # under torchrun; else one process of its own
if not LAUNCHED:
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")

import deepspeed
import torch
import torch.distributed as dist

from seqpar.config import load_config
from seqpar.engine.trainer import param_groups
from seqpar.models import build_model


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure(overrides: list[str]) -> dict[str, int]:
    cfg = load_config(None, overrides)
    stage, world = cfg.parallel.zero_stage, dist.get_world_size()
    model = build_model(cfg.model)  # with model.lora: the adapters applied, the base frozen
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1),
                                      config=cfg.deepspeed_config(cfg.layout(world), "cpu"), dist_init_required=False)
    opt = engine.optimizer
    seen: dict[str, int] = {}

    def probe(grad: torch.Tensor) -> torch.Tensor:
        # the embedding's gradient is the backward's last: every other gradient is in place now
        bufs = []
        for bucket in opt.ipg_buckets.values():
            bufs += bucket.buffer if isinstance(bucket.buffer, list) else [bucket.buffer]
        seen["bucket"] = nbytes(bufs)
        if stage == 1:  # whole local gradients (this one arrives next)
            seen["grads"] = nbytes([p.grad for p in engine.module.parameters()]) + nbytes([grad])
        elif stage == 2:  # the reduced partition (the bucket is smaller than the model: reduced already)
            seen["grads"] = nbytes([opt.grads_in_partition])
        else:
            seen["grads"] = nbytes([opt.grad_partitions_flat_buffer])
        return grad

    lora = cfg.model.lora is not None  # the frozen base has no gradient: only the state after the step
    if not lora:
        engine.module.model.embed_tokens.weight.register_hook(probe)
    b = cfg.train.micro_batch_size
    ids = torch.randint(0, 300, (b, 64))
    pos = torch.arange(64).repeat(b, 1)
    engine.backward(engine(ids, pos, ids).loss_sum)
    engine.step()
    master = getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_partitioned_groups_flat
    seen["optimizer"] = nbytes(master) + nbytes(
        [v for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0])
    seen["params"] = nbytes(getattr(opt, "bit16_groups_flat", None) or opt.fp16_partitioned_groups_flat)
    if lora:  # the frozen base sits in the module, outside DeepSpeed's flat groups
        seen["params"] += nbytes([q for q in engine.module.parameters() if not q.requires_grad])
    return seen


def main() -> None:
    if LAUNCHED:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    for arg in sys.argv[1:]:
        overrides = json.loads(arg)
        measured = measure(overrides)
        if dist.get_rank() == 0:
            print(json.dumps({"overrides": overrides, "world": dist.get_world_size(), "measured": measured}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
