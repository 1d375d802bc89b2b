#!/usr/bin/env bash
# Keep a seqpar run going across preemptions and crashes (torchrun, a Kubernetes pod, a shell):
#   scripts/auto_restart.sh torchrun --nproc_per_node 8 seqpar/train.py --config C.yaml
# Every attempt gets --resume auto appended (it resumes from the newest verified checkpoint) and
#   SEQPAR_ATTEMPT=<n>          1, 2, ... (recorded in the run-state file)
#   SEQPAR_RUN_STATE=<file>     rank 0 records how the run ended there (seqpar/checkpoint/runstate.py):
#                               launchers do not pass seqpar's exit status through (torchrun says 1)
#   SEQPAR_PID_DIR=<dir>        every rank creates <dir>/<pid> while it runs
# After an attempt, `python -m seqpar.checkpoint.runstate status` decides:
#   0  finished                       -> exit 0
#   75 preempted (checkpoint saved)   -> restart at once; exit 75 if this script was signalled
#   2  config / resume error, training diverged (train.max_skipped_steps), or the checkpoint dir
#      is locked by another job -> exit 2, no retry
#   74 checkpoint I/O error, 1 other  -> restart after BACKOFF_S; after MAX_RESTARTS such failures,
#                                        exit with that status (preemptions do not count)
# SIGTERM / SIGUSR1 / SIGINT to this script go to the registered ranks (INT as TERM: the ranks save
# on TERM and USR1, and background jobs of a script start with INT ignored, which seqpar keeps); they save at the next
# micro-batch and exit 75, and the script exits 75 (Kubernetes podFailurePolicy / Slurm requeue:
# "preempted, run me again"). Not to the launcher: the deepspeed runner leaves its ranks running
# as orphans and torchrun stops its workers on its own schedule. Nor to every leaf of the process
# tree: data-loader workers and helper processes must not get it. Before any rank has registered
# (start-up: nothing to save, the newest checkpoint stays the resume point) the launcher gets
# SIGTERM, which torchrun handles by stopping its workers (USR1 would kill it outright); ranks that
# register later (a `deepspeed` runner's) still get the signal, and ranks outliving their launcher
# are waited for. A repeated signal is forwarded again. Once signalled, the script exits 75 unless
# the run finished (0) or hit a usage error (2).
# Works as PID 1 of a container (make it the entry point): the kernel delivers to PID 1 only the
# signals it has handlers for, and these traps are handlers; bash also reaps orphaned processes.
# Kubernetes sends SIGTERM, then SIGKILL after terminationGracePeriodSeconds: make that longer
# than one micro-batch plus a checkpoint save.
# Env: MAX_RESTARTS (100), BACKOFF_S (30), ORPHAN_WAIT_S (120: how long ranks that outlive their
# launcher may go on saving before they are killed), PYTHON (python3: runs the run-state check).
set -u
MAX_RESTARTS=${MAX_RESTARTS:-100}
BACKOFF_S=${BACKOFF_S:-30}
ORPHAN_WAIT_S=${ORPHAN_WAIT_S:-120}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/seqpar-restart.XXXXXX") || exit 1
trap 'rm -rf "$work"' EXIT
child=0 stopping=0 interrupted=0 pending="" sent=" " piddir=""
say() { echo "auto_restart: $*"; }
nap() {  # sleep; a trapped signal ends it at once
  local pid
  sleep "$1" & pid=$!
  wait "$pid"; kill "$pid" 2>/dev/null
}

ranks() {  # registered ranks alive now; the pid must carry our SEQPAR_PID_DIR (a reused pid does not)
  local f pid
  [ -n "$piddir" ] || return 0
  for f in "$piddir"/*; do
    pid=${f##*/}
    case $pid in '' | *[!0-9]*) continue ;; esac
    kill -0 "$pid" 2>/dev/null || continue
    if [ -r "/proc/$pid/environ" ]; then
      tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "SEQPAR_PID_DIR=$piddir" || continue
    fi
    echo "$pid"
  done
}

deliver() {  # send the pending signal to ranks that have not had it yet; 1 if none is registered
  local pid found=1
  for pid in $(ranks); do
    found=0
    case $sent in *" $pid "*) continue ;; esac
    kill -"$pending" "$pid" 2>/dev/null && sent="$sent$pid "
  done
  return $found
}

on_signal() {  # $1: the signal received, $2: the one the ranks get
  stopping=1 pending=$2 sent=" " interrupted=1
  [ "$child" -gt 0 ] || return 0
  if deliver; then
    say "$1 received: forwarded $2 to ranks${sent% }"
  else
    say "$1 received before any rank registered: SIGTERM to the launcher (pid $child)"
    kill -TERM "$child" 2>/dev/null
  fi
}
trap 'on_signal TERM TERM' TERM
trap 'on_signal USR1 USR1' USR1
trap 'on_signal INT TERM' INT

wait_run() {  # wait for the launcher and then for ranks outliving it; sets status
  local deadline left
  while :; do
    if [ -n "$pending" ]; then  # poll: ranks that register after the signal must get it too
      nap 1
      deliver
      kill -0 "$child" 2>/dev/null && continue
    fi
    interrupted=0
    wait "$child"; status=$?
    # a trap interrupts wait (status > 128) while the launcher runs on: wait again
    [ "$interrupted" -eq 1 ] && [ "$status" -gt 128 ] && continue
    break
  done
  child=0
  deadline=$((SECONDS + ORPHAN_WAIT_S))
  while left=$(ranks) && [ -n "$left" ]; do  # e.g. a deepspeed runner that died before its ranks
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "killing ranks that outlived the launcher by ${ORPHAN_WAIT_S}s:" $left
      kill -KILL $left 2>/dev/null
      break
    fi
    [ -n "$pending" ] && deliver
    nap 1
  done
}

attempt=0 failures=0
while :; do
  attempt=$((attempt + 1))
  piddir="$work/pids-$attempt" state="$work/run_state-$attempt.json"
  mkdir -p "$piddir"
  started=$(date +%s)
  [ "$stopping" -eq 1 ] && { say "stopped by signal before attempt $attempt, exit 75"; exit 75; }
  SEQPAR_ATTEMPT=$attempt SEQPAR_RUN_STATE=$state SEQPAR_PID_DIR=$piddir "$@" --resume auto &
  child=$!
  wait_run
  line=$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" -m seqpar.checkpoint.runstate \
    status "$state" --since "$started" --launcher-status "$status")
  code=$?
  if [ -z "$line" ]; then  # the check itself failed (no python / seqpar): act on the launcher's status
    code=$status line="run-state check failed; using the launcher's status"
  fi
  result="attempt $attempt (status $status): $line"
  case $code in
    0) say "$result; done"; exit 0 ;;
    2) say "$result; not retrying, exit 2"; exit 2 ;;
  esac
  if [ "$stopping" -eq 1 ]; then say "$result; stopped by signal, exit 75"; exit 75; fi
  if [ "$code" -eq 75 ]; then
    delay=0
  else
    delay=$BACKOFF_S failures=$((failures + 1))
    if [ "$failures" -gt "$MAX_RESTARTS" ]; then say "$result; giving up after $MAX_RESTARTS failed attempts"; exit "$code"; fi
  fi
  say "$result; restart in ${delay}s"
  nap "$delay"
done
