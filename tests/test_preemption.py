"""How a stop reaches the ranks under a real launcher, and what is on disk afterwards.

2-rank torchrun jobs on gloo: SIGTERM to the agent alone, to every process, or to one rank; the
agent SIGKILLed (its ranks, in sessions of their own, must notice and stop) while a replacement
job starts on the same run dir (it must wait for the directory lock); a checkpoint write failing
on rank 1 (injected ENOSPC / EIO); a signal during start-up. Every stop must end with a committed
checkpoint taken at the stop, no ``.partial-`` left, a run-state record a restart loop reads as
"preempted", and the resumed run must end bitwise where an uninterrupted one ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from common import ENV, command, final_hashes, start, torchrun
from seqpar.checkpoint.runstate import classify, read_run_state
from seqpar.checkpoint.store import CheckpointStore


def wait_for_steps(run_dir: Path, proc: subprocess.Popen, more: int = 1, timeout: float = 120) -> None:
    """Until this attempt has logged ``more`` optimizer steps (training is under way)."""
    metrics = run_dir / "metrics.jsonl"
    before = metrics.read_text().count("\n") if metrics.exists() else 0
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= before + more:
            return
        time.sleep(0.02)
    raise AssertionError(f"no progress (exit {proc.poll()})")


def ranks_of(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """torchrun's workers by global rank."""
    out = {}
    for child in psutil.Process(proc.pid).children():
        env = child.environ()
        if "RANK" in env:
            out[int(env["RANK"])] = child
    assert len(out) == 2, out
    return out


def check_stopped_at_a_committed_checkpoint(run_dir: Path, t0: float, launcher_status: int) -> str:
    ck = run_dir / "checkpoints"
    store = CheckpointStore(ck)
    assert not list(ck.glob(".partial-*")), "a partial checkpoint was left behind"
    record = read_run_state(run_dir / "run_state.json")
    status, why = classify(record, launcher_status, since=t0)
    assert status == 75, (launcher_status, record, why)
    tag = record["checkpoint"]
    assert tag == store.latest_hint() == store.list()[-1].tag and store.verify(ck / tag) == [], tag
    return tag


@pytest.mark.xdist_group("references")  # one worker computes the reference runs once
@pytest.mark.slow
def test_sigterm_through_torchrun_agent_all_or_one_rank(tmp_path, references):
    """The three ways a SIGTERM reaches a torchrun job (Kubernetes / a restart wrapper: the agent
    only; a scheduler: every process; a stray kill: one rank), one after another on the same run,
    then the run finishes bitwise equal to an uninterrupted one."""
    cmd, run_dir = command(tmp_path, "term", 2, train={"max_steps": 24}, checkpoint={"every_micro_batches": 0})
    tags = []
    for how in ("agent", "all", "rank1"):
        t0 = time.time()
        proc = start(cmd + ["--resume", "auto"])
        wait_for_steps(run_dir, proc)
        ranks = ranks_of(proc)
        if how == "agent":
            os.kill(proc.pid, signal.SIGTERM)
        elif how == "all":
            for pid in [proc.pid] + [r.pid for r in ranks.values()]:
                os.kill(pid, signal.SIGTERM)
        else:
            ranks[1].send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0, f"{how}: torchrun reports a stopped job as a failure ({proc.returncode})"
        tags.append(check_stopped_at_a_committed_checkpoint(run_dir, t0, proc.returncode))
        assert "stop requested" in out and f"saved {tags[-1]}" in out, (how, out[-2000:])
        assert "keep_last 2 + 1 being written: needs up to" in out  # the disk the directory needs
    assert len(set(tags)) == 3, tags  # each stop saved where it stopped, after training on
    proc = start(cmd + ["--resume", "auto"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and f"resumed from {run_dir / 'checkpoints' / tags[-1]}" in out, out[-2000:]
    assert final_hashes(run_dir) == references[(2, 24)]


@pytest.mark.xdist_group("references")  # one worker computes the reference runs once
@pytest.mark.slow
def test_agent_killed_ranks_stop_and_replacement_waits_for_the_lock(tmp_path, references):
    """torchrun's agent SIGKILLed: its ranks (own sessions) notice the launcher is gone, save and
    exit; a replacement job started at once on the same run dir waits for the checkpoint dir lock
    instead of writing beside them, then resumes their checkpoint and finishes exactly."""
    cmd, run_dir = command(tmp_path, "orphans", 2, train={"max_steps": 24}, checkpoint={"every_micro_batches": 0})
    proc = start(cmd + ["--resume", "auto"])
    wait_for_steps(run_dir, proc, more=2)
    orphans = list(ranks_of(proc).values())
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    second = subprocess.Popen(cmd + ["--resume", "auto"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=ENV, start_new_session=True)
    gone, alive = psutil.wait_procs(orphans, timeout=120)
    assert not alive, "ranks of a killed launcher kept training"
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out[-3000:]
    ck = run_dir / "checkpoints"
    # every_micro_batches is 0: the only checkpoint is the one the orphans saved when they stopped
    resumed = [line for line in out.splitlines() if line.startswith("resumed from")]
    assert resumed and "step00000024" not in resumed[0], out[-3000:]
    if "is locked by" in out:  # the usual case: the orphans still held the lock when it started
        assert out.index("is locked by") < out.index("resumed from")
    assert not list(ck.glob(".partial-*"))
    assert final_hashes(run_dir) == references[(2, 24)]


@pytest.mark.xdist_group("references")  # one worker computes the reference runs once
@pytest.mark.slow
def test_write_failure_on_rank1_is_agreed_at_once(tmp_path, references):
    """An injected ENOSPC on rank 1 (twice: the retry fails too) stops both ranks within a micro-batch
    with one clear message and exit 74, instead of training on without checkpoints while rank 0
    waits an hour for rank 1's record. With on_write_error: warn, an EIO that fails one save (and
    the first attempt of the next) is reported, training goes on and ends exactly."""
    cmd, run_dir = command(tmp_path, "enospc", 2, checkpoint={"every_micro_batches": 2})
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                       env={**ENV, "SEQPAR_INJECT_WRITE_ERROR": "1:28:2"})
    out = r.stdout + r.stderr
    assert r.returncode != 0 and time.time() - t0 < 120, out[-3000:]
    assert "exitcode  : 74" in r.stderr, r.stderr[-3000:]
    assert "No space left on device" in out and "retrying once" in out and "could not be written (retried once)" in out
    record = read_run_state(run_dir / "run_state.json")
    assert record["state"] == "io_error" and classify(record, r.returncode, t0)[0] == 74, record

    cmd, run_dir = command(tmp_path, "eio", 2, checkpoint={"every_micro_batches": 2, "on_write_error": "warn"})
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**ENV, "SEQPAR_INJECT_WRITE_ERROR": "1:5:3"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "Input/output error" in out and "training goes on" in out, out[-3000:]
    assert final_hashes(run_dir) == references[(2, 8)]


@pytest.mark.slow
def test_signal_during_start_up_exits_as_preempted(tmp_path):
    """SIGTERM while the run is still importing and building: handled (exit 75, nothing new to
    save), not fatal (it used to kill the process: exit -15, read as a crash)."""
    cmd, run_dir = command(tmp_path, "early", 1)
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**ENV, "SEQPAR_PID_DIR": str(pids)})
    deadline = time.time() + 60
    while not (pids / str(proc.pid)).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)  # the process has just registered: it is still importing torch
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert "stop requested (SIGTERM): nothing new to save" in out
    assert json.loads((run_dir / "run_state.json").read_text())["state"] == "preempted"
    assert not (pids / str(proc.pid)).exists()


def test_ranks_agree_on_the_checkpoint_to_resume(tmp_path):
    """Rank 0 proposes, every rank hashes only the files it reads, all agree: a file corrupt as seen
    by one rank makes both fall back to the same older checkpoint; a file one rank cannot read
    makes both fail with one message; a rank that lists the directory differently still follows
    rank 0's candidates."""
    out = tmp_path / "rows.jsonl"
    r = torchrun(2, "resume_choice_worker.py", str(out), cwd=tmp_path, timeout=300)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    assert r.returncode == 0 and len(rows) == 3 and all(row["ok"] for row in rows), f"{rows}\n{r.stderr[-3000:]}"


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_runner_alone(tmp_path):
    """The `deepspeed` runner does not forward SIGTERM to its ranks on one node (it just dies and
    leaves them running): the ranks notice their launcher is gone and stop with a committed
    checkpoint all the same."""
    from common import BASE, TRAIN, free_port, write_config

    path, run_dir = write_config(tmp_path, "ds", BASE, train={"max_steps": 24}, checkpoint={"every_micro_batches": 0})
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                             "--master_port", str(free_port()), TRAIN, "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV,
                            start_new_session=True)
    wait_for_steps(run_dir, proc)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "--local_rank" in " ".join(p.cmdline())]  # not launch.py, whose arguments name TRAIN too
    assert len(ranks) == 2, ranks
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    gone, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive, "ranks of a stopped deepspeed runner kept training"
    out = proc.stdout.read()
    assert "its launcher deepspeed" in out, out[-3000:]
    check_stopped_at_a_committed_checkpoint(run_dir, t0, proc.returncode)


@pytest.mark.slow
def test_ctrl_c_saves_and_twice_aborts(tmp_path):
    """Ctrl-C (SIGINT) in a plain `python seqpar/train.py`: stops like SIGTERM (a checkpoint after
    this micro-batch, exit 75, recorded as preempted) and says so at once; pressed twice, the run
    aborts on the spot: exit 130, one line, recorded as failed with that status, nothing new saved."""
    # micro-batches long enough (~1 s) that a second press lands before the stop is done
    slow = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4}
    cmd, run_dir = command(tmp_path, "ctrlc", 1, checkpoint={"every_micro_batches": 0},
                           train={"max_steps": 200, "global_batch_size": 2},
                           data={"seq_len": 4096}, model=slow)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for_steps(run_dir, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "seqpar: interrupted: stopping after this micro-batch with a checkpoint" in err
    assert "stop requested (SIGINT): saved step" in out and "Traceback" not in err
    record = read_run_state(run_dir / "run_state.json")
    assert record["state"] == "preempted" and CheckpointStore(run_dir / "checkpoints").list()[-1].tag == record["checkpoint"]

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for_steps(run_dir, proc)
    saved = [c.tag for c in CheckpointStore(run_dir / "checkpoints").list()]
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    first = proc.stderr.readline() + proc.stderr.readline()  # the handler ran (two signals at once would be one)
    assert "interrupted: stopping after this micro-batch" in first, first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("seqpar: interrupted twice (Ctrl-C): aborted without saving")
    assert "Traceback" not in err
    record = read_run_state(run_dir / "run_state.json")
    assert record["state"] == "failed" and record["exit_code"] == 130
    assert [c.tag for c in CheckpointStore(run_dir / "checkpoints").list()] == saved
    # a run ending on an error still records how far it got and the newest committed checkpoint
    assert record["checkpoint"] == saved[-1] and isinstance(record["step"], int) and record["step"] >= 1


def test_sigint_handling_rules(monkeypatch):
    """Ctrl-C ignored at start (a background job of a script) stays ignored; the handler sets the
    stop flag before its message, so a failing write (stderr a pipe the same Ctrl-C closed) loses
    nothing; a second press raises KeyboardInterrupt; the old handler is known for restoring."""
    from seqpar.checkpoint import signals as sig

    old = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        s = sig.StopSignal()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN and s.previous(signal.SIGINT) is None
        s.restore()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        s = sig.StopSignal()
        assert s.previous(signal.SIGINT) is signal.default_int_handler
        monkeypatch.setattr(sig.os, "write", lambda fd, b: (_ for _ in ()).throw(BrokenPipeError()))
        s._handle(signal.SIGINT, None)
        assert s.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            s._handle(signal.SIGINT, None)
        s.restore()
    finally:
        signal.signal(signal.SIGINT, old)
