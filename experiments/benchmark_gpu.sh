#!/usr/bin/env bash
# The GPU benchmark, one script (293 s on one H200 on 2026-12-04, BENCHMARKS.md; rerunnable):
#   1. every aggregator and pre-aggregator, and the pipelines, on one (n, d) stack, with the HBM
#      floor (one streaming pass, `ones(n) @ x`), the Gram product (`x @ x.T`: cuBLAS on a GPU)
#      and the measured matmul peak (benchmark_aggregators.py prints all three); each timed run
#      dispatches 10 calls back to back, so that the host's dispatch stays out of the times;
#   2. the training step's throughput (vmapped workers) at n = 128 and 1024, trimmed mean under ALIE;
#   3. the coordinate-wise rules' cost per worker from n = 128 to 1024 (`--scaling`).
# Outputs: $OUT/aggregators.json, $OUT/scaling.json, $OUT/*.txt (the printed tables); paste them
# into BENCHMARKS.md. A failing section does not stop the next (the script exits 1 at the end).
#
#   OUT=/tmp/gpu bash experiments/benchmark_gpu.sh            # the full sizes
#   SMALL=1 OUT=/tmp/gpu_small bash experiments/benchmark_gpu.sh   # seconds, any machine (a test)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/robustjax_gpu_bench}
PY=${PYTHON:-python}  # PYTHON=python3 where no `python` is on the PATH
mkdir -p "$OUT"
if [[ -n "${SMALL:-}" ]]; then
  N=16 D=20000 F=3 PEAK=256 REPEATS=2 NS=16,32 MIN_TIME=0.1 STEPS=20 SCALE_NS=16,24 SCALE_D=1000
  RULES=mean,median,trimmed_mean,krum,multikrum,nnm
else
  N=64 D=1000000 F=8 PEAK=8192 REPEATS=5 NS=128,1024 MIN_TIME=2 STEPS=300
  SCALE_NS=128,129,256,1024 SCALE_D=100000
  RULES=""
fi
PIPELINES="clipping(c=1.0)+mean,arc+trimmed_mean,bucketing+median,nnm+krum,nnm+trimmed_mean"
failed=()
# One section: its table on stdout and in $OUT/<name>.txt, its wall time, and on failure the
# next section still runs (the script exits 1 at the end).
section() {
  local name=$1
  shift
  local t0=$SECONDS
  echo "## $name"
  "$@" 2>&1 | grep -v -i 'warning\|xla_bridge' | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "## $name: exit $rc after $((SECONDS - t0)) s"
  [[ $rc -eq 0 ]] || failed+=("$name")
}
"$PY" -c 'import jax, flax, optax, platform
print("# devices:", jax.devices(), "| jax", jax.__version__, "flax", flax.__version__,
      "optax", optax.__version__, "| python", platform.python_version())' | tee "$OUT/devices.txt"
rules=${RULES:+$RULES,}$PIPELINES
if [[ -z "$RULES" ]]; then
  rules="$("$PY" -c 'from robustjax import aggregators, preaggregators as p
print(",".join(aggregators.names() + p.names()))'),$PIPELINES"
fi
section aggregators "$PY" experiments/benchmark_aggregators.py --n=$N --d=$D --f=$F \
  --repeats=$REPEATS --peak_size=$PEAK --rules="$rules" --json_out="$OUT/aggregators.json" \
  --calls_per_time=10
section training "$PY" experiments/benchmark_training.py --ns=$NS --loop_max_n=0 \
  --rule=trimmed_mean --f=$((N / 8)) --attack=alie --min_time=$MIN_TIME --train_steps=$STEPS
section scaling "$PY" experiments/benchmark_aggregators.py --scaling=$SCALE_NS \
  --scaling_d=$SCALE_D --repeats=$REPEATS --json_out="$OUT/scaling.json" --calls_per_time=10
echo "# wrote $OUT"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "# failed: ${failed[*]}" >&2
  exit 1
fi
