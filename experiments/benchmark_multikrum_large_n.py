r"""MultiKrum at large n: the exact rule (row panels of the distance matrix beyond n = 4096) against
the sketched one (`multikrum_sketch`), time and peak memory, and the selection agreement.

Each (n, method) runs in a fresh process (so that its peak resident memory, VmHWM, is its own):
the process draws the stack (honest rows N(1, I_d), f = 20 % of n Byzantine rows by ALIE, float32),
compiles the rule, then times it (the best of `--repeats` calls) and saves the selected indices.
The agreement of a sketch with the exact rule is |S_sketch ∩ S_exact| / m over the m = n − f
selected inputs.

  python experiments/benchmark_multikrum_large_n.py                    # the BENCHMARKS.md table
  python experiments/benchmark_multikrum_large_n.py --ns=256,1024 --dim=10000 --ks=32,64

Columns: attack, n, method, seconds (best of the repeats, after compilation), peak RSS of the
process (GiB), the stack's size (GiB), the agreement with the exact selection, how many
Byzantine rows the selection keeps, and the aggregate's distance to the exact rule's per √d.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time

from _process import peak_rss_gib
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list('ns', ['256', '1024', '4096', '16384'], 'Numbers of workers.')
flags.DEFINE_integer('dim', 100_000, 'Dimension d.')
flags.DEFINE_list('ks', ['32', '64', '128'], 'Sketch dimensions.')
flags.DEFINE_float('f_fraction', 0.2, 'Byzantine fraction.')
flags.DEFINE_list('attacks', ['alie', 'sign_flip'], 'Attacks producing the Byzantine rows.')
flags.DEFINE_integer('exact_max_n', 4096, 'Largest n the exact rule runs at.')
flags.DEFINE_integer('repeats', 2, 'Timed calls (the best is reported).')
flags.DEFINE_string('child', None, 'internal: run one case (JSON) and print its result.')


def run_case(case: dict) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from robustjax import aggregators, attacks
  from robustjax import stack as st
  from robustjax.aggregators import _krum

  n, d, k = case['n'], case['dim'], case.get('k')
  f = max(1, int(round(case['f_fraction'] * n)))
  nh = n - f
  key = jax.random.key(0)

  # The stack is drawn whole, then its last f rows are overwritten in place (donated), so that
  # building it costs one stack of memory, not three (honest rows, attack, concatenation).
  @jax.jit
  def draw(key):  # row by row, so that the generator's temporaries are one row block
    rows = lambda k: 1.0 + jax.random.normal(k, (d,), jnp.float32)  # noqa: E731
    return jax.lax.map(rows, jax.random.split(key, n), batch_size=256)

  @functools.partial(jax.jit, donate_argnums=0)
  def attack(x):
    byz = attacks.get(case['attack'])(x[:nh], f=f)
    return x.at[nh:].set(byz.astype(jnp.float32))

  x = attack(draw(key)).block_until_ready()
  nn = n - f - 2
  if k is None:

    @jax.jit
    def select(x):
      scores = _krum._scores(x, nn, None)
      return jnp.argsort(scores)[: n - f], aggregators.multikrum(x, f=f)

  else:

    @jax.jit
    def select(x):
      y = st.random_projection(x, k, jax.random.key(1))
      scores = _krum._scores(y, nn, None, exact=False)
      return jnp.argsort(scores)[: n - f], aggregators.multikrum_sketch(
        x, f=f, k=k, key=jax.random.key(1)
      )

  t0 = time.perf_counter()
  jax.block_until_ready(select(x))
  compile_s = time.perf_counter() - t0
  best = float('inf')
  for _ in range(case['repeats']):
    t0 = time.perf_counter()
    idx, out = jax.block_until_ready(select(x))
    best = min(best, time.perf_counter() - t0)
  np.save(case['out'], np.asarray(idx))
  np.save(case['out'] + '.agg.npy', np.asarray(out))
  return {
    'attack': case['attack'],
    'byzantine_kept': int(np.sum(np.asarray(idx) >= nh)),
    'n': n,
    'f': f,
    'dim': d,
    'k': k,
    'seconds': best,
    'compile_and_first_s': compile_s,
    'peak_rss_gib': peak_rss_gib(),
    'stack_gib': n * d * 4 / 2**30,
    'finite': bool(np.all(np.isfinite(np.asarray(out)))),
  }


def main(argv):
  del argv
  if FLAGS.child:
    print('RESULT ' + json.dumps(run_case(json.loads(FLAGS.child))), flush=True)
    return
  import numpy as np

  tmp = tempfile.mkdtemp(prefix='mk_large_n_')
  rows = []
  print(
    f'{"attack":>9} {"n":>6} {"method":>13} {"seconds":>8} {"peak GiB":>9} {"stack GiB":>10} '
    f'{"agreement":>10} {"Byz kept":>9} {"agg gap":>8}'
  )
  for attack in FLAGS.attacks:
    for n in [int(v) for v in FLAGS.ns]:
      methods = ([None] if n <= FLAGS.exact_max_n else []) + [int(k) for k in FLAGS.ks]
      exact_idx = exact_agg = None
      for k in methods:
        out = os.path.join(tmp, f'{attack}_{n}_{k}.npy')
        case = {
          'n': n,
          'dim': FLAGS.dim,
          'k': k,
          'attack': attack,
          'f_fraction': FLAGS.f_fraction,
          'repeats': FLAGS.repeats,
          'out': out,
        }
        proc = subprocess.run(
          [sys.executable, __file__, f'--child={json.dumps(case)}'], capture_output=True, text=True
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith('RESULT ')]
        name = 'exact' if k is None else f'sketch k={k}'
        if not line:
          print(f'{attack:>9} {n:>6} {name:>13} failed:', proc.stderr[-800:], flush=True)
          continue
        r = json.loads(line[0][7:])
        idx, agg = np.load(out), np.load(out + '.agg.npy')
        if k is None:
          exact_idx, exact_agg = idx, agg
        r['agreement'] = (
          None
          if exact_idx is None
          else len(set(idx.tolist()) & set(exact_idx.tolist())) / len(exact_idx)
        )
        # The aggregate's distance to the exact rule's, relative to one honest row's spread (√d):
        # 1/√m would be the gap between two honest means of m rows.
        r['agg_gap'] = (
          None if exact_agg is None else float(np.linalg.norm(agg - exact_agg) / np.sqrt(r['dim']))
        )
        rows.append(r)
        agree = '–' if r['agreement'] is None else f'{r["agreement"]:.4f}'
        gap = '–' if r['agg_gap'] is None else f'{r["agg_gap"]:.1e}'
        print(
          f'{attack:>9} {n:>6} {name:>13} {r["seconds"]:>8.3f} {r["peak_rss_gib"]:>9.2f} '
          f'{r["stack_gib"]:>10.2f} {agree:>10} {r["byzantine_kept"]:>9} {gap:>8}',
          flush=True,
        )
  print(json.dumps(rows))


if __name__ == '__main__':
  app.run(main)
