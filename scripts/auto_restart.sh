#!/usr/bin/env bash
# Keep a seqpar run going across preemptions and crashes (torchrun, a Kubernetes pod, a shell):
#   scripts/auto_restart.sh torchrun --nproc_per_node 8 seqpar/train.py --config C.yaml
# Each attempt resumes from the newest verified checkpoint (--resume auto is appended). Exit 0 ends
# the loop (training finished); 75 (seqpar saved after SIGTERM/SIGUSR1) restarts at once; any other
# status restarts after a back-off, up to MAX_RESTARTS times. SIGTERM/SIGUSR1 sent to this script
# are forwarded to the *ranks* (the leaves of the process tree: python itself, or the workers of
# torchrun / the deepspeed runner, which would otherwise stop their workers on their own terms);
# the ranks save and exit, and the script exits with the run's status.
set -u
MAX_RESTARTS=${MAX_RESTARTS:-100}
BACKOFF_S=${BACKOFF_S:-30}
attempt=0
child=0
leaves() {  # processes under $1 that have no children of their own
  local kids; kids=$(pgrep -P "$1")
  if [ -z "$kids" ]; then echo "$1"; return; fi
  for k in $kids; do leaves "$k"; done
}
forward() {
  stopping=1
  [ "$child" -gt 0 ] || return 0
  for pid in $(leaves "$child"); do kill -"$1" "$pid" 2>/dev/null; done
}
stopping=0
trap 'forward TERM' TERM
trap 'forward USR1' USR1

while :; do
  "$@" --resume auto &
  child=$!
  while :; do
    wait "$child"; status=$?
    kill -0 "$child" 2>/dev/null || break   # still running: wait was interrupted by a trap
  done
  child=0
  if [ "$status" -eq 0 ]; then echo "auto_restart: finished"; exit 0; fi
  if [ "$stopping" -eq 1 ]; then echo "auto_restart: stopped by signal (status $status)"; exit "$status"; fi
  attempt=$((attempt + 1))
  if [ "$attempt" -gt "$MAX_RESTARTS" ]; then echo "auto_restart: giving up after $MAX_RESTARTS restarts"; exit "$status"; fi
  if [ "$status" -eq 75 ]; then delay=0; else delay=$BACKOFF_S; fi
  echo "auto_restart: run exited with $status; restart $attempt in ${delay}s"
  sleep "$delay"
done
