"""Run-state record: how a run ended, for restart loops that cannot see seqpar's exit status.

Launchers do not pass exit codes through (torchrun's agent reports any failed worker as 1, srun
says 137 when it killed a task), so rank 0 records the outcome in ``<run_dir>/run_state.json`` and,
when ``SEQPAR_RUN_STATE`` is set, in the restart wrapper's own file. ``scripts/auto_restart.sh``
and ``scripts/slurm_seqpar.sbatch`` read it between attempts with

    python -m seqpar.checkpoint.runstate status FILE [--since EPOCH] [--launcher-status N]

which prints one line and exits with the status to act on. Ranks also register their pid in
``SEQPAR_PID_DIR`` so the wrapper signals them, not the launcher. Standard library only: the shell
scripts call this between attempts and must not wait for torch to import.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

RUN_STATE_FILE = "run_state.json"
EXIT_FINISHED, EXIT_FAILED, EXIT_USAGE, EXIT_IO, EXIT_PREEMPTED = 0, 1, 2, 74, 75
# state -> the exit status it stands for; `running` means "started and never recorded an end"
STATES = {"running": EXIT_FAILED, "finished": EXIT_FINISHED, "preempted": EXIT_PREEMPTED,
          "usage_error": EXIT_USAGE, "io_error": EXIT_IO, "failed": EXIT_FAILED,
          "diverged": EXIT_USAGE}  # gradients not finite step after step: retrying repeats it


def _warn(msg: str) -> None:
    try:
        print(f"seqpar: warning: {msg}", file=sys.stderr, flush=True)
    except Exception:  # stderr closed: nothing left to tell
        pass


def _atomic_write(path: Path, text: str) -> None:
    """tmp file + fsync + rename + fsync of the directory: a reader sees the old or the new record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # per host and pid: first ranks of several nodes may write one shared file at once
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is done anyway
        pass


def write_run_state(run_dir: Path | None, state: str, *, exit_code: int, step: int | None = None,
                    checkpoint: str | None = None, reason: str = "") -> None:
    """Record ``state`` in ``<run_dir>/run_state.json`` and in ``$SEQPAR_RUN_STATE`` if set.

    ``run_dir=None`` writes only the wrapper's file (for the first rank of other nodes, whose
    wrappers cannot see rank 0's). Never raises: a failure prints one warning line per file.
    """
    try:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r} (one of {', '.join(STATES)})")
        attempt = os.environ.get("SEQPAR_ATTEMPT")
        record = {"state": state, "exit_code": int(exit_code), "step": step, "checkpoint": checkpoint,
                  "reason": str(reason), "time": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
                  "attempt": int(attempt) if attempt and attempt.isdigit() else attempt}
        text = json.dumps(record) + "\n"
    except Exception as e:
        _warn(f"run state not recorded: {e}")
        return
    targets = [Path(run_dir) / RUN_STATE_FILE] if run_dir is not None else []
    if os.environ.get("SEQPAR_RUN_STATE"):
        targets.append(Path(os.environ["SEQPAR_RUN_STATE"]))
    for path in targets:
        try:
            _atomic_write(path, text)
        except Exception as e:
            _warn(f"could not write run state {path}: {e}")


def read_run_state(path: Path) -> dict | None:
    """The record in ``path``; None when missing, unreadable or not a run-state record."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("state"), str) else None


def describe(record: dict) -> str:
    """One line for the log: 'preempted at step 120, checkpoint step00000120-seq000000'."""
    state, step = record.get("state"), record.get("step")
    at = f" at step {step}" if step is not None else ""
    reason = f": {record['reason']}" if record.get("reason") else ""
    if state == "running":
        return f"died without recording how it ended; it started{at}"
    if state == "preempted":
        ckpt = f", checkpoint {record['checkpoint']}" if record.get("checkpoint") else ""
        return f"preempted{at}{ckpt}"
    label = {"usage_error": "usage error", "io_error": "checkpoint I/O error"}.get(state, str(state))
    return f"{label}{at}{reason}"


def classify(record: dict | None, launcher_status: int | None, since: float | None = None) -> tuple[int, str]:
    """(status a restart loop should act on, one line saying why).

    0, 75 and 2 from the launcher are trusted (a launcher's own 2 is a usage error too); anything
    else (torchrun's 1, srun's 137, a signal) is replaced by the status the run recorded, if the
    record was written after ``since`` (this attempt's start). No record, an old one, or one still
    saying `running` means the run died without recording its end: 1.
    """
    time_ok = isinstance(record.get("time"), (int, float)) if record else False
    fresh = record is not None and (since is None or (time_ok and record["time"] >= since))
    if launcher_status in (EXIT_FINISHED, EXIT_PREEMPTED, EXIT_USAGE):
        if fresh and record.get("exit_code") == launcher_status:
            return launcher_status, describe(record)
        label = {EXIT_FINISHED: "finished", EXIT_PREEMPTED: "preempted", EXIT_USAGE: "usage error"}[launcher_status]
        return launcher_status, f"{label} (status {launcher_status})"
    if record is None:
        return EXIT_FAILED, "died without recording how it ended (no run-state record)"
    if not fresh:
        return EXIT_FAILED, "died without recording how it ended (the run-state record is older than this attempt)"
    if record["state"] == "running":
        return EXIT_FAILED, describe(record)
    code = record.get("exit_code")
    if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 255:
        code = STATES.get(record["state"], EXIT_FAILED)
    return code, describe(record)


def register_pid() -> Path | None:
    """Create ``$SEQPAR_PID_DIR/<pid>`` so the restart wrapper signals this process (a rank) rather
    than its launcher; removed at exit. Call first thing in ``main()``. Never raises."""
    pid_dir = os.environ.get("SEQPAR_PID_DIR")
    if not pid_dir:
        return None
    try:
        path = Path(pid_dir) / str(os.getpid())
        path.touch()
        atexit.register(unregister_pid)
        return path
    except Exception as e:
        _warn(f"could not register pid in {pid_dir}: {e}")
        return None


def unregister_pid() -> None:
    """Remove this process's ``$SEQPAR_PID_DIR/<pid>`` (idempotent). Never raises."""
    pid_dir = os.environ.get("SEQPAR_PID_DIR")
    if pid_dir:
        try:
            (Path(pid_dir) / str(os.getpid())).unlink(missing_ok=True)
        except Exception:
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m seqpar.checkpoint.runstate",
                                description="Read a seqpar run-state record (for restart scripts).")
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="print how the run ended; exit with the status to act on "
                                       "(0 finished, 75 preempted, 2 usage error, 74 I/O error, 1 other)")
    st.add_argument("file", type=Path)
    st.add_argument("--since", type=float, default=None, help="ignore a record written before this epoch time")
    st.add_argument("--launcher-status", type=int, default=None, help="the launcher's exit status")
    args = p.parse_args(argv)
    code, line = classify(read_run_state(args.file), args.launcher_status, args.since)
    print(line, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
