"""The tokenized-data cache: text and SFT files are tokenized once, then memory-mapped.

An entry is a folder named by a content hash (the files' sha256, the tokenizer's vocabulary, the
settings): renaming or moving a file keeps the cache, editing one invalidates it. It holds one raw
array file per key plus ``meta.json`` (dtype and length of each array, and what the dataset
records). The builder appends arrays chunk by chunk, so tokenizing a corpus larger than memory
holds one batch of records at a time, never the whole stream.

Entries are written in a temporary folder and renamed into place: a reader never sees a
half-written entry. One process builds an entry per cache directory at a time: the others that
need it (the ranks of a node whose data.cache_dir is node-local, or a second job on the same
corpus) wait on a lock file beside it and then read what the first one wrote; a builder that dies
releases the lock with its process, and the next in line builds. Where the file system has no
working locks, concurrent builders are still safe: the first rename wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from seqpar.data.tokenizer import _one_line
from seqpar.errors import DataError

CACHE_VERSION = "v2"  # bump when the entry layout or the document format changes (v2: raw arrays)

Say = Callable[[str], None]


MEMO_MIN_BYTES = 64 << 20  # files at least this large have what was read from them remembered
BUILDER = "builder"  # in a folder being built: "<host> <pid>" of the process building it
STALE_S = 600.0  # a live builder touches BUILDER every 30 s (Progress), far more often than this


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _stat_id(path: Path) -> str:
    st = path.stat()
    # no st_dev: it can differ between the NFS clients of one file
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def remembered(path: Path, tag: str, compute: Callable[[], str], memo_dir: Path | None,
               valid: Callable[[str], bool] = lambda v: True) -> str:
    """``compute()`` (a one-line string read from the whole file), remembered in ``memo_dir/memo``
    under the file's path, size, modification time and inode for files of ``MEMO_MIN_BYTES`` or
    more, so a restart (every rank, every preemption) does not read a corpus of many GB again;
    writing to a file changes its modification time (copying another file over it while keeping its
    time and size, as ``cp -p`` or ``rsync -t`` can, does not: delete the memo then). Small files
    are always read (cheap, and immune to coarse file-system clocks). A memo that fails ``valid``
    is computed again."""
    path = Path(path)
    if memo_dir is None or path.stat().st_size < MEMO_MIN_BYTES:
        return compute()
    ident = _stat_id(path)
    memo = Path(memo_dir) / "memo" / f"{hashlib.sha256(f'{tag}|{ident}'.encode()).hexdigest()[:32]}.{tag}"
    try:
        known = memo.read_text().strip()
        if known and valid(known):
            return known
    except OSError:
        pass
    value = compute()
    if _stat_id(path) == ident:  # unchanged while it was read: worth remembering
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
            tmp.write_text(value + "\n")
            os.replace(tmp, memo)
        except OSError:
            pass  # a read-only cache: read the file again next time
    return value


def file_sha256(path: Path, memo_dir: Path | None = None) -> str:
    """The file's sha256 (remembered for large files, see ``remembered``)."""
    return remembered(path, "sha256", lambda: _sha256(path), memo_dir,
                      valid=lambda v: len(v) == 64 and all(c in "0123456789abcdef" for c in v))


def cache_key(kind: str, file_hashes: list[str], tokenizer_key: str, settings: dict[str, Any]) -> str:
    """Content hash of what an entry is made from (``file_hashes``: ``file_sha256`` of each file)."""
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "kind": kind,
            "files": list(file_hashes),
            "tokenizer": tokenizer_key,
            "settings": settings,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class CacheWriteError(OSError):
    """Writing the entry failed (disk full, permissions): told apart from reading the data."""


class ArrayWriter:
    """Appends 1-D arrays, key by key, to raw files in an entry folder being built."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.heartbeat = folder / BUILDER  # a live build touches it (Progress)
        self.dtypes: dict[str, str] = {}
        self.lengths: dict[str, int] = {}
        self._files: dict[str, Any] = {}

    def declare(self, key: str, dtype: Any) -> None:
        """A key that may stay empty still gets its (empty) file and dtype."""
        if key not in self._files:
            self.dtypes[key] = np.dtype(dtype).str
            self.lengths[key] = 0
            try:
                self._files[key] = open(self.folder / f"{key}.bin", "wb")  # noqa: SIM115 - closed in close()
            except OSError as e:
                raise CacheWriteError(e.errno, e.strerror) from e

    def append(self, key: str, arr: np.ndarray) -> None:
        self.declare(key, arr.dtype)
        if np.dtype(self.dtypes[key]) != arr.dtype:
            raise TypeError(f"cache array '{key}' is {self.dtypes[key]}, got {arr.dtype}")
        try:
            np.ascontiguousarray(arr).tofile(self._files[key])
        except OSError as e:
            raise CacheWriteError(e.errno, e.strerror) from e
        self.lengths[key] += len(arr)

    def abandon(self) -> None:
        """Close the files of an entry that will be deleted (errors do not matter then)."""
        for f in self._files.values():
            try:
                f.close()
            except OSError:
                pass

    def close(self) -> dict[str, dict[str, Any]]:
        error = None
        for f in self._files.values():
            try:
                f.close()  # flushes: a full disk shows here too
            except OSError as e:
                error = error or CacheWriteError(e.errno, e.strerror)
        if error is not None:
            raise error
        return {k: {"dtype": self.dtypes[k], "length": self.lengths[k]} for k in self._files}


def _open(final: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    arrays = {}
    for key, spec in meta["arrays"].items():
        if not key.isidentifier():  # a file name inside the entry, nothing else
            raise ValueError(f"array name {key!r}")
        dtype, n = np.dtype(spec["dtype"]), int(spec["length"])
        path = final / f"{key}.bin"
        if path.stat().st_size != n * dtype.itemsize:
            raise ValueError(f"{path.name} holds {path.stat().st_size} bytes, meta.json says {n} x {dtype}")
        # np.memmap refuses an empty file
        arrays[key] = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.empty(0, dtype)
    return arrays


def cached(
    cache_dir: Path, name: str, build: Callable[[ArrayWriter], dict[str, Any]],
    say: Say | None = None, stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays (memory-mapped) and metadata of entry ``cache_dir/name``, built first if absent.

    ``build(writer)`` appends the arrays and returns the metadata to record; a ``DataError`` it
    raises (a bad record) leaves nothing behind. While another process builds the same entry in
    this directory, this one waits for it (``say``: one line when it starts waiting; ``stop``: true
    when the process is asked to stop, which ends the wait with ``Stopped``).
    """
    final = Path(cache_dir) / name
    if final.exists() and not (final / "meta.json").is_file():
        raise _damaged(final, "no meta.json")  # at once, not after tokenizing it all again
    if not (final / "meta.json").is_file():
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _unwritable(final, e) from None
        with _BuildLock(final, say, stop):
            if not (final / "meta.json").is_file():  # not written while this process waited
                _build(final, name, build)
    try:
        meta = json.loads((final / "meta.json").read_text())
        arrays = _open(final, meta)
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as e:
        raise _damaged(final, _one_line(e)) from None
    return arrays, meta


class _BuildLock:
    """An exclusive ``flock`` on ``.<entry>.lock`` beside the entry, held while building it (or
    while finding that a process it waited for has built it).

    The kernel releases it when the holder's process ends, however it ends, so a killed builder
    never blocks the next one. Without working locks (some network file systems) it degrades to
    no lock: builders then run side by side and the first rename wins, as before locks existed."""

    POLL_S = 0.5

    def __init__(self, final: Path, say: Say | None, stop: Callable[[], bool] | None):
        self.path = final.parent / f".{final.name}.lock"
        self.final, self.say, self.stop = final, say, stop
        self.fd: int | None = None
        self.held = False

    def __enter__(self) -> _BuildLock:
        import fcntl

        told = False
        while True:
            self.fd = self._open()
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if self._current():
                    self.held = True
                    return self
                # the holder removed this file when it was done: lock the one that is there now
                self._close()
                continue
            except BlockingIOError:  # another process holds it: it is building this entry
                self._close()
            except OSError:  # no locks on this file system: build side by side (safe, see above)
                self._close()
                return self
            if self.stop is not None and self.stop():
                raise Stopped()
            if not told and self.say is not None:
                self.say(f"waiting for another process tokenizing into {self.final} ({_builders(self.final)}); "
                         f"its entry is read when it is done")
                told = True
            time.sleep(self.POLL_S)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # created by another user: locking needs no write access
            try:
                return os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise _unwritable(self.final, e) from None
        except OSError as e:
            raise _unwritable(self.final, e) from None

    def _current(self) -> bool:
        """Whether the locked file is still the one at the path (not one its holder removed)."""
        try:
            here, mine = os.stat(self.path), os.fstat(self.fd)  # type: ignore[arg-type]
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __exit__(self, *exc: object) -> None:
        if self.held:
            # Removed while held, so no lock files pile up; a waiter that then locks the removed
            # file sees it is gone (_current) and locks the new one. Only the holder removes it.
            try:
                self.path.unlink()
            except OSError:
                pass
            self.held = False
        self._close()  # releases the lock


def _builders(final: Path) -> str:
    """Who is building ``final``, from the folders being built (for the waiting line)."""
    who = []
    for tmp in final.parent.glob(f".{final.name}.*"):
        try:
            host, pid = (tmp / BUILDER).read_text().split()[:2]
            who.append(f"{host} pid {pid}")
        except (OSError, ValueError):
            continue
    return ", ".join(who) or "a process sharing this cache directory"


def _build(final: Path, name: str, build: Callable[[ArrayWriter], dict[str, Any]]) -> None:
    """Builds entry ``final`` in a temporary folder beside it and renames it into place."""
    try:
        _remove_dead_builds(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        (tmp / BUILDER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    except OSError as e:
        raise _unwritable(final, e) from None
    try:
        writer = ArrayWriter(tmp)
        try:
            meta = build(writer)
        except BaseException:
            writer.abandon()
            raise
        meta = {**meta, "arrays": writer.close()}
        try:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        except OSError as e:
            raise CacheWriteError(e.errno, e.strerror) from e
    except CacheWriteError as e:  # reading the data is build's business (its own errors)
        shutil.rmtree(tmp, ignore_errors=True)
        raise _unwritable(final, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        (tmp / BUILDER).unlink()
        os.rename(tmp, final)
    except OSError:  # another process finished first; its entry is identical
        shutil.rmtree(tmp, ignore_errors=True)


def _damaged(final: Path, why: str) -> DataError:
    return DataError(f"tokenized-data cache entry '{final}' is unreadable ({why}): delete that directory and run "
                     f"again (it is rebuilt from data.paths)")


def _remove_dead_builds(final: Path) -> None:
    """Delete this entry's half-built folders left by processes on this host that no longer run
    and that nothing has written to for ``STALE_S`` (a job killed while tokenizing: they can be as
    large as the corpus; the quiet time guards against another machine of the same host name).
    Builds on other hosts, or of unknown origin, are left alone."""
    host, now = socket.gethostname(), time.time()
    for tmp in final.parent.glob(f".{final.name}.*"):
        try:
            owner, pid = (tmp / BUILDER).read_text().split()
            if owner != host or _alive(int(pid)):
                continue
            if max(f.stat().st_mtime for f in [tmp, *tmp.iterdir()]) > now - STALE_S:
                continue
        except (OSError, ValueError):
            continue
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _unwritable(final: Path, e: OSError) -> DataError:
    return DataError(
        f"cannot write the tokenized-data cache in '{final.parent}' ({e.strerror or e}): set "
        f"data.cache_dir to a writable directory with free space"
    )


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Stopped(Exception):
    """A stop (preemption) was asked for while tokenizing: the half-built entry is deleted."""


class Progress:
    """Tokenizing progress for a person waiting on it: a line when it starts, one every
    ``every_s`` seconds (bytes read of the total, tokens, rate, time left), one when done
    (``say`` None: silent). It also keeps the build's heartbeat and ends it on a stop."""

    def __init__(self, say: Say | None, key: str, paths: list[Path], entry: Path, every_s: float = 30.0,
                 clock: Callable[[], float] | None = None, heartbeat: Path | None = None,
                 stop: Callable[[], bool] | None = None):
        self.say, self.every_s, self.clock = say, every_s, clock or time.monotonic
        self.stop = stop  # true once the process was asked to stop: tokenizing ends at the next record
        self.heartbeat = heartbeat  # touched every every_s: the folder being built is alive
        self.total = sum(p.stat().st_size for p in paths)
        self.done_bytes = 0
        self.tokens = 0
        self.start = self.last = self.clock()
        if say is not None:
            files = f"{len(paths)} file{'s' if len(paths) != 1 else ''}"
            say(f"tokenizing {key} ({files}, {_size(self.total)}) into {entry} (once: later runs reuse it)")

    def advance(self, nbytes: int = 0, ntokens: int = 0) -> None:
        self.done_bytes += nbytes
        self.tokens += ntokens
        if self.stop is not None and self.stop():
            raise Stopped()
        now = self.clock()
        if now - self.last < self.every_s:
            return
        self.last = now
        if self.heartbeat is not None:
            try:
                self.heartbeat.touch()
            except OSError:
                pass
        if self.say is None:
            return
        elapsed = now - self.start
        frac = min(self.done_bytes / self.total, 1.0) if self.total else 1.0
        left = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = f", about {_duration(left)} left" if left == left else ""
        self.say(f"tokenizing: {_size(self.done_bytes)} of {_size(self.total)} ({100 * frac:.0f}%), "
                 f"{_count(self.tokens)} tokens, {_count(rate)} tokens/s{eta}")

    def finish(self, what: str) -> None:
        if self.say is not None:
            self.say(f"tokenized {_count(self.tokens)} tokens ({what}) in {_duration(self.clock() - self.start)}")
