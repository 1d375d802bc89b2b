"""The restart protocol: the run-state record (seqpar/checkpoint/runstate.py), scripts/auto_restart.sh
and scripts/slurm_seqpar.sbatch, driven by fake ranks and launchers (no training, a few seconds)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seqpar.checkpoint import runstate
from seqpar.checkpoint.runstate import classify, read_run_state, write_run_state

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = str(ROOT / "scripts" / "auto_restart.sh")
SBATCH = ROOT / "scripts" / "slurm_seqpar.sbatch"
PY = sys.executable

# A fake rank: registers its pid, records its run state like rank 0 does, and behaves as
# FAKE_PLAN says for this attempt (comma-separated, the last one repeats).
RANK = r"""
import os, signal, sys, time
from seqpar.checkpoint.runstate import register_pid, write_run_state
register_pid()
attempt = int(os.environ.get("SEQPAR_ATTEMPT", "1"))
plan = os.environ["FAKE_PLAN"].split(",")
mode = plan[min(attempt, len(plan)) - 1]
log = open(os.environ["FAKE_LOG"], "a")
print(f"attempt {attempt} {mode} args: {' '.join(sys.argv[1:])}", file=log, flush=True)
state = lambda s, code, **kw: write_run_state(None, s, exit_code=code, **kw)
state("running", 1, step=0)
got = []
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))
open(f"{os.environ['FAKE_READY']}.{attempt}", "w").close()
if mode == "finish":
    state("finished", 0, step=8); sys.exit(0)
if mode == "preempt":
    state("preempted", 75, step=3, checkpoint="step00000003-seq000000"); sys.exit(75)
if mode == "usage":
    state("usage_error", 2, reason="checkpoint dir is locked by job 7"); sys.exit(2)
if mode == "crash":
    sys.exit(3)
if mode == "slow":  # outlives its launcher, then saves
    time.sleep(1.5)
    print(f"attempt {attempt} end", file=log, flush=True)
    state("preempted", 75, step=4, checkpoint="step00000004-seq000000"); sys.exit(75)
# "wait": save and exit once FAKE_SIGNALS stop signals have arrived
deadline = time.time() + 30
while len(got) < int(os.environ.get("FAKE_SIGNALS", "1")) and time.time() < deadline:
    time.sleep(0.02)
print("signals:", *got, file=log, flush=True)
state("preempted", 75, step=5, checkpoint="step00000005-seq000000"); sys.exit(75)
"""


@pytest.fixture
def fake(tmp_path):
    """Paths and environment for a fake run in tmp_path."""
    (tmp_path / "rank.py").write_text(RANK)
    env = {**os.environ, "PYTHON": PY, "PYTHONPATH": str(ROOT), "BACKOFF_S": "1", "FAKE_PLAN": "finish",
           "FAKE_LOG": str(tmp_path / "log"), "FAKE_READY": str(tmp_path / "ready")}
    for k in ("SEQPAR_RUN_STATE", "SEQPAR_PID_DIR", "SEQPAR_ATTEMPT"):
        env.pop(k, None)

    class Fake:
        path, rank = tmp_path, [PY, str(tmp_path / "rank.py")]

        def __init__(self):
            self.env = env

        def log(self) -> str:
            return (tmp_path / "log").read_text() if (tmp_path / "log").exists() else ""

        def wait_ready(self, attempt: int = 1) -> None:
            wait_for(tmp_path / f"ready.{attempt}")
    return Fake()


def wait_for(path: Path) -> None:
    deadline = time.time() + 30
    while not path.exists() and time.time() < deadline:
        time.sleep(0.02)


def torchrun_like(body: str) -> list[str]:
    """A launcher process between the wrapper and the rank that, like torchrun's agent, reports any
    failed worker as 1. ``body`` runs the rank as "$@"."""
    return ["bash", "-c", body + '\ns=$?; [ "$s" -eq 0 ] || exit 1', "launcher"]


def wrapper(fake, cmd: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([WRAPPER, *cmd], capture_output=True, text=True, timeout=60, env={**fake.env, **env})


# --- the record and its classification -------------------------------------------------------

def rec(state: str, code: int, t: float = 100.0, **kw) -> dict:
    return {"state": state, "exit_code": code, "time": t, "step": kw.get("step", 7),
            "checkpoint": kw.get("checkpoint", "step00000007-seq000000"), "reason": kw.get("reason", "")}


@pytest.mark.parametrize("record,launcher,since,expect,words", [
    # the launcher's 0 / 75 / 2 are seqpar's own: trusted whatever the record says
    (None, 0, None, 0, "finished (status 0)"),
    (rec("finished", 0), 0, None, 0, "finished at step 7"),
    (rec("failed", 1), 0, None, 0, "finished (status 0)"),
    (None, 75, None, 75, "preempted (status 75)"),
    (rec("preempted", 75), 75, 50, 75, "preempted at step 7, checkpoint step00000007-seq000000"),
    (None, 2, None, 2, "usage error (status 2)"),
    # anything else is replaced by a fresh record's status
    (rec("preempted", 75), 1, 50, 75, "preempted at step 7"),
    (rec("preempted", 75), 137, None, 75, "preempted at step 7"),
    (rec("usage_error", 2, reason="checkpoint dir locked"), 1, 50, 2, "usage error at step 7: checkpoint dir locked"),
    (rec("io_error", 74, reason="disk full"), 1, 50, 74, "checkpoint I/O error at step 7: disk full"),
    (rec("failed", 1, reason="boom"), 137, 50, 1, "failed at step 7: boom"),
    (rec("finished", 0), 1, 50, 0, "finished at step 7"),
    (rec("preempted", 75), None, None, 75, "preempted at step 7"),
    # died without recording its end: 1
    (None, 1, None, 1, "died without recording how it ended (no run-state record)"),
    (rec("preempted", 75, t=10.0), 137, 50, 1, "record is older than this attempt"),
    (rec("running", 1), 137, 50, 1, "died without recording how it ended; it started at step 7"),
    (rec("running", 0), 137, 50, 1, "died without recording how it ended; it started at step 7"),
    ({"state": "preempted", "exit_code": 75}, 1, 50, 1, "older than this attempt"),  # no time
    ({"state": "io_error", "exit_code": "x", "time": 100.0}, 1, None, 74, "checkpoint I/O error"),
])
def test_classify(record, launcher, since, expect, words):
    code, line = classify(record, launcher, since)
    assert code == expect and words in line, (code, line)


def test_write_and_read_run_state(tmp_path, monkeypatch, capsys):
    own = tmp_path / "wrapper" / "state.json"
    monkeypatch.setenv("SEQPAR_RUN_STATE", str(own))
    monkeypatch.setenv("SEQPAR_ATTEMPT", "3")
    t0 = time.time()
    write_run_state(tmp_path / "run", "preempted", exit_code=75, step=12, checkpoint="step00000012-seq000000")
    for path in (tmp_path / "run" / "run_state.json", own):
        r = read_run_state(path)
        assert r["state"] == "preempted" and r["exit_code"] == 75 and r["step"] == 12 and r["attempt"] == 3
        assert r["checkpoint"] == "step00000012-seq000000" and r["pid"] == os.getpid() and r["time"] >= t0
        assert r["host"] and r["reason"] == ""
    assert not [p for p in own.parent.iterdir() if p.name != "state.json"]  # no tmp file left
    write_run_state(None, "finished", exit_code=0, step=20)  # only the wrapper's file
    assert read_run_state(own)["state"] == "finished"
    assert read_run_state(tmp_path / "run" / "run_state.json")["state"] == "preempted"

    # never raises: an unwritable target and a bad state each cost one warning line
    blocker = tmp_path / "file"
    blocker.write_text("")
    write_run_state(blocker / "run", "failed", exit_code=1)
    write_run_state(tmp_path / "run", "exploded", exit_code=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("seqpar: warning:") for line in err), err
    assert read_run_state(own)["state"] == "failed"  # each target on its own

    assert read_run_state(tmp_path / "missing.json") is None
    (tmp_path / "garbled.json").write_text('{"state": "preem')
    assert read_run_state(tmp_path / "garbled.json") is None
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_run_state(tmp_path / "list.json") is None


def test_register_pid(tmp_path, monkeypatch):
    monkeypatch.delenv("SEQPAR_PID_DIR", raising=False)
    assert runstate.register_pid() is None
    monkeypatch.setenv("SEQPAR_PID_DIR", str(tmp_path))
    assert runstate.register_pid() == tmp_path / str(os.getpid()) and (tmp_path / str(os.getpid())).exists()
    runstate.unregister_pid()
    runstate.unregister_pid()  # idempotent
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("SEQPAR_PID_DIR", str(tmp_path / "missing"))
    assert runstate.register_pid() is None  # warns, never raises


def test_cli_status(tmp_path):
    """One line, the status to act on; no torch import (the scripts call it between attempts)."""
    cli = [PY, "-m", "seqpar.checkpoint.runstate", "status"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SEQPAR_RUN_STATE", None)
    path = tmp_path / "state.json"
    path.write_text(json.dumps(rec("preempted", 75, t=time.time())))
    r = subprocess.run(cli + [str(path), "--launcher-status", "1", "--since", str(time.time() - 60)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 75 and r.stdout == "preempted at step 7, checkpoint step00000007-seq000000\n", r
    r = subprocess.run(cli + [str(path), "--launcher-status", "137", "--since", str(time.time() + 60)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "older than this attempt" in r.stdout
    r = subprocess.run(cli + [str(tmp_path / "none.json"), "--launcher-status", "2"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stdout.strip() == "usage error (status 2)"
    r = subprocess.run([PY, "-c", "import sys, seqpar.checkpoint.runstate; print('torch' in sys.modules)"],
                       capture_output=True, text=True, env=env)
    assert r.stdout.strip() == "False"


# --- scripts/auto_restart.sh ----------------------------------------------------------------

def test_wrapper_restarts_and_appends_resume_auto(fake):
    """75 restarts at once, a crash after the back-off, 0 ends the loop; every attempt gets
    --resume auto and its own SEQPAR_ATTEMPT / SEQPAR_RUN_STATE / SEQPAR_PID_DIR."""
    r = wrapper(fake, [*fake.rank, "--config", "x.yaml"], FAKE_PLAN="preempt,crash,finish")
    assert r.returncode == 0, r.stdout + r.stderr
    assert fake.log().count("args: --config x.yaml --resume auto") == 3
    assert [line.split()[:3] for line in fake.log().splitlines()] == [
        ["attempt", "1", "preempt"], ["attempt", "2", "crash"], ["attempt", "3", "finish"]]
    out = r.stdout
    assert "attempt 1 (status 75): preempted at step 3, checkpoint step00000003-seq000000; restart in 0s" in out
    assert "attempt 2 (status 3): died without recording how it ended; it started at step 0; restart in 1s" in out
    assert "attempt 3 (status 0): finished at step 8; done" in out


def test_wrapper_gives_up_after_max_restarts(fake):
    r = wrapper(fake, fake.rank, FAKE_PLAN="crash", MAX_RESTARTS="2", BACKOFF_S="0")
    assert r.returncode == 1 and fake.log().count("crash") == 3, r.stdout
    assert "attempt 3 (status 3): died without recording how it ended; it started at step 0; giving up after 2 failed attempts" in r.stdout


@pytest.mark.parametrize("launcher", ["direct", "torchrun_like"])
def test_wrapper_usage_error_stops_without_retry(fake, launcher):
    """Exit 2 (config / resume error, a checkpoint dir locked by another job) is not transient; the
    record says so also when the launcher reports 1."""
    cmd = fake.rank if launcher == "direct" else torchrun_like('"$@"') + fake.rank
    r = wrapper(fake, cmd, FAKE_PLAN="usage,finish", BACKOFF_S="0")
    assert r.returncode == 2 and fake.log().count("attempt") == 1, r.stdout
    status = 2 if launcher == "direct" else 1
    assert f"attempt 1 (status {status}): usage error: checkpoint dir is locked by job 7; not retrying, exit 2" in r.stdout


def test_wrapper_trusts_the_record_over_the_launcher(fake):
    """The launcher says 1 but the rank recorded a preemption: restart at once, not after the
    back-off (BACKOFF_S=30 would time the test out)."""
    t0 = time.time()
    r = wrapper(fake, torchrun_like('"$@"') + fake.rank, FAKE_PLAN="preempt,finish", BACKOFF_S="30")
    assert r.returncode == 0 and time.time() - t0 < 25, r.stdout
    assert "attempt 1 (status 1): preempted at step 3, checkpoint step00000003-seq000000; restart in 0s" in r.stdout


def test_wrapper_waits_for_ranks_outliving_the_launcher(fake):
    """A launcher that exits while its registered rank runs on: the next attempt starts only after
    the rank has ended, and the rank's record decides."""
    body = '"$@" &\nwhile [ ! -e "$FAKE_READY.$SEQPAR_ATTEMPT" ]; do sleep 0.02; done\nfalse'
    r = wrapper(fake, torchrun_like(body) + fake.rank, FAKE_PLAN="slow,finish", BACKOFF_S="30")
    assert r.returncode == 0, r.stdout
    assert fake.log().splitlines()[:3] == ["attempt 1 slow args: --resume auto", "attempt 1 end",
                                           "attempt 2 finish args: --resume auto"]
    assert "attempt 1 (status 1): preempted at step 4, checkpoint step00000004-seq000000; restart in 0s" in r.stdout


def test_wrapper_kills_ranks_that_outlive_the_launcher_too_long(fake):
    """A registered rank still running ORPHAN_WAIT_S after its launcher exited is killed, so two
    attempts never share the run dir; it recorded no end: a failure, restarted after the back-off."""
    body = '"$@" &\nwhile [ ! -e "$FAKE_READY.$SEQPAR_ATTEMPT" ]; do sleep 0.02; done\nfalse'
    r = wrapper(fake, torchrun_like(body) + fake.rank, FAKE_PLAN="wait,finish", ORPHAN_WAIT_S="1", BACKOFF_S="0")
    assert r.returncode == 0, r.stdout
    assert "killing ranks that outlived the launcher by 1s" in r.stdout
    assert "attempt 1 (status 1): died without recording how it ended; it started at step 0; restart in 0s" in r.stdout


def test_wrapper_forwards_signals_to_registered_ranks_only(fake):
    """USR1 then INT to the wrapper reach the registered rank under an intermediate launcher (INT as
    TERM), not an unregistered leaf of the tree; the launcher reports 1, the record says preempted,
    and the signalled wrapper exits 75 instead of restarting."""
    leaf = fake.path / "leaf.pid"
    body = f'sleep 60 >/dev/null 2>&1 & echo $! > {leaf}\n"$@"'
    proc = subprocess.Popen([WRAPPER, *torchrun_like(body), *fake.rank], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**fake.env, "FAKE_PLAN": "wait",
                                                                      "FAKE_SIGNALS": "2"})
    try:
        fake.wait_ready()
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 75, out
        assert "signals: SIGUSR1 SIGTERM" in fake.log() and fake.log().count("attempt") == 1, fake.log()
        assert "USR1 received: forwarded USR1 to ranks" in out and "INT received: forwarded TERM" in out
        assert "attempt 1 (status 1): preempted at step 5, checkpoint step00000005-seq000000; stopped by signal, exit 75" in out
        os.kill(int(leaf.read_text()), 0)  # the unregistered sleep was left alone
    finally:
        proc.kill()
        if leaf.exists():
            os.kill(int(leaf.read_text()), signal.SIGKILL)


def test_wrapper_signal_before_registration_goes_to_launcher(fake):
    """Nothing registered yet: the launcher gets SIGTERM; the run had nothing to save, the wrapper
    exits 75 (resume point unchanged)."""
    ready = fake.path / "launcher.ready"
    body = f'trap \'echo launcher got TERM >> "$FAKE_LOG"; kill $!; exit 1\' TERM\ntouch {ready}\nsleep 60 & wait $!'
    proc = subprocess.Popen([WRAPPER, *torchrun_like(body)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=fake.env)
    wait_for(ready)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75 and "launcher got TERM" in fake.log(), out
    assert "USR1 received before any rank registered: SIGTERM to the launcher" in out
    assert "attempt 1 (status 1): died without recording how it ended (no run-state record); stopped by signal, exit 75" in out


def test_wrapper_late_rank_gets_the_pending_signal(fake):
    """A rank that registers after the signal (still starting up; its launcher shrugged off TERM)
    gets it too, saves, and the wrapper stops with 75."""
    ready = fake.path / "launcher.ready"
    body = f'trap \'echo launcher got TERM >> "$FAKE_LOG"\' TERM\ntouch {ready}\nsleep 1\n"$@"'
    proc = subprocess.Popen([WRAPPER, *torchrun_like(body), *fake.rank], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**fake.env, "FAKE_PLAN": "wait"})
    wait_for(ready)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75, out
    assert "launcher got TERM" in fake.log() and "signals: SIGUSR1" in fake.log(), fake.log()
    assert "attempt 1 (status 1): preempted at step 5, checkpoint step00000005-seq000000; stopped by signal" in out


@pytest.mark.skipif(not (shutil.which("unshare") and shutil.which("pgrep")), reason="needs unshare, pgrep")
def test_wrapper_as_pid_1(fake):
    """As PID 1 of a fresh PID namespace (a container's entry point), SIGTERM still reaches it."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no permission for a PID namespace")
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c",
                             'echo "pid $$" >> "$FAKE_LOG"; exec "$0" "$@"', WRAPPER, *fake.rank],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**fake.env, "FAKE_PLAN": "wait"})
    try:
        fake.wait_ready()
        wrapper_pid = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()[0])
        os.kill(wrapper_pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert "pid 1" in fake.log() and "signals: SIGTERM" in fake.log(), fake.log() + out
        assert proc.returncode == 75, out
    finally:
        proc.kill()


# --- scripts/slurm_seqpar.sbatch ------------------------------------------------------------

def test_sbatch_script_parses_and_uses_the_protocol():
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    text = SBATCH.read_text()
    assert "-m seqpar.checkpoint.runstate status" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "SEQPAR_RUN_STATE" in text and "#SBATCH --signal=B:USR1@" in text


@pytest.mark.parametrize("plan,signal_batch,expect,requeued", [
    ("preempt", False, 75, True),   # srun says 137, the record says preempted
    ("usage", False, 2, False),
    ("finish", False, 0, False),
    ("crash", False, 1, False),
    ("wait", True, 75, True),       # --signal=B:USR1 reaches the batch shell, forwarded through srun
])
def test_sbatch_with_fake_slurm(fake, plan, signal_batch, expect, requeued):
    """The batch script under fake srun (which, like --kill-on-bad-exit, reports 137 for any failed
    task) and scontrol: requeue on 75 only, exit with the classified status."""
    bin_ = fake.path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text('#!/bin/bash\nwhile [ "${1#--}" != "$1" ]; do shift; done\n'
                               'SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0 "$@" & c=$!\n'
                               "trap 'kill -USR1 $c' USR1 TERM\n"
                               'while :; do wait $c; s=$?; kill -0 $c 2>/dev/null || break; done\n'
                               '[ "$s" -eq 0 ] || exit 137\n')
    (bin_ / "scontrol").write_text(f'#!/bin/bash\ncase $1 in show) echo node1;; *) echo "$*" >> {fake.path}/scontrol;; esac\n')
    # the ranks run "$PYTHON seqpar/train.py ...", the classification "$PYTHON -m ..."
    (bin_ / "python").write_text(f'#!/bin/bash\n[ "$1" = -m ] && exec {PY} "$@"\nshift; exec {PY} {fake.path}/rank.py "$@"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    (fake.path / "logs").mkdir()
    env = {**fake.env, "PATH": f"{bin_}:{os.environ['PATH']}", "PYTHON": str(bin_ / "python"), "FAKE_PLAN": plan,
           "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node1", "CONFIG": "c.yaml"}
    proc = subprocess.Popen(["bash", str(SBATCH)], cwd=fake.path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    if signal_batch:
        fake.wait_ready()
        proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == expect, out
    assert "args: --config c.yaml --resume auto" in fake.log()
    assert (fake.path / "logs" / "seqpar-42.state.json").exists()
    scontrol = (fake.path / "scontrol").read_text() if (fake.path / "scontrol").exists() else ""
    assert (scontrol == "requeue 42\n") == requeued, out
