"""Bit-exact resume matrix (ZeRO 0-3 x boundary/mid-window x dense/MoE x SP 1/2), 2 processes;
the runs and comparisons live in tests/resume_worker.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_resume_is_bit_exact_across_the_matrix(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rows.jsonl"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
         str(ROOT / "tests" / "resume_worker.py"), str(out)],
        capture_output=True, text=True, timeout=1500, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)},
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    failed = [row for row in rows if not row["ok"]]
    assert r.returncode == 0 and len(rows) == 32 and not failed, f"{failed}\n{r.stderr[-4000:]}"
    mid = [row for row in rows if "mid-window" in row["cell"]]
    assert all(not row["resumed_from"].endswith("micro0000") for row in mid)  # really mid-window
