"""ZeRO-3 models built partitioned (``deepspeed.zero.Init``) equal the whole-then-split path bitwise:
random init (dense tied, MoE, bf16, MoE bf16, YaRN bf16) and Hugging Face weights (dense, MoE with expert bias), at
start and after two steps. 2 gloo processes; the runs live in tests/zero3_init_worker.py."""

from __future__ import annotations

import pytest

from common import read_rows, torchrun


@pytest.mark.slow
def test_partitioned_build_equals_whole_build(tmp_path):
    out = tmp_path / "rows.jsonl"
    r = torchrun(2, "zero3_init_worker.py", str(out), cwd=tmp_path, timeout=900)
    rows = read_rows(out)
    assert r.returncode == 0 and len(rows) == 8, r.stderr[-4000:]
    assert all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]
    assert next(row for row in rows if row["case"] == "hf moe")["nonzero_bias"]  # the bias was loaded
