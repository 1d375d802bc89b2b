"""Tokenizing memory and speed of the data cache: peak traced (Python + numpy) memory while a
jsonl corpus of N documents is tokenized into the cache, against the size of the token stream.

    python scripts/bench_data.py [REPO_ROOT] [--docs 5000 20000]

REPO_ROOT (default: this checkout) lets the same script measure another checkout (an older
commit in a git worktree) for a before/after table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--docs", type=int, nargs="+", default=[5000, 20000])
    args = ap.parse_args()
    sys.path.insert(0, args.root)
    from seqpar.config import DataConfig
    from seqpar.data import build_dataset

    rng = random.Random(0)
    words = ["long", "context", "ring", "token", "shard", "rank", "zero", "loss", "window"]
    print("| documents | token stream | peak traced memory | time |")
    print("|---|---|---|---|")
    for n in args.docs:
        d = Path(tempfile.mkdtemp())
        with open(d / "c.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))}) + "\n")
        cfg = DataConfig(type="text", paths=[d / "c.jsonl"], seq_len=256)
        tracemalloc.start()
        t = time.time()
        ds = build_dataset(cfg, d / "cache")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"| {n:,} | {ds.tokens.nbytes / 1e6:.1f} MB | {peak / 1e6:.1f} MB | {time.time() - t:.2f} s |")


if __name__ == "__main__":
    main()
