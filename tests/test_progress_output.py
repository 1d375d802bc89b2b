"""What an operator sees: plain progress lines, the tqdm bar (never glued to other lines, created
after the start-up summary, one final frame, rates that do not count resumed steps, a label during
the final evaluation), the checkpoint-line policy, no DeepSpeed start-up noise, and a fast
``python -m seqpar.ckpt --help``.

In-process tests drive ``RunLogger`` with a fake terminal (a StringIO that says it is a tty) and
render what a terminal would show (``screen``); two command-line runs (a stop drill with plain
lines, then its resume in a pseudo-terminal with the bar) check the same through train.py."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from common import BASE, ENV, ROOT, TRAIN, write_config
from seqpar.metrics import RunLogger, checkpoint_line_mode, duration

FRAME = re.compile(r"\d+/\d+ \[")  # a tqdm frame: "... 3/4 [00:01<00:00, ..."
NOISE = ("built successfully", "[INFO]")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(raw: str) -> list[str]:
    """The lines a terminal shows for ``raw`` (carriage returns overwrite, newlines commit)."""
    raw = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)  # cursor moves (nested bars only: none here)
    lines, cur, col = [], [], 0
    for ch in raw:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(cur).rstrip())
            cur, col = [], 0
        else:
            if col < len(cur):
                cur[col] = ch
            else:
                cur.append(ch)
            col += 1
    if "".join(cur).strip():
        lines.append("".join(cur).rstrip())
    return lines


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


STEP = {"loss": 2.5, "lr": 1e-3, "tok_s": 12345.0, "mem_gib": 1.25}


def terminal(monkeypatch) -> Tty:
    """stdout and stderr both go to one fake terminal, as in an interactive shell (set inside the
    test: pytest resets sys.stdout / sys.stderr after fixtures)."""
    tty = Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    monkeypatch.setattr(sys, "stderr", tty)
    return tty


def test_plain_lines_and_eta_count_only_this_process(tmp_path, capsys):
    clock = Clock()
    log = RunLogger(tmp_path, True, 100, progress=False, tensorboard="off", clock=clock)
    log.print("seqpar 0.1.0 | config x")
    log.start_at(50)  # resumed at step 50
    clock.t += 20.0
    log.log(60, dict(STEP, mfu=0.412), progress=True)  # 10 steps in 20 s: 40 left = 80 s
    log.log(60, {"passkey_accuracy": 0.5})  # a record only: no line
    clock.t += 80.0
    log.log(100, STEP, progress=True)
    log.close()
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "seqpar 0.1.0 | config x",
        "step 60/100 | loss 2.5000 | lr 1.00e-03 | 12,345 tok/s | mfu 41.2% | mem 1.2 GiB | eta 1m20s",
        "step 100/100 | loss 2.5000 | lr 1.00e-03 | 12,345 tok/s | mem 1.2 GiB",
    ], out
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [60, 60, 100] and rows[1]["passkey_accuracy"] == 0.5


def test_progress_bar_false_prints_lines_even_on_a_terminal(tmp_path, monkeypatch):
    term = terminal(monkeypatch)
    log = RunLogger(tmp_path, True, 4, progress=False, tensorboard="off")
    log.start_at(0)
    log.log(2, STEP, progress=True)
    log.close()
    assert screen(term.getvalue())[0].startswith("step 2/4 | loss 2.5000"), term.getvalue()


def test_bar_only_on_a_terminal(tmp_path, capsys):
    log = RunLogger(tmp_path, True, 4, progress=True, tensorboard="off", stream=io.StringIO())
    log.start_at(0)
    log.log(1, STEP, progress=True)
    log.close()
    assert log.bar is None and capsys.readouterr().out.startswith("step 1/4 | loss")


def test_bar_after_summary_lines_above_it_final_frame_once(tmp_path, monkeypatch):
    term = terminal(monkeypatch)
    log = RunLogger(tmp_path, True, 4, progress=True, tensorboard="off")
    print("resumed from runs/x/checkpoints/step00000001-seq000000 (step 1, micro-step 0)")  # resume.py's print
    log.print("seqpar 0.1.0 | config x\noutput  runs/x")
    assert not FRAME.search(term.getvalue()), "a bar frame before the start-up summary"
    handler = logging.StreamHandler(sys.stderr)  # e.g. DeepSpeed's logger (created before the bar)
    lg = logging.getLogger("seqpar-test-progress")
    lg.addHandler(handler)
    log.start_at(1)
    assert FRAME.search(term.getvalue()), "the bar starts with training"
    log.log(2, STEP, progress=True)
    print("resumed from elsewhere")  # any print while the bar is shown
    print("seqpar: warning: something", file=sys.stderr)
    try:
        log.log(3, STEP, progress=True)
        lg.warning("a library warning")
    finally:
        lg.removeHandler(handler)
    log.checkpoint(3, "step00000003-seq000000", 0.0123, background=True)
    sys.stdout.write("half a ")
    log.log(4, STEP, progress=True)
    sys.stdout.write("line\n")
    log.close()
    assert sys.stdout is term and sys.stderr is term and handler.stream is term  # all put back
    lines = screen(term.getvalue())
    frames = [i for i, line in enumerate(lines) if FRAME.search(line)]
    assert len(frames) == 1 and frames[0] == len(lines) - 1, lines  # one frame left: the final, last
    assert "4/4" in lines[-1] and "loss=2.5000" in lines[-1] and lines[-1].startswith("train: 100%"), lines
    assert lines[:-1] == [
        "resumed from runs/x/checkpoints/step00000001-seq000000 (step 1, micro-step 0)",
        "seqpar 0.1.0 | config x",
        "output  runs/x",
        "resumed from elsewhere",
        "seqpar: warning: something",
        "a library warning",
        "checkpoint step00000003-seq000000: training blocked 0.012 s (background write)",
        "half a line",
    ], lines


def _rate(frame: str) -> float:
    m = re.search(r"([\d.]+)step/s", frame) or re.search(r"([\d.]+)s/step", frame)
    assert m, frame
    return float(m.group(1)) if "step/s" in m.group(0) else 1 / float(m.group(1))


def test_bar_rate_after_a_resume_counts_only_this_process(tmp_path, monkeypatch):
    term = terminal(monkeypatch)
    log = RunLogger(tmp_path, True, 1000, progress=True, tensorboard="off")
    log.start_at(900)  # 900 steps were done by earlier processes
    time.sleep(0.5)
    log.log(901, STEP, progress=True)
    log.close()
    final = screen(term.getvalue())[-1]
    assert "901/1000" in final, final
    assert _rate(final) < 10, final  # 1 step in 0.5 s; counting the resumed steps would say ~1800/s


def test_final_evaluation_label(tmp_path, monkeypatch):
    term = terminal(monkeypatch)
    log = RunLogger(tmp_path, True, 2, progress=True, tensorboard="off")
    log.start_at(0)
    log.log(2, STEP, progress=True)
    seen = []

    def predict(x):
        seen.append(term.getvalue())
        time.sleep(0.15)  # tqdm redraws at most every 0.1 s
        return x * 2

    counted = log.counted(predict, 3, "evaluating passkey")
    assert [counted(i) for i in range(3)] == [0, 2, 4]
    assert "evaluating passkey" in screen(seen[2])[-1] and "2/3" in screen(seen[2])[-1], screen(seen[2])
    log.close()
    print("done: 2 steps")
    lines = screen(term.getvalue())
    assert lines[-1] == "done: 2 steps" and "2/2" in lines[-2] and lines[-2].startswith("train: 100%"), lines
    assert sum(bool(FRAME.search(x)) for x in lines) == 1, lines  # the evaluation bar is gone


def test_final_evaluation_label_plain(tmp_path, capsys):
    log = RunLogger(tmp_path, True, 2, progress=False, tensorboard="off")
    counted = log.counted(lambda: 1, 64, "evaluating passkey")
    counted()
    log.close()
    assert capsys.readouterr().out == "evaluating passkey: 64 samples\n"


@pytest.mark.parametrize("setting, printed", [
    ("every", [1, 2, 3, 4, 5, 6, 7]),
    ("none", [7]),
    (3, [3, 6, 7]),
    ("auto", [1, 7]),  # every_micro_batches 1 < grad-accum 4: the first, then the progress line sums up
])
def test_checkpoint_line_policy(tmp_path, capsys, setting, printed):
    log = RunLogger(tmp_path, True, 2, progress=False, tensorboard="off", checkpoint_lines=setting,
                    save_every_micro_batches=1, grad_accum_steps=4)
    log.start_at(0)
    for i in range(1, 8):
        log.checkpoint(i // 4, f"tag{i}", 0.5, background=False, ends_run=i == 7)
        if i == 4:
            log.log(1, STEP, progress=True)
    log.close()
    out = capsys.readouterr().out.splitlines()
    assert [int(line.split()[1].removeprefix("tag").rstrip(":")) for line in out if line.startswith("checkpoint ")] \
        == printed, out
    step_line = next(line for line in out if line.startswith("step 1/2"))
    quiet = len([i for i in range(1, 5) if i not in printed])  # saves before the step's line, not shown
    if quiet:
        summary = f" | {0.5 * quiet:.2f} s blocked by {quiet} checkpoint" + "s" * (quiet > 1)
        assert step_line.endswith(summary), step_line
    else:
        assert "blocked" not in step_line, step_line
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["ckpt_tag"] for r in rows if "ckpt_tag" in r] == [f"tag{i}" for i in range(1, 8)]


def test_checkpoint_line_mode_auto():
    assert checkpoint_line_mode("auto", 0, 8) == "every"  # every_steps: a line each
    assert checkpoint_line_mode("auto", 8, 8) == "every"  # one save per step
    assert checkpoint_line_mode("auto", 1, 8) == "first"
    assert checkpoint_line_mode(5, 1, 8) == 5 and checkpoint_line_mode("none", 0, 1) == "none"
    assert [duration(s) for s in (41, 161, 3720, 3 * 86400 + 4 * 3600)] == ["41s", "2m41s", "1h02m", "3d04h"]


def test_other_ranks_print_nothing(tmp_path, capsys):
    log = RunLogger(tmp_path / "r1", False, 4, progress=True, tensorboard="off")
    log.start_at(0)
    log.log(1, STEP, progress=True)
    log.checkpoint(1, "t", 0.1, background=True, ends_run=True)
    assert log.counted(len, 3, "evaluating passkey") is len
    log.close()
    assert capsys.readouterr() == ("", "") and not (tmp_path / "r1").exists()


def test_deepspeed_op_build_line_only_when_compiling(monkeypatch, tmp_path, capsys):
    import importlib

    from seqpar.metrics import quiet_deepspeed

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    ds_torch = importlib.import_module("deepspeed.comm.torch")

    def fake_build():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("something else DeepSpeed said")
        return "op"

    monkeypatch.setattr(ds_torch, "build_shm_op", fake_build)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))  # nothing compiled there yet
    said: list[str] = []
    quiet_deepspeed(said.append)
    quiet_deepspeed(said.append)  # idempotent
    assert ds_torch.build_shm_op() == "op"
    assert capsys.readouterr().out == "something else DeepSpeed said\n"
    assert len(said) == 1 and said[0].startswith("compiling a DeepSpeed op (deepspeed_shm_comm; once"), said
    built = Path(said[0].split("cached in ")[1].rstrip(")"))
    built.mkdir(parents=True, exist_ok=True)
    (built / "deepspeed_shm_comm.so").touch()  # cached now: silent
    assert ds_torch.build_shm_op() == "op" and len(said) == 1
    assert logging.getLogger("DeepSpeed").getEffectiveLevel() >= logging.WARNING


# -- the command line ----------------------------------------------------------------------------------
def test_ckpt_help_is_fast_and_imports_no_torch():
    probe = ("import runpy, sys\nsys.argv = ['seqpar.ckpt', '--help']\n"
             "try:\n    runpy.run_module('seqpar.ckpt', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=60)
    assert "list" in r.stdout and "export" in r.stdout and r.stderr.strip() == "NO-TORCH", r
    best = 1e9
    for _ in range(3):  # the best of three: the machine may be busy with other tests
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "seqpar.ckpt", "--help"], capture_output=True, cwd=ROOT, env=ENV,
                           timeout=60)
        best = min(best, time.monotonic() - t0)
        assert r.returncode == 0
    assert best < 2.0, best


def _run_in_pty(cmd: list[str], env: dict, timeout: float = 300) -> tuple[int, str]:
    """Run ``cmd`` with stdout and stderr on a 120-column pseudo-terminal; (status, what it showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the terminal's other side closed
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
    finally:
        os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_cli_plain_lines_then_bar_after_resume(tmp_path):
    """A stop drill with plain lines, then its resume with the bar on a terminal."""
    env = {**ENV, "SEQPAR_STOP_AFTER_MICRO_BATCHES": "10"}  # 4 micro-batches a step: stops inside step 3
    over = dict(train={"max_steps": 4, "global_batch_size": 4},
                data={"passkey": {"eval_samples": 3, "key_digits": 2}})
    path, run_dir = write_config(tmp_path, "run", BASE, logging={"progress_bar": False, "log_every": 2}, **over)
    r = subprocess.run([sys.executable, TRAIN, "--config", str(path)], capture_output=True, text=True, env=env,
                       timeout=300, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 75, out[-3000:]
    for noise in NOISE:
        assert noise not in out, out[:3000]
    lines = r.stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 1 and steps[0].startswith("step 2/4 | loss ") and " tok/s | mem " in steps[0], lines
    assert " | eta " in steps[0] and "blocked by 6 checkpoints" in steps[0], steps  # saves 2..7 summed up
    ckpt = [line for line in lines if line.startswith("checkpoint ")]
    assert len(ckpt) == 2 and "step00000000-seq000001" in ckpt[0] and "step00000002-seq000002" in ckpt[1], lines
    assert any(line.startswith("stop requested") and "saved step00000002-seq000002" in line for line in lines)

    path, _ = write_config(tmp_path, "run", BASE, logging={"progress_bar": True, "log_every": 1}, **over)
    code, raw = _run_in_pty([sys.executable, TRAIN, "--config", str(path)], ENV)
    shown = screen(raw)
    assert code == 0, "\n".join(shown[-40:])
    for noise in NOISE:
        assert noise not in raw, raw[:3000]
    summary_end = raw.index("\nckpt    ")
    assert not FRAME.search(raw[:summary_end]), raw[:summary_end]  # no frame before the summary
    resumed = [line for line in shown if "resumed from" in line]
    assert len(resumed) == 1 and resumed[0].startswith("resumed from ") and not FRAME.search(resumed[0]), shown
    frames = [line for line in shown if FRAME.search(line)]
    assert len(frames) == 1 and frames[0].startswith("train: 100%") and "4/4" in frames[0], shown
    assert "evaluating passkey" in raw and not any("evaluating passkey" in line for line in shown), shown
    done = shown.index(next(line for line in shown if line.startswith("done: 4 steps")))
    # the final frame, the last checkpoint with the export command, then the result
    assert shown[done - 2] == frames[0] and shown[done - 1].startswith("saved ") and \
        "python -m seqpar.ckpt export" in shown[done - 1], shown
    ckpt = [line for line in shown if line.startswith("checkpoint ")]
    assert len(ckpt) == 2 and "step00000004-seq000000" in ckpt[1], shown  # the first of this process and the final
