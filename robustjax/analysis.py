"""Analysis of sweep results: tidy CSV, worst case over attacks, heatmaps and accuracy curves.

Works on the run records `robustjax.sweeps.run_sweep` writes (``<out>/runs/*.json``), with plain
Python and NumPy (no pandas). The worst case follows ByzFL's benchmark convention:

1. average the metric over seeds for each (rule, f, heterogeneity, attack, learning rate);
2. for each learning rate take the minimum over attacks (the attacker picks its best attack);
3. take the maximum over learning rates of that minimum (the defender tunes the learning rate
   knowing the attacker will adapt): ``max_lr min_attack mean_seed metric``.

The heterogeneity of a run is one label per split: ``γ=<gamma>`` for ``split='gamma'``,
``α=<alpha>`` for ``'dirichlet'``, ``'iid'`` and ``'extreme'`` otherwise (see `heterogeneity`).

Example:
  >>> from robustjax import analysis
  >>> rows = [
  ...   {'rule': 'tm', 'f': 1, 'het': 'iid', 'attack': a, 'lr': lr, 'seed': 0, 'acc': acc}
  ...   for a, lr, acc in [('x', 0.1, 0.9), ('y', 0.1, 0.5), ('x', 0.01, 0.7), ('y', 0.01, 0.6)]
  ... ]
  >>> wc = analysis.worst_case(rows, metric='acc', by=('rule', 'f', 'het'), lr_key='lr')
  >>> wc[0]['worst_case'], wc[0]['best_lr'], wc[0]['worst_attack']
  (0.6, 0.01, 'y')
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
  'RUN_COLUMNS',
  'heterogeneity',
  'tidy',
  'curve_rows',
  'write_csv',
  'read_csv',
  'worst_case',
  'markdown_table',
  'pivot',
  'plot_heatmaps',
  'plot_curves',
  'analyse',
  'describe',
]

RUN_COLUMNS = (
  'run_id',
  'sweep',
  'rule',
  'aggregator',
  'pre',
  'attack',
  'num_workers',
  'num_byzantine',
  'split',
  'gamma',
  'alpha',
  'heterogeneity',
  'momentum',
  'learning_rate',
  'seed',
  'dataset',
  'model',
  'num_steps',
  'test_accuracy',
  'max_test_accuracy',
  'test_loss',
  'train_loss',
  'wall_s',
  'vmapped',
  'group_size',
)


def heterogeneity(config: Mapping) -> str:
  """A label of the data split of a run config: ``'γ=0.33'``, ``'α=0.1'``, ``'iid'``, ..."""
  split = config.get('split', 'iid')
  if split == 'gamma':
    return f'γ={float(config["gamma"]):g}'
  if split == 'dirichlet':
    return f'α={float(config["alpha"]):g}'
  return str(split)


def _split_rule(rule: str) -> tuple[str, str]:
  """(aggregator name, pre-aggregators' spec) of a rule spec, through the one resolver."""
  from robustjax.pipeline import as_rule

  p = as_rule(rule, 0)
  return p.stages[-1].name, '+'.join(s.spec for s in p.stages[:-1])


def tidy(records: Iterable[Mapping]) -> list[dict]:
  """One flat row per run record (the columns of `RUN_COLUMNS`)."""
  rows = []
  for r in records:
    c = r['config']
    agg, pre = _split_rule(c['rule'])
    final = r['final']
    rows.append(
      {
        'run_id': r['run_id'],
        'sweep': r.get('sweep', ''),
        'rule': c['rule'],
        'aggregator': agg,
        'pre': pre,
        'attack': c['attack'],
        'num_workers': c['num_workers'],
        'num_byzantine': c['num_byzantine'],
        'split': c.get('split', ''),
        'gamma': c.get('gamma', ''),
        'alpha': c.get('alpha', ''),
        'heterogeneity': heterogeneity(c),
        'momentum': c.get('momentum', ''),
        'learning_rate': c.get('learning_rate', ''),
        'seed': c.get('seed', 0),
        'dataset': c.get('dataset', ''),
        'model': c.get('model', ''),
        'num_steps': c.get('num_steps', ''),
        'test_accuracy': final['test_accuracy'],
        'max_test_accuracy': final.get('max_test_accuracy', final['test_accuracy']),
        'test_loss': final.get('test_loss', float('nan')),
        'train_loss': final.get('train_loss', float('nan')),
        'wall_s': r.get('wall_s', float('nan')),
        'vmapped': r.get('vmapped', False),
        'group_size': r.get('group_size', 1),
      }
    )
  return rows


def curve_rows(records: Iterable[Mapping]) -> list[dict]:
  """One row per (run, evaluated step): run_id, step, test_accuracy, test_loss, train_loss."""
  rows = []
  for r in records:
    c = r['curve']
    for i, s in enumerate(c['step']):
      rows.append(
        {
          'run_id': r['run_id'],
          'step': s,
          'test_accuracy': c['test_accuracy'][i],
          'test_loss': c['test_loss'][i],
          'train_loss': c['train_loss'][i],
        }
      )
  return rows


def write_csv(rows: Sequence[Mapping], path: str, columns: Sequence[str] | None = None) -> str:
  """Writes rows (dicts) as CSV (columns: `columns` or the first row's keys); returns `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  cols = list(columns or (rows[0].keys() if rows else []))
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as fh:
    w = csv.DictWriter(fh, fieldnames=cols, extrasaction='ignore')
    w.writeheader()
    w.writerows(rows)
  os.replace(tmp, path)
  return path


def read_csv(path: str) -> list[dict]:
  """Reads a CSV back (values as strings)."""
  with open(path, newline='') as fh:
    return list(csv.DictReader(fh))


def worst_case(
  rows: Sequence[Mapping],
  *,
  metric: str = 'test_accuracy',
  by: Sequence[str] = ('rule', 'num_byzantine', 'heterogeneity'),
  attack_key: str = 'attack',
  lr_key: str = 'learning_rate',
  seed_key: str = 'seed',
) -> list[dict]:
  """``max over lr of min over attacks of mean over seeds`` of `metric`, per `by` group.

  Args:
    rows: tidy rows (dicts).
    metric: the column to aggregate (higher is better).
    by: the columns that define a cell (e.g. rule, f, heterogeneity).
    attack_key, lr_key, seed_key: the attack, learning-rate and seed columns (a missing
      learning-rate column counts as one learning rate).

  Returns:
    One dict per cell (in order of first appearance): the `by` values, ``worst_case``,
    ``best_lr`` (the argmax learning rate), ``worst_attack`` (the argmin attack at best_lr),
    ``per_attack`` (attack -> seed-mean metric at best_lr), ``num_seeds`` (at best_lr, min over
    attacks) and ``complete`` (whether every attack seen in `rows` is present for best_lr).
  """
  attacks_all = list(dict.fromkeys(r[attack_key] for r in rows))
  cells: dict[tuple, dict] = {}
  for r in rows:
    key = tuple(r[k] for k in by)
    lr = r.get(lr_key, None)
    cells.setdefault(key, {}).setdefault(lr, {}).setdefault(r[attack_key], []).append(
      (r.get(seed_key, 0), float(r[metric]))
    )
  out = []
  for key, per_lr in cells.items():
    best = None
    for lr, per_attack in per_lr.items():
      means = {a: float(np.mean([v for _, v in vs])) for a, vs in per_attack.items()}
      worst_attack = min(means, key=lambda a: (means[a], a))
      value = means[worst_attack]
      if best is None or value > best[0] or (value == best[0] and _lt(lr, best[1])):
        best = (value, lr, worst_attack, means, per_attack)
    value, lr, worst_attack, means, per_attack = best
    out.append(
      {
        **dict(zip(by, key)),
        'worst_case': value,
        'best_lr': lr,
        'worst_attack': worst_attack,
        'per_attack': means,
        'num_seeds': min(len(v) for v in per_attack.values()),
        'complete': all(a in means for a in attacks_all),
      }
    )
  return out


def _lt(a, b) -> bool:
  try:
    return a < b
  except TypeError:
    return str(a) < str(b)


def pivot(
  cells: Sequence[Mapping],
  row_key: str,
  col_key: str,
  value: str = 'worst_case',
  *,
  row_order: Sequence | None = None,
  col_order: Sequence | None = None,
):
  """``(row labels, col labels, 2-D array)`` of `value` (NaN where a cell is missing).

  Labels are sorted (γ / α labels from the most homogeneous), or in `row_order` / `col_order`
  (labels not present are dropped)."""
  rlabels = _ordered(row_order, [c[row_key] for c in cells])
  clabels = _ordered(col_order, [c[col_key] for c in cells])
  table = np.full((len(rlabels), len(clabels)), np.nan)
  for c in cells:
    if c[row_key] in rlabels and c[col_key] in clabels:
      table[rlabels.index(c[row_key]), clabels.index(c[col_key])] = c[value]
  return rlabels, clabels, table


def _ordered(order, values) -> list:
  if order is None:
    return _sorted_labels(values)
  present = set(values)
  return [v for v in order if v in present]


def _label_key(v):
  """Sort key of a label: ``name=number`` labels by their number (γ / α from the most
  homogeneous), then numbers, then strings; tuples element by element."""
  if isinstance(v, tuple):
    return tuple(_label_key(x) for x in v)
  if isinstance(v, str) and '=' in v:  # 'γ=0.5' (most homogeneous first), 'f=10'
    name, _, num = v.partition('=')
    try:
      return (0, -float(num) if name in ('γ', 'α') else float(num), name)
    except ValueError:
      pass
  if isinstance(v, (int, float)) and not isinstance(v, bool):
    return (1, float(v), '')
  return (2, 0.0, str(v))


def _sorted_labels(values) -> list:
  return sorted(dict.fromkeys(values), key=_label_key)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str], *, digits: int = 3) -> str:
  """A GitHub markdown table of `rows` (floats rounded to `digits`)."""

  def fmt(v):
    if isinstance(v, float):
      return 'n/a' if math.isnan(v) else f'{v:.{digits}f}'
    return str(v)

  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for r in rows:
    lines.append('| ' + ' | '.join(fmt(r.get(c, '')) for c in columns) + ' |')
  return '\n'.join(lines)


def plot_heatmaps(
  cells: Sequence[Mapping],
  path: str,
  *,
  panel_key: str = 'rule',
  row_key: str = 'num_byzantine',
  col_key: str = 'heterogeneity',
  value: str = 'worst_case',
  title: str | None = None,
  row_label: str = 'f',
  col_label: str = 'heterogeneity',
  value_label: str | None = None,
  row_order: Sequence | None = None,
  col_order: Sequence | None = None,
  panel_order: Sequence | None = None,
) -> str:
  """One heatmap per `panel_key` value: rows `row_key` × columns `col_key`, annotated; PNG.

  Cells are dicts (e.g. `worst_case` output or tidy rows). The colour scale spans the values
  shown (shared by the panels), the colorbar says what they are (`value_label`), and panels come
  in `panel_order`, else sorted as `plot_curves` sorts its panels."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  panels = _ordered(panel_order, [c[panel_key] for c in cells])
  shown = [c[value] for c in cells if c[panel_key] in panels and np.isfinite(c[value])]
  vmin, vmax = (min(shown), max(shown)) if shown else (0.0, 1.0)
  if vmax - vmin < 1e-3:
    vmin, vmax = vmin - 0.05, vmax + 0.05
  width = max(5.0, 1.2 + 3.6 * len(panels))
  fig, axes = plt.subplots(
    1, len(panels), figsize=(width, 3.4), squeeze=False, layout='constrained'
  )
  im = None
  for ax, p in zip(axes[0], panels):
    sub = [c for c in cells if c[panel_key] == p]
    rl, cl, t = pivot(sub, row_key, col_key, value, row_order=row_order, col_order=col_order)
    im = ax.imshow(t, vmin=vmin, vmax=vmax, cmap='RdYlGn', aspect='auto')
    for i in range(t.shape[0]):
      for j in range(t.shape[1]):
        if not np.isnan(t[i, j]):
          ax.text(j, i, f'{t[i, j]:.2f}', ha='center', va='center', fontsize=9)
    long = max((len(str(c)) for c in cl), default=0) > 6
    ax.set_xticks(
      range(len(cl)),
      [str(c) for c in cl],
      fontsize=8,
      rotation=30 if long else 0,
      ha='right' if long else 'center',
    )
    ax.set_yticks(range(len(rl)), [str(r) for r in rl])
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(str(p), fontsize=8)
  fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label=value_label or value.replace('_', ' '))
  if title:
    fig.suptitle(title, fontsize=9, wrap=True)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_curves(
  records: Sequence[Mapping],
  path: str,
  *,
  panel_key,
  hue_key,
  metric: str = 'test_accuracy',
  title: str | None = None,
  ncols: int = 4,
) -> str:
  """Accuracy curves: one panel per ``panel_key(record)``, one line per ``hue_key(record)``
  (callables on a run record, or config field names); seeds of a line are averaged. Panels and
  hues are sorted, a hue has the same colour in every panel, the y-range spans the values drawn
  (shared by the panels) and the step axis has integer ticks."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

  pk = panel_key if callable(panel_key) else (lambda r, k=panel_key: r['config'][k])
  hk = hue_key if callable(hue_key) else (lambda r, k=hue_key: r['config'][k])
  panels: dict = {}
  for r in records:
    panels.setdefault(pk(r), {}).setdefault(hk(r), []).append(r)
  names = _sorted_labels(panels)
  hues = _sorted_labels(hk(r) for r in records)
  colors = {h: f'C{i % 10}' for i, h in enumerate(hues)}  # one colour per hue in every panel
  ncols = min(ncols, len(names))
  nrows = -(-len(names) // ncols)
  fig, axes = plt.subplots(
    nrows, ncols, figsize=(3.3 * ncols, 2.6 * nrows + 0.6), squeeze=False, layout='constrained'
  )
  for ax in axes.flat[len(names) :]:
    ax.axis('off')
  drawn = []
  for ax, p in zip(axes.flat, names):
    for h in hues:
      recs = panels[p].get(h)
      if not recs:
        continue
      steps = recs[0]['curve']['step']
      ys = np.mean([r['curve'][metric] for r in recs], axis=0)
      ax.plot(steps, ys, label=str(h), lw=1.3, color=colors[h])
      drawn += [float(v) for v in ys if np.isfinite(v)]
    ax.set_title(' '.join(map(str, p)) if isinstance(p, tuple) else str(p), fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.set_xlabel('step', fontsize=8)
    ax.tick_params(labelsize=7)
  if drawn:
    lo, hi = min(drawn), max(drawn)
    pad = max(0.05 * (hi - lo), 1e-3)
    for ax in axes.flat[: len(names)]:
      ax.set_ylim(lo - pad, hi + pad)
  axes.flat[0].set_ylabel(metric.replace('_', ' '), fontsize=8)
  from matplotlib.lines import Line2D

  handles = [Line2D([], [], color=colors[h], lw=1.3) for h in hues]
  labels = [str(h) for h in hues]
  fig.legend(handles, labels, loc='outside lower center', ncols=min(6, len(labels)), fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9, wrap=True)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def describe(records: Sequence[Mapping]) -> str:
  """A title for a sweep's figures: dataset, model, steps, n and the attack set."""

  def values(key):
    return ', '.join(str(v) for v in _sorted_labels(r['config'].get(key) for r in records))

  return (
    f'{values("dataset")} / {values("model")}, {values("num_steps")} steps, '
    f'n = {values("num_workers")}; attacks: {values("attack")}'
  )


def analyse(out_dir: str, *, metric: str = 'test_accuracy', title: str | None = None) -> dict:
  """Writes the standard analysis of a sweep directory to ``<out_dir>/analysis/``.

  ``runs.csv``, ``curves.csv``, ``worst_case.csv``, ``worst_case.md``, ``heatmap.png`` (worst
  case per rule, f × heterogeneity) and ``curves.png`` (per rule, f and heterogeneity, the curve of
  every attack). Works on a partial sweep (cells report ``complete``).

  Returns:
    name -> path of what was written.
  """
  from robustjax import sweeps

  records = sweeps.load_results(out_dir)
  if not records:
    raise ValueError(f'no finished runs under {out_dir}/runs')
  d = os.path.join(out_dir, 'analysis')
  rows = tidy(records)
  paths = {
    'runs': write_csv(rows, os.path.join(d, 'runs.csv'), RUN_COLUMNS),
    'curves_csv': write_csv(curve_rows(records), os.path.join(d, 'curves.csv')),
  }
  cells = worst_case(rows, metric=metric)
  flat = [{k: v for k, v in c.items() if k != 'per_attack'} for c in cells]
  paths['worst_case'] = write_csv(flat, os.path.join(d, 'worst_case.csv'))
  cols = ['rule', 'num_byzantine', 'heterogeneity', 'worst_case', 'worst_attack', 'best_lr']
  md = os.path.join(d, 'worst_case.md')
  with open(md, 'w') as fh:
    fh.write(markdown_table(flat, cols) + '\n')
  paths['worst_case_md'] = md
  title = title or describe(records)
  paths['heatmap'] = plot_heatmaps(
    cells,
    os.path.join(d, 'heatmap.png'),
    title=title,
    value_label=f'worst-case {metric.replace("_", " ")}\n(min over attacks, max over lr)',
  )
  paths['curves'] = plot_curves(
    records,
    os.path.join(d, 'curves.png'),
    panel_key=lambda r: (
      r['config']['rule'],
      f'f={r["config"]["num_byzantine"]}',
      heterogeneity(r['config']),
    ),
    hue_key='attack',
    title=title,
  )
  return paths
