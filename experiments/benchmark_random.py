"""jax's random bits on CPU: its own Threefry lowering (a rolled loop) against the unrolled one of
`robustjax.host.unroll_threefry`, side by side.

Each lowering runs in processes of its own (``ROBUSTJAX_UNROLL_THREEFRY=0`` / ``1``), alternated
over `--rounds`; a process times every case (the fastest of `--calls` calls after a warm-up) and
checks its outputs' digest, which must be the same under both lowerings. The cases:

- ``step draws n=N``: the random draws of one training step of N workers (a 5-way key split,
  a key folded in per worker, 25 batch indices per worker), as `robustjax.training` makes them;
- ``normal RxC``: one `jax.random.normal` draw of that shape (local DP noise over a stack, a
  Gaussian attack, a random projection);
- ``train step n=N``: the whole training step of the `benchmark_training.py` task (digits, MLP of
  64, batch 25, trimmed mean, sign flipping, f = 2); ``+ local DP``: with per-worker clipping
  and local Gaussian noise (``dp_clip=1``, ``dp_local_noise=1``); ``MLP 256-256``: a model of
  85,002 parameters instead of 4,810.

  python experiments/benchmark_random.py
  python experiments/benchmark_random.py --rounds=2 --cases=draws
"""

import hashlib
import json
import os
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _process import cpu_name  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('rounds', 3, 'processes per lowering, alternated')
flags.DEFINE_integer('calls', 30, 'timed calls per case and process (the fastest is kept)')
flags.DEFINE_list('cases', ['draws', 'normal', 'train'], 'case groups: draws, normal, train')
flags.DEFINE_string('_worker', None, 'internal: time the cases in this process')


def _draws(n):
  import jax
  import jax.numpy as jnp

  def draws(key_data):
    key = jax.random.wrap_key_data(key_data)
    key, k_grad, *_ = jax.random.split(key, 5)
    one = lambda row: jax.random.randint(jax.random.fold_in(k_grad, row), (25,), 0, 28)
    return jax.random.key_data(key), jax.vmap(one)(jnp.arange(n))

  f = jax.jit(draws)
  arg = jax.random.key_data(jax.random.key(0))
  return lambda: f(arg)


def _normal(shape):
  import jax

  f = jax.jit(lambda key: jax.random.normal(key, shape))
  key = jax.random.key(0)
  return lambda: f(key)


def _train_step(n, dp, hidden='64,'):
  from robustjax import training
  from robustjax.configs.default import get_config

  c = get_config()
  c.num_workers, c.num_byzantine = n, 2
  c.rule, c.attack, c.model = 'trimmed_mean', 'sign_flip', f'mlp(hidden=({hidden}))'
  c.batch_size, c.backend = 25, 'vmap'
  if dp:
    c.dp_clip, c.dp_local_noise = 1.0, 1.0
  exp = training.build(c)
  state = exp.init_state()
  return lambda: exp.step(state)


def _cases(groups):
  cases = []
  if 'draws' in groups:
    cases += [(f'step draws n={n}', lambda n=n: _draws(n)) for n in (64, 1024)]
  if 'normal' in groups:
    cases += [(f'normal 64x{d:,}', lambda d=d: _normal((64, d))) for d in (10**5, 10**6)]
  if 'train' in groups:
    cases += [
      ('train step n=64', lambda: _train_step(64, False)),
      ('train step n=1024', lambda: _train_step(1024, False)),
      ('train step n=256 + local DP', lambda: _train_step(256, True)),
      ('train step n=64 + local DP, MLP 256-256', lambda: _train_step(64, True, '256, 256')),
    ]
  return cases


def _digest(out) -> str:
  import jax
  import numpy as np

  h = hashlib.sha256()
  for leaf in jax.tree.leaves(out):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()[:16]


def _work():
  """Times every case in this process; one JSON line per case."""
  import jax

  from robustjax import host

  host.retain_freed_memory()
  applied = host.unroll_threefry()  # False under ROBUSTJAX_UNROLL_THREEFRY=0
  for name, make in _cases(FLAGS.cases):
    call = make()
    t0 = time.perf_counter()
    out = jax.block_until_ready(call())  # compiles
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(FLAGS.calls):
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      times.append(time.perf_counter() - t0)
    row = {'case': name, 'unrolled': applied, 'time_s': min(times), 'first_s': compile_s}
    print(json.dumps({**row, 'digest': _digest(out)}), flush=True)


def main(argv):
  del argv
  if FLAGS._worker:
    return _work()
  import jax

  print(f'# jax {jax.__version__}, {cpu_name()}; {FLAGS.rounds} rounds, fastest of {FLAGS.calls}')
  rows = {}
  for _ in range(FLAGS.rounds):
    for flag in ('0', '1'):
      cmd = [sys.executable, __file__, '--_worker=1', f'--calls={FLAGS.calls}']
      cmd.append(f'--cases={",".join(FLAGS.cases)}')
      env = {**os.environ, 'ROBUSTJAX_UNROLL_THREEFRY': flag, 'JAX_PLATFORMS': 'cpu'}
      out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
      if out.returncode:
        sys.exit(f'worker failed:\n{out.stderr[-3000:]}')
      for line in out.stdout.splitlines():
        if line.startswith('{'):
          r = json.loads(line)
          rows.setdefault(r['case'], {}).setdefault(r['unrolled'], []).append(r)
  print(
    "\n| case | jax's lowering (ms) | unrolled (ms) | speed-up (fastest) | first call, "
    'compile included (s) | same bits |'
  )
  print('|---|---:|---:|---:|---|---|')
  for case, by in rows.items():
    rolled, unrolled = by.get(False, []), by.get(True, [])
    span = lambda rs: '–'.join(
      f'{1e3 * t:.2f}' for t in (min(r['time_s'] for r in rs), max(r['time_s'] for r in rs))
    )
    first = lambda rs: f'{min(r["first_s"] for r in rs):.2f}'
    best = min(r['time_s'] for r in rolled) / min(r['time_s'] for r in unrolled)
    same = len({r['digest'] for r in rolled + unrolled}) == 1
    print(
      f'| {case} | {span(rolled)} | {span(unrolled)} | {best:.2f}× | {first(rolled)} / '
      f'{first(unrolled)} | {"yes" if same else "NO"} |'
    )


if __name__ == '__main__':
  app.run(main)
