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


def make_checkpoint(store: CheckpointStore, step: int, micro: int, ranks: int = 2) -> Path:
    tag = tag_for(step, micro)
    part = store.begin(tag)
    files = []
    for r in range(ranks):
        d = part / f"rank{r:05d}"
        d.mkdir()
        files += codec.save_tree({"w": torch.full((100,), float(r + step))}, d / "optimizer")
    (part / "trainer_state.json").write_text(json.dumps({"step": step}))
    files.append(part / "trainer_state.json")
    return store.commit(tag, describe_files(part, files), {"world_size": ranks})


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
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        store.begin(tag_for(5, 0))


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
