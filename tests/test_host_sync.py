"""No host sync inside a micro-batch (issue 11): nothing the model produced (the loss, tensors
with autograd history, parameters, buffers such as the MoE routing digest) is read on the host in a
micro-batch that neither opens nor closes its window; the per-micro-batch records still end up as
plain numbers. The check runs on CPU by recording reads (tests/host_sync_worker.py): on a GPU each
such read would make the host wait for the GPU."""

from __future__ import annotations

import json
import subprocess
import sys

from common import ENV, ROOT


def test_no_model_value_is_read_inside_a_window(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "host_sync_worker.py")], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env={**ENV, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["mid_window_micro_batches"] == 2
    assert got["reads"] == [], got["reads"]
    # read later, in one go: the records are plain numbers, one per micro-batch / step
    assert len(got["micro_losses"]) == 8 and all(isinstance(x, float) and x > 0 for x in got["micro_losses"])
    assert len(got["routing"]) == 8 and all(isinstance(x, int) for x in got["routing"])
    assert got["routing"] == sorted(got["routing"]) and len(set(got["routing"])) == 8  # running digest
    assert len(got["losses"]) == 2


def test_varlen_lse_is_unpadded_on_the_device():
    """The efficient varlen kernel's padded per-document LSE, unpadded without host reads."""
    import torch

    from seqpar.kernels.sdpa import unpad_varlen_lse

    lens = [5, 1, 7, 3]
    cu = torch.tensor([0, 5, 6, 13, 16])
    padded = torch.randn(len(lens), 3, 8)
    expected = torch.cat([padded[i, :, :n] for i, n in enumerate(lens)], dim=1)  # the old host loop
    assert torch.equal(unpad_varlen_lse(padded, cu, 16), expected)
