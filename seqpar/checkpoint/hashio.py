"""Write checkpoint files once: hash the bytes while writing them, fsync, report size + sha256.

Today's path writes a file, fsyncs it, then reads it back to hash it (``store.describe_files``):
every byte crosses the page cache twice and the hash (~1.45 GB/s here) adds to the write time.
``write_file`` hashes each slice on a second thread while the calling thread writes the next one
(hashlib drops the GIL on large buffers), so hashing hides behind the write and the final fsync,
and asks the kernel to start writing back every ``WRITEBACK`` bytes so the disk works meanwhile.

We write safetensors ourselves because the library has no streaming writer and no hook to see the
bytes it writes: ``save()`` builds the whole file in memory (one more host copy of the checkpoint)
and ``save_file()`` writes from Rust where we cannot hash. The format is small (8-byte
little-endian header length, JSON header padded with spaces to a multiple of 8, raw tensor bytes)
and ``write_safetensors`` reproduces safetensors 0.8's layout exactly: tensors sorted by its dtype
order (descending) then by name, compact JSON, so its output is byte-identical to ``save_file``'s
(only ``__metadata__`` key order may differ: safetensors emits a hash map in random order, we
sort it; both load the same).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import queue
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SLICE = 4 << 20  # write/hash granularity: small enough to interleave, large enough to drop the GIL
_LAG = 16  # slices the hasher may trail the writer by (views of the caller's buffers, not copies)
WRITEBACK = 32 << 20  # start disk writeback every this many bytes (0: leave it all to fsync)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        f = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc: fsync alone still gives durability
        return None
    f.argtypes, f.restype = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint], ctypes.c_int
    return f


_sync_file_range = _load_sync_file_range()

# safetensors dtype names, listed in safetensors' own dtype order (its Rust enum); files lay tensors
# out by this order descending, then by name. F4 (packed pairs, shape rewritten) is left out.
_DTYPES: list[tuple[str, str]] = [
    ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E8M0", "float8_e8m0fnu"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("I16", "int16"), ("U16", "uint16"), ("F16", "float16"),
    ("BF16", "bfloat16"), ("I32", "int32"), ("U32", "uint32"), ("F32", "float32"),
    ("C64", "complex64"), ("F64", "float64"), ("I64", "int64"), ("U64", "uint64"),
]
DTYPE_NAMES: dict[torch.dtype, str] = {
    getattr(torch, t): s for s, t in _DTYPES if hasattr(torch, t)  # older torch lacks some
}
_RANK = {s: i for i, (s, _) in enumerate(_DTYPES)}


@dataclass
class FileRecord:
    size: int
    sha256: str


def _slices(chunks: Iterable[bytes | bytearray | memoryview]) -> Iterator[memoryview]:
    for c in chunks:
        mv = memoryview(c).cast("B")
        for i in range(0, len(mv), SLICE):
            yield mv[i : i + SLICE]


def _hasher(q: queue.Queue, h: hashlib._Hash, err: list[BaseException]) -> None:
    # Keeps draining after a failure so the writer never blocks on a full queue.
    while (b := q.get()) is not None:
        if not err:
            try:
                h.update(b)
            except BaseException as e:  # noqa: BLE001 - reported by write_file
                err.append(e)


def write_file(path: Path, chunks: Iterable[bytes | bytearray | memoryview], mode: int = 0o600,
               *, hash_thread: bool = True) -> FileRecord:
    """Create ``path`` (must not exist) with exactly ``mode``, write ``chunks``, fsync, close.

    Returns size and sha256 of the bytes written. Chunks must not change until the call returns
    (they are hashed a little after being written). On any error the partial file is removed and
    the error re-raised. ``hash_thread=False`` hashes on the calling thread (for benchmarks).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    h, err, size, queued = hashlib.sha256(), [], 0, 0
    q: queue.Queue = queue.Queue(_LAG)
    t = threading.Thread(target=_hasher, args=(q, h, err), name="seqpar-hash", daemon=True)
    try:
        os.fchmod(fd, mode)  # the umask only ever removes bits; the file must be exactly ``mode``
        if hash_thread:
            t.start()
        for mv in _slices(chunks):
            if hash_thread:
                q.put(mv)
            else:
                h.update(mv)
            n = 0
            while n < len(mv):  # os.write may write less than asked
                n += os.write(fd, mv[n:])
            size += n
            if WRITEBACK and _sync_file_range and size - queued >= WRITEBACK:
                # Start writing these pages to disk now, without waiting (SYNC_FILE_RANGE_WRITE):
                # otherwise the disk idles until fsync while the writer goes at hash speed (Linux
                # starts background writeback only past dirty_background_ratio, GiBs on big hosts).
                # Advisory: a failure here is ignored, fsync below is what makes the file durable.
                _sync_file_range(fd, queued, size - queued, 2)
                queued = size
        if hash_thread:
            q.put(None)  # the hasher finishes the tail while the disk flushes
        os.fsync(fd)
        if hash_thread:
            t.join()
        if err:
            raise err[0]
    except BaseException:
        if t.is_alive():
            q.put(None)
            t.join()
        try:
            os.close(fd)
        finally:
            os.unlink(path)
        raise
    os.close(fd)
    return FileRecord(size, h.hexdigest())


def write_bytes(path: Path, data: bytes, mode: int = 0o600) -> FileRecord:
    """``write_file`` of one buffer."""
    return write_file(path, [data], mode)


def _byte_view(name: str, t: torch.Tensor) -> memoryview:
    """Zero-copy bytes of a dense CPU tensor (refuses a non-contiguous one; only a lazy conj/neg
    view, rare, is copied to apply it)."""
    if t.layout != torch.strided or t.device.type != "cpu":
        raise ValueError(f"tensor {name!r}: need a dense CPU tensor, got {t.layout} on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"tensor {name!r} is not contiguous; call .contiguous() before saving")
    t = t.detach().resolve_conj().resolve_neg()  # lazy conj/neg bits are not in the bytes yet
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # 0-d -> 1 elem, 0-elem -> empty


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                       ) -> tuple[bytes, list[str]]:
    """(8-byte length + padded JSON header, tensor names in file order)."""
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors here")
    order = sorted(tensors, key=lambda k: (-_RANK[DTYPE_NAMES[tensors[k].dtype]], k))
    head: dict[str, object] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map str to str")
        head["__metadata__"] = dict(sorted(metadata.items()))
    off = 0
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        head[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    # serde_json's compact form: no spaces, non-ASCII kept as UTF-8, same escapes as Python's.
    js = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js, order


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      mode: int = 0o600) -> FileRecord:
    """Stream a safetensors file (as ``save_file`` would write it) without building it in memory.

    Tensors must be contiguous, dense and on the CPU (a ``ValueError`` names the first that is not):
    copying a non-contiguous one silently would cost memory the snapshot was sized without. Unlike
    ``save_file``, tensors sharing memory are accepted (each is written in full).
    """
    if sys.byteorder != "little":  # the format is little-endian; we write memory as it is
        raise RuntimeError("write_safetensors needs a little-endian host")
    header, order = safetensors_header(tensors, metadata)
    views = [_byte_view(k, tensors[k]) for k in order]  # validate everything before creating the file
    return write_file(path, [header, *(v for v in views if len(v))], mode)
