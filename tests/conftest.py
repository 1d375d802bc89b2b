"""Fixtures shared by the command-line fault and preemption tests."""

from __future__ import annotations

import pytest

from common import command, final_hashes, run


@pytest.fixture(scope="session")
def references(tmp_path_factory) -> dict[tuple[int, int], dict[str, str]]:
    """Final state of uninterrupted runs, by (processes, max_steps), computed on first use."""
    tmp = tmp_path_factory.mktemp("ref")

    class Refs(dict):
        def __missing__(self, key):
            nproc, steps = key
            cmd, run_dir = command(tmp, f"ref{nproc}-{steps}", nproc, checkpoint={"every_micro_batches": 0},
                                   train={"max_steps": steps})
            r = run(cmd)
            assert r.returncode == 0, r.stderr[-3000:]
            self[key] = final_hashes(run_dir)
            return self[key]

    return Refs()
