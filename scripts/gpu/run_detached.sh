#!/usr/bin/env bash
# For the device tool's calls of at most 10 minutes: runs the command given (e.g.
# `scripts/gpu/run_detached.sh scripts/gpu/bench_kernels.sh`) in a session of its own, so it
# outlives the call, with OUT=/tmp/detached and its output in /tmp/detached/output.log; then
# waits up to WAIT seconds (default 540) and packs /tmp/detached into $OUT/detached.tgz (one file:
# the tool returns at most 8), and files the command left in /tmp/detached_extra beside it (each
# under 16 MiB, e.g. bench_kernels.sh's Triton cache). Called again without a command (in the
# next call, while the machine is still held), it waits again and packs what is there. STOP=1
# (no command) stops a running one: every process of its session, compute-sanitizer's tests under
# `timeout` included (a `pkill -f` pattern matches the calling command's own line and kills it).
set -uo pipefail
cd "$(dirname "$0")/../.."
DIR=/tmp/detached
OUT=${OUT:-gpu-out}
mkdir -p "$DIR" "$OUT"
if [ -n "${STOP:-}" ]; then
  if [ -e "$DIR/running" ] && [ -f "$DIR/session" ]; then
    pkill -s "$(cat "$DIR/session")"
    sleep 2
    echo "stopped: $(cat "$DIR/running")" && echo stopped >"$DIR/exit_code" && rm -f "$DIR/running"
  else
    echo "nothing detached is running"
  fi
fi
if [ $# -gt 0 ]; then
  if [ -e "$DIR/running" ]; then echo "a detached command is still running: $(cat "$DIR/running")"; exit 1; fi
  rm -rf "${DIR:?}"/* /tmp/detached_extra
  echo "$*" >"$DIR/running"
  setsid bash -c 'echo $$ >/tmp/detached/session; OUT=/tmp/detached "$@" >/tmp/detached/output.log 2>&1; echo $? >/tmp/detached/exit_code; rm -f /tmp/detached/running' \
    _ "$@" </dev/null >/dev/null 2>&1 &
fi
end=$((SECONDS + ${WAIT:-540}))
while [ -e "$DIR/running" ] && [ $SECONDS -lt $end ]; do sleep 2; done
if [ -e "$DIR/exit_code" ]; then
  echo "finished with exit code $(cat "$DIR/exit_code")"
else
  echo "still running after ${WAIT:-540} s: call scripts/gpu/run_detached.sh again (no command) to wait on"
fi
tail -n 40 "$DIR/output.log" 2>/dev/null
tar czf "$OUT/detached.tgz" -C /tmp detached
for extra in /tmp/detached_extra/*; do if [ -f "$extra" ]; then cp "$extra" "$OUT/"; fi; done
