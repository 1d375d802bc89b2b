"""Checkpoint file write throughput: hash while writing vs write, fsync, then re-read to hash.

    python scripts/bench_hashio.py --mib 512 --dir /tmp/seqpar-hashbench

Same bytes, same disk, variants interleaved per round, best of ``--repeats``. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench_checkpoint import raw_write  # noqa: E402  (the baseline bench_checkpoint reports)
from seqpar.checkpoint import hashio  # noqa: E402
from seqpar.checkpoint.hashio import write_safetensors  # noqa: E402
from seqpar.checkpoint.store import describe_files  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512, help="fp32 tensor data in MiB")
    p.add_argument("--dir", type=Path, default=Path("/tmp/seqpar-hashbench"))
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    a.dir.mkdir(parents=True)
    # A model-like mix: a few large matrices, many small vectors.
    n = a.mib << 18  # fp32 elements
    tensors = {f"layer{i}.w": torch.randn(n // 16 // 1024, 1024) for i in range(15)}
    tensors |= {f"layer{i}.b": torch.randn(1024) for i in range(64)}
    tensors["embed"] = torch.randn(n - sum(t.numel() for t in tensors.values()))
    f = a.dir / "x.safetensors"

    def today() -> None:
        save_file(tensors, f)
        describe_files(a.dir, [f])  # fsync + re-read sha256

    def ours(hash_thread: bool = True, writeback: bool = True) -> None:
        saved = hashio.WRITEBACK
        hashio.WRITEBACK = saved if writeback else 0
        try:  # write_safetensors' body, with the knobs exposed
            header, order = hashio.safetensors_header(tensors)
            views = [hashio._byte_view(k, tensors[k]) for k in order]
            hashio.write_file(f, [header, *(v for v in views if len(v))], hash_thread=hash_thread)
        finally:
            hashio.WRITEBACK = saved

    variants = {
        "raw write + fsync (bench_checkpoint.raw_write)": None,
        "save_file + fsync + re-read sha256 (today)": today,
        "write_safetensors (hash thread, early writeback)": lambda: write_safetensors(f, tensors),
        "  same, no early writeback": lambda: ours(writeback=False),
        "  same, hashing on the writing thread": lambda: ours(hash_thread=False),
    }

    save_file(tensors, f)
    size = f.stat().st_size
    f.unlink()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.repeats):
        for name, fn in variants.items():
            os.sync()  # start each from a quiet disk: no other run's dirty pages in the way
            if fn is None:
                dt = raw_write(a.dir / "raw.bin", size)
            else:
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                f.unlink()
            times[name].append(dt)
    buf = torch.randn(1 << 26).numpy()  # 256 MiB, already in memory
    t0 = time.perf_counter()
    hashlib.sha256(buf).hexdigest()
    sha = buf.nbytes / (time.perf_counter() - t0)
    shutil.rmtree(a.dir, ignore_errors=True)

    raws = times["raw write + fsync (bench_checkpoint.raw_write)"]
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"# {size / 2**20:.1f} MiB safetensors file ({len(tensors)} fp32 tensors) in {a.dir}, "
          f"best of {a.repeats}; sha256 alone {sha / 1e9:.2f} GB/s")
    # The disk's speed drifts between rounds on a shared VM: the last column compares within a round.
    print("| variant | best s | MiB/s | x raw (best) | x raw (median of rounds) |\n|---|---|---|---|---|")
    for name, ts in times.items():
        ratio = med([r / t for r, t in zip(raws, ts)])
        best = min(ts)
        print(f"| {name} | {best:.3f} | {size / 2**20 / best:.0f} | {min(raws) / best:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
