"""scripts/bench_train.py on CPU: the trainer's step against the plain loop, tiny shape."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_cpu(tmp_path: Path):
    out = tmp_path / "rows.json"
    # --peak-tflops: MFU columns on CPU too (and the trainer's own MFU record, from seqpar.flops)
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--device", "cpu", "--seq-lens", "128,256",
         "--steps", "2", "--warmup", "1", "--peak-tflops", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| seq_len"))
    columns = [c.strip() for c in lines[head].strip("|").split("|")]
    assert columns == ["seq_len", "seqpar tok/s", "plain tok/s", "ratio", "seqpar MFU", "plain MFU",
                       "seqpar peak GiB", "plain peak GiB"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[head + 2:] if line.startswith("|")]
    assert [row[0] for row in rows] == ["128", "256"]
    for row in rows:
        assert float(row[columns.index("plain tok/s")].replace(",", "")) > 0
        assert float(row[columns.index("ratio")]) > 0
        assert row[columns.index("seqpar MFU")].endswith("%") and row[columns.index("plain MFU")].endswith("%")
    assert lines[0].startswith("# seqpar bench_train | CPU") and "torch " in lines[0]
    assert any(line.startswith("MFU = ") for line in lines[head:])

    data = json.loads(out.read_text())
    assert [row["seq_len"] for row in data["rows"]] == [128, 256]
    for row in data["rows"]:
        assert row["seqpar_tok_s"] > 0 and row["plain_tok_s"] > 0
        assert row["seqpar_mfu"] > 0 and row["plain_mfu"] > 0
        assert abs(row["ratio"] - row["seqpar_tok_s"] / row["plain_tok_s"]) < 1e-9
        # same model, init and data: the first step's loss agrees up to kernel rounding
        assert abs(row["seqpar_loss0"] - row["plain_loss0"]) < 1e-4 * row["plain_loss0"]
    # the trainer logged its own MFU (per-document FLOPs) at its last step
    assert re.search(r"step 3/3 \|.*\| mfu \d", r.stderr), r.stderr


def test_bench_train_longest_bisects_on_measured_peaks(tmp_path: Path):
    """--longest on CPU: each probe is a process whose peak RSS is measured (wait4); with a memory
    limit a little above the shortest probe's peak, the answer is a length that fits and the
    next one up (or a longer one probed) does not, for being over the limit."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--device", "cpu", "--longest", "--steps", "1",
            "--warmup", "0", "--granularity", "256", "--seq-lens", "256"]
    first = subprocess.run(base + ["--max-len", "256", "--json", str(tmp_path / "a.json")], capture_output=True,
                           text=True, timeout=300, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "longest trainable sequence: 256 tokens" in first.stdout and "end of the search" in first.stdout
    peak0 = json.loads((tmp_path / "a.json").read_text())["probes"][0]["peak_gib"]
    limit = peak0 + 0.06  # the tiny model's RSS grows by ~0.06 GiB per 1K tokens
    r = subprocess.run(base + ["--max-len", "16384", "--memory-limit-gib", f"{limit:.3f}", "--json",
                               str(tmp_path / "b.json")], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "b.json").read_text())
    best, probes = data["longest"], {p["seq_len"]: p for p in data["probes"]}
    assert probes[best]["fits"] and probes[best]["peak_gib"] <= limit
    longer = [p for s, p in probes.items() if s > best]
    assert longer and not any(p["fits"] for p in longer)
    assert all("over the memory limit" in p["why"] for p in longer)
    assert min(s for s in probes if s > best) == best + 256  # bisection closed to the granularity
    assert r.stdout.strip().splitlines()[-1].startswith(f"longest trainable sequence: {best} tokens")
