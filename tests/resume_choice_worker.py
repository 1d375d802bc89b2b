"""Worker for tests/test_preemption.py::test_ranks_agree_on_the_checkpoint_to_resume (2 gloo ranks).

Builds checkpoints with the store, then runs ``CheckpointManager.find_resume`` on both ranks with
rank 1 seeing the disk differently (a file it reads hashes differently, cannot be read, or the
directory lists fewer checkpoints). Writes one JSON line per case to argv[1] (rank 0).
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from common import every_rank, finish, report, shared_tmpdir
from seqpar.checkpoint import codec, manager
from seqpar.checkpoint.manager import CheckpointManager, ResumeError
from seqpar.checkpoint.store import CheckpointStore, describe_files, tag_for
from seqpar.config import CheckpointConfig


def make(store: CheckpointStore, step: int) -> Path:
    tag = tag_for(step, 0)
    part = store.begin(tag)
    files = []
    for r in range(2):
        (part / f"rank{r:05d}").mkdir()
        files += codec.save_tree({"w": torch.full((10,), float(step + r))}, part / f"rank{r:05d}" / "optimizer")
    (part / "trainer_state.json").write_text("{}")
    files.append(part / "trainer_state.json")
    pos = {"step": step, "window_samples": 0, "consumed_samples": 4 * step, "micro_step": 0}
    return store.commit(tag, describe_files(part, files), {"position": pos})


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    root = shared_tmpdir("seqpar-choice-") / "run"
    store = CheckpointStore(root / "checkpoints")
    if rank == 0:
        for step in (1, 2):
            make(store, step)
    dist.barrier()
    mgr = CheckpointManager(CheckpointConfig(), root, rank, 2, pin=False)
    mine = lambda p: (lambda rel: not rel.startswith("rank") or rel.startswith(f"rank{rank:05d}/"))  # noqa: E731
    newest = store.root / tag_for(2, 0)
    real_hash = manager.sha256_file
    rows: list[dict] = []

    def case(name: str, fake_hash, fake_list=None, expect: str = "") -> None:
        manager.sha256_file = fake_hash if rank == 1 else real_hash
        if fake_list and rank == 1:
            mgr.store.list = fake_list  # shadows the method on this instance
        try:
            got = str(mgr.find_resume("auto", reads=mine, log=lambda m: None))
        except ResumeError as e:
            got = f"ResumeError: {e}"
        finally:
            manager.sha256_file = real_hash
            mgr.store.__dict__.pop("list", None)
        choices = every_rank([got])
        same = choices[0] == choices[1]
        report({"case": name, "ok": same and expect in choices[0][0], "choices": choices}, rows)

    def corrupt_newest_rank1(path: Path) -> str:
        return "0" * 64 if path.parent.parent == newest else real_hash(path)

    def unreadable(path: Path) -> str:
        if path.parent.parent == newest:
            raise OSError(errno.EIO, "Input/output error")
        return real_hash(path)

    case("corrupt on rank 1 only: both take the older", corrupt_newest_rank1, expect=tag_for(1, 0))
    case("unreadable on rank 1: both fail with one message", unreadable, expect="rank 1: rank00001/optimizer")
    case("rank 1 lists fewer: rank 0 decides", real_hash, fake_list=lambda: store.list()[:1], expect=tag_for(2, 0))
    status = finish(rows, Path(sys.argv[1]))
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
