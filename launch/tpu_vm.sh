#!/usr/bin/env bash
# Start the same robustjax experiment on every host of a Cloud TPU VM or TPU pod slice.
#
# Needs: the gcloud CLI, authenticated, with a project set (`gcloud auth login`,
# `gcloud config set project PROJECT`); a TPU VM / pod slice already created, e.g.
#   gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b \
#     --accelerator-type=v4-16 --version=tpu-ubuntu2204-base
# and REPO_URL: a git URL of this repository that the TPU hosts can clone (a public URL, or a
# private one with credentials on the hosts). Run it from your workstation, not on the TPU.
#
# One command: `gcloud compute tpus tpu-vm ssh --worker=all --command=...` runs on every host
#   1. setup: a current `jax[tpu]`, then clone (or update) the repository and `pip install -e`;
#   2. run:   experiments/train.py with the same config on every host. With more than one host,
#      each process gets --num_processes=$NUM_HOSTS and jax.distributed.initialize() (called by
#      train.py) detects the coordinator address and its process id from the TPU metadata; the
#      worker axis of the simulation is then sharded over every TPU core of the slice.
#
# Usage:
#   TPU_NAME=my-tpu ZONE=us-central2-b REPO_URL=https://github.com/ORG/robustjax.git \
#     launch/tpu_vm.sh [--config.num_workers=64 --config.rule=nnm+krum ...]
# Environment (optional): PROJECT, BRANCH (main), CONFIG (experiments/configs/default.py),
#   WORKDIR (run dir on each host, ~/robustjax_runs/run), NUM_HOSTS (read from gcloud when unset),
#   MODE (all | setup | run; default all), DETACH=1 (run under nohup, log in $WORKDIR.log, return).
#
# Checkpoints: WORKDIR is a local directory on every host; process 0 writes metrics.jsonl and
# summary.json there. Orbax checkpoints of arrays sharded over several hosts need a directory all
# hosts share (an NFS or gcsfuse mount); without one, pass --config.checkpoint_every=0.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM / pod slice name}"
: "${ZONE:?set ZONE, e.g. us-central2-b}"
: "${REPO_URL:?set REPO_URL to a git URL of this repository}"
BRANCH="${BRANCH:-main}"
CONFIG="${CONFIG:-experiments/configs/default.py}"
WORKDIR="${WORKDIR:-\$HOME/robustjax_runs/run}"
MODE="${MODE:-all}"
DETACH="${DETACH:-0}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi

if [[ -z "${NUM_HOSTS:-}" ]]; then
  # One network endpoint per host.
  endpoints="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
    --format='value(networkEndpoints[].ipAddress)')"
  NUM_HOSTS="$(tr ';,' '\n\n' <<<"$endpoints" | grep -c . || true)"
  NUM_HOSTS="${NUM_HOSTS:-1}"
fi
echo "TPU $TPU_NAME ($ZONE): $NUM_HOSTS host(s), mode $MODE"

# Quote the user's extra train.py flags for the remote shell.
extra=""
for arg in "$@"; do extra+=" $(printf '%q' "$arg")"; done

setup="set -e
pip install -q -U 'jax[tpu]'
if [ -d \$HOME/robustjax/.git ]; then
  git -C \$HOME/robustjax fetch -q origin $BRANCH && git -C \$HOME/robustjax checkout -q FETCH_HEAD
else
  git clone -q --branch $BRANCH $REPO_URL \$HOME/robustjax
fi
pip install -q -e \"\$HOME/robustjax[experiments]\""

dist=""
if ((NUM_HOSTS > 1)); then dist="--num_processes=$NUM_HOSTS"; fi
train="cd \$HOME/robustjax && mkdir -p $WORKDIR && python experiments/train.py \
--config=$CONFIG --workdir=$WORKDIR $dist$extra"
if [[ "$DETACH" == 1 ]]; then
  train="cd \$HOME/robustjax && mkdir -p $WORKDIR && nohup python experiments/train.py \
--config=$CONFIG --workdir=$WORKDIR $dist$extra > $WORKDIR.log 2>&1 &"
fi

case "$MODE" in
  all) command="$setup
$train" ;;
  setup) command="$setup" ;;
  run) command="$train" ;;
  *) echo "MODE must be all, setup or run; got $MODE" >&2; exit 2 ;;
esac

exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
  --worker=all --command="$command"
