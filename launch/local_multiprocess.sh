#!/usr/bin/env bash
# Try the multi-host path on one machine: N CPU processes joined by jax.distributed.initialize().
#
# Needs: this repository checked out and installed (`pip install -e .`), Python with jax (CPU is
# enough), and a free local TCP port. Run from the repository root.
#
# Every process runs the same experiments/train.py command with
#   --coordinator_address=localhost:$PORT --num_processes=$NUM_PROCESSES --process_id=$i
# and XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS, so the mesh spans
# NUM_PROCESSES x DEVICES_PER_PROCESS CPU devices and the worker axis is sharded across processes
# exactly as on a TPU pod slice or a multi-node GPU job (cross-process CPU collectives: gloo).
#
# Usage (environment variables, all optional; extra arguments go to train.py):
#   launch/local_multiprocess.sh
#   NUM_PROCESSES=4 DEVICES_PER_PROCESS=2 CONFIG=experiments/configs/default.py \
#     launch/local_multiprocess.sh --config.num_steps=50 --config.rule=nnm+krum
#
# Output: $WORKDIR (metrics.jsonl, summary.json, checkpoints/) and one log per process in
# $WORKDIR/logs/process_<i>.log. Exit status: non-zero if any process failed.
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PORT="${PORT:-12355}"
CONFIG="${CONFIG:-experiments/configs/default.py:smoke}"
WORKDIR="${WORKDIR:-/tmp/robustjax_multiprocess}"
PYTHON="${PYTHON:-python}"

cd "$(dirname "$0")/.."
mkdir -p "$WORKDIR/logs"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup INT TERM

echo "starting $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices" \
  "(coordinator localhost:$PORT, config $CONFIG, workdir $WORKDIR)"
for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
    "$PYTHON" experiments/train.py \
      --config="$CONFIG" \
      --workdir="$WORKDIR" \
      --coordinator_address="localhost:$PORT" \
      --num_processes="$NUM_PROCESSES" \
      --process_id="$i" \
      "$@" >"$WORKDIR/logs/process_$i.log" 2>&1 &
  pids+=("$!")
done

status=0
for ((i = 0; i < NUM_PROCESSES; i++)); do
  if wait "${pids[$i]}"; then
    echo "process $i: ok"
  else
    rc=$?
    echo "process $i: FAILED (exit $rc); see $WORKDIR/logs/process_$i.log"
    status=1
  fi
done

echo "--- process 0 (last lines) ---"
tail -n 5 "$WORKDIR/logs/process_0.log"
exit "$status"
