"""The README's first command, end to end: the embedded default learns passkey retrieval.

Runs ``python seqpar/train.py --config configs/tiny-cpu.yaml`` exactly as a newcomer does (only
the run directory moved into the test's tmp dir) and checks the last line: held-out accuracy of
at least 50% on 3-digit keys (chance 0.1%), printed with its chance level. About 3 minutes on
2 fast cores (docs/benchmarks.md); 2-core VMs vary by 4x and more (815 s, 3.5-9.3K tokens/s
within one run, on one whose single-thread fp32 matmul reaches ~30 GFLOP/s), so the time is
checked against a 20-minute budget: it catches a regression of several times, not a slow machine.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from common import ENV, ROOT, TRAIN


@pytest.mark.slow
@pytest.mark.alone  # the wall-clock promise holds for the machine to itself, not shared with a second worker
def test_the_default_run_learns_passkey_retrieval(tmp_path):
    cmd = [sys.executable, TRAIN, "--config", str(ROOT / "configs" / "tiny-cpu.yaml"),
           "--logging.run_dir", str(tmp_path / "run")]
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}  # as typed: all cores
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env, cwd=tmp_path)
    wall = time.time() - t0
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"done: 1200 steps, loss [\d.]+ -> [\d.]+, passkey accuracy ([\d.]+)% on 64 held-out "
                     r"3-digit keys \(chance 0\.1%\)", last)
    assert m, last
    assert float(m.group(1)) >= 50.0, last
    print(f"default run: {wall:.0f} s, {last}")
    assert wall < 1200, f"the default run took {wall:.0f} s (README: about 3 minutes on 2 fast cores)"
