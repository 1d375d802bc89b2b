"""Checkpoint costs: training blocked by an async save vs a synchronous one, write throughput vs a
raw fsync'd write of the same bytes on the same disk, and resume time at step 10 vs step 1000.

Write throughput counts from the start of the save to the commit (files written, hashed while
written, fsynced, manifest + marker, rename). After the commit, retention re-reads the new
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("/tmp/seqpar-ckbench"))
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
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
    sync, block, committed, retained = [], [], [], []
    for _ in range(a.repeats):
        tr.ckpt.writer.background = False
        t0 = time.perf_counter()
        tr.save_checkpoint()
        sync.append(tr.ckpt.writer.timings["committed"] - t0)  # up to the commit
        tr.train_micro_batch()
        tr.ckpt.writer.background = True
        t0 = time.perf_counter()
        tr.save_checkpoint()
        block.append(time.perf_counter() - t0)
        tr.ckpt.finish()
        timings = tr.ckpt.writer.timings
        committed.append(timings["committed"] - t0)
        retained.append(timings["retained"] - timings["committed"])
        tr.train_micro_batch()
    ck = tr.ckpt.store.list()[-1].path
    size = dir_bytes(ck)
    raw = min(raw_write(a.out / "raw.bin", size) for _ in range(a.repeats))
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
    print("| measure | seconds | MiB/s |\n|---|---|---|")
    print(f"| synchronous save (snapshot + write + fsync + hash + commit) | {med(sync):.3f} | {size / 2**20 / med(sync):.0f} |")
    print(f"| async save: training blocked | {med(block):.3f} | - |")
    print(f"| async save: until committed | {med(committed):.3f} | {size / 2**20 / med(committed):.0f} |")
    print(f"| raw write + fsync of the same bytes | {raw:.3f} | {size / 2**20 / raw:.0f} |")
    print(f"| after the commit: re-verify from the disk (retention) | {med(retained):.3f} | - |")
    print(f"| **write throughput / raw** (async, until committed) | - | {raw / med(committed):.2f} x |")
    print(f"| **training blocked / synchronous save** | - | {med(block) / med(sync):.2f} x |")
    print(f"| start to first micro-batch, resuming at step 10 | {resume[10]:.3f} | - |")
    print(f"| start to first micro-batch, resuming at step 1000 | {resume[1000]:.3f} | - |")


if __name__ == "__main__":
    main()
