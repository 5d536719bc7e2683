#!/usr/bin/env bash
# Try the multi-host path on one machine: N CPU processes joined by jax.distributed.initialize().
#
# Needs: robustjax installed (`pip install -e .` or the wheel) in $PYTHON (default python3), and a
# free local TCP port. Runs from any directory.
#
# Every process runs the same `robustjax train` command with
#   --coordinator_address=localhost:$PORT --num_processes=$NUM_PROCESSES --process_id=$i
#   --expect_devices=$((NUM_PROCESSES * DEVICES_PER_PROCESS))
# and XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS, so the mesh spans
# NUM_PROCESSES x DEVICES_PER_PROCESS CPU devices and the worker axis is sharded across processes
# exactly as on a TPU pod slice or a multi-node GPU job (cross-process CPU collectives: gloo).
#
# Usage (environment variables, all optional; extra arguments go to `robustjax train`):
#   launch/local_multiprocess.sh
#   NUM_PROCESSES=4 DEVICES_PER_PROCESS=2 CONFIG=default \
#     launch/local_multiprocess.sh --config.num_steps=50 --config.rule=nnm+krum
#
# WORKDIR defaults to /tmp/robustjax_multiprocess/<hash of the config and arguments>: the same
# command resumes its run, a different one gets its own folder. Output: $WORKDIR (metrics.jsonl,
# summary.json, curves.png, tensorboard/, checkpoints/) and one log per process in
# $WORKDIR.logs/process_<i>.log. The first process to fail ends the others; exit status non-zero
# if any failed.
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PORT="${PORT:-12355}"
CONFIG="${CONFIG:-default:smoke}"
PYTHON="${PYTHON:-python3}"
run_hash="$(printf '%s\n' "$NUM_PROCESSES $DEVICES_PER_PROCESS $CONFIG" "$@" | sha1sum | cut -c1-10)"
WORKDIR="${WORKDIR:-/tmp/robustjax_multiprocess/$run_hash}"
LOGS="$WORKDIR.logs"
mkdir -p "$LOGS"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

echo "starting $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices" \
  "(coordinator localhost:$PORT, config $CONFIG, workdir $WORKDIR)"
for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
    "$PYTHON" -m robustjax train \
      --config="$CONFIG" \
      --workdir="$WORKDIR" \
      --coordinator_address="localhost:$PORT" \
      --num_processes="$NUM_PROCESSES" \
      --process_id="$i" \
      --expect_devices="$((NUM_PROCESSES * DEVICES_PER_PROCESS))" \
      "$@" >"$LOGS/process_$i.log" 2>&1 &
  pids+=("$!")
done

# Wait for the processes in the order they end; the first failure stops the rest.
status=0
for ((left = NUM_PROCESSES; left > 0; left--)); do
  set +e
  wait -n "${pids[@]}"
  rc=$?
  set -e
  if ((rc != 0)); then
    status=1
    echo "a process failed (exit $rc); stopping the others"
    stop_all
    break
  fi
done
wait 2>/dev/null || true

for ((i = 0; i < NUM_PROCESSES; i++)); do
  echo "--- process $i (last lines of $LOGS/process_$i.log) ---"
  tail -n 3 "$LOGS/process_$i.log"
done
exit "$status"
