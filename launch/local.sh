#!/usr/bin/env bash
# Pretrain on this machine: one process, or N processes on localhost (a multi-host rehearsal).
#
#   launch/local.sh [--dry-run] [--config FILE] [--workdir DIR] [--cpu-devices N]
#                   [--processes N] [--port PORT] [-- ARGS FOR mocojax.main...]
#
#   launch/local.sh                                   # configs/demo.py into runs/demo
#   launch/local.sh --cpu-devices 8                   # 8 virtual CPU devices, 1 process
#   launch/local.sh --processes 2 --cpu-devices 4     # 2 processes x 4 CPU devices, as 2 hosts
#   launch/local.sh -- --config.batch_size=512        # any config override after --
#
# With --processes N every process runs the same command plus --coordinator_address,
# --num_processes and --process_id (mocojax/distributed.py); process i logs to
# WORKDIR/logs/process_i.log and process 0 also to the terminal. --dry-run prints the
# commands and runs nothing.
set -euo pipefail
# show/run (launch/lib.sh): print a command pasteably, run it unless --dry-run.
# shellcheck source=/dev/null  # lib.sh is checked on its own (tests/test_plan.py)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DRY_RUN=0
CONFIG=configs/demo.py
WORKDIR=runs/demo
CPU_DEVICES=
PROCESSES=1
PORT=12355
PYTHON=${PYTHON:-python3}
EXTRA=()

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --config) CONFIG=$2; shift ;;
    --workdir) WORKDIR=$2; shift ;;
    --cpu-devices) CPU_DEVICES=$2; shift ;;
    --processes) PROCESSES=$2; shift ;;
    --port) PORT=$2; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "local.sh: unknown option $1" >&2; usage 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.."


ENV=()
if [[ -n $CPU_DEVICES ]]; then
  # Virtual devices exist only on the CPU backend; the flag must be set before JAX starts.
  # XLA:CPU aborts the process when one virtual device reaches a collective 60 s after the others
  # (in-process), and a cross-process collective times out too; a busy laptop can be that slow,
  # so the limits are raised to 5 and 20 minutes.
  FLAGS="--xla_force_host_platform_device_count=$CPU_DEVICES"
  FLAGS+=" --xla_cpu_collective_call_terminate_timeout_seconds=300"
  FLAGS+=" --xla_cpu_collective_timeout_seconds=1200"
  ENV=(env "XLA_FLAGS=$FLAGS" JAX_PLATFORMS=cpu)
fi
MAIN=("$PYTHON" -m mocojax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")

if [[ $PROCESSES == 1 ]]; then
  run_exec "${ENV[@]}" "${MAIN[@]}"  # signals sent to this script reach the trainer
  exit 0
fi

run mkdir -p "$WORKDIR/logs"
PIDS=()
for ((i = PROCESSES - 1; i >= 0; i--)); do  # process 0 last, in the foreground
  CMD=("${ENV[@]}" "${MAIN[@]}" "--coordinator_address=localhost:$PORT"
       "--num_processes=$PROCESSES" "--process_id=$i")
  if [[ $i == 0 ]]; then
    show "${CMD[@]}"; printf ' 2>&1 | tee %q &\n' "$WORKDIR/logs/process_0.log"
    if [[ $DRY_RUN == 0 ]]; then
      "${CMD[@]}" > >(tee "$WORKDIR/logs/process_0.log") 2>&1 &
      PIDS+=($!)
    fi
  else
    show "${CMD[@]}"; printf ' > %q 2>&1 &\n' "$WORKDIR/logs/process_$i.log"
    if [[ $DRY_RUN == 0 ]]; then
      "${CMD[@]}" > "$WORKDIR/logs/process_$i.log" 2>&1 &
      PIDS+=($!)
    fi
  fi
done
# SIGTERM/SIGINT to this script go to every process: JAX's preemption service then agrees
# on one step that all of them save before exiting.
trap 'kill -TERM "${PIDS[@]}" 2>/dev/null' TERM INT
STATUS=0
for pid in "${PIDS[@]}"; do
  # wait returns early when a trapped signal arrives; wait again for the process itself.
  while true; do
    set +e; wait "$pid"; rc=$?; set -e
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if [[ $rc != 0 ]]; then STATUS=$rc; fi
done
exit "$STATUS"
