r"""Times the vmapped optimal attacks against a sequential Python line search.

For each defender (an aggregator, optionally after pre-aggregators: `nnm+krum`) and each optimal
attack (`optimal_alie`, `optimal_ipm`), on one random honest stack of n − f workers and dimension d:

- *vmapped*: `robustjax.attacks.optimal_*` (one jitted call: a grid of candidate scales and
  refinement rounds, each round's candidates evaluated together; for orthogonally equivariant
  defenders the candidates are evaluated on exact coordinates of the (n − f + 2)-dimensional span,
  after NNM the mixing weights are chosen from the distances to the candidate (one centred Gram
  of the honest inputs per call) and the rule runs on the mixed stack, or, for most candidates,
  is evaluated from the order statistics of one of two reference mixings
  (``span_mixing``: nnm+trimmed_mean), and for L-statistics (mean, median, trimmed mean) from
  the honest columns sorted once: the column *shortcut*, `attacks.evaluation_shortcut` decides,
  `--subspace=false` / `--order_statistics=false` turn them off);
- *sequential*: the line search of published code (ByzFL 0.0.11 `Optimal_ALittleIsEnough` /
  `Optimal_InnerProductManipulation`: an expansion phase from τ = `--start` with step `--delta`
  doubling while the error grows, then a contraction phase multiplying the step by `--ratio`),
  with the same number of evaluations; each evaluation is one jitted call that, as that code does,
  computes the attack (μ, σ), concatenates the stack, runs the defender and returns
  ‖F − μ‖ to Python (`.item()`), which chooses the next scale.

Both reported deviations ‖F(honest ∪ Byzantine) − μ‖ are recomputed by the same jitted evaluator.
The process keeps the host memory a call frees for the next (`robustjax.host`, as
`training.build` sets on CPU; both searches run in this process and get it): without it every
call maps and page-faults its buffers anew (the sorted honest columns, 20 MB at 52 × 100,000).
`--noretain_host_memory` keeps glibc's defaults.
Prints a table (defender, attack, evaluations, vmapped time, sequential time, speed-up, deviation
reached by each). Times are the minimum over at least `--repeats` (`--seq_repeats`) runs and at
least `--min_time` seconds of runs, for both searches alike, after one compile / warm-up run (the
minimum, since on a shared machine other jobs only ever add time; on this project's 2-core VM
the same jitted call runs for stretches of tens of calls at about half its best speed, so a
handful of runs can miss its best: BENCHMARKS.md).

Examples:
  python experiments/benchmark_attacks.py
  python experiments/benchmark_attacks.py --n=64 --d=100000 --f=12 \
      --defenders=mean,median,trimmed_mean,krum,multikrum,nnm+krum --json_out=/tmp/att.json
"""

from __future__ import annotations

import os

# The span reduction's QR runs in LAPACK (OpenBLAS on CPU); OpenBLAS threads spinning next to
# XLA's thread pool made single calls 10-30x slower on a shared 2-core machine. One thread: stable.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _process import cpu_name  # noqa: E402
from absl import app, flags  # noqa: E402

from robustjax import attacks, host, pipeline  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('n', 64, 'total number of workers (n − f honest)')
flags.DEFINE_integer('d', 100_000, 'dimension of each worker slice')
flags.DEFINE_integer('f', 12, 'number of Byzantine workers (also the f the defender is told)')
flags.DEFINE_list(
  'defenders',
  ['mean', 'median', 'trimmed_mean', 'krum', 'multikrum', 'nnm+krum', 'nnm+trimmed_mean'],
  'defenders: aggregator names, optionally prefixed by pre-aggregators joined with +',
)
flags.DEFINE_list('attacks', ['optimal_alie', 'optimal_ipm'], 'optimal attacks to time')
flags.DEFINE_integer('num_scales', 12, 'first-round grid size')
flags.DEFINE_integer('num_refine', 4, 'points per refinement round')
flags.DEFINE_integer('refine_rounds', 5, 'refinement rounds')
flags.DEFINE_float('max_scale', 10.0, 'the grid covers [0, max_scale]')
flags.DEFINE_integer('batch_size', 8, 'candidates per vmapped batch (lax.map); 0: all at once')
flags.DEFINE_enum('subspace', 'auto', ['auto', 'true', 'false'], 'span reduction (see attacks)')
flags.DEFINE_enum(
  'order_statistics', 'auto', ['auto', 'false'], 'sorted-column evaluation (see attacks)'
)
flags.DEFINE_float('start', 0.0, 'line search: first scale (ByzFL default 0.0)')
flags.DEFINE_float('delta', 10.0, 'line search: first step (ByzFL default 10.0)')
flags.DEFINE_float('ratio', 0.8, 'line search: contraction ratio (ByzFL default 0.8)')
flags.DEFINE_integer('repeats', 5, 'timed runs of the vmapped attack (minimum reported)')
flags.DEFINE_integer('seq_repeats', 3, 'timed runs of the sequential search (minimum reported)')
flags.DEFINE_float(
  'min_time', 2.0, 'each search also runs for at least this many seconds (0: only the repeats)'
)
flags.DEFINE_integer('seed', 0, 'seed of the honest stack')
flags.DEFINE_bool(
  'retain_host_memory',
  True,
  'keep the host memory a call frees for the next (robustjax.host, as training.build does on CPU)',
)
flags.DEFINE_string('json_out', None, 'write the rows as JSON here')


def _defender(spec: str, f: int):
  return pipeline.as_rule(spec, f)


def _byz_row(kind, honest, tau):
  """The attack at scale τ, computed from the honest stack as the published code does."""
  n_h = honest.shape[0]
  w = jnp.full((n_h,), 1.0 / n_h, honest.dtype)
  mu = w @ honest
  if kind == 'optimal_alie':
    sd = jnp.sqrt(w @ jnp.square(honest - mu))
    return mu - tau * sd, mu
  return -tau * mu, mu


def _make_evaluator(kind, rule, f):
  @jax.jit
  def evaluate(honest, tau):
    row, mu = _byz_row(kind, honest, tau)
    full = jnp.concatenate([honest, jnp.broadcast_to(row[None], (f,) + row.shape)], axis=0)
    return jnp.linalg.norm(rule(full) - mu)

  @jax.jit
  def deviation_of(honest, byz):
    mu = jnp.mean(honest, axis=0)
    return jnp.linalg.norm(rule(jnp.concatenate([honest, byz], axis=0)) - mu)

  return evaluate, deviation_of


def line_search(evaluate, honest, evals, start, delta, ratio):
  """ByzFL's expansion / contraction line search, one jitted evaluation per step."""
  best_x, best_y = start, evaluate(honest, start).item()
  remaining = evals - 1
  while remaining > 0:  # expansion
    prop_x = best_x + delta
    prop_y = evaluate(honest, prop_x).item()
    remaining -= 1
    if prop_y > best_y:
      best_x, best_y, delta = prop_x, prop_y, delta * 2
    else:
      delta *= ratio
      break
  while remaining > 0:  # contraction
    prop_x = best_x + delta
    prop_y = evaluate(honest, prop_x).item()
    remaining -= 1
    if prop_y > best_y:
      best_x, best_y = prop_x, prop_y
    delta *= ratio
  return best_x


def _time(fn, repeats):
  """Fastest of at least `repeats` runs and at least `--min_time` seconds of runs, and the
  last run's output."""
  times, start = [], time.perf_counter()
  while len(times) < repeats or time.perf_counter() - start < FLAGS.min_time:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times), out


def main(argv):
  del argv
  n, d, f = FLAGS.n, FLAGS.d, FLAGS.f
  n_h = n - f
  rng = np.random.default_rng(FLAGS.seed)
  # Heterogeneous honest inputs around a common direction (gradients of a shared model).
  honest = jnp.asarray(
    rng.normal(size=(1, d)) + rng.normal(size=(n_h, d)) * rng.uniform(0.5, 2.0, size=(1, d)),
    jnp.float32,
  )
  evals = FLAGS.num_scales + FLAGS.refine_rounds * FLAGS.num_refine
  subspace = {'auto': None, 'true': True, 'false': False}[FLAGS.subspace]
  order_statistics = {'auto': None, 'false': False}[FLAGS.order_statistics]
  batch_size = FLAGS.batch_size or None
  cpu = cpu_name()
  retained = FLAGS.retain_host_memory and host.retain_freed_memory()
  print(
    f'# n={n} (honest {n_h}, Byzantine {f}), d={d}, evaluations={evals}, '
    f'batch_size={batch_size}, jax {jax.__version__}, {jax.devices()[0].platform}, {cpu}, '
    f'freed host memory kept: {retained}'
  )
  header = (
    f'{"defender":<18} {"attack":<13} {"evals":>5} {"shortcut":>16} {"vmapped s":>10} '
    f'{"sequential s":>12} {"speed-up":>8} {"dev vmapped":>12} {"dev sequential":>14}'
  )
  print(header)
  print('-' * len(header))
  rows = []
  for spec in FLAGS.defenders:
    rule = _defender(spec, f)
    for kind in FLAGS.attacks:
      attack = attacks.get(kind)
      shortcut = attacks.evaluation_shortcut(rule, n_h, f, d)
      spans = ('span', 'span_mixing')
      if subspace is True and shortcut not in spans:
        shortcut = 'span'
      elif subspace is False and shortcut in spans:
        shortcut = None
      if order_statistics is False and shortcut == 'order_statistics':
        shortcut = None

      def run_vmapped(rule=rule, attack=attack):
        return attack(
          honest,
          f=f,
          rule=rule,
          max_scale=FLAGS.max_scale,
          num_scales=FLAGS.num_scales,
          num_refine=FLAGS.num_refine,
          refine_rounds=FLAGS.refine_rounds,
          batch_size=batch_size,
          subspace=subspace,
          order_statistics=order_statistics,
          return_scale=True,
        )

      jax.block_until_ready(run_vmapped())  # compile
      t_vec, (byz, tau) = _time(run_vmapped, FLAGS.repeats)

      evaluate, deviation_of = _make_evaluator(kind, rule, f)
      evaluate(honest, 0.0).item()  # compile
      seq = lambda evaluate=evaluate: line_search(
        evaluate, honest, evals, FLAGS.start, FLAGS.delta, FLAGS.ratio
      )
      t_seq, tau_seq = _time(seq, FLAGS.seq_repeats)
      row_seq, _ = _byz_row(kind, honest, tau_seq)
      byz_seq = jnp.broadcast_to(row_seq[None], (f, d))
      dev_vec = float(deviation_of(honest, byz))
      dev_seq = float(deviation_of(honest, byz_seq))
      row = dict(
        defender=rule.name,
        attack=kind,
        evals=evals,
        shortcut=shortcut,
        vmapped_s=t_vec,
        sequential_s=t_seq,
        speedup=t_seq / t_vec,
        tau_vmapped=float(tau),
        tau_sequential=float(tau_seq),
        dev_vmapped=dev_vec,
        dev_sequential=dev_seq,
      )
      rows.append(row)
      print(
        f'{rule.name:<18} {kind:<13} {evals:>5} {shortcut or "-":>16} '
        f'{t_vec:>10.3f} {t_seq:>12.3f} {t_seq / t_vec:>7.1f}x '
        f'{dev_vec:>12.4g} {dev_seq:>14.4g}',
        flush=True,
      )
  if FLAGS.json_out:
    with open(FLAGS.json_out, 'w') as fh:
      json.dump(dict(n=n, d=d, f=f, retain_host_memory=retained, rows=rows), fh, indent=1)


if __name__ == '__main__':
  app.run(main)
