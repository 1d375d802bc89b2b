"""scripts/bench_train.py on CPU: the trainer's step against the plain loop, tiny shape."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def scratch_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment of a benchmark run whose temporary files go to a directory of their own, to
    check that the script removes its run directories and data caches when it ends."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # torch's compile cache stays where it was: tests/conftest.py pins TORCHINDUCTOR_CACHE_DIR
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "TMPDIR": str(scratch)}, scratch


def test_bench_train_cpu(tmp_path: Path):
    out = tmp_path / "rows.json"
    env, scratch = scratch_env(tmp_path)
    # --peak-tflops: MFU columns on CPU too (and the trainer's own MFU record, from seqpar.flops)
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--device", "cpu", "--seq-lens", "128,256",
         "--steps", "2", "--warmup", "1", "--peak-tflops", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False, env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert not list(scratch.iterdir())  # its run directories and data cache are gone
    lines = r.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| seq_len"))
    columns = [c.strip() for c in lines[head].strip("|").split("|")]
    assert columns == ["seq_len", "seqpar tok/s", "plain tok/s", "ratio", "seqpar MFU", "plain MFU",
                       "seqpar peak GiB", "plain peak GiB", "plain loop"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[head + 2:] if line.startswith("|")]
    assert [row[0] for row in rows] == ["128", "256"]
    for row in rows:
        assert float(row[columns.index("plain tok/s")].replace(",", "")) > 0
        assert float(row[columns.index("ratio")]) > 0
        assert row[columns.index("seqpar MFU")].endswith("%") and row[columns.index("plain MFU")].endswith("%")
        assert row[columns.index("plain loop")] == "eager"  # auto: eager unless it runs out of GPU memory
    assert lines[0].startswith("# seqpar bench_train | CPU") and "torch " in lines[0]
    assert any(line.startswith("MFU = ") for line in lines[head:])

    data = json.loads(out.read_text())
    assert [row["seq_len"] for row in data["rows"]] == [128, 256]
    for row in data["rows"]:
        assert row["seqpar_tok_s"] > 0 and row["plain_tok_s"] > 0
        assert row["seqpar_mfu"] > 0 and row["plain_mfu"] > 0
        assert abs(row["ratio"] - row["seqpar_tok_s"] / row["plain_tok_s"]) < 1e-9
        # same model, init and data: the first step's loss agrees up to kernel rounding
        assert abs(row["seqpar_loss0"] - row["plain_loss0"]) < 1e-4 * row["plain_loss0"]
    # the trainer logged its own MFU (per-document FLOPs) at its last step
    assert re.search(r"step 3/3 \|.*\| mfu \d", r.stderr), r.stderr


def test_bench_train_checkpointed_plain_loop_and_variants(tmp_path: Path):
    """--plain checkpointed (per-layer torch.utils.checkpoint + chunked CE: the baseline at 128K) trains
    the same first loss as the Trainer; --variant times the Trainer again with overrides and prints
    it against the Trainer's own row (the deterministic / fast ratio of issue 11)."""
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--device", "cpu", "--seq-lens", "256",
           "--steps", "2", "--warmup", "1", "--train.loss_chunk_size", "64", "--plain", "checkpointed",
           "--variant", "train.deterministic=true", "--variant", "memory.activation_checkpointing=full",
           "--variant", "train.attention=flash_attn", "--json", str(out)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["plain_mode"] == "checkpointed" and row["plain_tok_s"] > 0
    assert abs(row["seqpar_loss0"] - row["plain_loss0"]) < 1e-5 * row["plain_loss0"]
    assert [v["variant"] for v in row["variants"]] == ["train.deterministic=true",
                                                       "memory.activation_checkpointing=full", "train.attention=flash_attn"]
    for v in row["variants"][:2]:
        assert v["tok_s"] > 0 and abs(v["vs_seqpar"] - v["tok_s"] / row["seqpar_tok_s"]) < 1e-9 and v["error"] is None
    # a variant that fails (here: a CUDA-only kernel on CPU) is a row with its error, not a lost table
    failed = row["variants"][2]
    assert failed["tok_s"] is None and "needs a CUDA device" in failed["error"]
    assert "| 256 | train.deterministic=true |" in r.stdout and "| checkpointed |" in r.stdout

    bad = subprocess.run(cmd[:-6] + ["--variant", "deterministic"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "--variant 'deterministic': write section.key=value" in bad.stderr


def test_bench_train_out_of_memory_falls_back_and_reports(monkeypatch):
    """A CUDA out-of-memory is a result: the plain loop retries checkpointed (--plain auto), a side
    that still does not fit is reported as such, and the table prints '-' for it."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
    bt = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_train", bt)  # dataclasses look their module up
    spec.loader.exec_module(bt)
    tried = []

    def fake_plain(cfg, device, loader, args, mode):
        tried.append(mode)
        if mode == "eager" or args.fail_all:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return 1.0, 2.0, 3.0

    class Cfg:
        class data:
            seq_len = 131072

    monkeypatch.setattr(bt, "run_plain", fake_plain)
    args = type("A", (), {"plain": "auto", "fail_all": False})()
    assert bt.measure_plain(Cfg, torch.device("cpu"), None, args) == ("checkpointed", (1.0, 2.0, 3.0))
    assert tried == ["eager", "checkpointed"]
    args.plain, tried[:] = "eager", []
    assert bt.measure_plain(Cfg, torch.device("cpu"), None, args) == ("out of memory", None) and tried == ["eager"]
    monkeypatch.setattr(bt, "run_seqpar", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    topo = type("T", (), {"device": torch.device("cpu")})()
    assert bt.measure_seqpar(Cfg, topo, args) is None
    row = bt.Row(131072, None, 10.0, None, None, 0.3, None, 5.0, None, 1.0, 1e15, None, 3.0, "checkpointed", [])
    assert "| 131072 | - | 10 | - | - | 30.0% | - | 5.00 | checkpointed |" in bt.table([], [row], "")


def test_bench_train_longest_bisects_on_measured_peaks(tmp_path: Path):
    """--longest on CPU: each probe is a process whose peak RSS is measured (wait4); with a memory
    limit a little above the shortest probe's peak, the answer is a length that fits and the
    next one up (or a longer one probed) does not, for being over the limit."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--device", "cpu", "--longest", "--steps", "1",
            "--warmup", "0", "--granularity", "256", "--seq-lens", "256"]
    first = subprocess.run(base + ["--max-len", "256", "--json", str(tmp_path / "a.json")], capture_output=True,
                           text=True, timeout=300, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "longest trainable sequence: 256 tokens" in first.stdout and "end of the search" in first.stdout
    peak0 = json.loads((tmp_path / "a.json").read_text())["probes"][0]["peak_gib"]
    limit = peak0 + 0.06  # the tiny model's RSS grows by ~0.06 GiB per 1K tokens
    r = subprocess.run(base + ["--max-len", "16384", "--memory-limit-gib", f"{limit:.3f}", "--json",
                               str(tmp_path / "b.json")], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "b.json").read_text())
    best, probes = data["longest"], {p["seq_len"]: p for p in data["probes"]}
    assert probes[best]["fits"] and probes[best]["peak_gib"] <= limit
    longer = [p for s, p in probes.items() if s > best]
    assert longer and not any(p["fits"] for p in longer)
    assert all("over the memory limit" in p["why"] for p in longer)
    assert min(s for s in probes if s > best) == best + 256  # bisection closed to the granularity
    assert r.stdout.strip().splitlines()[-1].startswith(f"longest trainable sequence: {best} tokens")


def test_bench_train_longest_with_packed_documents(tmp_path: Path):
    """--doc-len: a probe's rows pack documents of that length (how the 1M fit is checked within a
    device session); the probe records how many documents its timed row held."""
    env, scratch = scratch_env(tmp_path)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--device", "cpu", "--longest",
                        "--steps", "1", "--warmup", "0", "--granularity", "1024", "--seq-lens", "1024",
                        "--max-len", "1024", "--doc-len", "256", "--json", str(tmp_path / "p.json")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    (probe,) = json.loads((tmp_path / "p.json").read_text())["probes"]
    assert probe["fits"] and probe["docs_per_row"] == 4
    assert not list(scratch.iterdir())  # the probe process removed its run directory
    assert "rows packed with documents of 256 tokens" in r.stdout


def test_bench_train_stops_on_sigterm(tmp_path: Path):
    """The Trainer catches SIGTERM (to checkpoint a preempted run); the benchmark stops on it instead
    of running to its end, so `timeout` in scripts/device_run.sh bounds every step."""
    import signal
    import time

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "err", "w") as err:
        child = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--device", "cpu",
                                  "--probe", "128", "--steps", "2500", "--warmup", "0"],
                                 stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path, env=env)
        time.sleep(12)  # built and training (alone, the run takes about a minute)
        sent = time.monotonic()
        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=120)
    waited = time.monotonic() - sent
    assert code != 0 and waited < 20, (code, waited, (tmp_path / "err").read_text()[-2000:])
