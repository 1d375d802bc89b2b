"""``train.fused_optimizer`` (issue 11): torch's fused AdamW kernel through DeepSpeed equals the
plain one (fp32, 1e-5 relative on every parameter after a few steps) and resumes bitwise from a
checkpoint taken inside an accumulation window."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from common import ENV, ROOT, command, final_hashes, run

sys.path.insert(0, str(ROOT / "scripts"))
from gpu_smoke import final_weights as _weights  # noqa: E402  (the smoke test's reader of a run's weights)


@pytest.mark.slow
def test_fused_adamw_equals_plain_and_resumes_bitwise(tmp_path):
    train = {"max_steps": 4}
    ck = {"every_micro_batches": 0}
    plain_cmd, plain_dir = command(tmp_path, "plain", 1, train={**train, "fused_optimizer": "off"}, checkpoint=ck)
    fused_cmd, fused_dir = command(tmp_path, "fused", 1, train={**train, "fused_optimizer": "on"}, checkpoint=ck)
    stop_cmd, stop_dir = command(tmp_path, "stopped", 1, train={**train, "fused_optimizer": "on"}, checkpoint=ck)
    plain = run(plain_cmd)
    fused = run(fused_cmd)
    assert plain.returncode == 0 and fused.returncode == 0, (plain.stdout + fused.stdout)[-3000:]
    assert "AdamW (fused)" in fused.stdout and "AdamW (fused)" not in plain.stdout
    a, b = _weights(plain_dir), _weights(fused_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(b[k], a[k], rtol=1e-5, atol=1e-7), (k, (b[k] - a[k]).abs().max())

    # stopped after micro-batch 11 (inside the third step's window), resumed: bitwise the same
    stopped = run(stop_cmd + ["--resume", "none"], env={**ENV, "SEQPAR_STOP_AFTER_MICRO_BATCHES": "11"})
    assert stopped.returncode == 75, stopped.stdout[-3000:]
    state = json.loads((stop_dir / "run_state.json").read_text())
    assert state["state"] == "preempted"
    resumed = run(stop_cmd + ["--resume", "auto"])
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-3000:]
    got, want = final_hashes(stop_dir), final_hashes(fused_dir)
    assert got == want
