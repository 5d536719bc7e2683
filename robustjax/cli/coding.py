r"""The LAD / Com-LAD experiment: robust linear regression with cyclic gradient coding.

Reproduces (as reconstructed, see docs/gradient_coding.md) the numerical study of Li, Allouah,
Guerraoui, Skoglund, Xiao, arXiv:2603.28780: n workers, f Byzantine, full-batch gradient descent on
a synthetic linear regression with one sample per data subset; plain robust aggregation (averaging,
CWTM, NNM + CWTM) against LAD (the same rules on cyclic coded vectors, redundancy d) and DRACO
(repetition r = 2f + 1, majority vote), each also with compressed messages (Com-LAD).

Every run is the library's one training step (`robustjax.training.make_step`, with
``coding='cyclic(d=…)'`` or ``'draco'``, full-batch ``batch_size=0``) in its run loop
(`robustjax.training.make_advance`: one `lax.scan` over the steps, the seeds vmapped); one program
per (f, rule, compression, redundancy).

Usage:
  robustjax coding --config=lad \
      --workdir=/tmp/lad [--config.update_doc=True]
  robustjax coding --config=lad:smoke --workdir=/tmp/s

Writes ``results.npz``, ``summary.json`` and the figures ``figures/gradient_coding_*.png``
(``make_figures``) in the workdir; ``--config.figures_dir=docs/figures`` writes the figures into
the repository's docs instead, and ``--config.update_doc=True`` rewrites the results table between
the ``<!-- results:ATTACK -->`` markers of docs/gradient_coding.md (never by default).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from robustjax import attacks, coding, compression, configs, data, pipeline, training

_FLAGS = {}


def define_flags():
  """Defines the command's absl flags (the `robustjax` command calls it)."""
  _FLAGS['config'] = config_flags.DEFINE_config_file('config', configs.path('lad'))
  _FLAGS['workdir'] = flags.DEFINE_string('workdir', '/tmp/robustjax_lad', 'results directory')


# The key of DRACO's runs among the rules' (a method of the study, decoded by its own vote).
DRACO = 'DRACO'

RULE_LABELS = {'mean': 'averaging', 'trimmed_mean': 'CWTM', 'nnm+trimmed_mean': 'NNM+CWTM'}


def make_problem(cfg, seed: int):
  """One seed's data: the dataset, its solution w⋆ and the smoothness constant L."""
  ds = data.synthetic_linear_regression(
    num_samples=cfg.num_samples,
    dim=cfg.dim,
    heterogeneity=cfg.heterogeneity,
    noise=cfg.noise,
    seed=seed,
  )
  n = cfg.num_workers
  if cfg.num_samples % n:
    raise ValueError(f'num_samples={cfg.num_samples} must be a multiple of num_workers={n}')
  a64 = np.asarray(ds.x_train, np.float64)
  lip = np.linalg.eigvalsh(a64.T @ a64 / a64.shape[0]).max() + cfg.ridge
  sol = data.least_squares_solution(ds, ridge=cfg.ridge)
  return ds, sol.astype(np.float32), lip


def make_compressor(cfg, on: bool):
  if not on or cfg.compressor == 'none':
    return None
  if cfg.compressor == 'qsgd':
    return f'qsgd(levels={cfg.qsgd_levels})'
  if cfg.compressor == 'rand_k':
    return f'rand_k(fraction={cfg.rand_k_fraction})'
  raise ValueError(f'unknown compressor {cfg.compressor!r}; known: qsgd, rand_k, none')


def _code(d: int, redraw: bool, draco: bool) -> str:
  if draco:
    return 'draco'
  return f'cyclic(d={d}, redraw={redraw})'  # d = 1, fixed: the plain assignment, B = I


def run_sweep(cfg, problems, *, rule, f, compressor, variants, lr, draco=False):
  """One rule over `variants` (pairs (d, redraw)), the seeds vmapped: the engine's step
  (`robustjax.training.make_step`) in its run loop (`make_advance`, full batch, one scan).

  Returns (errors (S, V, T), subsets per worker (V,), bits per step).
  """
  n = cfg.num_workers
  k = cfg.num_samples // n
  parts = [np.arange(j * k, (j + 1) * k) for j in range(n)]
  tx = optax.sgd(lr)
  built = [
    training.least_squares_problem(ds, parts, tx, ridge=cfg.ridge, solution=sol)
    for ds, sol, _ in problems
  ]
  datas = [p.data for p in built]
  batch = {key: jnp.asarray(np.stack([d[key] for d in datas])) for key in datas[0]}
  axes = {key: 0 for key in batch}
  for key in ('idx', 'sizes'):  # the subsets are the same for every seed
    batch[key], axes[key] = jnp.asarray(datas[0][key]), None
  errs, loads, bits = [], [], 0.0
  for d, redraw in variants:
    spec = training.TrainSpec(
      num_workers=n,
      num_byzantine=f,
      batch_size=0,
      momentum=0.0,
      algorithm='dsgd',
      local_steps=1,
      local_lr=0.0,
      pipeline=pipeline.as_rule('draco' if draco else rule, f),
      attack=attacks.get(cfg.attack if f > 0 else 'none'),
      code=coding.make(_code(d, redraw, draco), n=n, f=f),
      compressor=compression.make(compressor) if compressor else None,
    )
    step = training.make_step(spec, built[0])
    w0 = jnp.zeros((cfg.dim,), jnp.float32)
    seeds = [cfg.seed + 1000 * f + s for s in range(len(problems))]
    states = [training.init_state(spec, built[0], w0, {}, s) for s in seeds]
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    advance = training.make_advance(
      step, data_axes=axes, evaluate=training.make_eval(spec, built[0])
    )
    _, hist = advance(state, batch, cfg.num_steps)
    errs.append(np.asarray(hist['eval_rel_dist']).T)  # (S, T)
    loads.append(float(hist['load'][0, 0]))
    bits = float(hist['bits'][0, 0])
  return np.stack(errs, axis=1), np.asarray(loads), bits


def run(cfg) -> dict:
  """The full sweep; returns a dict of results (numpy arrays and metadata)."""
  seeds = [cfg.seed + s for s in range(cfg.num_seeds)]
  problem = [make_problem(cfg, s) for s in seeds]
  lr = cfg.learning_rate or 1.0 / max(p[2] for p in problem)
  variants = [(1, False)] + [(int(d), True) for d in cfg.redundancies]
  results = {'variants': variants, 'lr': lr, 'runs': {}}
  for f in cfg.byzantine:
    for compressed in (False, True):
      comp = make_compressor(cfg, compressed)
      if compressed and comp is None:
        continue
      tag = 'com' if compressed else 'plain'
      for rule in cfg.rules:
        t0 = time.time()
        errs, loads, bits = run_sweep(
          cfg, problem, rule=rule, f=f, compressor=comp, variants=variants, lr=lr
        )
        results['runs'][(f, tag, rule)] = (errs, loads, bits)
        print(
          f'f={f:2d} {tag:5s} {rule:18s} {time.time() - t0:6.1f}s  final err by variant:',
          ' '.join(f'{e:.2e}' for e in np.median(errs[:, :, -1], axis=0)),
          flush=True,
        )
      if cfg.draco:
        t0 = time.time()
        errs, loads, bits = run_sweep(
          cfg, problem, rule=None, f=f, compressor=comp, variants=[(1, False)], lr=lr, draco=True
        )
        results['runs'][(f, tag, DRACO)] = (errs, loads, bits)
        print(
          f'f={f:2d} {tag:5s} {DRACO:18s} {time.time() - t0:6.1f}s  final err:',
          f'{np.median(errs[:, 0, -1]):.2e}  load {loads[0]:.1f}',
          flush=True,
        )
  return results


def summarize(cfg, results) -> list[dict]:
  """One row per (f, compression, method, variant): median and quartiles of the final error."""
  rows = []
  for (f, tag, rule), (errs, loads, bits) in results['runs'].items():
    names = (
      [('DRACO', 0)]
      if rule == DRACO
      else [
        (f'{RULE_LABELS.get(rule, rule)}' if i == 0 else f'LAD-{RULE_LABELS.get(rule, rule)}', i)
        for i in range(len(results['variants']))
      ]
    )
    for name, i in names:
      final = errs[:, i, -1]
      d = results['variants'][i][0] if rule != DRACO else None
      rows.append(
        {
          'f': f,
          'compressed': tag == 'com',
          'method': name,
          'rule': rule,
          'd': d,
          'subsets_per_worker': float(loads[i]),
          'bits_per_step': bits,
          'final_error_median': float(np.median(final)),
          'final_error_q25': float(np.quantile(final, 0.25)),
          'final_error_q75': float(np.quantile(final, 0.75)),
        }
      )
  return rows


def markdown_table(cfg, rows) -> str:
  """Final relative error (median over seeds) per method, columns f; plain and compressed."""
  fs = list(cfg.byzantine)
  out = []
  for compressed in (False, True):
    sub = [r for r in rows if r['compressed'] == compressed]
    if not sub:
      continue
    bits = sub[0]['bits_per_step']
    title = 'compressed (Com-LAD, ' + cfg.compressor + ')' if compressed else 'uncompressed'
    out.append(f'**{title}**, {bits / 1e3:.1f} kbit per step (all n workers)\n')
    out.append(
      '| method | d | subsets / worker / step | ' + ' | '.join(f'f = {f}' for f in fs) + ' |'
    )
    out.append('|---|---|---|' + '---|' * len(fs))
    keys = []
    for r in sub:
      k = (r['method'], r['d'])
      if k not in keys:
        keys.append(k)
    for method, d in keys:
      cells, loads = [], []
      for f in fs:
        match = [r for r in sub if r['f'] == f and r['method'] == method and r['d'] == d]
        if match:
          v = match[0]['final_error_median']
          cells.append(f'{v:.2e}' if np.isfinite(v) and v < 1e3 else 'diverged')
          loads.append(match[0]['subsets_per_worker'])
        else:
          cells.append('–')
      uniq = list(dict.fromkeys(f'{x:.3g}' for x in loads))
      load = ' / '.join(uniq) if loads else '–'  # one value, or one per f (DRACO)
      dd = '–' if d is None else (f'{d}' if method.startswith('LAD') else '1 (fixed)')
      out.append(f'| {method} | {dd} | {load} | ' + ' | '.join(cells) + ' |')
    out.append('')
  return '\n'.join(out)


def make_figures(cfg, results, outdir: str) -> list[str]:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  os.makedirs(outdir, exist_ok=True)
  runs = results['runs']
  variants = results['variants']
  fs = list(cfg.byzantine)
  ds = [v[0] for v in variants[1:]]
  steps = np.arange(1, cfg.num_steps + 1)
  colors = {'mean': 'tab:gray', 'trimmed_mean': 'tab:blue', 'nnm+trimmed_mean': 'tab:green'}
  paths = []

  # diverged runs (CWTM at f = 20 without enough redundancy) leave through the top; exact DRACO
  # (error ~1e-14, optimisation only) through the bottom, drawn there as a downward triangle
  top, bottom = 1e2, 1e-6

  def med(x):
    m = np.median(x, axis=0)
    return np.where(np.isfinite(m), np.minimum(m, 10 * top), 10 * top)

  def finish(ax):
    ax.set_ylim(bottom, top)
    ax.grid(alpha=0.3, which='both')

  draco_loads = [runs[(f, 'plain', DRACO)][1][0] for f in fs if (f, 'plain', DRACO) in runs]
  draco_label = 'DRACO (' + ' / '.join(f'{x:.3g}' for x in draco_loads) + ' subsets)'

  def panels():
    """One panel per f, sharing the y axis."""
    fig, axes = plt.subplots(1, len(fs), figsize=(5.0 * len(fs) + 2.2, 4.2), sharey=True)
    return fig, np.atleast_1d(axes)

  def save(fig, axes, name):
    """A shared legend on the right, then docs/figures/<prefix>_<name>.png."""
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    fig.legend(handles, labels, loc='center right', fontsize=8, frameon=False)
    p = os.path.join(outdir, f'{cfg.figure_prefix}_{name}.png')
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

  # 1. error vs iterations
  fig, axes = panels()
  show_d = [d for d in (5, 20) if d in ds]
  for ax, f in zip(axes, fs):
    for rule in cfg.rules:
      errs = runs[(f, 'plain', rule)][0]
      lab = RULE_LABELS.get(rule, rule)
      ax.plot(steps, med(errs[:, 0]), color=colors.get(rule), ls=':', label=f'{lab} (no coding)')
      if not pipeline.as_rule(rule, 0).robust:  # no coding variants of the plain mean
        continue
      for d, ls in zip(show_d, ('--', '-')):
        i = variants.index((d, True))
        ax.plot(steps, med(errs[:, i]), color=colors.get(rule), ls=ls, label=f'LAD-{lab}, d={d}')
    if (f, 'plain', DRACO) in runs:
      errs, loads, _ = runs[(f, 'plain', DRACO)]
      ax.plot(steps, med(errs[:, 0]), color='tab:red', lw=2, label=draco_label)
    ax.set_yscale('log')
    ax.set_xlabel('iteration')
    ax.set_title(f'n = {cfg.num_workers}, f = {f}, attack: {cfg.attack}')
    finish(ax)
  axes[0].set_ylabel('relative error ‖w − w*‖² / ‖w*‖² (median of seeds)')
  save(fig, axes, 'iterations')

  # 2. final error vs d (= subsets per worker per step), plain and compressed
  fig, axes = panels()
  for ax, f in zip(axes, fs):
    for tag, ls, mk in (('plain', '-', 'o'), ('com', '--', 's')):
      for rule in cfg.rules:
        if (f, tag, rule) not in runs:
          continue
        errs = runs[(f, tag, rule)][0]
        lab = RULE_LABELS.get(rule, rule) + (' (compressed)' if tag == 'com' else '')
        y = [med(errs[:, variants.index((d, True)), -1:])[0] for d in ds]
        ax.plot(ds, y, color=colors.get(rule), ls=ls, marker=mk, ms=4, label=f'LAD-{lab}')
      if (f, tag, DRACO) in runs:
        errs, loads, _ = runs[(f, tag, DRACO)]
        y = med(errs[:, 0, -1:])[0]
        exact = y < bottom
        lab = (
          ' (compressed)' if tag == 'com' else (f' (exact: {y:.0e}, off-scale)' if exact else '')
        )
        ax.plot(
          [loads[0]],
          [max(y, bottom * 1.6)],
          color='tab:red',
          marker='v' if exact else '*',
          ms=12,
          ls='none',
          mfc='tab:red' if tag == 'plain' else 'white',
          label='DRACO' + lab,
        )
    for rule in cfg.rules:  # no coding, fixed assignment: a cross at d = 1
      errs = runs[(f, 'plain', rule)][0]
      ax.plot(
        [1],
        [med(errs[:, 0, -1:])[0]],
        color=colors.get(rule),
        marker='x',
        ms=9,
        ls='none',
        label=f'{RULE_LABELS.get(rule, rule)} (no coding)',
      )
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('redundancy d = subsets computed per worker per step')
    ax.set_title(f'final error after {cfg.num_steps} steps, f = {f}, {cfg.attack}')
    finish(ax)
  axes[0].set_ylabel('relative error (median of seeds)')
  save(fig, axes, 'redundancy')

  # 3. error vs computation spent (cumulative subsets per worker)
  fig, axes = panels()
  cmap = plt.get_cmap('viridis')
  for ax, f in zip(axes, fs):
    rule = 'nnm+trimmed_mean' if 'nnm+trimmed_mean' in cfg.rules else cfg.rules[-1]
    errs, loads, _ = runs[(f, 'plain', rule)]
    for j, d in enumerate(ds):
      i = variants.index((d, True))
      ax.plot(
        steps * loads[i],
        med(errs[:, i]),
        color=cmap(j / max(1, len(ds) - 1)),
        label=f'LAD-{RULE_LABELS.get(rule, rule)}, d={d}',
      )
    if (f, 'plain', DRACO) in runs:
      e2, l2, _ = runs[(f, 'plain', DRACO)]
      ax.plot(steps * l2[0], med(e2[:, 0]), color='tab:red', lw=2, label=draco_label)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('computation: subset gradients per worker, cumulative')
    ax.set_title(f'f = {f}, {cfg.attack}')
    finish(ax)
  axes[0].set_ylabel('relative error (median of seeds)')
  save(fig, axes, 'computation')

  # 4. communication: error vs cumulative bits, plain vs compressed
  if any(k[1] == 'com' for k in runs):
    fig, axes = panels()
    rule = 'nnm+trimmed_mean' if 'nnm+trimmed_mean' in cfg.rules else cfg.rules[-1]
    for ax, f in zip(axes, fs):
      for tag, ls in (('plain', '-'), ('com', '--')):
        errs, _, bits = runs[(f, tag, rule)]
        for d, c in ((1, 'tab:gray'), (20, 'tab:green'), (50, 'tab:olive')):
          if (d, True) not in variants:
            continue
          i = variants.index((d, True))
          ax.plot(
            steps * bits / cfg.num_workers,
            med(errs[:, i]),
            color=c,
            ls=ls,
            label=f'LAD-{RULE_LABELS.get(rule, rule)} d={d}' + (' Com' if tag == 'com' else ''),
          )
        if (f, tag, DRACO) in runs:
          e2, _, b2 = runs[(f, tag, DRACO)]
          ax.plot(
            steps * b2 / cfg.num_workers,
            med(e2[:, 0]),
            color='tab:red',
            ls=ls,
            label='DRACO' + (' Com' if tag == 'com' else ''),
          )
      ax.set_xscale('log')
      ax.set_yscale('log')
      ax.set_xlabel('bits sent per worker, cumulative')
      ax.set_title(f'f = {f}, {cfg.attack}; dashed: compressed ({cfg.compressor})')
      finish(ax)
    axes[0].set_ylabel('relative error (median of seeds)')
    save(fig, axes, 'communication')
  return paths


def load_results(cfg, workdir: str) -> dict:
  """The `run` results back from a workdir's results.npz and summary.json (to redraw figures)."""
  with open(os.path.join(workdir, 'summary.json')) as fh:
    summary = json.load(fh)
  arrays = np.load(os.path.join(workdir, 'results.npz'))
  variants = [(1, False)] + [(int(d), True) for d in cfg.redundancies]
  runs = {}
  for name in arrays.files:
    f, tag, rule = name.split('_', 2)
    rows = [
      r
      for r in summary['rows']
      if r['f'] == int(f) and r['rule'] == rule and r['compressed'] == (tag == 'com')
    ]
    loads = np.array([r['subsets_per_worker'] for r in rows])
    runs[(int(f), tag, rule)] = (arrays[name], loads, rows[0]['bits_per_step'])
  return {'variants': variants, 'lr': summary['lr'], 'runs': runs}


def update_doc(path: str, table: str, tag: str) -> None:
  start, end = f'<!-- results:{tag} -->', f'<!-- /results:{tag} -->'
  with open(path) as fh:
    text = fh.read()
  if start not in text or end not in text:
    raise ValueError(f'{path}: needs the markers {start} and {end}')
  head, rest = text.split(start, 1)
  _, tail = rest.split(end, 1)
  with open(path, 'w') as fh:
    fh.write(head + start + '\n' + table + '\n' + end + tail)


def main(argv):
  del argv
  cfg = _FLAGS['config'].value
  workdir = _FLAGS['workdir'].value
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  results = load_results(cfg, cfg.replot_from) if cfg.replot_from else run(cfg)
  rows = summarize(cfg, results)
  table = markdown_table(cfg, rows)
  print(table)
  print(f'total {time.time() - t0:.1f} s on {jax.device_count()} {jax.default_backend()} device(s)')
  np.savez_compressed(
    os.path.join(workdir, 'results.npz'),
    **{f'{f}_{tag}_{rule}': v[0] for (f, tag, rule), v in results['runs'].items()},
  )
  with open(os.path.join(workdir, 'summary.json'), 'w') as fh:
    json.dump(
      {'lr': results['lr'], 'rows': rows, 'config': cfg.to_dict()}, fh, indent=1, default=str
    )
  if cfg.make_figures:
    figures = cfg.figures_dir or os.path.join(workdir, 'figures')
    os.makedirs(figures, exist_ok=True)
    for p in make_figures(cfg, results, figures):
      print('wrote', p)
  if cfg.update_doc:
    update_doc(cfg.doc, table, cfg.attack)
    print('updated', cfg.doc)


if __name__ == '__main__':
  define_flags()
  app.run(main)
