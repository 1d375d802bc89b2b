"""Peak host memory per rank of building a ZeRO-3 model whole vs partitioned (deepspeed.zero.Init).

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 scripts/bench_zero3_init.py --mode whole
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 scripts/bench_zero3_init.py --mode partitioned

One mode per launch (a process's peak RSS only grows). Default shape: Llama-3.2-1B (16 layers,
hidden 2048, 32/8 heads, MLP 8192, tied 128,256 vocabulary; 1.24B parameters, 4.9 GB in fp32).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.distributed as dist

from seqpar.config import validate_config
from seqpar.engine.zero3_init import build_partitioned_model
from seqpar.models import build_model, count_parameters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["whole", "partitioned"], required=True)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128256)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    cfg = validate_config({
        "model": {"arch": "llama", "vocab_size": args.vocab, "hidden_size": args.hidden,
                  "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True},
        "parallel": {"zero_stage": 3},
    })
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    if args.mode == "whole":
        model = build_model(cfg.model, seed=0)
    else:
        ds = cfg.deepspeed_config(cfg.layout(dist.get_world_size()))
        model = build_partitioned_model(cfg.model, ds, 0, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    total, _ = count_parameters(model)
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (peak, before, seconds))
    if dist.get_rank() == 0:
        print(f"{args.mode}: {total / 1e9:.2f}B parameters on {dist.get_world_size()} ranks; "
              + "; ".join(f"rank {r}: peak RSS {p:.2f} GiB (before build {b:.2f}), build {s:.1f} s"
                          for r, (p, b, s) in enumerate(rows)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
