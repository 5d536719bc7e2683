#!/usr/bin/env bash
# Run one robustjax experiment on every host of a Cloud TPU VM or TPU pod slice, from your
# workstation.
#
# Needs: the gcloud CLI, authenticated, with a project set (`gcloud auth login`, `gcloud config
# set project PROJECT`); a TPU VM / pod slice already created, e.g.
#   gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b \
#     --accelerator-type=v4-16 --version=tpu-ubuntu2204-base
# (any image: the hosts get a Python that current jax supports, see below); this checkout, with
# Python >= 3.11 and pip on your workstation to build the wheel.
#
# What it does:
#   1. builds ONE wheel of this checkout (uncommitted edits included; its git revision and
#      sha256 are printed) and copies it to every host (`tpu-vm scp --worker=all`): every host
#      runs the same code, and each process checks at start that all of them do;
#   2. setup on every host, once (skipped when this wheel is already installed): a virtual
#      environment ~/robustjax-venv with Python >= 3.11 (the image's python3 when recent enough,
#      else Python $PYTHON_VERSION fetched by `uv`, as the images with Python 3.10 need), a
#      current `jax[tpu]` (installed once, not on every run) and the wheel;
#   3. run: `python3 -m robustjax train` in every host's venv; with several hosts each gets
#      --num_processes and jax.distributed.initialize() reads the coordinator and its process id
#      from the TPU metadata. Detached by default (nohup; the job survives your laptop's SSH
#      session): follow it with MODE=logs, stop it with MODE=stop.
#
# Usage:
#   TPU_NAME=my-tpu ZONE=us-central2-b launch/tpu_vm.sh [robustjax train flags ...]
#   TPU_NAME=my-tpu ZONE=us-central2-b WORKDIR=/mnt/shared/run1 launch/tpu_vm.sh \
#     --config.num_workers=256 --config.rule=nnm+krum
#   MODE=logs TPU_NAME=... ZONE=... launch/tpu_vm.sh      # the last lines of worker 0's log
# Environment (optional): PROJECT; CONFIG (a shipped config name or a path on the hosts; default
#   default); WORKDIR (default ~/robustjax_runs/<hash of CONFIG and flags>: the same command
#   resumes, a different one gets its own folder); NUM_HOSTS (read from gcloud when unset);
#   MODE (all | setup | run | logs | stop; default all); DETACH (1, or 0 to stay attached);
#   PYTHON_VERSION (3.12); JAX_SPEC ("jax[tpu]").
#
# Checkpoints: with several hosts every process writes the orbax checkpoints, so WORKDIR must be
# a directory all hosts share (a gcsfuse or Filestore mount); a local folder per host is refused
# at start by every process. Without one, pass --config.checkpoint_every=0.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM / pod slice name}"
: "${ZONE:?set ZONE, e.g. us-central2-b}"
CONFIG="${CONFIG:-default}"
MODE="${MODE:-all}"
DETACH="${DETACH:-1}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
here="$(cd "$(dirname "$0")/.." && pwd)"
gflags=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then gflags+=(--project="$PROJECT"); fi

if [[ -z "${NUM_HOSTS:-}" ]]; then
  # One network endpoint per host.
  endpoints="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${gflags[@]}" \
    --format='value(networkEndpoints[].ipAddress)')"
  NUM_HOSTS="$(tr ';,' '\n\n' <<<"$endpoints" | grep -c . || true)"
  NUM_HOSTS="${NUM_HOSTS:-1}"
fi
run_hash="$(printf '%s\n' "$CONFIG" "$@" | sha1sum | cut -c1-10)"
if [[ -z "${WORKDIR:-}" ]]; then
  if ((NUM_HOSTS > 1)) && [[ " $* " != *" --config.checkpoint_every=0 "* ]] \
    && [[ "$MODE" == all || "$MODE" == run ]]; then
    echo "$NUM_HOSTS hosts write the checkpoints: set WORKDIR to a directory they all share" \
      "(a gcsfuse or Filestore mount), or pass --config.checkpoint_every=0" >&2
    exit 2
  fi
  WORKDIR="\$HOME/robustjax_runs/$run_hash"
fi
echo "TPU $TPU_NAME ($ZONE): $NUM_HOSTS host(s), mode $MODE, workdir $WORKDIR"

ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gflags[@]}" --worker=all --command="$1"; }

if [[ "$MODE" == logs ]]; then
  exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gflags[@]}" --worker=0 \
    --command="tail -n 50 $WORKDIR.log"
fi
if [[ "$MODE" == stop ]]; then
  ssh_all "pkill -INT -f 'robustjax train' || true"
  exit 0
fi
if [[ "$MODE" != all && "$MODE" != setup && "$MODE" != run ]]; then
  echo "MODE must be all, setup, run, logs or stop; got $MODE" >&2
  exit 2
fi

venv="\$HOME/robustjax-venv"
if [[ "$MODE" != run ]]; then
  # 1. One wheel, every host.
  build="$(mktemp -d)"
  # Reproducible: the same sources give the same bytes (and the hosts skip the reinstall).
  SOURCE_DATE_EPOCH="$(git -C "$here" log -1 --format=%ct 2>/dev/null || echo 315532800)" \
    python3 -m pip wheel -q --no-deps --no-cache-dir -w "$build" "$here"
  wheel="$(ls "$build"/robustjax-*.whl)"
  sha="$(sha256sum "$wheel" | cut -c1-16)"
  rev="$(git -C "$here" describe --always --dirty 2>/dev/null || echo 'not a git checkout')"
  echo "shipping $(basename "$wheel") (sha256 $sha…, revision $rev) to every host"
  dest="robustjax_dist/$sha"
  ssh_all "mkdir -p \$HOME/$dest"
  gcloud compute tpus tpu-vm scp "$wheel" "$TPU_NAME:~/$dest/" "${gflags[@]}" --worker=all
  # 2. Setup, once per wheel.
  ssh_all "set -e
if [ \"\$(cat \$HOME/robustjax_dist/installed 2>/dev/null)\" = $sha ]; then
  echo \"\$(hostname): robustjax $sha already installed\"; exit 0
fi
if [ ! -x $venv/bin/python ]; then
  if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    python3 -m venv $venv
  else
    python3 -m pip install -q --user uv
    \$HOME/.local/bin/uv venv --seed --python $PYTHON_VERSION $venv
  fi
fi
$venv/bin/python -c 'import jax' 2>/dev/null || $venv/bin/python -m pip install -q -U '$JAX_SPEC'
wheel=\$(ls \$HOME/$dest/robustjax-*.whl)
$venv/bin/python -m pip install -q \"\$wheel[experiments]\"
$venv/bin/python -m pip install -q --force-reinstall --no-deps \"\$wheel\"
echo $sha > \$HOME/robustjax_dist/installed
echo \"\$(hostname): \$($venv/bin/python -c 'import jax, robustjax; print(\"jax\", jax.__version__, \"robustjax\", robustjax.__version__)')\""
fi
if [[ "$MODE" == setup ]]; then exit 0; fi

# 3. Run (the user's flags quoted for the remote shell).
extra=""
for arg in "$@"; do extra+=" $(printf '%q' "$arg")"; done
dist=""
if ((NUM_HOSTS > 1)); then dist=" --num_processes=$NUM_HOSTS"; fi
train="$venv/bin/python -m robustjax train --config=$CONFIG --workdir=$WORKDIR$dist$extra"
if [[ "$DETACH" == 1 ]]; then
  ssh_all "mkdir -p \$(dirname $WORKDIR) && nohup $train > $WORKDIR.log 2>&1 < /dev/null &
echo \"\$(hostname): started; log $WORKDIR.log\""
  echo "detached; follow with: MODE=logs TPU_NAME=$TPU_NAME ZONE=$ZONE $0"
else
  ssh_all "mkdir -p \$(dirname $WORKDIR) && $train"
fi
