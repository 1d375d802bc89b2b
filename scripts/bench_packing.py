"""Padding left by SFT packing: greedy file-order vs best-fit decreasing (``data.packing``).

For a few length distributions of SFT examples, prints sequences needed, fill (real tokens per
sequence token: padding is computed like any token, so fill is the share of compute that trains)
and packing time, with the volume lower bound. Runs in seconds on a CPU:

    python scripts/bench_packing.py [--seq-len 32768]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from seqpar.data.packing import best_fit_pack, greedy_pack  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the example counts")
    a = ap.parse_args(argv)
    s = a.seq_len
    rng = np.random.default_rng(0)
    cases = [("long (0.25-0.9 x seq_len)", int(2000 * a.scale), s // 4, int(0.9 * s)),
             ("medium (0.02-0.6 x seq_len)", int(100_000 * a.scale), s // 50, int(0.6 * s)),
             ("short (0.003-0.12 x seq_len)", int(20_000 * a.scale), s // 300, int(0.12 * s))]
    print(f"seq_len {s}: examples with uniformly random lengths")
    print("| examples | count | greedy: sequences, fill | best_fit: sequences, fill, time | lower bound |")
    print("|---|---|---|---|---|")
    for name, n, lo, hi in cases:
        lengths = rng.integers(lo, hi, n)
        gb, _ = greedy_pack(lengths, s)
        t = time.perf_counter()
        _, bb = best_fit_pack(lengths, s)
        took = time.perf_counter() - t
        real = float(lengths.sum())
        g, b = len(gb) - 1, len(bb) - 1
        print(f"| {name} | {n:,} | {g:,}, {real / (g * s):.1%} | {b:,}, {real / (b * s):.1%}, {took:.2f} s "
              f"| {int(np.ceil(real / s)):,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
