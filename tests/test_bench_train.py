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
