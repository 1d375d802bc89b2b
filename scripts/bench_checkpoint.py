"""Checkpoint costs: training blocked by an async save vs a synchronous one, write throughput vs a
raw fsync'd write of the same bytes on the same disk, and resume time at step 10 vs step 1000.

Write throughput counts from the start of the save to the commit (snapshot, files written, hashed
while written, fsynced, manifest + marker, rename), against a raw write + fsync of the same number
of bytes measured in the same round (the faster of one before and one after the saves: this
disk's speed varies a lot from second to second); per-round ratios and their median. The
synchronous save has the machine to itself; the async one shares the 2 cores with the training
micro-batch that runs meanwhile. After the commit, retention re-reads the new
checkpoint from the disk to re-verify it before deleting older ones: reported on its own line
(it runs in the background and delays only the next save).

    python scripts/bench_checkpoint.py --hidden 512 --layers 8 --out /tmp/ckbench

One process (CPU: gloo; GPU when available). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def config(run_dir: Path, hidden: int, layers: int, steps: int, seq: int) -> dict:
    return {
        "model": {"arch": "llama", "vocab_size": 320, "hidden_size": hidden, "intermediate_size": 3 * hidden,
                  "num_hidden_layers": layers, "num_attention_heads": max(hidden // 64, 1)},
        "data": {"type": "passkey", "seq_len": seq, "passkey": {"eval_samples": 0, "key_digits": 2}},
        "parallel": {"zero_stage": 2},
        "train": {"max_steps": steps, "micro_batch_size": 1, "global_batch_size": 2, "warmup_steps": 1},
        "checkpoint": {"resume": "none", "at_end": False, "keep_last": 10},
        "logging": {"run_dir": str(run_dir), "progress_bar": False, "tensorboard": "off", "log_every": 10**6},
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def raw_write(path: Path, nbytes: int) -> float:
    """Seconds to write and fsync ``nbytes`` in 64 MiB blocks."""
    block = os.urandom(1 << 20) * 64
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block[: min(left, len(block))])
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


LLAMA_1B = ["--model.vocab_size", "128256", "--model.hidden_size", "2048", "--model.intermediate_size", "8192",
            "--model.num_hidden_layers", "16", "--model.num_attention_heads", "32", "--model.num_key_value_heads", "8",
            "--model.tie_word_embeddings", "true", "--data.passkey.eval_samples", "0", "--parallel.zero_stage", "0"]


def size_rows(precision: str) -> dict[str, dict[str, int]]:
    """Checkpoint bytes by training mode for the Llama-3.2-1B shape (issue 14), from shapes alone."""
    from seqpar.config import load_config
    from seqpar.optim.sizes import checkpoint_bytes

    galore = ["--train.optimizer", "galore", "--train.galore.rank", "512"]
    modes = {
        "full AdamW": [],
        "GaLore rank 512 (1/4 hidden), fp32 master weights": galore + ["--train.galore.master_weights", "true"],
        "GaLore rank 512 (1/4 hidden), bf16 weights (default)": galore,
        "Q-GaLore rank 512: INT8 weights, INT4 projectors, bf16 moments": ["--train.optimizer", "qgalore",
                                                                           "--train.galore.rank", "512"],
        "LoRA rank 16 (all projections)": ["--model.lora.rank", "16"],
    }
    if precision == "fp32":  # no master copy either way
        del modes["GaLore rank 512 (1/4 hidden), fp32 master weights"]
        modes["GaLore rank 512 (1/4 hidden)"] = modes.pop("GaLore rank 512 (1/4 hidden), bf16 weights (default)")
    return {name: checkpoint_bytes(load_config(None, LLAMA_1B + ["--train.precision", precision] + over))
            for name, over in modes.items()}


def sizes(precision: str) -> None:
    rows = size_rows(precision)
    full = rows["full AdamW"]["total"]
    print(f"# Llama-3.2-1B shape, {precision}, checkpoint bytes (weights + optimizer state), seqpar.optim.sizes")
    print("| mode | weights GB | optimizer GB | total GB | vs full AdamW |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['weights'] / 1e9:.3f} | {r['optimizer'] / 1e9:.3f} | {r['total'] / 1e9:.3f} | "
              f"{r['total'] / full:.3f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("/tmp/seqpar-ckbench"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", choices=["bf16", "fp32"], default=None,
                   help="only print checkpoint sizes by training mode for the Llama-3.2-1B shape")
    a = p.parse_args()
    if a.sizes:
        sizes(a.sizes)
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from seqpar.config import validate_config
    from seqpar.engine import Trainer
    from seqpar.parallel import init_topology, pick_device

    shutil.rmtree(a.out, ignore_errors=True)
    device = pick_device("auto")
    topo = init_topology(1, 1, device)

    # 1. blocking time and throughput, one large-ish model
    tr = Trainer(validate_config(config(a.out / "big", a.hidden, a.layers, 100, 128)), topo)
    tr.train_micro_batch()  # mid-window: the save includes partial gradients
    size = 0
    sync, block, committed, retained, raw = [], [], [], [], []
    for _ in range(a.repeats):  # each round measures the raw write right beside the saves (the disk varies)
        # every save is taken mid-window (micro-step 1 of 2), so it includes the partial gradients
        before = raw_write(a.out / "raw.bin", size) if size else float("inf")
        tr.ckpt.writer.background = False
        t0 = time.perf_counter()
        tr.save_checkpoint()
        sync.append(tr.ckpt.writer.timings["committed"] - t0)  # up to the commit
        tr.train_micro_batch()
        tr.train_micro_batch()
        tr.ckpt.writer.background = True
        t0 = time.perf_counter()
        tr.save_checkpoint()
        blocked = time.perf_counter() - t0
        # training goes on while the write runs; the optimizer step closing this window waits for
        # the background copy of the optimizer state and weights: counted as blocked too
        tr.ckpt.writer.deferred_wait_s = 0.0
        tr.train_micro_batch()
        block.append(blocked + tr.ckpt.writer.deferred_wait_s)
        tr.ckpt.finish()
        timings = tr.ckpt.writer.timings
        committed.append(timings["committed"] - t0)
        retained.append(timings["retained"] - timings["committed"])
        size = dir_bytes(tr.ckpt.store.list()[-1].path)
        raw.append(min(before, raw_write(a.out / "raw.bin", size)))  # the faster of before / after
        tr.train_micro_batch()
    params = sum(p.numel() for p in tr.model.parameters())

    # 2. resume at step 10 vs step 1000 (tiny model: the point is what grows with the step)
    resume = {}
    for steps in (10, 1000):
        d = a.out / f"resume{steps}"
        t = Trainer(validate_config(config(d, 32, 2, steps, 128)), topo)
        t.cfg.checkpoint.at_end = True
        t.train()
        cfg = config(d, 32, 2, steps + 1, 128)
        cfg["checkpoint"]["resume"] = "auto"
        cfg["checkpoint"]["allow_changes"] = ["train.max_steps"]
        t0 = time.perf_counter()
        r = Trainer(validate_config(cfg), topo)
        r.train_micro_batch()
        resume[steps] = time.perf_counter() - t0

    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"# {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, model {params / 1e6:.1f}M params, "
          f"ZeRO-2 fp32, checkpoint {size / 2**20:.1f} MiB (mid-window, with partial gradients)")
    print("| measure (median of rounds) | seconds | MiB/s |\n|---|---|---|")
    print(f"| synchronous save (snapshot + write + fsync + hash + commit) | {med(sync):.3f} | {size / 2**20 / med(sync):.0f} |")
    print(f"| async save: training blocked | {med(block):.3f} | - |")
    print(f"| async save: until committed | {med(committed):.3f} | {size / 2**20 / med(committed):.0f} |")
    print(f"| raw write + fsync of the same bytes (faster of before / after each round) | {med(raw):.3f} | "
          f"{size / 2**20 / med(raw):.0f} |")
    print(f"| after the commit: re-verify from the disk (retention) | {med(retained):.3f} | - |")
    for what, times in (("synchronous save", sync), ("async save until committed, training alongside", committed)):
        ratios = sorted(r / c for r, c in zip(raw, times))
        print(f"| **write throughput / raw**: {what} (per round: {', '.join(f'{x:.2f}' for x in ratios)}) "
              f"| - | {med(ratios):.2f} x |")
    print(f"| **training blocked / synchronous save** | - | {med(block) / med(sync):.2f} x |")
    print(f"| start to first micro-batch, resuming at step 10 | {resume[10]:.3f} | - |")
    print(f"| start to first micro-batch, resuming at step 1000 | {resume[1000]:.3f} | - |")


if __name__ == "__main__":
    main()
