"""Checkpoint mirror (seqpar/checkpoint/mirror.py) on a plain path, a file:// URL and memory://."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from contextlib import suppress
from pathlib import Path

import pytest
import torch

import fsspec  # noqa: F401  (a dependency of seqpar: the mirror tests must run, never skip)

from seqpar.checkpoint import codec  # noqa: E402
from seqpar.checkpoint import mirror as mirror_mod  # noqa: E402
from seqpar.checkpoint.mirror import AsyncMirror, Mirror, MirrorError, order_key, safe_rel, safe_tag  # noqa: E402
from seqpar.checkpoint.store import MANIFEST, MARKER, CheckpointStore, describe_files, tag_for  # noqa: E402


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not under test; keeps this file fast


@pytest.fixture(params=["path", "file", "memory"])
def far_url(request, tmp_path):
    url = {"path": str(tmp_path / "far"), "file": f"file://{tmp_path}/far",
           "memory": f"memory://seqpar-mirror-{uuid.uuid4().hex}"}[request.param]
    yield url
    if request.param == "memory":  # the memory filesystem is global to the process
        m = Mirror(url, 1)
        with suppress(FileNotFoundError):
            m.fs.rm(m.base, recursive=True)


def make_ck(root: Path, step: int, consumed: int | None = None, value: float = 0.0) -> Path:
    """A committed checkpoint with nested files (and an empty one); ``consumed`` sets its position
    (without one it is a format-1 checkpoint)."""
    store = CheckpointStore(root)
    tag = tag_for(step, 0)
    part = store.begin(tag)
    (part / "rank00000").mkdir()
    files = codec.save_tree({"w": torch.full((300,), value + step)}, part / "rank00000" / "optimizer")
    for rel, data in {"model/sub/config.json": json.dumps({"step": step}).encode(), "empty.bin": b""}.items():
        (part / rel).parent.mkdir(parents=True, exist_ok=True)
        (part / rel).write_bytes(data)
        files.append(part / rel)
    pos = {"consumed_samples": consumed, "step": step, "micro_step": 0, "window_samples": 0}
    meta = {"format_version": 1} if consumed is None else {"position": pos}
    return store.commit(tag, describe_files(part, files), meta)


def far_file(m: Mirror, tag: str, rel: str) -> str:
    return f"{m.base}/{tag}/{rel}"


def flip_far_byte(m: Mirror, tag: str, rel: str = "rank00000/optimizer.safetensors") -> None:
    data = m.fs.cat_file(far_file(m, tag, rel))
    m.fs.pipe_file(far_file(m, tag, rel), bytes([data[0] ^ 1]) + data[1:])


def test_names_and_order_keys():
    for bad in ("", "/abs", "a/../b", "..", "a\\b", "a//b", "./a", "a/", "x\0y", None):
        with pytest.raises(MirrorError, match="unsafe"):
            safe_rel(bad)
    assert safe_rel("rank00001/optimizer.json") == "rank00001/optimizer.json"
    for bad in ("a/b", ".partial-x", "superseded"):
        with pytest.raises(MirrorError):
            safe_tag(bad)
    pos = lambda n: {"position": {"consumed_samples": n, "step": 0, "micro_step": 0}}  # noqa: E731
    keys = [order_key(tag_for(9, 0), {}), order_key(tag_for(10, 0), {}), order_key(tag_for(1, 0), pos(5)),
            order_key(tag_for(0, 3), pos(7))]
    assert keys == sorted(keys)  # without a position: by tag, and older than any with one
    assert order_key("not-a-tag", {}) is None
    with pytest.raises(MirrorError, match="malformed position"):
        order_key(tag_for(1, 0), {"position": {"consumed_samples": "5"}})


def test_push_list_verify_fetch(far_url, tmp_path):
    src = tmp_path / "local"
    # tag order disagrees with position order: the mirror orders by consumed samples
    cks = [make_ck(src, 2, consumed=10), make_ck(src, 3, consumed=20), make_ck(src, 1, consumed=30)]
    m = Mirror(far_url, keep_last=5)
    assert m.list() == [] and m.fetch_newest(tmp_path / "empty") is None
    for ck in cks:
        m.push(ck)
    assert [t for t, _ in m.list()] == [ck.name for ck in cks]
    assert [p["consumed_samples"] for _, p in m.list()] == [10, 20, 30]
    assert all(m.verify(ck.name) == [] for ck in cks)
    m.push(cks[-1])  # pushing an already mirrored checkpoint again changes nothing
    assert [t for t, _ in m.list()] == [ck.name for ck in cks]

    new = tmp_path / "new-node"
    got = m.fetch_newest(new)
    assert got == new / cks[-1].name and CheckpointStore(new).verify(got) == []
    assert [c.tag for c in CheckpointStore(new).list()] == [got.name] and not list(new.glob(".partial-*"))
    for f in cks[-1].rglob("*"):
        if f.is_file():
            assert (got / f.relative_to(cks[-1])).read_bytes() == f.read_bytes()
    with pytest.raises(FileExistsError, match="verifies"):
        m.fetch(got.name, new)
    (got / "model" / "sub" / "config.json").write_text("{}")  # a corrupt local copy is moved aside
    assert CheckpointStore(new).verify(m.fetch(got.name, new)) == []
    assert (new / "superseded" / got.name / MARKER).is_file()


def test_retention_and_rewind(far_url, tmp_path, capsys):
    m = Mirror(far_url, keep_last=2)
    cks = [make_ck(tmp_path / "a", s, consumed=10 * s) for s in (1, 2, 3, 4)]
    for ck in cks:
        m.push(ck)
        assert m.list()[-1][0] == ck.name  # never the one just pushed
    assert [t for t, _ in m.list()] == [tag_for(3, 0), tag_for(4, 0)]
    assert not m.fs.exists(f"{m.base}/{tag_for(1, 0)}")
    # the run resumed step 2 and wrote step 3 again: the far step 4 and the old step 3 go aside
    redo = make_ck(tmp_path / "b", 3, consumed=30, value=0.5)  # another trajectory
    m.push(redo)
    assert [t for t, _ in m.list()] == [tag_for(3, 0)] and m.verify(tag_for(3, 0)) == []
    assert m.fs.cat_file(far_file(m, tag_for(3, 0), MANIFEST)) == (redo / MANIFEST).read_bytes()
    for tag in (tag_for(3, 0), tag_for(4, 0)):
        assert m.fs.exists(f"{m.base}/superseded/{tag}/{MARKER}")
    assert f"moving {tag_for(4, 0)} to superseded/" in capsys.readouterr().err


def test_far_corruption_and_uncommitted_fall_back(far_url, tmp_path):
    m = Mirror(far_url, keep_last=5)
    c1, c2, c3 = (make_ck(tmp_path / "local", s, consumed=s) for s in (1, 2, 3))
    for ck in (c1, c2, c3):
        m.push(ck)
    m.fs.rm_file(far_file(m, c3.name, MARKER))  # an upload that never committed
    assert [t for t, _ in m.list()] == [c1.name, c2.name]
    assert "no COMMITTED marker" in m.verify(c3.name)[0]
    flip_far_byte(m, c2.name)
    assert m.verify(c2.name) == [f"{c2.name}: rank00000/optimizer.safetensors checksum mismatch (corrupt)"]
    new = tmp_path / "new-node"
    with pytest.warns(UserWarning, match=f"{c2.name} unusable"):
        got = m.fetch_newest(new)
    assert got == new / c1.name and CheckpointStore(new).verify(got) == []
    assert sorted(p.name for p in new.iterdir()) == [c1.name]  # no partial download left behind
    m.fs.pipe_file(far_file(m, c1.name, "rank00000/extra.bin"), b"x")  # the far side holds what it lists
    assert m.verify(c1.name) == [f"{c1.name}: rank00000/extra.bin is not listed in {MANIFEST}"]
    flip_far_byte(m, c1.name)
    with pytest.raises(MirrorError, match="could be fetched"), pytest.warns(UserWarning):
        m.fetch_newest(tmp_path / "other-node")  # never mistaken for an empty mirror
    m.push(c3)  # the leftover of the interrupted upload is replaced
    assert m.list()[-1][0] == c3.name and m.verify(c3.name) == []


def test_hostile_far_manifest_refused(far_url, tmp_path):
    m = Mirror(far_url, keep_last=3)
    tag = tag_for(7, 0)
    manifest = json.dumps({"format_version": 1, "tag": tag, "files": {
        "../x": {"size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}}}).encode()
    m.fs.makedirs(f"{m.base}/{tag}", exist_ok=True)
    m.fs.pipe_file(f"{m.base}/x", b"x")
    m.fs.pipe_file(far_file(m, tag, MANIFEST), manifest)
    m.fs.pipe_file(far_file(m, tag, MARKER), (hashlib.sha256(manifest).hexdigest() + "\n").encode())
    assert "unsafe" in m.verify(tag)[0] and m.list() == []
    local = tmp_path / "deep" / "root"
    with pytest.raises(MirrorError, match="unsafe"):
        m.fetch(tag, local)
    assert not (local.parent / "x").exists() and m.fetch_newest(local) is None
    # a local manifest naming a file outside its checkpoint is refused too
    ck = make_ck(tmp_path / "local", 8)
    bad = json.loads((ck / MANIFEST).read_text())
    bad["files"]["../../etc"] = bad["files"].pop("empty.bin")
    (ck / MANIFEST).write_text(json.dumps(bad))
    (ck / MARKER).write_text(hashlib.sha256((ck / MANIFEST).read_bytes()).hexdigest() + "\n")
    with pytest.raises(MirrorError, match="unsafe"):
        m.push(ck)
    assert not m.fs.exists(f"{m.base}/{ck.name}")


def test_push_fails_cleanly(far_url, tmp_path, monkeypatch):
    m = Mirror(far_url, keep_last=3)
    ck = make_ck(tmp_path / "local", 1, consumed=1)
    path = ck / "rank00000" / "optimizer.safetensors"
    good = path.read_bytes()
    path.write_bytes(bytes([good[0] ^ 1]) + good[1:])  # corrupt after commit: not uploaded as good
    with pytest.raises(MirrorError, match="does not match its manifest"):
        m.push(ck)
    assert m.list() == [] and not m.fs.exists(f"{m.base}/{ck.name}")
    path.write_bytes(good)
    # local retention deletes the checkpoint while it is being pushed
    real = mirror_mod._copy_hashing

    def copy_then_delete(src, dst, size):
        out = real(src, dst, size)
        shutil.rmtree(ck, ignore_errors=True)
        return out

    monkeypatch.setattr(mirror_mod, "_copy_hashing", copy_then_delete)
    with pytest.raises(MirrorError, match="disappeared while pushing"):
        m.push(ck)
    assert m.list() == [] and not m.fs.exists(f"{m.base}/{ck.name}")


def test_async_pushes_newest_and_reports_errors(far_url, tmp_path, capsys):
    m = Mirror(far_url, keep_last=2)
    cks = [make_ck(tmp_path / "local", s, consumed=s) for s in range(1, 6)]
    pushed, started, release = [], threading.Event(), threading.Event()
    real_push = m.push

    def slow_push(local: Path) -> None:
        pushed.append(local.name)
        started.set()
        release.wait(10)
        real_push(local)

    m.push = slow_push
    am = AsyncMirror(m)
    am.submit(cks[0])
    assert started.wait(10)
    for ck in cks[1:]:  # commits arrive while the first push is in flight
        am.submit(ck)
    assert am.protected() == {cks[0].name, cks[-1].name}
    release.set()
    assert am.wait(timeout=10)
    assert pushed == [cks[0].name, cks[-1].name] and am.last_error is None and am.last_pushed == cks[-1].name
    assert [t for t, _ in m.list()] == [cks[0].name, cks[-1].name]

    gone = make_ck(tmp_path / "local", 9, consumed=9)
    shutil.rmtree(gone)  # local retention was faster
    am.submit(gone)  # never raises
    assert am.close(timeout=10)
    line = f"mirror push of {gone.name} to {far_url} failed: MirrorError: "
    assert am.last_error.startswith(line) and am.last_pushed == cks[-1].name
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"seqpar: {line}")
    assert [t for t, _ in m.list()] == [cks[0].name, cks[-1].name]
