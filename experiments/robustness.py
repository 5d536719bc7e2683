"""Empirical (f, κ) robustness of every aggregator, with and without NNM, and the MultiKrum study.

For each rule, n and feasible f, `robustjax.robustness.estimate_kappa` searches for inputs with a
large ratio ‖F(x) − x̄_S‖² / ((1/|S|) Σ_{i∈S} ‖x_i − x̄_S‖²); the best ratio found, κ̂, is a measured
*lower* bound on the rule's κ⋆. It is tabulated against the proven upper bound (where one is known)
and the universal lower bound f/(n − 2f). A κ̂ above a proven upper bound is a contradiction: it is
printed loudly and its witness saved as `.npz`.

Usage:
  python experiments/robustness.py --study=kappa       # the table and figures for every rule
  python experiments/robustness.py --study=multikrum   # κ̂ of MultiKrum against m and f/n
  python experiments/robustness.py --study=benchmark   # configurations per second
  python experiments/robustness.py --study=all

Results are cached in `--results` (JSON, one entry per (rule, n, f)) so an interrupted run resumes
and the tables / figures can be regenerated with `--plot_only`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import zlib

import jax
from absl import app, flags

from robustjax import aggregators, pipeline, robustness

FLAGS = flags.FLAGS
flags.DEFINE_enum('study', 'all', ['all', 'kappa', 'multikrum', 'benchmark'], 'What to run.')
flags.DEFINE_list('ns', ['10', '20', '50'], 'Numbers of inputs n.')
flags.DEFINE_list('rules', [], 'Aggregators (default: every registered one).')
flags.DEFINE_bool('with_nnm', True, 'Also measure every rule after NNM.')
flags.DEFINE_integer('dim', 8, 'Dimension of the inputs.')
flags.DEFINE_integer('budget', 6000, 'Configurations evaluated per (rule, n, f).')
flags.DEFINE_integer('seed', 0, 'PRNG seed.')
flags.DEFINE_integer('batch', 512, 'Configurations per compiled call.')
flags.DEFINE_float('local_fraction', 0.3, 'Share of the budget spent in local search (0: none).')
flags.DEFINE_integer('local_batch', 64, 'Configurations refined in parallel by the local search.')
flags.DEFINE_list('f_step', [], 'n:step, a stride over f for that n (default: every feasible f).')
flags.DEFINE_integer(
  'subset_max_n', 10, 'mda / smea (exponential subset search) only up to this n.'
)
flags.DEFINE_list('mk_ns', ['10', '20'], 'n for the MultiKrum study (m = 1 .. n − f, every f).')
flags.DEFINE_string('results', 'docs/robustness_results.json', 'JSON cache of all results.')
flags.DEFINE_string('table', 'docs/robustness_table.md', 'Markdown table written here.')
flags.DEFINE_string('fig_prefix', 'docs/figures/robustness_', 'Figures: <prefix><name>.png.')
flags.DEFINE_string('witness_dir', 'docs/robustness_witnesses', 'Contradiction witnesses (.npz).')
flags.DEFINE_string(
  'witness_store', '/tmp/robustness_witnesses', 'Every witness (.npz), for cross-evaluation.'
)
flags.DEFINE_bool('plot_only', False, 'Only rebuild the tables and figures from --results.')


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


def _spec(rule, pre, params):
  name = ('nnm+' if pre else '') + rule
  return (name, params) if params else name


def _key(rule, pre, n, f, params):
  extra = ''.join(f',{k}={v}' for k, v in sorted(params.items()))
  return f'{"nnm+" if pre else ""}{rule}{extra}|n={n}|f={f}'


def measure(results, rule, pre, n, f, params=None, *, budget=None):
  """Runs (or reads from the cache) one estimate; returns the entry or None if infeasible."""
  params = params or {}
  k = _key(rule, pre, n, f, params)
  if k in results:
    return results[k]
  spec = _spec(rule, pre, params)
  seed = jax.random.fold_in(jax.random.key(FLAGS.seed), zlib.crc32(k.encode()) % (2**31))
  try:
    est = robustness.estimate_kappa(
      spec,
      n,
      f,
      FLAGS.dim,
      seed,
      budget or FLAGS.budget,
      batch=FLAGS.batch,
      local_batch=FLAGS.local_batch,
      local_fraction=FLAGS.local_fraction,
    )
  except ValueError as err:
    results[k] = {'infeasible': str(err).splitlines()[0]}
    return results[k]
  ub = robustness.upper_bound(spec, n, f)
  lb = robustness.lower_bound(n, f)
  entry = {
    'rule': ('nnm+' if pre else '') + rule,
    'base': rule,
    'pre': 'nnm' if pre else '',
    'params': params,
    'n': n,
    'f': f,
    'kappa': est.kappa,
    'upper': ub,
    'lower': lb,
    'family': est.witness.family,
    'evaluated': est.evaluated,
    'seconds': round(est.seconds, 2),
  }
  if ub is not None and est.kappa > ub * (1 + 1e-4) + 1e-6:
    os.makedirs(FLAGS.witness_dir, exist_ok=True)
    path = os.path.join(FLAGS.witness_dir, k.replace('|', '_').replace(',', '_') + '.npz')
    est.witness.save(path, kappa=est.kappa, upper=ub, n=n, f=f)
    entry['contradiction'] = path
    bar = '!' * 100
    print(
      f'\n{bar}\nCONTRADICTION: {entry["rule"]} n={n} f={f}: measured kappa {est.kappa:.6g} > '
      f'proven upper bound {ub:.6g}\nwitness saved to {path}\n{bar}\n',
      file=sys.stderr,
      flush=True,
    )
  if FLAGS.witness_store:
    os.makedirs(FLAGS.witness_store, exist_ok=True)
    est.witness.save(_witness_path(k), kappa=est.kappa)
  results[k] = entry
  return entry


def _witness_path(k):
  return os.path.join(FLAGS.witness_store, k.replace('|', '_').replace(',', '_') + '.npz')


def cross_evaluate_multikrum(results):
  """Re-evaluates every Krum / MultiKrum witness of an (n, f) under every m of that (n, f).

  Each witness is a valid input, so max over witnesses of ratio(MultiKrum_m, witness) is still a
  measured lower bound on κ⋆(MultiKrum_m); it removes the search's seed-to-seed noise between
  neighbouring m (and makes Krum and MultiKrum m=1, the same rule, agree).
  """
  groups = {}
  for k, e in results.items():
    if 'kappa' in e and not e['pre'] and e['base'] in ('krum', 'multikrum'):
      if e['base'] == 'krum' or 'm' in e['params']:
        groups.setdefault((e['n'], e['f']), []).append((k, e))
  for _, items in sorted(groups.items()):
    wits = []
    for k, _ in items:
      path = _witness_path(k)
      if os.path.exists(path):
        wits.append(robustness.Witness.load(path))
    for _, e in items:
      spec = 'krum' if e['base'] == 'krum' else ('multikrum', e['params'])
      best, src = e['kappa'], 'search'
      for w in wits:
        r = robustness.ratio(spec, w.stack, w.honest)
        if r > best:
          best, src = r, 'cross'
      e['kappa_search'] = e.get('kappa_search', e['kappa'])
      e['kappa'] = max(best, e['kappa'])
      e['kappa_source'] = src


def _fs(n):
  steps = dict(item.split(':') for item in FLAGS.f_step)
  step = int(steps.get(str(n), 1))
  fs = list(range(0, (n + 1) // 2, step))
  if (n - 1) // 2 not in fs:
    fs.append((n - 1) // 2)
  return fs


def _coarse_first(fs):
  """Orders f values so that a truncated run still spans the range: ends and middle first."""
  out, seen = [], set()
  levels = [fs]
  while levels:
    nxt = []
    for lv in levels:
      if not lv:
        continue
      mid = len(lv) // 2
      for f in (lv[0], lv[-1], lv[mid]):
        if f not in seen:
          seen.add(f)
          out.append(f)
      nxt += [lv[1:mid], lv[mid + 1 : -1]]
    levels = [lv for lv in nxt if lv]
  return out


def run_kappa(results):
  rules = FLAGS.rules or [r for r in aggregators.names() if not aggregators.properties(r).decodes]
  pres = (False, True) if FLAGS.with_nnm else (False,)
  t0 = time.time()
  # Coarse to fine over f (every n and rule at a few f first), so a run cut short is still usable.
  # f = 0 (no adversary: how far the rule is from the mean) comes last.
  order = {n: _coarse_first([f for f in _fs(n) if f]) + [0] for n in map(int, FLAGS.ns)}
  depth = max(len(v) for v in order.values())
  jobs = []
  for i in range(depth):
    for n in map(int, FLAGS.ns):
      if i >= len(order[n]):
        continue
      f = order[n][i]
      for rule in rules:
        if pipeline.as_rule(rule, 0).exponential and n > FLAGS.subset_max_n:
          continue
        for pre in pres:
          jobs.append((rule, pre, n, f))
  for rule, pre, n, f in jobs:
    e = measure(results, rule, pre, n, f)
    if 'kappa' in e:
      print(
        f'[{time.time() - t0:7.0f}s] {e["rule"]:24s} n={n:3d} f={f:3d} '
        f'kappa={e["kappa"]:.4g} lower={e["lower"]:.3g} upper={e["upper"]} '
        f'({e["seconds"]}s, {e["family"]})',
        flush=True,
      )
    _save(FLAGS.results, results)


def run_multikrum(results):
  t0 = time.time()
  jobs = []
  for n in map(int, FLAGS.mk_ns):
    fs = [f for f in range(n) if n > 2 * f + 2]
    for f in _coarse_first(fs):
      jobs.append((n, f, 0))  # Krum
    ms = {f: _coarse_first(list(range(1, n - f + 1))) for f in fs}
    for i in range(max(len(v) for v in ms.values())):
      for f in _coarse_first(fs):
        if i < len(ms[f]):
          jobs.append((n, f, ms[f][i]))
  for n, f, m in jobs:
    if m == 0:
      e = measure(results, 'krum', False, n, f)
    else:
      e = measure(results, 'multikrum', False, n, f, {'m': m})
    print(
      f'[{time.time() - t0:7.0f}s] {"multikrum" if m else "krum"} n={n} f={f} m={m} '
      f'kappa={e["kappa"]:.4g} ({e["seconds"]}s)',
      flush=True,
    )
    _save(FLAGS.results, results)


def run_benchmark():
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


def write_table(results, path):
  rows = [e for e in results.values() if 'kappa' in e and not e['params']]
  rows.sort(key=lambda e: (e['n'], e['base'], e['pre'], e['f']))
  lines = [
    '# Measured (f, κ) robustness coefficients',
    '',
    'Generated by `python experiments/robustness.py --study=kappa` (see docs/robustness.md).',
    'κ̂: the largest ratio the search found — a **measured lower bound** on κ⋆, re-checkable from',
    'its witness. upper: the **proven** upper bound from the papers (— where none is known).',
    'lower: the universal lower bound f/(n − 2f), proven for every rule.',
    f'dim = {FLAGS.dim}, seed {FLAGS.seed}; configurations evaluated per cell: '
    f'{min(e["evaluated"] for e in rows)} to {max(e["evaluated"] for e in rows)} (the `evaluated` '
    f'field of each entry in the results JSON).',
    '',
  ]
  contradictions = [e for e in rows if 'contradiction' in e]
  if contradictions:
    lines += ['## CONTRADICTIONS (κ̂ above a proven upper bound)', '']
    for e in contradictions:
      lines.append(
        f'- **{e["rule"]} n={e["n"]} f={e["f"]}: κ̂ = {_fmt(e["kappa"])} > {_fmt(e["upper"])}**, '
        f'witness `{e["contradiction"]}`'
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
        if 'contradiction' in e:
          c = f'**{c} CONTRADICTION**'
        cells.append(c)
      lines.append(f'| {rule} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  total = sum(e['seconds'] for e in rows)
  lines.append(f'Search time, summed over cells: {total / 60:.1f} min.')
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as fh:
    fh.write('\n'.join(lines) + '\n')


def plot_kappa(results, prefix):
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  rows = [e for e in results.values() if 'kappa' in e and not e['params']]
  ns = sorted({e['n'] for e in rows})
  for pre in ('', 'nnm'):
    sub = [e for e in rows if e['pre'] == pre]
    if not sub:
      continue
    fig, axes = plt.subplots(1, len(ns), figsize=(5.2 * len(ns), 5.0), squeeze=False)
    rules = sorted({e['base'] for e in sub})
    cmap = plt.get_cmap('tab20')
    for ax, n in zip(axes[0], ns):
      for i, rule in enumerate(rules):
        pts = sorted((e['f'] / n, e['kappa']) for e in sub if e['n'] == n and e['base'] == rule)
        pts = [(a, max(b, 1e-4)) for a, b in pts if a > 0]
        if pts:
          ax.plot(*zip(*pts), 'o-', ms=3, lw=1.2, color=cmap(i % 20), label=rule)
      fs = [f for f in range(1, (n + 1) // 2)]
      ax.plot(
        [f / n for f in fs],
        [robustness.lower_bound(n, f) for f in fs],
        'k--',
        lw=2,
        label='f/(n−2f) (proven lower bound)',
      )
      ax.set_yscale('log')
      ax.set_ylim(1e-2, 1e7)
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
      'Measured κ̂ ' + ('of F ∘ NNM ' if pre else '') + 'against f/n (huge values: not robust)'
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(f'{prefix}kappa{"_nnm" if pre else ""}.png', dpi=110)
    plt.close(fig)


def multikrum_summary(results):
  """{n: {f: {'krum': κ̂, 'm': {m: κ̂}}}} from the cache."""
  out = {}
  for e in results.values():
    if 'kappa' not in e or e['pre']:
      continue
    if e['base'] == 'multikrum' and 'm' in e['params']:
      out.setdefault(e['n'], {}).setdefault(e['f'], {'m': {}})['m'][e['params']['m']] = e['kappa']
    elif e['base'] == 'krum' and not e['params']:
      out.setdefault(e['n'], {}).setdefault(e['f'], {'m': {}})['krum'] = e['kappa']
  return out


def write_multikrum(results, path):
  summ = multikrum_summary(results)
  lines = [
    '# MultiKrum study: measured κ̂ against m and f/n',
    '',
    'Generated by `python experiments/robustness.py --study=multikrum`. Every number is a measured',
    'lower bound on κ⋆ (best ratio found by `estimate_kappa`), not a proven bound.',
    '',
  ]
  for n in sorted(summ):
    lines += [
      f'## n = {n}',
      '',
      '| f | f/n | Krum | ' + ' | '.join(f'm={m}' for m in range(1, n + 1)) + ' | best m |',
      '|---|---|---|' + '---|' * (n + 1),
    ]
    for f in sorted(summ[n]):
      d = summ[n][f]
      ms = d['m']
      best = min(ms, key=lambda m: ms[m]) if ms else None
      cells = [_fmt(ms[m]) if m in ms else '' for m in range(1, n + 1)]
      lines.append(
        f'| {f} | {f / n:.2f} | {_fmt(d.get("krum"))} | ' + ' | '.join(cells) + f' | {best} |'
      )
    lines.append('')
  with open(path, 'w') as fh:
    fh.write('\n'.join(lines) + '\n')


def plot_multikrum(results, prefix):
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  summ = multikrum_summary(results)
  ns = sorted(summ)
  if not ns:
    return
  fig, axes = plt.subplots(1, len(ns), figsize=(5.5 * len(ns), 4.4), squeeze=False)
  for ax, n in zip(axes[0], ns):
    fs = sorted(summ[n])
    cmap = plt.get_cmap('viridis')
    for i, f in enumerate(fs):
      ms = summ[n][f]['m']
      if not ms:
        continue
      xs = sorted(ms)
      ax.plot(
        xs,
        [max(ms[m], 1e-4) for m in xs],
        'o-',
        ms=3,
        color=cmap(i / max(len(fs) - 1, 1)),
        label=f'f={f} (f/n={f / n:.2f})',
      )
      if 'krum' in summ[n][f]:
        ax.plot([1], [max(summ[n][f]['krum'], 1e-4)], 'kx', ms=8)
    ax.set_yscale('log')
    ax.set_xlabel('m (number of inputs averaged)')
    ax.set_title(f'MultiKrum, n = {n} (x: Krum)')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel('measured κ̂ (lower bound on κ⋆)')
  fig.tight_layout()
  fig.savefig(f'{prefix}multikrum_m.png', dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for n, mk in zip(ns, ('o', 's', '^')):
    fs = sorted(f for f in summ[n] if f > 0 and 'krum' in summ[n][f] and summ[n][f]['m'])
    if not fs:
      continue
    kr = [summ[n][f]['krum'] for f in fs]
    full = [summ[n][f]['m'].get(n - f, math.nan) for f in fs]
    best = [min(summ[n][f]['m'].values()) for f in fs]
    x = [f / n for f in fs]
    ax.plot(x, kr, mk + '-', color='C3', label=f'Krum, n={n}')
    ax.plot(x, full, mk + '-', color='C0', label=f'MultiKrum m=n−f, n={n}')
    ax.plot(x, best, mk + ':', color='C2', label=f'MultiKrum best m, n={n}')
    ax.plot(
      x,
      [robustness.lower_bound(n, f) for f in fs],
      mk + '--',
      color='k',
      lw=1,
      label=f'f/(n−2f), n={n}',
    )
  ax.set_yscale('log')
  ax.set_xlabel('f / n')
  ax.set_ylabel('measured κ̂ (lower bound on κ⋆)')
  ax.set_title('MultiKrum against Krum')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(f'{prefix}multikrum_vs_krum.png', dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  results = _load(FLAGS.results)
  if not FLAGS.plot_only:
    if FLAGS.study in ('all', 'benchmark'):
      run_benchmark()
    if FLAGS.study in ('all', 'kappa'):
      run_kappa(results)
    if FLAGS.study in ('all', 'multikrum'):
      run_multikrum(results)
    _save(FLAGS.results, results)
  if FLAGS.study in ('all', 'kappa'):
    write_table(results, FLAGS.table)
    plot_kappa(results, FLAGS.fig_prefix)
  if FLAGS.study in ('all', 'multikrum'):
    cross_evaluate_multikrum(results)
    _save(FLAGS.results, results)
    write_multikrum(results, FLAGS.table.replace('_table', '_multikrum'))
    plot_multikrum(results, FLAGS.fig_prefix)


if __name__ == '__main__':
  app.run(main)
