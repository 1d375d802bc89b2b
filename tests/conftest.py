"""Suite-wide set-up: two pytest workers on two cores (pyproject's ``-n 2``), fixtures shared by
the command-line fault and preemption tests."""

from __future__ import annotations

import fcntl
import getpass
import os
import re
from collections.abc import Iterator

import pytest

WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    # One intra-op thread per worker: two workers with two OpenMP threads each on two cores make an
    # in-process test many times slower (spin-waits). Set before any test module imports torch.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import command, final_hashes, run  # noqa: E402  (after OMP_NUM_THREADS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first (stable order otherwise): with two workers the run then ends on short
    tests instead of one worker finishing a 5-minute test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path set-up (and xdist's basetemp of this worker)
def pytest_configure(config: pytest.Config) -> None:
    """Temporary files of tested processes (torchrun's agent directories, test workers' run
    directories) go under this run's pytest-N directory, which pytest rotates, not loose in /tmp.
    Set before collection, so test modules' own environments inherit it. torch's compile cache
    stays where it was: warm across runs, shared by the workers."""
    import tempfile

    import common

    try:
        user = re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())  # torch's default cache name
    except (KeyError, OSError):  # no passwd entry (some containers): torch falls back the same way
        user = f"uid_{os.getuid()}"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_{user}"))
    factory = getattr(config, "_tmp_path_factory", None)  # as xdist itself reads it (absent: -p no:tmpdir)
    if factory is None:
        return
    base = factory.getbasetemp()
    tmp = (base.parent if WORKER else base) / "tmp"
    tmp.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    common.ENV.update(TMPDIR=str(tmp), TORCHINDUCTOR_CACHE_DIR=os.environ["TORCHINDUCTOR_CACHE_DIR"])
    tempfile.tempdir = None  # recomputed from TMPDIR on next use


@pytest.fixture(autouse=True)
def _machine_share(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Under several workers, a test marked ``alone`` (it checks a wall-clock promise) runs with
    the machine to itself: it holds an exclusive lock, every other test a shared one. The
    turnstile lets a waiting ``alone`` test in before the other worker's next test. The lock files
    live in this run's pytest-N directory (the workers' base temps are inside it)."""
    if not WORKER:
        yield
        return
    base = tmp_path_factory.getbasetemp().parent / "machine"
    alone = request.node.get_closest_marker("alone") is not None
    with open(f"{base}.turnstile", "a") as turnstile, open(f"{base}.share", "a") as share:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(share, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(share, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def references(tmp_path_factory) -> dict[tuple[int, int], dict[str, str]]:
    """Final state of uninterrupted runs, by (processes, max_steps), computed on first use (the
    tests that use it share one worker: ``xdist_group("references")``)."""
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
