"""Checkpoint storage without training: codec round trips, commit protocol, corruption detection."""

from __future__ import annotations

import enum
import json
import random
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from seqpar.checkpoint import codec
from seqpar.checkpoint.store import MARKER, CheckpointStore, describe_files, parse_tag, tag_for
from seqpar.rng import rng_state_dict


class Color(enum.Enum):
    RED = 1


Pair = namedtuple("Pair", "a b")


def test_codec_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(codec, "ALLOWED_CLASSES", codec.ALLOWED_CLASSES | {f"{__name__}:Color", f"{__name__}:Pair"})
    tree = {
        "t": torch.arange(6, dtype=torch.bfloat16).view(2, 3), "scalar": torch.tensor(3.5),
        "state": {0: {"exp_avg": torch.ones(3)}, 1: {}}, "tup": (1, "x", None, True),
        "inf": float("inf"), "nan": float("nan"), "dtype": torch.float16, "size": torch.Size([2, 3]),
        "enum": Color.RED, "pair": Pair(1, torch.zeros(2)), "np": np.arange(4, dtype=np.uint32),
        "__weird": 1, "rng": rng_state_dict(),
    }
    files = codec.save_tree(tree, tmp_path / "state")
    assert {f.suffix for f in files} == {".json", ".safetensors"}
    back = codec.load_tree(tmp_path / "state")
    assert torch.equal(back["t"], tree["t"]) and back["t"].dtype == torch.bfloat16
    assert back["state"][0]["exp_avg"].tolist() == [1, 1, 1] and back["state"][1] == {}
    assert back["tup"] == (1, "x", None, True) and back["inf"] == float("inf") and np.isnan(back["nan"])
    assert back["dtype"] is torch.float16 and back["size"] == (2, 3) and back["enum"] is Color.RED
    assert isinstance(back["pair"], Pair) and torch.equal(back["pair"].b, torch.zeros(2))
    assert back["np"].dtype == np.uint32 and back["__weird"] == 1
    # the RNG snapshot restores the exact streams
    from seqpar.rng import load_rng_state_dict

    load_rng_state_dict(back["rng"])
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    load_rng_state_dict(tree["rng"])
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())


def test_codec_refuses_unknown_classes(tmp_path):
    with pytest.raises(codec.CodecError, match="Color"):
        codec.encode({"x": Color.RED})
    (tmp_path / "bad.json").write_text(json.dumps({"__object__": "os:system", "state": {}}))
    with pytest.raises(codec.CodecError, match="not allowed"):
        codec.load_tree(tmp_path / "bad")


def make_checkpoint(store: CheckpointStore, step: int, micro: int, ranks: int = 2, tag: str | None = None,
                    position: dict | None = None) -> Path:
    tag = tag or tag_for(step, micro)
    part = store.begin(tag)
    files = []
    for r in range(ranks):
        d = part / f"rank{r:05d}"
        d.mkdir()
        files += codec.save_tree({"w": torch.full((100,), float(r + step))}, d / "optimizer")
    (part / "trainer_state.json").write_text(json.dumps({"step": step}))
    files.append(part / "trainer_state.json")
    position = position or {"step": step, "window_samples": micro, "consumed_samples": 8 * step + micro,
                            "micro_step": micro}
    meta = {"world_size": ranks, "position": position}
    return store.commit(tag, describe_files(part, files), meta)


def test_commit_verify_and_corruption(tmp_path):
    store = CheckpointStore(tmp_path)
    assert parse_tag(tag_for(12, 3)) == (12, 3) and parse_tag("latest") is None
    good = make_checkpoint(store, 1, 0)
    assert store.verify(good) == [] and store.latest_hint() == good.name
    assert not list(tmp_path.glob(".partial-*"))
    cases = {
        "truncated": lambda p: p.write_bytes(p.read_bytes()[:-10]),
        "flipped byte": lambda p: p.write_bytes(bytes([p.read_bytes()[0] ^ 1]) + p.read_bytes()[1:]),
        "missing rank file": lambda p: p.unlink(),
    }
    for i, (name, corrupt) in enumerate(cases.items()):
        ck = make_checkpoint(store, 2 + i, 0)
        corrupt(ck / "rank00001" / "optimizer.safetensors")
        problems = store.verify(ck)
        assert problems and "rank00001/optimizer.safetensors" in problems[0], (name, problems)
    ck = make_checkpoint(store, 9, 0)
    (ck / MARKER).unlink()
    assert "no COMMITTED marker" in store.verify(ck)[0]
    ck = make_checkpoint(store, 10, 0)
    (ck / "manifest.json").write_text((ck / "manifest.json").read_text().replace('"world_size": 2', '"world_size": 3'))
    assert "does not match" in store.verify(ck)[0]


def test_partial_cleanup_and_retention(tmp_path):
    store = CheckpointStore(tmp_path)
    for s in range(1, 6):
        make_checkpoint(store, s, 0)
    store.begin(tag_for(6, 0))  # a write that never committed
    assert [c.step for c in store.list()] == [1, 2, 3, 4, 5]  # the partial one is not listed
    assert store.remove_partials() and not list(tmp_path.glob(".partial-*"))
    gone = store.retain(keep_last=2, protect={tag_for(1, 0)})
    assert [c.step for c in store.list()] == [1, 4, 5] and len(gone) == 2
    store.retain(keep_last=0, protect=set())
    assert [c.step for c in store.list()] == [5]  # the newest complete one always survives
    store.begin(tag_for(5, 0))  # the same position again: the old one is moved aside, not overwritten
    assert (tmp_path / "superseded" / tag_for(5, 0)).is_dir()


def test_set_aside_newer_keeps_everything(tmp_path):
    """Resuming an older checkpoint moves the newer ones aside (never deletes or overwrites)."""
    store = CheckpointStore(tmp_path)
    for s, m in ((1, 0), (2, 0), (2, 1), (3, 0)):
        make_checkpoint(store, s, m)
    (tmp_path / "superseded" / tag_for(3, 0)).mkdir(parents=True)  # left by an earlier set-aside
    moved = store.set_aside_newer(tag_for(2, 0))
    assert [c.tag for c in store.list()] == [tag_for(1, 0), tag_for(2, 0)]
    assert sorted(p.name for p in moved) == [tag_for(2, 1), f"{tag_for(3, 0)}.1"]
    assert all(store.verify(p) == [] for p in moved)  # intact, just elsewhere
    assert (tmp_path / "superseded" / tag_for(3, 0)).is_dir()
    store.begin(tag_for(2, 1))  # the resumed run can write that tag again


def test_lazy_tree_reads_exact_flat_ranges(tmp_path):
    """Elastic resume reads saved tensors lazily: any flat range equals the eager tensor's."""
    from seqpar.checkpoint.codec import LAZY_MIN_NUMEL, LazyTensor, load_tree, save_tree

    g = torch.Generator().manual_seed(0)
    tree = {"big1d": torch.randn(LAZY_MIN_NUMEL + 7, generator=g),
            "big3d": torch.randn(37, 41, 53, generator=g).to(torch.bfloat16),
            "small": torch.randn(3, 4, generator=g), "step": torch.tensor(5.0), "n": 3}
    save_tree(tree, tmp_path / "t")
    lazy = load_tree(tmp_path / "t", lazy=True)
    assert isinstance(lazy["big1d"], LazyTensor) and isinstance(lazy["big3d"], LazyTensor)
    assert torch.equal(lazy["small"], tree["small"]) and torch.equal(lazy["step"], tree["step"]) and lazy["n"] == 3
    for key in ("big1d", "big3d"):
        full = tree[key].reshape(-1)
        assert lazy[key].numel() == full.numel()
        for _ in range(20):
            lo = int(torch.randint(0, full.numel() - 1, (1,), generator=g))
            hi = int(torch.randint(lo + 1, min(full.numel(), lo + 5000) + 1, (1,), generator=g))
            assert torch.equal(lazy[key].flat(lo, hi), full[lo:hi]), (key, lo, hi)
        assert torch.equal(lazy[key].flat(0, full.numel()), full)


def test_newest_means_most_training_not_highest_tag(tmp_path):
    """Order is the manifest's position: an elastic resume onto fewer micro-steps per window wrote
    micro-step 3 after micro-step 4 (format-1 tags); retention and ``auto`` must keep the later one."""
    store = CheckpointStore(tmp_path)
    pos = lambda step, w: {"step": step, "window_samples": w, "consumed_samples": 8 * step + w, "micro_step": 0}  # noqa: E731
    make_checkpoint(store, 10, 4, tag="step00000010-micro0004", position=pos(10, 4))
    make_checkpoint(store, 10, 3, tag="step00000010-micro0003", position=pos(10, 6))  # later, lower tag
    assert [c.tag for c in store.list()] == ["step00000010-micro0004", "step00000010-micro0003"]
    gone = store.retain(keep_last=1, protect=set())
    assert [p.name for p in gone] == ["step00000010-micro0004"]
    assert [c.tag for c in store.list()] == ["step00000010-micro0003"]
    # today's tags name the position (sequences done in the window): unique per position
    assert tag_for(10, 6) != tag_for(10, 4) and parse_tag(tag_for(10, 6)) == (10, 6)


def test_resume_none_moves_the_old_run_aside(tmp_path):
    """A fresh start in a directory that holds a longer run: the old checkpoints go to superseded/
    (kept), so retention can never delete the new run's checkpoints in favour of the old ones."""
    from seqpar.checkpoint.manager import CheckpointManager
    from seqpar.config import CheckpointConfig

    store = CheckpointStore(tmp_path / "checkpoints")
    old = make_checkpoint(store, 3000, 0)
    lines = []
    mgr = CheckpointManager(CheckpointConfig(), tmp_path, rank=0, world=1, pin=False)
    assert mgr.find_resume("none", log=lines.append) is None
    assert store.list() == [] and (store.root / "superseded" / old.name).is_dir() and "moved" in lines[0]
    new = make_checkpoint(store, 100, 0)
    assert store.retain(keep_last=1, protect=set(), committed_now=new) == [] and new.is_dir()


def test_explicit_resume_takes_run_and_checkpoints_dirs_and_says_what_a_path_is(tmp_path):
    """--resume <path>: one checkpoint, its root's ``latest`` file, a run or checkpoints directory
    (the checkpoint ``latest`` names, else the newest), as seqpar.ckpt takes them; a path holding no
    checkpoint says so and what to pass (not "no COMMITTED marker")."""
    from seqpar.checkpoint.manager import CheckpointManager, ResumeError
    from seqpar.config import CheckpointConfig

    run_dir = tmp_path / "run"
    store = CheckpointStore(run_dir / "checkpoints")
    first, second = make_checkpoint(store, 1, 0), make_checkpoint(store, 2, 0)
    mgr = CheckpointManager(CheckpointConfig(), tmp_path / "other", rank=0, world=1, pin=False)
    lines: list[str] = []
    assert mgr.find_resume(str(first), log=lines.append) == first and not lines
    assert mgr.find_resume(str(run_dir), log=lines.append) == second
    assert lines == [f"--checkpoint.resume {run_dir}: resuming {second}"]
    (store.root / "latest").write_text(first.name)
    assert mgr.find_resume(str(store.root), log=lines.append) == first
    assert mgr.find_resume(str(store.root / "latest"), log=lines.append) == first
    # a latest file naming a symbolic link is refused (a checkpoint is a plain directory of its root)
    elsewhere = make_checkpoint(CheckpointStore(tmp_path / "elsewhere"), 9, 0)
    (store.root / "step00000099-seq000000").symlink_to(elsewhere)
    (store.root / "latest").write_text("step00000099-seq000000")
    with pytest.raises(ResumeError, match="a symbolic link"):
        mgr.find_resume(str(store.root / "latest"), log=lines.append)
    (tmp_path / "empty").mkdir()
    for bad, says in ((tmp_path / "empty", "no checkpoints in"), (tmp_path / "nowhere", "does not exist")):
        with pytest.raises(ResumeError) as e:
            mgr.find_resume(str(bad), log=lines.append)
        assert says in str(e.value) and "pass a checkpoint directory" in str(e.value) and "COMMITTED marker" not in str(e.value)


def test_retention_reverifies_and_deletes_by_renaming(tmp_path, monkeypatch):
    """Nothing is deleted when the new checkpoint does not verify from the disk; a delete renames to
    .deleting-* first, so a kill in the middle leaves no half checkpoint with its marker."""
    import shutil

    store = CheckpointStore(tmp_path)
    older = [make_checkpoint(store, s, 0) for s in (1, 2)]
    new = make_checkpoint(store, 3, 0)
    (new / "rank00000" / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="does not verify after commit"):
        store.retain(keep_last=1, protect=set(), committed_now=new)
    assert all(p.is_dir() for p in older)
    good = make_checkpoint(store, 4, 0)
    seen = []

    def killed(path, *args, **kwargs):
        seen.append(Path(path).name)
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):  # killed while deleting
        store.retain(keep_last=1, protect=set(), committed_now=good)
    assert seen and seen[0].startswith(".deleting-")
    assert seen[0].removeprefix(".deleting-") not in [c.tag for c in store.list()]
    monkeypatch.undo()
    assert store.remove_partials() and not list(tmp_path.glob(".deleting-*"))


def test_directory_lock_refuses_a_second_job(tmp_path):
    """Two jobs on one checkpoint dir: the second waits lock_wait_s, then is refused with the holder."""
    import subprocess
    import sys

    from seqpar.checkpoint.store import DirLockedError

    store = CheckpointStore(tmp_path / "ck")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from seqpar.checkpoint.store import CheckpointStore; "
        f"CheckpointStore({str(tmp_path / 'ck')!r}).lock(0); print('locked', flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        told = []
        with pytest.raises(DirLockedError, match=r"in use by another job \(.*\"pid\": %d" % holder.pid):
            store.lock(wait_s=0.6, log=told.append)
        assert told and "waiting up to" in told[0]
    finally:
        holder.kill()
        holder.wait()
    assert store.lock(wait_s=5)  # released when the holder died
    store.unlock()


def test_new_directories_are_fsynced(tmp_path, monkeypatch):
    """Every directory a checkpoint creates is fsynced into its parent (else a power loss can lose a
    committed checkpoint's rank dir even though its files were synced)."""
    from seqpar.checkpoint import store as store_mod

    synced = []
    real = store_mod.fsync_file
    monkeypatch.setattr(store_mod, "fsync_file", lambda p: (synced.append(Path(p)), real(p))[1])
    store = CheckpointStore(tmp_path / "a" / "b")
    part = store.begin(tag_for(1, 0))
    assert tmp_path / "a" in synced and tmp_path / "a" / "b" in synced  # parents of new dirs
    store_mod.make_dirs(part / "rank00000" / "sub")
    assert part in synced and part / "rank00000" in synced
    store.set_aside(part)
    assert store.root / "superseded" in synced and store.root in synced


def test_snapshot_copies_each_tensor_once_into_pinned_memory(monkeypatch):
    """The GPU path, on CPU: a snapshot with pinning makes exactly one copy of each tensor (it used to
    make three: device-to-host, a clone, and a pinned copy of the clone)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from seqpar.checkpoint import writer

    copies = {torch.ops.aten.copy_.default, torch.ops.aten.clone.default, torch.ops.aten._to_copy.default}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func in copies
            return func(*args, **(kwargs or {}))

    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))  # no pinning on CPU
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())  # pinning is a copy
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    tree = {"a": torch.randn(4, 5), "b": [torch.arange(3)], "strided": torch.randn(6)[::2]}
    with Count():
        snap = writer.Snapshot.take({"x": tree}, pin=True)
    assert Count.n == 3
    # the part that changes only at the next optimizer step is copied later, by the writer, once too
    weights = {"w": torch.randn(3, 3)}
    Count.n = 0
    with Count():
        later = writer.Snapshot.take({}, pin=True, deferred={"opt": {"m": torch.ones(2), "v": torch.ones(4)}},
                                     deferred_tensors=[weights])
        assert Count.n == 0
        live = weights["w"]
        later.materialize()
    assert Count.n == 3 and weights["w"] is not live and torch.equal(weights["w"], live)
    skeleton, tensors = snap.parts["x"]
    back = codec.decode(skeleton, tensors)
    assert torch.equal(back["a"], tree["a"]) and torch.equal(back["strided"], tree["strided"])
    tree["a"] += 1  # training goes on changing the live tensors
    assert not torch.equal(back["a"], tree["a"])


def test_writer_hashes_while_writing(tmp_path, monkeypatch):
    """No file the writer writes is read back to hash it (that halved the write throughput); the
    manifest records exactly the bytes on disk, and files get checkpoint.file_mode whatever the umask."""
    import hashlib
    import os

    from seqpar.checkpoint import store as store_mod
    from seqpar.checkpoint.writer import CheckpointWriter, Snapshot

    read_back = []
    real = store_mod.sha256_file
    monkeypatch.setattr(store_mod, "sha256_file", lambda p, *a: (read_back.append(Path(p).name), real(p, *a))[1])
    store = CheckpointStore(tmp_path, mode=0o640)
    tag = tag_for(1, 0)
    store.begin(tag)
    snap = Snapshot.take({"rank00000/optimizer": {"w": torch.randn(1000), "n": 3}}, pin=False)
    snap.raw["trainer_state.json"] = b'{"step": 1}'
    old = os.umask(0)
    try:
        CheckpointWriter(store, 0, 1, background=False, mode=0o640).submit(tag, snap, {"position": {
            "step": 1, "window_samples": 0, "consumed_samples": 8, "micro_step": 0}})
    finally:
        os.umask(old)
    assert read_back == ["manifest.json"]  # the marker holds the manifest's hash; nothing else re-read
    final = store.final_dir(tag)
    assert store.verify(final) == []
    for rel, want in store.manifest(final)["files"].items():
        assert hashlib.sha256((final / rel).read_bytes()).hexdigest() == want["sha256"]
        assert (final / rel).stat().st_mode & 0o777 == 0o640, rel
    assert (final / "manifest.json").stat().st_mode & 0o777 == 0o640


def test_keep_best_protects_the_lowest_eval_loss(tmp_path):
    """checkpoint.keep_best: retention never deletes the checkpoint with the lowest held-out loss; a
    NaN loss (a manifest written before NaN was left out) is never the best."""
    store = CheckpointStore(tmp_path)
    for step, loss in ((1, float("nan")), (2, 3.0), (3, 1.5), (4, 2.0), (5, 2.5)):
        part = store.begin(tag_for(step, 0))
        (part / "trainer_state.json").write_text("{}")
        pos = {"step": step, "window_samples": 0, "consumed_samples": 8 * step, "micro_step": 0}
        new = store.commit(tag_for(step, 0), describe_files(part, [part / "trainer_state.json"]),
                           {"position": pos, "eval_loss": loss})
        store.retain(keep_last=1, protect=set(), committed_now=new, keep_best=True)
    assert store.best() == (tag_for(3, 0), 1.5)
    assert [c.step for c in store.list()] == [3, 5]
    store.retain(keep_last=1, protect=set(), committed_now=new, keep_best=False)
    assert [c.step for c in store.list()] == [5]


def test_keep_best_compares_only_losses_measured_on_the_same_held_out_data(tmp_path):
    """A resume may change the held-out data (evaluation settings are neutral): a loss measured on
    other data is not comparable, so it is never the best; a manifest that does not say (written
    before eval_set was recorded) still counts."""
    store = CheckpointStore(tmp_path)
    for step, loss, eval_set in ((1, 1.0, None), (2, 0.5, "old"), (3, 2.0, "new"), (4, 3.0, "new")):
        part = store.begin(tag_for(step, 0))
        (part / "trainer_state.json").write_text("{}")
        pos = {"step": step, "window_samples": 0, "consumed_samples": 8 * step, "micro_step": 0}
        store.commit(tag_for(step, 0), describe_files(part, [part / "trainer_state.json"]),
                     {"position": pos, "eval_loss": loss, **({"eval_set": eval_set} if eval_set else {})})
    assert store.best() == (tag_for(2, 0), 0.5)  # no eval_set of its own: every loss counts
    store.eval_set = "new"
    assert store.best() == (tag_for(1, 0), 1.0)
    (tmp_path / tag_for(1, 0)).rename(tmp_path / "elsewhere")
    assert store.best() == (tag_for(3, 0), 2.0)
