"""The tokenized-data cache at corpus scale: the builder holds one batch of records, never the whole
stream; a batch boundary changes nothing in what is built; progress is reported to the first rank;
a failed or interrupted build leaves nothing behind; a damaged entry is one clear line."""

from __future__ import annotations

import errno
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from test_data import make_hf_tokenizer, write_jsonl
from test_data_errors import one_line_error

import seqpar.data.cache as cache_mod
import seqpar.data.sources as sources
from seqpar.config import DataConfig
from seqpar.data import build_dataset, build_tokenizer


def _docs(n: int, seed: int = 0, lo: int = 20, hi: int = 300) -> list[str]:
    rng = random.Random(seed)
    words = ["long", "context", "ring", "token", "shard", "rank", "zero", "loss", "window", "é", "日本"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(lo, hi) // 5)) for _ in range(n)]


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.iterdir()) if cache.exists() else []


def _arrays(ds) -> dict[str, np.ndarray]:
    keys = ("tokens", "doc_ends", "loss_mask", "offsets")
    return {k: np.asarray(getattr(ds, k)) for k in keys if hasattr(ds, k)}


@pytest.mark.parametrize("kind", ["text", "sft"])
@pytest.mark.parametrize("hf", [False, True])
def test_batches_change_nothing(tmp_path: Path, monkeypatch, kind: str, hf: bool):
    """Built a few records at a time (many appends) or in one batch: the same arrays and samples."""
    docs = _docs(23)
    if kind == "text":
        recs = [{"text": d} for d in docs]
    else:  # both record shapes, so offsets and masks cross batch ends in each
        recs = [{"prompt": d[:30], "response": d[30:]} if i % 2 else
                {"messages": [{"role": "user", "content": d[:20]}, {"role": "assistant", "content": d[20:]}]}
                for i, d in enumerate(docs)]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    tok = make_hf_tokenizer(tmp_path / "tokenizer.json", ["<|endoftext|>", "<s>"]) if hf else None
    cfg = DataConfig(type=kind, paths=[path, path], seq_len=64, tokenizer=tok)
    whole = build_dataset(cfg, tmp_path / "one")
    monkeypatch.setattr(sources, "_ENCODE_BATCH", 3)
    pieces = build_dataset(cfg, tmp_path / "many")
    a, b = _arrays(whole), _arrays(pieces)
    assert a.keys() == b.keys() and len(a) >= 2
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert len(whole) == len(pieces) > 3
    for i in range(len(whole)):
        for k, v in whole[i].items():
            assert np.array_equal(v, pieces[i][k]), (i, k)
    if kind == "text":  # every document's eos is where doc_ends says, and only there
        eos = build_tokenizer(cfg).eos_id
        assert len(a["doc_ends"]) == 46 and np.array_equal(np.flatnonzero(a["tokens"] == eos), a["doc_ends"])
    else:
        assert a["offsets"][0] == 0 and a["offsets"][-1] == len(a["tokens"]) == len(a["loss_mask"])


def test_builder_holds_one_batch_not_the_stream(tmp_path: Path, monkeypatch):
    """Peak Python/numpy allocation while tokenizing is bounded by a batch, not the corpus: a
    corpus larger than memory tokenizes."""
    docs = _docs(20000, lo=200, hi=400)
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": d} for d in docs])
    monkeypatch.setattr(sources, "_ENCODE_BATCH", 64)
    cfg = DataConfig(type="text", paths=[path], seq_len=256)
    tracemalloc.start()
    try:
        ds = build_dataset(cfg, tmp_path / "cache")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    stream = ds.tokens.nbytes + ds.doc_ends.nbytes
    assert stream > 12_000_000  # the fixed costs (a 1 MiB read buffer for the content hash) are ~2 MB
    assert peak < stream / 4, (peak, stream)  # holding the stream (or its pieces) would be >= 1x


def test_progress_lines(tmp_path: Path, monkeypatch):
    """Start, periodic (bytes of the total, tokens, rate, time left) and end lines through ``say``;
    silent without one (every rank but the first)."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _docs(300)])
    ticks = iter(range(0, 10**6, 7))  # every clock reading is 7 s after the last
    monkeypatch.setattr(cache_mod.time, "monotonic", lambda: float(next(ticks)))
    monkeypatch.setattr(sources, "_ENCODE_BATCH", 50)
    cfg = DataConfig(type="text", paths=[path], seq_len=64)
    lines: list[str] = []
    ds = build_dataset(cfg, tmp_path / "cache", lines.append, "data.eval_paths")
    entry = _entries(tmp_path / "cache")[0]
    assert lines[0] == f"tokenizing data.eval_paths (1 file, {cache_mod._size(path.stat().st_size)}) into {entry} " \
                       "(once: later runs reuse it)"
    periodic = lines[1:-1]
    assert periodic and all(line.startswith("tokenizing: ") and " of " in line and "tokens/s" in line
                            for line in periodic), lines
    assert "(100%)" not in periodic[0] and "left" in periodic[0]
    assert lines[-1].startswith(f"tokenized {cache_mod._count(len(ds.tokens))} tokens (300 documents) in ")
    # a second build reads the entry: nothing to report; another rank's build says nothing
    again: list[str] = []
    build_dataset(cfg, tmp_path / "cache", again.append)
    assert again == []
    build_dataset(cfg, tmp_path / "other", None)  # no printer: must not fail


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch):
    """A bad record after several written batches: the error names it; no entry, no temporary
    folder remains; the fixed file then builds."""
    recs = [{"text": d} for d in _docs(40)]
    path = write_jsonl(tmp_path / "d.jsonl", recs + [{"txt": "oops"}])
    monkeypatch.setattr(sources, "_ENCODE_BATCH", 4)
    cfg = DataConfig(type="text", paths=[path], seq_len=32)
    one_line_error(lambda: build_dataset(cfg, tmp_path / "cache"), f"{path}:41", "missing field 'text'")
    assert _entries(tmp_path / "cache") == []
    write_jsonl(path, recs)
    assert len(build_dataset(cfg, tmp_path / "cache")) > 0 and len(_entries(tmp_path / "cache")) == 1


def test_full_disk_is_one_line(tmp_path: Path, monkeypatch):
    """Writing the entry fails mid-way (ENOSPC): one line naming data.cache_dir; nothing left."""
    monkeypatch.setattr(sources, "_ENCODE_BATCH", 4)
    real = cache_mod.np.ascontiguousarray
    calls = {"n": 0}

    class Full:
        def __init__(self, arr):
            self.arr = arr

        def tofile(self, f):
            raise OSError(errno.ENOSPC, "No space left on device")

    def contiguous(arr):
        calls["n"] += 1
        return Full(arr) if calls["n"] > 5 else real(arr)

    monkeypatch.setattr(cache_mod.np, "ascontiguousarray", contiguous)
    cfg = DataConfig(type="sft", paths=[write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "response": d}
                                                                          for d in _docs(40)])], seq_len=64)
    one_line_error(lambda: build_dataset(cfg, tmp_path / "cache"), "cannot write the tokenized-data cache",
                   "No space left on device", "data.cache_dir")
    assert _entries(tmp_path / "cache") == [] and calls["n"] > 5


def test_entry_names_stay_inside(tmp_path: Path):
    """meta.json is read back as data: an array name that is not a plain name is refused."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _docs(10)])
    cfg = DataConfig(type="text", paths=[path], seq_len=16)
    build_dataset(cfg, tmp_path / "cache")
    (entry,) = _entries(tmp_path / "cache")
    meta = (entry / "meta.json").read_text().replace('"doc_ends"', '"../doc_ends"')
    (entry / "meta.json").write_text(meta)
    one_line_error(lambda: build_dataset(cfg, tmp_path / "cache"), "is unreadable", "delete that directory")


def test_large_files_are_hashed_once(tmp_path: Path, monkeypatch):
    """A large file's content hash is remembered by path, size, mtime and inode: a restart reads
    nothing; an edit (new mtime) is hashed again and builds a new entry; a damaged memo is ignored."""
    monkeypatch.setattr(cache_mod, "MEMO_MIN_BYTES", 1)
    reads: list[Path] = []
    real = cache_mod._sha256
    monkeypatch.setattr(cache_mod, "_sha256", lambda p: reads.append(Path(p)) or real(p))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _docs(30)])
    cfg = DataConfig(type="text", paths=[path], seq_len=32)
    first = build_dataset(cfg, tmp_path / "cache")
    assert reads == [path]
    second = build_dataset(cfg, tmp_path / "cache")
    assert reads == [path] and np.array_equal(first.tokens, second.tokens)  # remembered
    (memo,) = (tmp_path / "cache" / "memo").iterdir()
    assert memo.read_text().strip() == real(path)
    memo.write_text("not a hash\n")
    build_dataset(cfg, tmp_path / "cache")
    assert reads == [path, path] and memo.read_text().strip() == real(path)  # rehashed, rewritten
    write_jsonl(path, [{"text": d} for d in _docs(31)])  # edited: a new mtime (and content)
    edited = build_dataset(cfg, tmp_path / "cache")
    assert reads == [path] * 3 and len(edited.doc_ends) == 31
    assert len([e for e in _entries(tmp_path / "cache") if e.name.startswith("text-")]) == 2


def test_dead_builds_are_removed(tmp_path: Path):
    """A job killed while tokenizing leaves a hidden half-built folder (as large as what it had
    written); the next build on the same host removes it once its process is gone and nothing has
    written to it for a while. Live, recent, foreign or unexplained folders are left alone."""
    import os
    import socket
    import subprocess
    import sys

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _docs(10)])
    cfg = DataConfig(type="text", paths=[path], seq_len=16)
    cache = tmp_path / "cache"
    build_dataset(cfg, cache)
    (entry,) = _entries(cache)
    assert not (entry / cache_mod.BUILDER).exists()
    name = entry.name
    import shutil
    shutil.rmtree(entry)  # as if never built
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host, old = socket.gethostname(), 1_000_000_000  # 2001: long quiet

    def half_built(tag: str, owner: str, recent: bool = False) -> Path:
        d = cache / f".{name}.{tag}"
        d.mkdir()
        (d / "tokens.bin").write_bytes(b"\0" * 64)
        if owner:
            (d / cache_mod.BUILDER).write_text(owner + "\n")
        if not recent:
            for f in [*d.iterdir(), d]:
                os.utime(f, (old, old))
        return d

    gone = half_built("dead", f"{host} {dead}")
    kept = [half_built("live", f"{host} {os.getpid()}"), half_built("other", f"elsewhere {dead}"),
            half_built("fresh", f"{host} {dead}", recent=True), half_built("unknown", "")]
    build_dataset(cfg, cache)
    assert not gone.exists() and all(d.exists() for d in kept)
    assert (cache / name / "meta.json").is_file()


@pytest.mark.slow
def test_prepare_ahead_then_train(tmp_path: Path):
    """`python -m seqpar.data` tokenizes a config's data (training and held-out) into the run's cache;
    the training job then starts without tokenizing; a mistake is one line with exit status 2."""
    import os
    import subprocess
    import sys

    from test_data_errors import ROOT, write_train_config

    train_f = write_jsonl(tmp_path / "train.jsonl", [{"text": d} for d in _docs(40)])
    eval_f = write_jsonl(tmp_path / "eval.jsonl", [{"text": d} for d in _docs(8, seed=1)])
    data = {"type": "text", "paths": [str(train_f)], "eval_paths": [str(eval_f)]}
    config = write_train_config(tmp_path, data, eval_every=1)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "seqpar.data", "--config", str(config)]
    r = subprocess.run(cli, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "seqpar.data: tokenizing data.paths (1 file" in r.stdout and "tokenizing data.eval_paths" in r.stdout
    assert "seqpar.data: train: TextDataset" in r.stdout and "seqpar.data: held-out: TextDataset" in r.stdout
    entries = sorted(p.name for p in (tmp_path / "run" / "cache").iterdir())
    assert len(entries) == 2
    r = subprocess.run([sys.executable, str(ROOT / "seqpar" / "train.py"), "--config", str(config)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)  # the job: data ready
    assert r.returncode == 0 and "tokenizing" not in r.stdout and "held-out loss" in r.stdout, r.stdout[-2000:]
    assert sorted(p.name for p in (tmp_path / "run" / "cache").iterdir()) == entries
    quiet = subprocess.run(cli + ["--train.eval_every", "0"], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=300)
    assert quiet.returncode == 0 and "warning: data.eval_paths is not used: train.eval_every is 0" in quiet.stdout
    quiet = subprocess.run(cli + ["--train.eval_every", "0", "--train.eval_by_position", "[8]"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=300)
    assert ("warning: data.eval_paths and train.eval_by_position are not used: train.eval_every is 0"
            in quiet.stdout), quiet.stdout
    second = write_jsonl(tmp_path / "web.jsonl", [{"text": d} for d in _docs(8, seed=2)])
    per_file = subprocess.run(cli + ["--data.eval_per_file", "true", "--data.eval_paths", f"[{eval_f}, {second}]"],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert per_file.returncode == 0, per_file.stderr  # eval.jsonl's entry is the one above; web.jsonl is new
    assert "tokenizing data.eval_paths[1] (1 file" in per_file.stdout and "eval_paths[0]" not in per_file.stdout
    assert "seqpar.data: held-out eval: TextDataset" in per_file.stdout
    assert "seqpar.data: held-out web: TextDataset" in per_file.stdout
    assert len(list((tmp_path / "run" / "cache").iterdir())) == 3
    bad = subprocess.run(cli + ["--model.vocab_size", "100"], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "the byte tokenizer (vocabulary of 259) has more ids than model.vocab_size=100" in bad.stderr


def test_token_file_scan_is_remembered(tmp_path: Path, monkeypatch):
    """The one full pass over a large token file (its largest id, before the model is built) runs
    once; restarts read the remembered result; an edited file is scanned again; a file with a
    negative id is refused every time (nothing remembered)."""
    monkeypatch.setattr(cache_mod, "MEMO_MIN_BYTES", 1)
    scans: list[str] = []
    real = sources.TokenDataset._scan_file
    monkeypatch.setattr(sources.TokenDataset, "_scan_file", staticmethod(lambda p, f: scans.append(str(p)) or real(p, f)))
    tok = tmp_path / "t.npy"
    np.save(tok, (np.arange(5000, dtype=np.int32) * 3) % 1001)
    cfg = DataConfig(type="tokens", paths=[tok], seq_len=64)
    first = build_dataset(cfg, tmp_path / "cache")
    assert first.vocab_size_needed == 1001 and first.vocab_source == f"token file '{tok}' (id 1000 at token 667)"
    again = build_dataset(cfg, tmp_path / "cache")
    assert (again.vocab_size_needed, again.vocab_source) == (first.vocab_size_needed, first.vocab_source)
    assert scans == [str(tok)]
    np.save(tok, np.arange(5000, dtype=np.int32) % 1500)  # edited
    assert build_dataset(cfg, tmp_path / "cache").vocab_size_needed == 1500 and len(scans) == 2
    neg = tmp_path / "neg.npy"
    np.save(neg, np.array([3, -1] * 100, dtype=np.int32))
    bad = DataConfig(type="tokens", paths=[neg], seq_len=16)
    for _ in range(2):
        one_line_error(lambda: build_dataset(bad, tmp_path / "cache").vocab_size_needed, "token 1 is -1")
    assert scans.count(str(neg)) == 2


def test_memo_keys_and_damaged_entries(tmp_path: Path, monkeypatch):
    """A same-size edit is hashed again (its mtime moved); the token scan's memo is per dtype (the
    same bytes read as uint16 and as uint32 hold other ids); an entry folder without meta.json is
    refused at once, before anything is tokenized; a live build's heartbeat file is touched."""
    import os

    monkeypatch.setattr(cache_mod, "MEMO_MIN_BYTES", 1)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "aaaa"}] * 20)
    cfg = DataConfig(type="text", paths=[path], seq_len=16)
    first = build_dataset(cfg, tmp_path / "cache")
    write_jsonl(path, [{"text": "bbbb"}] * 20)  # same size, other bytes
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a clock that did move
    second = build_dataset(cfg, tmp_path / "cache")
    assert not np.array_equal(first.tokens, second.tokens) and int(second.tokens[1]) == ord("b")

    raw = tmp_path / "t.bin"
    arr = np.arange(70_000, 70_400, dtype=np.uint32)  # ids above 65535: read as uint16, other ids
    arr.tofile(raw)
    ids = {}
    for dtype in ("uint16", "uint32"):
        ds = build_dataset(DataConfig(type="tokens", paths=[raw], seq_len=16, token_dtype=dtype), tmp_path / "cache")
        ids[dtype] = ds.vocab_size_needed
    assert ids == {"uint16": int(arr.view(np.uint16).max()) + 1, "uint32": 70_400}

    (entry,) = [e for e in _entries(tmp_path / "cache") if e.name.startswith("text-") and
                np.array_equal(np.fromfile(e / "tokens.bin", dtype=np.uint16), np.asarray(second.tokens))]
    (entry / "meta.json").unlink()
    lines: list[str] = []
    one_line_error(lambda: build_dataset(cfg, tmp_path / "cache", lines.append), f"'{entry}' is unreadable",
                   "no meta.json", "delete that directory")
    assert lines == []  # refused before tokenizing again

    beat = tmp_path / "builder"
    beat.write_text("host 1\n")
    os.utime(beat, (1_000_000_000, 1_000_000_000))
    ticks = iter(range(0, 1000, 40))
    prog = cache_mod.Progress(None, "data.paths", [path], tmp_path / "e", clock=lambda: float(next(ticks)),
                              heartbeat=beat)
    prog.advance(10)
    assert beat.stat().st_mtime > 1_000_000_000  # touched although nothing is printed


@pytest.mark.slow
def test_preempted_while_tokenizing(tmp_path: Path):
    """SIGTERM while the first rank tokenizes: it stops at the next record, deletes the half-built
    folder, says so in one line and exits 75 (preempted) with run_state.json saying the same."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from test_data_errors import ROOT, write_train_config

    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:  # ~2 x 10^5 records: tens of seconds of tokenizing, far more than the test waits
        for i in range(200_000):
            f.write(json.dumps({"text": f"record {i} " + "long context training " * 12}) + "\n")
    config = write_train_config(tmp_path, {"type": "text", "paths": [str(big)]})
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, str(ROOT / "seqpar" / "train.py"), "--config", str(config)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert p.stdout is not None
    for line in p.stdout:
        if line.startswith("seqpar: tokenizing data.paths"):
            break
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 75, (out[-2000:], err[-2000:])
    assert "seqpar: stop requested while tokenizing the data (nothing to save" in err and "Traceback" not in err
    assert "tokenized " not in out  # it did not finish
    cache = tmp_path / "run" / "cache"
    assert not cache.exists() or [e.name for e in cache.iterdir() if e.name != "memo"] == []
    state = json.loads((tmp_path / "run" / "run_state.json").read_text())
    assert state["state"] == "preempted" and state["exit_code"] == 75


def test_another_rank_says_why_it_tokenizes(tmp_path: Path, capsys):
    """A rank other than the first tokenizes only when rank 0's entry is not in its cache
    (node-local storage): its lines carry its rank, the first one the reason."""
    from seqpar.data.prepare import progress_printer

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _docs(20)])
    build_dataset(DataConfig(type="text", paths=[path], seq_len=16), tmp_path / "local", progress_printer(3))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("seqpar: rank 3: tokenizing data.paths (1 file") and "node-local storage" in lines[0]
    assert lines[-1].startswith("seqpar: rank 3: tokenized ") and "node-local" not in lines[-1]


def test_bench_data_script_prints_its_table():
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "bench_data.py"), "--docs", "300"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 300 |")]
    assert len(rows) == 1 and "MB" in rows[0], r.stdout


_LOCK_WORKER = """
import os, sys, time
from pathlib import Path
import numpy as np
from seqpar.data.cache import cached
from seqpar.errors import DataError
cache, mode, log = sys.argv[1:4]
go = Path(log).with_name("go")

def build(w):
    with open(log, "a") as f:
        f.write(f"start {os.getpid()}\\n")
    w.declare("x", np.int64)
    for i in range(30):
        w.append("x", np.arange(5) + i)
    while mode != "ok" and not go.exists():  # held until the test has seen the other process wait
        time.sleep(0.02)
    if mode == "fail":
        raise DataError("bad record")
    return {"built_by": os.getpid()}

try:
    arrays, meta = cached(Path(cache), "text-0123", build, say=lambda m: print(m, flush=True))
except DataError as e:
    print("error", e, flush=True)
    sys.exit(2)
print("sum", int(arrays["x"].sum()), "by", meta["built_by"], flush=True)
"""


def _lock_workers(tmp_path: Path, first_mode: str):
    """Starts a builder (held inside its build), waits until it builds, starts a second process on
    the same entry and waits until that one says it is waiting."""
    import subprocess
    import sys
    import time

    log = tmp_path / "log"
    log.touch()
    script = tmp_path / "worker.py"
    script.write_text(_LOCK_WORKER)
    cmd = [sys.executable, str(script), str(tmp_path / "cache")]
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    first = subprocess.Popen([*cmd, first_mode, str(log)], stdout=out1.open("w"), text=True)
    deadline = time.monotonic() + 120
    while "start" not in log.read_text():
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.02)
    second = subprocess.Popen([*cmd, "ok", str(log)], stdout=out2.open("w"), text=True)
    while "waiting for another process" not in out2.read_text():
        assert time.monotonic() < deadline and second.poll() is None, out2.read_text()
        time.sleep(0.02)
    return first, second, log, out1, out2


def test_one_build_per_cache_directory(tmp_path: Path):
    """Two processes needing the same entry in one directory (the ranks of a node with a node-local
    data.cache_dir): the second waits for the first, says so once, and reads what it built."""
    first, second, log, out1, out2 = _lock_workers(tmp_path, "block")
    (tmp_path / "go").touch()
    first.wait(timeout=120)
    second.wait(timeout=120)
    o1, o2 = out1.read_text(), out2.read_text()
    assert first.returncode == 0 and second.returncode == 0, (o1, o2)
    assert log.read_text().count("start") == 1, log.read_text()  # tokenized once
    assert o2.count("waiting for another process tokenizing into") == 1, o2
    assert f"pid {first.pid}" in o2  # names the builder
    assert o1.splitlines()[-1] == o2.splitlines()[-1] == f"sum {sum(range(5)) * 30 + 5 * sum(range(30))} by {first.pid}"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["text-0123"]  # no lock file or temp folder left


@pytest.mark.parametrize("how", ["killed", "failed"])
def test_waiter_builds_when_the_builder_ends(tmp_path: Path, how: str):
    """A builder killed outright (the kernel drops its lock) or failing on a bad record: the process
    waiting for it builds the entry itself."""
    import signal

    first, second, log, _, out2 = _lock_workers(tmp_path, "block" if how == "killed" else "fail")
    if how == "killed":
        first.send_signal(signal.SIGKILL)
    else:
        (tmp_path / "go").touch()
    first.wait(timeout=120)
    second.wait(timeout=120)
    assert second.returncode == 0, out2.read_text()
    assert log.read_text().count("start") == 2
    assert out2.read_text().splitlines()[-1].endswith(f"by {second.pid}")
    assert (tmp_path / "cache" / "text-0123" / "meta.json").is_file()


def test_stop_while_waiting(tmp_path: Path):
    """A preemption while waiting for another builder ends the wait (Stopped), holding nothing."""
    import fcntl
    import os

    cache = tmp_path / "cache"
    cache.mkdir()
    lock = cache / ".text-0123.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process is building
    said, polls = [], []
    try:
        with pytest.raises(cache_mod.Stopped):
            cache_mod.cached(cache, "text-0123", lambda w: pytest.fail("built while another held the lock"),
                             say=said.append, stop=lambda: polls.append(1) or len(polls) > 2)
        assert lock.exists()  # the builder's lock file stays: a waiter never removes what it does not hold
    finally:
        os.close(fd)
    assert len(said) == 1 and said[0].startswith(f"waiting for another process tokenizing into {cache / 'text-0123'}")
    assert not (cache / "text-0123").exists()
