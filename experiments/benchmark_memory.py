r"""Peak memory and compile time of one training step at many workers.

For each (n, rule) a fresh process (so that its peak resident memory, VmHWM, is its own) builds
the robust D-SGD step for an MLP of about `--params` parameters on a synthetic 10-class Gaussian
mixture in dimension 64 with `--samples` training samples (the embedded digits have too few
samples for 4096 workers; `data.synthetic_classification`), batch
`--batch_size` per worker, worker momentum, f = n/8 Byzantine workers under ALIE), compiles it,
reads XLA's memory analysis of the compiled step, and runs `--steps` steps. Columns: n, rule,
parameters P, compile seconds, seconds per step, peak RSS (GiB), XLA's temporary buffers (GiB),
and those temporaries in units of one (n, P) float32 stack: a rule that built an O(n²·P) or
O(n·(n − f)·P) intermediate would show a ratio growing like n.

  python experiments/benchmark_memory.py                       # the BENCHMARKS.md table
  python experiments/benchmark_memory.py --ns=128,1024 --rules=mean,median
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

from _process import peak_rss_gib
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list('ns', ['128', '1024', '4096'], 'Numbers of workers.')
flags.DEFINE_list('rules', ['mean', 'trimmed_mean', 'multikrum', 'nnm+trimmed_mean'], 'Rule specs.')
flags.DEFINE_integer('params', 100_000, 'Approximate number of model parameters.')
flags.DEFINE_integer('batch_size', 8, 'Examples per worker per step.')
flags.DEFINE_integer('steps', 2, 'Timed steps after compilation.')
flags.DEFINE_integer('samples', 40_000, 'Training samples of the synthetic data.')
flags.DEFINE_string('child', None, 'internal: run one case (JSON) and print its result.')


def _hidden(params: int) -> int:
  # 64 inputs, 10 classes; one hidden layer h has 64h + h + 10h + 10 parameters.
  return max(1, round((params - 10) / 75))


def run_case(case: dict) -> dict:
  import jax
  import numpy as np

  from robustjax import configs, training
  from robustjax import data as rdata

  rdata._LOADERS.register('synthetic_benchmark')(
    functools.partial(rdata.synthetic_classification, num_samples=case['samples'], dim=64)
  )
  cfg = configs.get('default')
  cfg.dataset = 'synthetic_benchmark'
  n = case['n']
  cfg.num_workers, cfg.num_byzantine = n, max(1, n // 8)
  cfg.rule, cfg.attack = case['rule'], 'alie'
  cfg.model = f'mlp(hidden=({_hidden(case["params"])},))'
  cfg.batch_size, cfg.backend = case['batch_size'], 'vmap'
  exp = training.build(cfg)
  state = exp.init_state()
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  t0 = time.perf_counter()
  compiled = jax.jit(exp.step).lower(state).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp = getattr(mem, 'temp_size_in_bytes', None) if mem is not None else None
  state, m = compiled(state)
  jax.block_until_ready((state, m))
  times = []
  for _ in range(case['steps']):
    t = time.perf_counter()
    state, m = compiled(state)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t)
  return {
    **case,
    'num_params': num_params,
    'compile_s': compile_s,
    'step_s': min(times),
    'peak_rss_gib': peak_rss_gib(),
    'temp_gib': None if temp is None else temp / 2**30,
    'temp_per_stack': None if temp is None else temp / (4 * n * num_params),
  }


def main(argv):
  del argv
  if FLAGS.child:
    print('RESULT ' + json.dumps(run_case(json.loads(FLAGS.child))), flush=True)
    return
  print(
    '| n | rule | P | compile s | step s | peak RSS GiB | XLA temporaries GiB | '
    'temporaries / (n·P·4 B) |'
  )
  print('|---:|---|---:|---:|---:|---:|---:|---:|')
  for n in [int(v) for v in FLAGS.ns]:
    for rule in FLAGS.rules:
      case = {
        'n': n,
        'rule': rule,
        'params': FLAGS.params,
        'batch_size': FLAGS.batch_size,
        'steps': FLAGS.steps,
        'samples': FLAGS.samples,
      }
      env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'}
      proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f'--child={json.dumps(case)}'],
        capture_output=True,
        text=True,
        env=env,
      )
      lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')]
      if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        print(f'| {n} | {rule} | failed: {tail} |||||', flush=True)
        continue
      r = json.loads(lines[-1][len('RESULT ') :])
      temp = '-' if r['temp_gib'] is None else f'{r["temp_gib"]:.2f}'
      ratio = '-' if r['temp_per_stack'] is None else f'{r["temp_per_stack"]:.2f}'
      print(
        f'| {n} | {rule} | {r["num_params"]:,} | {r["compile_s"]:.1f} | {r["step_s"]:.3f} | '
        f'{r["peak_rss_gib"]:.2f} | {temp} | {ratio} |',
        flush=True,
      )


if __name__ == '__main__':
  app.run(main)
