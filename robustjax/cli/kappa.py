"""Empirical (f, κ) robustness of every aggregator, with and without NNM, and the MultiKrum study.

For each rule, n and feasible f, `robustjax.robustness.estimate_kappa` searches for inputs with a
large ratio ‖F(x) − x̄_S‖² / ((1/|S|) Σ_{i∈S} ‖x_i − x̄_S‖²); the best ratio found, κ̂, is a measured
*lower* bound on the rule's κ⋆, certified by a witness saved with the results. Coordinate-wise
rules are also searched densely on the line (`robustness.search_1d`). A κ̂ equal to a proven upper
bound is an exact κ⋆; a κ̂ above one is a contradiction, printed loudly.

Usage:
  robustjax kappa --docs --study=kappa       # every rule, n = 10, 20, 50, every f
  robustjax kappa --docs --study=multikrum   # MultiKrum: every m, both neighbour counts
  robustjax kappa --docs --study=dim         # the effect of the dimension on a few cells
  robustjax kappa --docs --study=benchmark   # configurations per second
  robustjax kappa --docs --study=all

Cells run in `--processes` worker processes, grouped by (n, f, dim) so that each process compiles
the rule-independent parts of the search once per group. Results are cached in `--results` (one
JSON entry per cell; an interrupted run resumes) and witnesses in `--witnesses` (one compressed
.npz per study and n, one array pair per cell); `--plot_only` rebuilds tables and figures.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
import zlib

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
# Output paths; unset: <workdir or docs>/<the name here>.
OUTPUTS = {
  'results': 'robustness_results.json',
  'mk_results': 'robustness_multikrum_results.json',
  'table': 'robustness_table.md',
  'mk_table': 'robustness_multikrum.md',
  'dim_table': 'robustness_dim.md',
  'fig_prefix': 'figures/robustness_',
  'witnesses': 'robustness_witnesses',
}


def define_flags():
  """Defines the command's absl flags (the `robustjax` command calls it)."""
  flags.DEFINE_enum(
    'study', 'all', ['all', 'kappa', 'multikrum', 'dim', 'benchmark', 'recheck'], 'What to run.'
  )
  flags.DEFINE_list('ns', ['10', '20', '50'], 'Numbers of inputs n.')
  flags.DEFINE_list(
    'rules', [], 'Aggregators (default: every registered one that does not decode).'
  )
  flags.DEFINE_bool('with_nnm', True, 'Also measure every rule after NNM.')
  flags.DEFINE_integer('dim', 0, 'Dimension of the inputs (0: robustness.default_dim per rule).')
  flags.DEFINE_integer(
    'max_dim', 20, 'With --dim=0: at most this dimension (n − 1 = 49 at n = 50 costs 2.5x).'
  )
  flags.DEFINE_integer('budget', 10_000, 'Configurations per restart and cell (before the cap).')
  flags.DEFINE_integer('restarts', 3, 'Independent restarts per cell; the best is kept.')
  flags.DEFINE_float(
    'seconds_per_cell', 4.0, 'Cap: a slow rule gets its budget scaled to about this search time.'
  )
  flags.DEFINE_integer('seed', 0, 'PRNG seed.')
  flags.DEFINE_integer('batch', 512, 'Configurations per compiled call.')
  flags.DEFINE_integer('processes', 2, 'Worker processes.')
  flags.DEFINE_integer('exponential_max_n', 20, 'Rules that enumerate subsets: only up to this n.')
  flags.DEFINE_list('mk_ns', ['10', '20', '50'], 'n for the MultiKrum study.')
  flags.DEFINE_list('mk_fs', [], 'f for the MultiKrum study (default: every f with n > 2f + 2).')
  flags.DEFINE_string('workdir', '/tmp/robustjax_kappa', 'Where the outputs go (without --docs).')
  flags.DEFINE_bool(
    'docs', False, "Write into the repository's docs/ (regenerating the published set)."
  )
  flags.DEFINE_string('results', None, 'JSON cache of the kappa study.')
  flags.DEFINE_string('mk_results', None, 'JSON cache of the MultiKrum study.')
  flags.DEFINE_string('table', None, 'Markdown table of the kappa study.')
  flags.DEFINE_string('mk_table', None, 'Markdown table of MultiKrum.')
  flags.DEFINE_string('dim_table', None, 'Markdown table of the dim study.')
  flags.DEFINE_string('fig_prefix', None, 'Figures: <prefix><name>.png.')
  flags.DEFINE_string('witnesses', None, 'Witness archives (.npz).')
  flags.DEFINE_bool('plot_only', False, 'Only rebuild the tables and figures from the caches.')


# --------------------------------------------------------------------------------------------------
# Caches.


def _load(path):
  if os.path.exists(path):
    with open(path) as fh:
      return json.load(fh)
  return {}


def _save(path, results):
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as fh:
    json.dump(results, fh, indent=0, sort_keys=True)
  os.replace(tmp, path)


def witness_archive(directory, study, n):
  return os.path.join(directory, f'{study}_n{n}.npz')


def witness_name(key):
  """The array names of a cell's witness inside its archive."""
  safe = ''.join(c if c.isalnum() else '_' for c in key)
  return f'{safe}__stack', f'{safe}__honest'


def load_witness(directory, study, n, key):
  """The witness of one cell: (stack, honest), for `robustness.ratio(rule, stack, honest)`."""
  s, h = witness_name(key)
  with np.load(witness_archive(directory, study, n)) as z:
    return z[s], z[h]


def _store_witnesses(directory, study, n, cells):
  """Adds {key: (stack, honest)} to the study's archive for n (rewritten atomically)."""
  os.makedirs(directory, exist_ok=True)
  path = witness_archive(directory, study, n)
  arrays = {}
  if os.path.exists(path):
    with np.load(path) as z:
      arrays = {k: z[k] for k in z.files}
  for key, (stack, honest) in cells.items():
    s, h = witness_name(key)
    arrays[s], arrays[h] = np.asarray(stack, np.float32), np.asarray(honest, bool)
  tmp = path + '.tmp.npz'
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)


def cell_status(kappa, upper, searched_1d):
  """'exact' when κ̂ reaches a proven upper bound (to float32 rounding), '1-D search' for a
  coordinate-wise rule searched on the line, 'search' otherwise."""
  if upper is not None and abs(kappa - upper) <= 1e-5 * upper + 1e-9:
    return 'exact'
  return '1-D search' if searched_1d else 'search'


def cell_key(spec, n, f):
  return f'{spec}|n={n}|f={f}'


# --------------------------------------------------------------------------------------------------
# One group of cells, in a worker process.


def _rate(pipe, n, f, dim):
  """Configurations per second of the rule's batched ratio: a probe of 4 (cheap even for a rule
  taking seconds per configuration), then a batch of 128 if the probe is fast."""
  from robustjax import robustness

  x, m = robustness.canonical_witnesses(n, max(f, 1) if 2 * max(f, 1) < n else f, dim)
  x = np.resize(x, (4, n, dim)) if x.size else np.zeros((4, n, dim), np.float32)
  m = np.resize(m, (4, n)) if m.size else np.ones((4, n), bool)
  np.asarray(robustness.ratios(pipe, x, m, f=f))  # compile
  t = time.perf_counter()
  np.asarray(robustness.ratios(pipe, x, m, f=f))
  rate = 4 / max(time.perf_counter() - t, 1e-9)
  if rate < 5000:
    return rate
  return robustness.benchmark(pipe, n=n, f=f, dim=dim, batch=128, repeats=1)['eval_only_per_s']


def _scaled_options(pipes, n, f, dim, opts):
  """The search size of a cell, from one timed batch of its rule (recorded in the entry).

  Rules evaluating fewer than 50,000 configurations/s search in batches of 128 instead of
  `--batch` (every part of the search is counted in batches); the budget is then scaled so that
  the search takes about `--seconds_per_cell`. Below 1,000 configurations/s (CAF at n = 50, MDA and
  SMEA at n = 20) it searches in batches of 32 and drops the attacks and the second line-search
  pass; the canonical witnesses, the restarts and the hill climber stay.
  """
  rate = min(_rate(p, n, f, dim) for p in pipes)
  slow = rate < 1000
  batch = opts['batch'] if rate >= 50_000 else (32 if slow else 128)
  # Per restart: the budget, plus about 21 line-search batches of the candidates.
  planned = opts['restarts'] * (opts['budget'] + 21 * batch)
  scale = min(1.0, rate * opts['seconds_per_cell'] / planned)
  return dict(
    budget=max(batch, int(opts['budget'] * scale)),
    local_candidates=max(4, min(32, int(round(32 * scale)), batch // 8)),
    batch=batch,
    attacks=not slow,
    passes=1 if slow else 2,
    rate=rate,
  )


MIN_RATE = 20.0
"""Cells whose rule evaluates fewer configurations per second are not searched (recorded as
skipped with the measured rate): even the smallest search (about 1,500 configurations) would take
more than a minute."""


def run_group(job):
  """Runs every cell of one (study, n, f, dim) group; returns [(key, entry, stack, honest)]."""
  import jax

  from robustjax import pipeline, robustness

  study, n, f, dim, cells, opts = job
  out = []
  for key, spec, extra in cells:
    seed = jax.random.fold_in(jax.random.key(opts['seed']), zlib.crc32(key.encode()) % (2**31))
    t0 = time.perf_counter()
    try:
      pipe = pipeline.as_rule(spec, f)
      cell_dim = dim or robustness.default_dim(pipe, n, f)
      pipe(np.zeros((n, cell_dim), np.float32))
    except ValueError as err:
      out.append((key, {'infeasible': str(err).splitlines()[0]}, None, None))
      continue
    if extra == 'multikrum':
      ests, scaled = _multikrum_cells(n, f, cell_dim, seed, opts)
    else:
      scaled = _scaled_options([pipe], n, f, cell_dim, opts)
      if scaled['rate'] < MIN_RATE:
        entry = {'rule': pipe.spec, 'n': n, 'f': f, 'skipped': f'{scaled["rate"]:.1f} configs/s'}
        out.append((key, entry, None, None))
        print(f'  [{os.getpid()}] {key}: skipped ({entry["skipped"]})', flush=True)
        continue
      est = robustness.estimate_kappa(
        pipe,
        n,
        f,
        cell_dim,
        seed,
        scaled['budget'],
        restarts=opts['restarts'],
        batch=scaled['batch'],
        local_candidates=scaled['local_candidates'],
        attacks=scaled['attacks'],
        passes=scaled['passes'],
      )
      if pipe.coordinatewise and n - f >= 2 and study != 'dim':
        line = robustness.search_1d(pipe, n, f, jax.random.fold_in(seed, 1))
        est.per_family['1-D search'] = line.kappa
        if line.kappa > est.kappa:
          est = dataclasses.replace(est, kappa=line.kappa, witness=line.witness, dim=1)
      ests = [(key, spec, est)]
    seconds = time.perf_counter() - t0
    for k, s, est in ests:
      p = pipeline.as_rule(s, f)
      ub = robustness.upper_bound(p, n, f)
      lb = robustness.lower_bound(n, f)
      status = cell_status(est.kappa, ub, p.coordinatewise and n - f >= 2 and study != 'dim')
      entry = {
        'rule': p.spec,
        'n': n,
        'f': f,
        'dim': est.dim,
        'kappa': est.kappa,
        'upper': ub,
        'lower': lb,
        'status': status,
        'family': est.witness.family,
        'per_restart': [float(r) for r in est.per_restart],
        'evaluated': est.evaluated,
        'budget': scaled['budget'],
        'rate': round(scaled.get('rate', 0.0)),
        'seconds': round(seconds / len(ests), 2),
      }
      if isinstance(s, tuple):
        entry['params'] = dict(s[1])
        entry['base'] = s[0]
      if ub is not None and est.kappa > ub * (1 + 1e-4) + 1e-6:
        entry['contradiction'] = True
      out.append((k, entry, est.witness.stack, est.witness.honest))
    print(
      f'  [{os.getpid()}] {key}: kappa={ests[0][2].kappa:.5g} ({seconds:.1f}s, '
      f'budget {scaled["budget"]})',
      flush=True,
    )
  return out


# --------------------------------------------------------------------------------------------------
# MultiKrum: every m and both neighbour counts from one evaluation.


def multikrum_specs(n, f):
  """[(key, spec)] for m = 1 … n − f and num_neighbors n − f − 2 (paper), n − f − 1 (ByzFL)."""
  out = []
  for conv, k in (('paper', n - f - 2), ('byzfl', n - f - 1)):
    for m in range(1, n - f + 1):
      spec = ('multikrum', {'m': m, 'num_neighbors': k})
      out.append((f'multikrum|{conv}|m={m}|n={n}|f={f}', spec))
  return out


def multikrum_evaluator(n, f):
  """(B, n, d), (B, n) → (B, 2(n − f)) ratios of MultiKrum for every m and both neighbour counts.

  One sort of the Krum scores per convention, then prefix means: the same selection as
  `aggregators.multikrum` (lowest scores, ties to the lower index). It only steers the search;
  every reported κ̂ is re-evaluated with the registered rule.
  """
  import jax
  import jax.numpy as jnp

  from robustjax import aggregators

  def one(x, mask):
    w = mask.astype(x.dtype)
    h = jnp.sum(w)
    mu = (w @ x) / h
    var = jnp.sum(w * jnp.sum((x - mu) ** 2, axis=1)) / h
    outs = []
    for k in (n - f - 2, n - f - 1):
      scores = aggregators.krum_scores(x, f=f, num_neighbors=k)
      order = jnp.argsort(scores, stable=True)
      prefix = jnp.cumsum(x[order], axis=0) / jnp.arange(1, n + 1, dtype=x.dtype)[:, None]
      outs.append(prefix[: n - f])
    y = jnp.concatenate(outs)
    num = jnp.sum((y - mu) ** 2, axis=1)
    return jnp.where(var > 0, num / jnp.where(var > 0, var, 1.0), jnp.where(num > 0, jnp.inf, 0.0))

  return jax.jit(jax.vmap(one))


def _multikrum_cells(n, f, dim, seed, opts):
  from robustjax import robustness

  specs = multikrum_specs(n, f)
  evaluate = multikrum_evaluator(n, f)
  ests = robustness.estimate_kappas(
    [s for _, s in specs],
    n,
    f,
    dim,
    seed,
    opts['budget'],
    restarts=opts['restarts'],
    batch=opts['batch'],
    local_candidates=4,
    evaluate=evaluate,
  )
  return [(k, s, e) for (k, s), e in zip(specs, ests)], {'budget': opts['budget']}


# --------------------------------------------------------------------------------------------------
# The studies.


def _fs(n):
  return list(range(0, (n + 1) // 2))


def _options():
  return {
    'seed': FLAGS.seed,
    'budget': FLAGS.budget,
    'restarts': FLAGS.restarts,
    'seconds_per_cell': FLAGS.seconds_per_cell,
    'batch': FLAGS.batch,
  }


def _run_jobs(jobs, results, results_path, study):
  """Runs the groups in worker processes; saves every finished group's entries and witnesses."""
  t0 = time.time()
  done = 0
  total = sum(len(j[4]) for j in jobs)
  ctx = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(FLAGS.processes, mp_context=ctx) as pool:
    futures = [pool.submit(run_group, j) for j in jobs]
    for fut in concurrent.futures.as_completed(futures):
      out = fut.result()
      by_n = {}
      for key, entry, stack, honest in out:
        results[key] = entry
        if stack is not None:
          by_n.setdefault(entry['n'], {})[key] = (stack, honest)
          if entry.get('contradiction'):
            bar = '!' * 100
            print(
              f'\n{bar}\nCONTRADICTION: {key}: kappa {entry["kappa"]:.6g} > proven upper bound '
              f'{entry["upper"]:.6g}\n{bar}\n',
              file=sys.stderr,
              flush=True,
            )
      for n, cells in by_n.items():
        _store_witnesses(FLAGS.witnesses, study, n, cells)
      _save(results_path, results)
      done += len(out) if study != 'multikrum' else 1
      first = out[0][1] if out else {}
      print(
        f'[{time.time() - t0:7.0f}s] {done}/{total} cells; last: {out[0][0] if out else ""} '
        f'kappa={first.get("kappa", "—")}',
        flush=True,
      )
  return time.time() - t0


def run_kappa(results):
  from robustjax import aggregators, pipeline

  rules = FLAGS.rules or [r for r in aggregators.names() if not aggregators.properties(r).decodes]
  specs = [r for r in rules] + ([f'nnm+{r}' for r in rules] if FLAGS.with_nnm else [])
  groups = {}
  for n in map(int, FLAGS.ns):
    for f in _fs(n):
      for spec in specs:
        key = cell_key(spec, n, f)
        if key in results:
          continue
        pipe = pipeline.as_rule(spec, 0)
        if pipe.exponential and n > FLAGS.exponential_max_n:
          continue
        dim = FLAGS.dim or (1 if pipe.coordinatewise else min(n - 1, FLAGS.max_dim))
        groups.setdefault((n, f, dim), []).append((key, spec, None))
  # Large groups first (n = 50), so the two processes finish together.
  jobs = [('kappa', n, f, d, cells, _options()) for (n, f, d), cells in groups.items()]
  jobs.sort(key=lambda j: -j[1] * (1 + (j[3] > 1)))
  wall = _run_jobs(jobs, results, FLAGS.results, 'kappa')
  print(f'kappa study: {sum(len(j[4]) for j in jobs)} cells in {wall / 60:.1f} min', flush=True)
  return wall


def run_multikrum(results):
  groups = []
  for n in map(int, FLAGS.mk_ns):
    for f in map(int, FLAGS.mk_fs) if FLAGS.mk_fs else range(0, n):
      if n <= 2 * f + 2:
        continue
      if any(k in results for k, _ in multikrum_specs(n, f)):
        continue
      groups.append(
        (
          'multikrum',
          n,
          f,
          FLAGS.dim or min(n - 1, FLAGS.max_dim),
          [(f'mk|n={n}|f={f}', 'krum', 'multikrum')],
          _options(),
        )
      )
  groups.sort(key=lambda j: -j[1])
  wall = _run_jobs(groups, results, FLAGS.mk_results, 'multikrum')
  print(f'multikrum study: {len(groups)} (n, f) groups in {wall / 60:.1f} min', flush=True)
  return wall


DIM_CELLS = (
  ('krum', 20, 7),
  ('geometric_median', 20, 5),
  ('nnm+median', 20, 9),
  ('monna', 10, 2),
  ('caf', 10, 3),
  ('multikrum', 20, 4),
  ('nnm+trimmed_mean', 20, 6),
  ('meamed', 20, 5),
  ('krum', 50, 17),
  ('nnm+median', 50, 20),
)


def run_dim(results):
  jobs = []
  for spec, n, f in DIM_CELLS:
    for dim in sorted({1, 2, 4, 8, min(n - 1, 20), n - 1}):
      key = f'{spec}|n={n}|f={f}|dim={dim}'
      if key not in results:
        jobs.append(('dim', n, f, dim, [(key, spec, None)], _options()))
  return _run_jobs(jobs, results, FLAGS.results.replace('_results', '_dim_results'), 'dim')


def _perturbed_float64(e, stack, honest, count=2048):
  """The best float64 ratio over random perturbations of a witness (scales 10⁻⁸ … 10⁻²).

  A witness on an exact tie that float32 rounding breaks adversarially has a float64 neighbour
  breaking it the same way, with nearly the same ratio: this finds it (κ⋆ is a supremum).
  """
  import jax.numpy as jnp

  from robustjax import robustness

  rng = np.random.default_rng(0)
  x = stack.astype(np.float64)[None] + (
    10.0 ** rng.uniform(-8, -2, size=(count, 1, 1)) * rng.normal(size=(count, *stack.shape))
  )
  m = np.broadcast_to(honest, (count, honest.size))
  r = np.asarray(robustness.ratios(e['rule'], jnp.asarray(x), jnp.asarray(m), f=e['f']))
  r = np.where(np.isfinite(r), r, -1.0)
  i = int(np.argmax(r))
  return robustness.ratio(e['rule'], x[i], honest)


def run_recheck(results):
  """Re-evaluates every witness of the kappa study with the rule in float64 (`kappa_float64`).

  The search and `ratio` run the rule in float32; a κ̂ that float32 rounding inflated would show
  here as a float64 ratio well below it.
  """
  import jax

  from robustjax import robustness

  t0 = time.time()
  worst = (0.0, None)
  for key, e in sorted(results.items()):
    if 'kappa' not in e or 'kappa_float64' in e:
      continue
    stack, honest = load_witness(FLAGS.witnesses, 'kappa', e['n'], key)
    with jax.enable_x64(True):
      r64 = robustness.ratio(e['rule'], stack.astype(np.float64), honest)
      if e['kappa'] > 1e-6 and r64 < e['kappa'] * (1 - 1e-3):
        r64 = max(r64, _perturbed_float64(e, stack, honest))
    e['kappa_float64'] = r64
    gap = (e['kappa'] - r64) / max(abs(e['kappa']), 1e-300)
    if e['kappa'] > 1e-6 and gap > worst[0]:
      worst = (gap, key)
  _save(FLAGS.results, results)
  print(
    f'recheck: largest relative drop in float64 {worst[0]:.3g} ({worst[1]}), '
    f'{time.time() - t0:.0f} s',
    flush=True,
  )


def run_benchmark():
  from robustjax import robustness

  rows = []
  for rule in ('median', 'trimmed_mean', 'meamed', 'krum'):
    b = robustness.benchmark(rule, n=20, f=4, dim=16, batch=4096, repeats=5)
    rows.append(b)
    print(
      f'{rule:14s} n=20 f=4 dim=16 batch=4096: {b["configs_per_s"]:,.0f} configs/s '
      f'(generation + evaluation), {b["eval_only_per_s"]:,.0f} configs/s (evaluation only)',
      flush=True,
    )
  return rows


# --------------------------------------------------------------------------------------------------
# Tables and figures.


def _fmt(x):
  if x is None:
    return '—'
  if isinstance(x, float) and math.isinf(x):
    return '∞'
  if abs(x) >= 1e4:
    return f'{x:.2e}'
  return f'{x:.4g}'


_MARK = {'exact': ' **exact**', '1-D search': ' (1-D search)', 'search': ''}


def write_table(results, path):
  from robustjax import robustness

  rows = [e for e in results.values() if 'kappa' in e]
  for e in rows:
    e['status'] = cell_status(e['kappa'], e['upper'], e['status'] != 'search')
  rows.sort(key=lambda e: (e['n'], e['rule'], e['f']))
  below = [e for e in rows if e['kappa'] < e['lower'] * (1 - 1e-6)]
  lines = [
    '# Measured (f, κ) robustness coefficients',
    '',
    'Generated by `robustjax kappa --docs --study=kappa` (see docs/robustness.md).',
    'Each cell: κ̂, the largest ratio found — a **measured lower bound** on κ⋆, re-checkable from',
    'its witness (`docs/robustness_witnesses/kappa_n<n>.npz`, see docs/robustness.md) — then the',
    '**proven** upper bound in parentheses where one is known. **exact**: κ̂ reaches the proven',
    'upper bound, so κ̂ = κ⋆. (1-D search): a coordinate-wise rule, whose κ⋆ is its κ⋆ on the line,',
    'searched densely there (`robustness.search_1d`). The first row is the universal lower bound',
    'f/(n − 2f), proven for every rule.',
    f'Search per cell: {FLAGS.restarts} restarts, up to {FLAGS.budget:,} configurations each',
    '(fewer for slow rules: the `budget` field of each entry), plus the attacks, the line search',
    'and the hill climber; dim n − 1 (1 for coordinate-wise rules).',
    '',
    f'Cells below f/(n − 2f): {len(below)} (must be 0).',
    '',
  ]
  skipped = sorted(
    (e['rule'], e['n'], e['f'], e['skipped']) for e in results.values() if 'skipped' in e
  )
  if skipped:
    lines += [
      f'Not searched (the rule evaluates fewer than {MIN_RATE:g} configurations/s there, measured):'
      + ', '.join(f' {r} n={n} f={f} ({why})' for r, n, f, why in skipped)
      + '.',
      '',
    ]
  checked = [e for e in rows if 'kappa_float64' in e]
  if checked:
    drops = [
      e for e in checked if e['kappa'] > 1e-6 and e['kappa_float64'] < e['kappa'] * (1 - 1e-3)
    ]
    lines += [
      f'Float64 re-check (`--study=recheck`: every witness re-evaluated with the rule in float64):'
      f' {len(checked)} cells, {len(drops)} with κ̂ > 10⁻⁶ and a float64 ratio more than 0.1 %'
      ' below it'
      + (': ' + ', '.join(f'{e["rule"]} n={e["n"]} f={e["f"]}' for e in drops) if drops else '')
      + '.',
      '',
    ]
  contradictions = [e for e in rows if e.get('contradiction')]
  if contradictions:
    lines += ['## CONTRADICTIONS (κ̂ above a proven upper bound)', '']
    for e in contradictions:
      lines.append(
        f'- **{e["rule"]} n={e["n"]} f={e["f"]}: κ̂ = {_fmt(e["kappa"])} > {_fmt(e["upper"])}**'
      )
    lines.append('')
  for n in sorted({e['n'] for e in rows}):
    sub = [e for e in rows if e['n'] == n]
    fs = sorted({e['f'] for e in sub})
    lines += [f'## n = {n}', '']
    lines.append('| rule | ' + ' | '.join(f'f={f}' for f in fs) + ' |')
    lines.append('|---|' + '---|' * len(fs))
    lines.append(
      '| *lower bound f/(n−2f)* | '
      + ' | '.join(_fmt(robustness.lower_bound(n, f)) for f in fs)
      + ' |'
    )
    for rule in sorted({e['rule'] for e in sub}, key=lambda r: (r.startswith('nnm+'), r)):
      cells = []
      for f in fs:
        e = next((x for x in sub if x['rule'] == rule and x['f'] == f), None)
        if e is None:
          cells.append('')
          continue
        c = _fmt(e['kappa'])
        if e['upper'] is not None:
          c += f' (≤ {_fmt(e["upper"])})'
        c += _MARK[e['status']]
        if e.get('contradiction'):
          c = f'**{c} CONTRADICTION**'
        cells.append(c)
      lines.append(f'| {rule} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  total = sum(e['seconds'] for e in rows)
  lines.append(f'Search time, summed over cells (two processes in parallel): {total / 60:.1f} min.')
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as fh:
    fh.write('\n'.join(lines) + '\n')


def _plt():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def plot_kappa(results, prefix):
  from robustjax import robustness

  plt = _plt()
  rows = [e for e in results.values() if 'kappa' in e]
  ns = sorted({e['n'] for e in rows})
  for pre in (False, True):
    sub = [e for e in rows if e['rule'].startswith('nnm+') == pre]
    if not sub:
      continue
    fig, axes = plt.subplots(1, len(ns), figsize=(5.2 * len(ns), 5.0), squeeze=False)
    rules = sorted({e['rule'] for e in sub})
    cmap = plt.get_cmap('tab20')
    for ax, n in zip(axes[0], ns):
      for i, rule in enumerate(rules):
        pts = sorted((e['f'] / n, e['kappa']) for e in sub if e['n'] == n and e['rule'] == rule)
        pts = [(a, max(b, 1e-4)) for a, b in pts if a > 0 and math.isfinite(b)]
        if pts:
          label = rule.removeprefix('nnm+')
          ax.plot(*zip(*pts), 'o-', ms=3, lw=1.2, color=cmap(i % 20), label=label)
      fs = list(range(1, (n + 1) // 2))
      ax.plot(
        [f / n for f in fs],
        [robustness.lower_bound(n, f) for f in fs],
        'k--',
        lw=2,
        label='f/(n−2f) (proven lower bound)',
      )
      ax.set_yscale('log')
      ax.set_ylim(bottom=1e-2)
      ax.set_xlabel('f / n')
      ax.set_title(f'n = {n}' + (' (after NNM)' if pre else ''))
      ax.grid(alpha=0.3, which='both')
    axes[0][0].set_ylabel('measured κ̂ (lower bound on κ⋆)')
    handles = {}
    for ax in axes[0]:
      for h, lab in zip(*ax.get_legend_handles_labels()):
        handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc='lower center', ncol=8, fontsize=8)
    fig.suptitle(
      'Measured κ̂ '
      + ('of F ∘ NNM ' if pre else '')
      + "against f/n (infinite values, the mean's for f ≥ 1, are not drawn)"
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(f'{prefix}kappa{"_nnm" if pre else ""}.png', dpi=110)
    plt.close(fig)


def multikrum_summary(results):
  """{conv: {n: {f: {m: κ̂}}}} from the MultiKrum cache."""
  out = {}
  for key, e in results.items():
    if 'kappa' not in e:
      continue
    conv = key.split('|')[1]
    out.setdefault(conv, {}).setdefault(e['n'], {}).setdefault(e['f'], {})[e['params']['m']] = e[
      'kappa'
    ]
  return out


def write_multikrum(results, path):
  from robustjax import robustness

  summ = multikrum_summary(results)
  lines = [
    '# MultiKrum study: measured κ̂ against m, f/n and the neighbour count',
    '',
    'Generated by `robustjax kappa --docs --study=multikrum` (see docs/robustness.md).',
    'Every number is a measured lower bound on κ⋆ (the best ratio found, re-checkable from its',
    'witness in `docs/robustness_witnesses/multikrum_n<n>.npz`). m = 1 is Krum. "paper": scores',
    'over n − f − 2 neighbours (Blanchard et al.); "ByzFL": n − f − 1. Krum\'s proven bound',
    '6(1 + f/(n − 2f)) (Allouah et al. 2023) holds for m = 1 with n − f − 2 neighbours.',
    '',
  ]
  for conv, label in (
    ('paper', 'n − f − 2 neighbours (paper)'),
    ('byzfl', 'n − f − 1 neighbours (ByzFL)'),
  ):
    for n in sorted(summ.get(conv, {})):
      d = summ[conv][n]
      lines += [
        f'## n = {n}, {label}',
        '',
        '| f | f/n | f/(n−2f) | ' + ' | '.join(f'm={m}' for m in range(1, n + 1)) + ' | best m |',
        '|---|---|---|' + '---|' * (n + 1),
      ]
      for f in sorted(d):
        ms = d[f]
        best = min(ms, key=lambda m: ms[m])
        cells = [_fmt(ms[m]) if m in ms else '' for m in range(1, n + 1)]
        lines.append(
          f'| {f} | {f / n:.2f} | {_fmt(robustness.lower_bound(n, f))} | '
          + ' | '.join(cells)
          + f' | {best} |'
        )
      lines.append('')
  with open(path, 'w') as fh:
    fh.write('\n'.join(lines) + '\n')


def plot_multikrum(results, prefix):
  from robustjax import robustness

  plt = _plt()
  summ = multikrum_summary(results)
  ns = sorted(summ.get('paper', {}))
  if not ns:
    return
  # κ̂ against m, one line per f.
  fig, axes = plt.subplots(2, len(ns), figsize=(5.5 * len(ns), 8.4), squeeze=False)
  for row, conv in enumerate(('paper', 'byzfl')):
    for ax, n in zip(axes[row], ns):
      d = summ.get(conv, {}).get(n, {})
      cmap = plt.get_cmap('viridis')
      fs = sorted(d)
      for i, f in enumerate(fs):
        xs = sorted(d[f])
        ax.plot(
          xs,
          [max(d[f][m], 1e-4) for m in xs],
          'o-',
          ms=2.5,
          lw=1,
          color=cmap(i / max(len(fs) - 1, 1)),
          label=f'f={f}' if len(fs) <= 12 or i % 3 == 0 else None,
        )
      ax.set_yscale('log')
      ax.set_xlabel('m (inputs averaged; m = 1 is Krum)')
      ax.set_title(
        f'MultiKrum, n = {n}, {"n − f − 2" if conv == "paper" else "n − f − 1"} neighbours'
      )
      ax.grid(alpha=0.3, which='both')
      ax.legend(fontsize=6, ncol=2)
    axes[row][0].set_ylabel('measured κ̂ (lower bound on κ⋆)')
  fig.tight_layout()
  fig.savefig(f'{prefix}multikrum_m.png', dpi=110)
  plt.close(fig)

  # κ̂ against f/n, one line per m (as a function of n − f).
  fig, axes = plt.subplots(1, len(ns), figsize=(5.5 * len(ns), 4.6), squeeze=False)
  choices = (
    ('m = 1 (Krum)', lambda n, f: 1),
    ('m = 2', lambda n, f: 2),
    ('m = (n − f)/2', lambda n, f: max(1, (n - f) // 2)),
    ('m = n − 2f', lambda n, f: max(1, n - 2 * f)),
    ('m = n − f', lambda n, f: n - f),
  )
  for ax, n in zip(axes[0], ns):
    for j, (label, pick) in enumerate(choices):
      for conv, style in (('paper', '-'), ('byzfl', ':')):
        d = summ.get(conv, {}).get(n, {})
        fs = sorted(f for f in d if f > 0 and pick(n, f) in d[f])
        if fs:
          ax.plot(
            [f / n for f in fs],
            [max(d[f][pick(n, f)], 1e-4) for f in fs],
            'o' + style,
            ms=3,
            color=f'C{j}',
            label=f'{label}, {conv}',
          )
    fs = [f for f in range(1, n) if n > 2 * f + 2]
    ax.plot(
      [f / n for f in fs],
      [robustness.lower_bound(n, f) for f in fs],
      'k--',
      lw=1.5,
      label='f/(n−2f)',
    )
    ax.plot(
      [f / n for f in fs],
      [6 * (1 + robustness.lower_bound(n, f)) for f in fs],
      '--',
      color='grey',
      lw=1,
      label='Krum bound 6(1 + f/(n−2f))',
    )
    ax.set_yscale('log')
    ax.set_xlabel('f / n')
    ax.set_title(
      f'MultiKrum, n = {n}\n(solid: n − f − 2 neighbours; dotted: n − f − 1)', fontsize=10
    )
    ax.grid(alpha=0.3, which='both')
  axes[0][0].set_ylabel('measured κ̂ (lower bound on κ⋆)')
  axes[0][-1].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(f'{prefix}multikrum_vs_f.png', dpi=110)
  plt.close(fig)


def write_dim(results, path):
  rows = {}
  for e in results.values():
    if 'kappa' in e:
      rows.setdefault((e['rule'], e['n'], e['f']), {})[e['dim']] = e['kappa']
  dims = sorted({d for r in rows.values() for d in r})
  lines = [
    '# The effect of the search dimension on κ̂',
    '',
    'Generated by `robustjax kappa --docs --study=dim`: the same search (seeded per cell',
    'and dimension) at every dim; κ̂ is a measured lower bound on κ⋆ in each column.',
    '',
    '| rule | n | f | ' + ' | '.join(f'dim {d}' for d in dims) + ' |',
    '|---|---|---|' + '---|' * len(dims),
  ]
  for (rule, n, f), r in sorted(rows.items()):
    lines.append(f'| {rule} | {n} | {f} | ' + ' | '.join(_fmt(r.get(d)) for d in dims) + ' |')
  with open(path, 'w') as fh:
    fh.write('\n'.join(lines) + '\n')


def _fill_output_paths() -> None:
  """Unset output paths go under --workdir, or docs/ with --docs (never docs/ by default)."""
  base = 'docs' if FLAGS.docs else FLAGS.workdir
  for name, rel in OUTPUTS.items():
    if FLAGS[name].value is None:
      FLAGS[name].value = os.path.join(base, rel)
  os.makedirs(os.path.dirname(FLAGS.fig_prefix) or '.', exist_ok=True)


def main(argv):
  del argv
  _fill_output_paths()
  if FLAGS.study in ('all', 'benchmark') and not FLAGS.plot_only:
    run_benchmark()
  if FLAGS.study in ('all', 'kappa'):
    results = _load(FLAGS.results)
    if not FLAGS.plot_only:
      run_kappa(results)
    write_table(results, FLAGS.table)
    plot_kappa(results, FLAGS.fig_prefix)
  if FLAGS.study in ('all', 'recheck'):
    results = _load(FLAGS.results)
    if not FLAGS.plot_only:
      run_recheck(results)
    write_table(results, FLAGS.table)
  if FLAGS.study in ('all', 'multikrum'):
    results = _load(FLAGS.mk_results)
    if not FLAGS.plot_only:
      run_multikrum(results)
    write_multikrum(results, FLAGS.mk_table)
    plot_multikrum(results, FLAGS.fig_prefix)
  if FLAGS.study in ('all', 'dim'):
    path = FLAGS.results.replace('_results', '_dim_results')
    results = _load(path)
    if not FLAGS.plot_only:
      run_dim(results)
    write_dim(results, FLAGS.dim_table)


if __name__ == '__main__':
  define_flags()
  app.run(main)
