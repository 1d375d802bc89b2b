"""scripts/gpu_smoke.py under torchrun on 2 gloo processes: every check that applies to 2 ranks
passes (SP layouts, bitwise resume, elastic 2 -> 1), and a perturbed SP result fails the run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from common import ENV, ROOT, free_port

SCRIPT = str(ROOT / "scripts" / "gpu_smoke.py")


def smoke(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         SCRIPT, "--device", "cpu", *args],
        capture_output=True, text=True, timeout=timeout, env={**ENV, "PYTHONPATH": str(ROOT)},
    )


def verdicts(out: str) -> dict[str, str]:
    """check name -> PASS / FAIL / SKIP, from the script's result lines."""
    rows = [line.split(":", 1)[0].split(" ", 1) for line in out.splitlines()
            if line.startswith(("PASS ", "FAIL ", "SKIP "))]
    return {name: status for status, name in rows}


@pytest.mark.slow
def test_smoke_passes_every_check_on_two_ranks(tmp_path):
    r = smoke("--workdir", str(tmp_path / "work"))
    got = verdicts(r.stdout)
    want = {"sp=ulysses2 vs sp1": "PASS", "sp=ring2 vs sp1": "PASS", "ep2 vs ep1": "PASS", "resume 2 ranks": "PASS",
            "elastic 2->1": "PASS"}
    assert r.returncode == 0 and got == want, f"{got}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert "bitwise equal to the uninterrupted run" in r.stdout
    assert "gpu_smoke: 5 passed, 0 failed, 0 skipped" in r.stdout


@pytest.mark.slow
def test_smoke_fails_on_a_perturbed_sp_result():
    r = smoke("--only", "sp", "--inject-mismatch")
    got = verdicts(r.stdout)
    assert r.returncode != 0, r.stdout[-3000:]
    assert got == {"sp=ulysses2 vs sp1": "FAIL", "sp=ring2 vs sp1": "FAIL", "ep": "SKIP", "resume": "SKIP",
                   "elastic": "SKIP"}, f"{got}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert ("gpu_smoke: 0 passed, 2 failed, 3 skipped (ep: not in --only; resume: not in --only; elastic: not in "
            "--only)") in r.stdout
