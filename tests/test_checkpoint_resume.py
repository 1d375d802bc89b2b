"""Bit-exact resume matrix (ZeRO 0-3 x boundary/mid-window x dense/MoE x SP 1/2), 2 processes;
the runs and comparisons live in tests/resume_worker.py."""

from __future__ import annotations

import pytest

from common import read_rows, torchrun


@pytest.mark.slow
def test_resume_is_bit_exact_across_the_matrix(tmp_path):
    out = tmp_path / "rows.jsonl"
    r = torchrun(2, "resume_worker.py", str(out), cwd=tmp_path)
    rows = read_rows(out)
    failed = [row for row in rows if not row["ok"]]
    assert r.returncode == 0 and len(rows) == 32 and not failed, f"{failed}\n{r.stderr[-4000:]}"
    mid = [row for row in rows if "mid-window" in row["cell"]]
    assert all(not row["resumed_from"].endswith("seq000000") for row in mid)  # really mid-window
