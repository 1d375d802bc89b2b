"""Hash-while-writing file output: safetensors byte identity, hashes, permissions, failure cleanup."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from seqpar.checkpoint import hashio
from seqpar.checkpoint.hashio import DTYPE_NAMES, FileRecord, write_bytes, write_file, write_safetensors


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ts = {f"d.{DTYPE_NAMES[dt]}": (torch.randn(3, 5, generator=g) * 4).to(dt) for dt in DTYPE_NAMES
          if dt not in (torch.bool, torch.complex64) and "e8m0" not in str(dt)}
    ts |= {
        "bool": torch.rand(7, generator=g) > 0.5, "c64": torch.randn(4, dtype=torch.complex64, generator=g),
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16), "empty": torch.zeros(0, 3),
        "empty_i64": torch.zeros(2, 0, dtype=torch.int64), "offset_view": torch.arange(20, dtype=torch.int64)[5:],
        "big": torch.randn(70_000, generator=g),  # several slices (see small_slices)
        "b": torch.ones(1), "a": torch.ones(1, dtype=torch.float64),
        "name \"é\"\n\x01\\": torch.ones(2, dtype=torch.int32),  # JSON escapes must match serde_json's
    }
    return ts


def record_of(path: Path) -> FileRecord:
    data = path.read_bytes()
    return FileRecord(len(data), hashlib.sha256(data).hexdigest())


@pytest.fixture(autouse=True)
def small_slices(monkeypatch):
    monkeypatch.setattr(hashio, "SLICE", 64 << 10)  # many slices through the pipeline, still fast
    monkeypatch.setattr(hashio, "WRITEBACK", 100 << 10)  # and early writeback requests


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_safetensors_round_trip_and_byte_identity(tmp_path, metadata):
    ts = sample()
    rec = write_safetensors(tmp_path / "ours.safetensors", ts, metadata)
    save_file(ts, tmp_path / "ref.safetensors", metadata=metadata)
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "ref.safetensors").read_bytes()
    assert rec == record_of(tmp_path / "ours.safetensors")
    back = load_file(tmp_path / "ours.safetensors")
    assert back.keys() == ts.keys()
    for k, t in ts.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k
    with safe_open(tmp_path / "ours.safetensors", framework="pt") as f:
        assert f.metadata() == metadata and torch.equal(f.get_tensor("big"), ts["big"])


def test_float8_e8m0_and_many_metadata_keys(tmp_path):
    # safetensors emits metadata in hash-map order (random), we sort it: compare loaded values.
    ts = {"s": torch.ones(4).to(torch.float8_e8m0fnu), "x": torch.ones(2)}
    meta = {k: f"v{k}" for k in "zamqb"}
    write_safetensors(tmp_path / "a", ts, meta)
    save_file(ts, tmp_path / "b")
    with safe_open(tmp_path / "a", framework="pt") as f:
        assert f.metadata() == meta and torch.equal(f.get_tensor("x"), ts["x"])
    write_safetensors(tmp_path / "c", ts)
    assert (tmp_path / "c").read_bytes() == (tmp_path / "b").read_bytes()


def test_empty_dict_matches_save_file(tmp_path):
    write_safetensors(tmp_path / "a", {})
    save_file({}, tmp_path / "b")
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_refuses_non_contiguous_and_bad_input_without_creating_a_file(tmp_path):
    p = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="'t' is not contiguous"):
        write_safetensors(p, {"ok": torch.ones(2), "t": torch.ones(3, 4).T})
    with pytest.raises(ValueError, match="metadata"):
        write_safetensors(p, {"ok": torch.ones(2)}, {"a": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="invalid tensor name"):
        write_safetensors(p, {"__metadata__": torch.ones(2)})
    assert not p.exists()


def test_conj_view_is_written_resolved(tmp_path):
    z = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64).conj()
    write_safetensors(tmp_path / "z", {"z": z})
    assert torch.equal(load_file(tmp_path / "z")["z"], z.resolve_conj())


@pytest.mark.parametrize("hash_thread,writeback", [(True, True), (False, True), (True, False)])
def test_write_file_chunks_and_hash(tmp_path, monkeypatch, hash_thread, writeback):
    if not writeback:
        monkeypatch.setattr(hashio, "_sync_file_range", None)  # as on a host without it
    chunks = [b"abc", bytearray(os.urandom(200_000)), memoryview(os.urandom(70_000)), b"",
              torch.arange(9).numpy()]
    rec = write_file(tmp_path / "f", chunks, hash_thread=hash_thread)
    assert rec == record_of(tmp_path / "f") and rec.size == 3 + 200_000 + 70_000 + 72
    assert write_bytes(tmp_path / "empty", b"") == FileRecord(0, hashlib.sha256(b"").hexdigest())


def test_mode_is_exact_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        write_bytes(tmp_path / "a", b"x")
        os.umask(0o077)
        write_bytes(tmp_path / "b", b"x", mode=0o640)
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o7777 == 0o600
    assert (tmp_path / "b").stat().st_mode & 0o7777 == 0o640


def test_refuses_existing_file_and_leaves_it_alone(tmp_path):
    (tmp_path / "a").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        write_bytes(tmp_path / "a", b"new")
    assert (tmp_path / "a").read_bytes() == b"keep"


def test_short_writes(tmp_path, monkeypatch):
    real = os.write
    monkeypatch.setattr(hashio.os, "write", lambda fd, b: real(fd, bytes(b)[:1000]))
    data = os.urandom(150_000)
    assert write_bytes(tmp_path / "a", data) == FileRecord(len(data), hashlib.sha256(data).hexdigest())
    assert (tmp_path / "a").read_bytes() == data


@pytest.mark.parametrize("hash_thread", [True, False])
def test_write_error_removes_partial_file(tmp_path, monkeypatch, hash_thread):
    real, calls = os.write, []

    def failing(fd: int, b) -> int:
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, b)

    monkeypatch.setattr(hashio.os, "write", failing)
    threads = threading.active_count()
    with pytest.raises(OSError) as e:
        write_file(tmp_path / "a", [os.urandom(400_000)], hash_thread=hash_thread)
    assert e.value.errno == errno.ENOSPC
    assert not (tmp_path / "a").exists() and threading.active_count() == threads


def test_error_from_chunk_source_removes_partial_file(tmp_path):
    def chunks():
        yield b"x" * 100_000
        raise RuntimeError("snapshot broke")

    with pytest.raises(RuntimeError, match="snapshot broke"):
        write_file(tmp_path / "a", chunks())
    assert not (tmp_path / "a").exists()
