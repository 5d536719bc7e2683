r"""Run a sweep (resumable, seeds vmapped) and analyse it: tidy CSV, worst-case table, figures.

Examples:
  robustjax sweep run --config=sweep_byzfl:fast \
      --out=/tmp/sweeps/byzfl
  robustjax sweep analyse --out=/tmp/sweeps/byzfl
  robustjax sweep run --config=sweep_smoke --out=/tmp/s \
      --config.base.num_steps=10 --max_groups=2

``run`` writes ``<out>/sweep.json`` and ``<out>/runs/<run_id>.json`` (one per finished run,
written atomically); rerunning the same command skips finished runs, so a killed sweep resumes.
``analyse`` writes ``<out>/analysis/``: ``runs.csv`` (one row per run), ``curves.csv`` (one row
per run and evaluated step), ``worst_case.csv`` / ``worst_case.md`` (per rule, f and
heterogeneity: min over attacks, the learning rate chosen by max over lr of min over attacks),
``heatmap.png`` (f × heterogeneity per rule) and ``curves.png`` (accuracy curves of the worst
attack).

A config file defines ``get_config(variant)`` returning `robustjax.configs.default.sweep_config`
(``name``, ``base``, ``grid``; see ``robustjax/configs/sweep_byzfl.py``);
``--config=path.py:variant`` picks a variant and ``--config.base.FIELD=VALUE`` overrides a base
field (a misspelled field fails, listing the known ones).
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

COMMANDS = ('run', 'analyse', 'report')
FLAGS = flags.FLAGS


def define_flags():
  """Defines the command's absl flags (the `robustjax` command calls it)."""
  config_flags.DEFINE_config_file(
    'config', None, 'Sweep config: path/to/sweep_config.py[:variant].'
  )
  flags.DEFINE_string('out', None, 'The sweep directory.')
  flags.DEFINE_integer('max_groups', None, 'run: stop after this many groups of this call.')
  flags.DEFINE_bool('vmap', True, 'run: batch the members of a group in one program.')
  flags.DEFINE_bool('quiet', False, 'run: no progress lines.')
  flags.DEFINE_enum(
    'metric', 'test_accuracy', ['test_accuracy', 'max_test_accuracy'], 'analyse: the metric.'
  )
  flags.DEFINE_string('title', None, "analyse: the figures' title.")
  flags.DEFINE_enum('kind', None, ['byzfl', 'bucketing'], 'report: which reproduction.')
  flags.DEFINE_string(
    'figures', None, 'report: figure folder (default <out>/report; docs/figures with --docs).'
  )
  flags.DEFINE_bool('docs', False, "report: write the figures into the repository's docs/figures.")
  flags.DEFINE_string('baseline', None, 'report: sweep directory of the no-attack runs.')
  flags.mark_flags_as_required(['out'])


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f'usage: robustjax sweep {{{"|".join(COMMANDS)}}} --out=DIR [flags]')
  cmd = argv[1]
  if cmd == 'run':
    from robustjax import sweeps

    sweep = FLAGS.config
    if sweep is None:
      raise app.UsageError('run needs --config=path/to/sweep_config.py[:variant]')
    summary = sweeps.run_sweep(
      sweep.base,
      {k: list(v) for k, v in sweep.grid.items()},
      FLAGS.out,
      vmap=FLAGS.vmap,
      max_groups=FLAGS.max_groups,
      progress=not FLAGS.quiet,
      name=sweep.name,
    )
    print(summary)
  elif cmd == 'analyse':
    from robustjax import analysis

    paths = analysis.analyse(FLAGS.out, metric=FLAGS.metric, title=FLAGS.title)
    for k, v in paths.items():
      print(f'{k}: {v}')
  else:
    if FLAGS.kind is None:
      raise app.UsageError('report needs --kind=byzfl|bucketing')
    report = report_byzfl if FLAGS.kind == 'byzfl' else report_bucketing
    figures = FLAGS.figures or (
      os.path.join('docs', 'figures') if FLAGS.docs else os.path.join(FLAGS.out, 'report')
    )
    os.makedirs(figures, exist_ok=True)
    print(report(FLAGS.out, figures, FLAGS.baseline))


# ------------------------------------------------------------------------------------------------
# Reports for docs/reproductions.md.

_SHORT = {
  'geometric_median': 'GM',
  'trimmed_mean': 'TM',
  'krum': 'Krum',
  'median': 'CM',
  'centered_clipping': 'CClip',
}


def _short_rule(rule: str) -> str:
  from robustjax import pipeline

  p = pipeline.as_rule(rule, 0)
  agg = p.stages[-1].name
  name = _SHORT.get(agg, agg)
  pres = [s.name for s in p.stages[:-1]]
  if 'bucketing' in pres:
    name += ' + bucketing'
  return name


def _short_attack(attack: str) -> str:
  from robustjax import attacks

  resolved = attacks.get(attack)
  name, params = resolved.name, dict(resolved.params)
  if name == 'sign_flip' and params.get('variant') == 'negate':
    return 'bit flip'
  return {
    'sign_flip': 'sign flip',
    'optimal_ipm': 'optimal IPM',
    'optimal_alie': 'optimal ALIE',
    'alie': 'ALIE',
    'ipm': 'IPM',
    'label_flip': 'label flip',
    'mimic_heuristic': 'mimic',
    'none': 'no attack',
  }.get(name, name)


def _steps(records) -> str:
  return ' / '.join(str(s) for s in sorted({int(r['config']['num_steps']) for r in records}))


def _wall(records) -> float:
  groups = {}
  for r in records:
    groups[(r['group_wall_s'], r['group_size'])] = r['group_wall_s']
  return sum(groups.values())


def report_byzfl(out: str, figures: str, baseline: str | None = None) -> str:
  from robustjax import analysis, sweeps
  from robustjax.configs.sweep_byzfl import PUBLISHED

  records = sweeps.load_results(out)
  rows = analysis.tidy(records)
  for r in rows:
    r['rule'] = _short_rule(r['rule'])
    r['attack'] = _short_attack(r['attack'])
  cells = analysis.worst_case(rows)
  steps = _steps(records)
  analysis.plot_heatmaps(
    cells,
    os.path.join(figures, 'repro_byzfl_heatmap.png'),
    title=(
      f'ByzFL setting on digits, {steps} steps, clipping (c = 2) + NNM + GM / TM: worst case '
      'over {sign flip, optimal IPM, optimal ALIE}, mean of the seeds'
    ),
    value_label='worst-case test accuracy\n(min over attacks, max over lr)',
  )
  g0 = [r for r in records if float(r['config']['gamma']) == 0.0]
  analysis.plot_curves(
    g0,
    os.path.join(figures, 'repro_byzfl_curves.png'),
    panel_key=lambda r: f'{_short_rule(r["config"]["rule"])}, f={r["config"]["num_byzantine"]}',
    hue_key=lambda r: _short_attack(r['config']['attack']),
    title=(
      f'ByzFL setting on digits, γ = 0, {steps} steps (clipping + NNM + GM / TM): test accuracy '
      'per attack (sign flip, optimal IPM, optimal ALIE)'
    ),
  )
  lines = []
  gammas = analysis._sorted_labels(c['heterogeneity'] for c in cells)
  for rule, key in (('GM', 'geometric_median'), ('TM', 'trimmed_mean')):
    sub = {(c['num_byzantine'], c['heterogeneity']): c for c in cells if c['rule'] == rule}
    head = ['f'] + [f'{g} ours' for g in gammas] + ['γ=1 ByzFL', 'γ=0 ByzFL', 'worst attack γ=0']
    lines.append(f'**{rule}** (clipping c = 2 + NNM + {rule})\n')
    lines.append('| ' + ' | '.join(head) + ' |')
    lines.append('|' + '---|' * len(head))
    for f in sorted({k[0] for k in sub}):
      vals = [sub.get((f, g)) for g in gammas]
      cellstr = [
        'n/a' if v is None else f'{v["worst_case"]:.2f}' + ('' if v['complete'] else '*')
        for v in vals
      ]
      pub1 = PUBLISHED[(key, 1.0)][f - 1]
      pub0 = PUBLISHED[(key, 0.0)][f - 1]
      worst0 = sub.get((f, 'γ=0'))
      lines.append(
        f'| {f} | ' + ' | '.join(cellstr) + f' | {pub1:.2f} | {pub0:.2f} | '
        f'{worst0["worst_attack"] if worst0 else "n/a"} |'
      )
    lines.append('')
  lines.append(f'runs: {len(records)}; summed group wall time: {_wall(records) / 60:.1f} min')
  lines.append(f'seeds per cell: {sorted({c["num_seeds"] for c in cells})}')
  if baseline:
    base: dict = {}
    for r in analysis.tidy(sweeps.load_results(baseline)):
      base.setdefault(r['heterogeneity'], []).append(r['test_accuracy'])
    lines.append('')
    lines.append('| no attack, f = 0, mean | ' + ' | '.join(gammas) + ' |')
    lines.append('|---|' + '---|' * len(gammas))
    vals = [f'{sum(base[g]) / len(base[g]):.2f}' if g in base else 'n/a' for g in gammas]
    lines.append('| test accuracy | ' + ' | '.join(vals) + ' |')
  return '\n'.join(lines)


def report_bucketing(out: str, figures: str, baseline: str | None = None) -> str:
  from robustjax import analysis, sweeps

  records = sweeps.load_results(out)
  attacks = ['ALIE', 'bit flip', 'IPM', 'label flip', 'mimic']
  order = ['Krum', 'Krum + bucketing', 'CM', 'CM + bucketing', 'RFA', 'RFA + bucketing']
  order += ['CClip', 'CClip + bucketing']
  if baseline:
    records = records + sweeps.load_results(baseline)
    attacks = ['no attack', *attacks]
    order = ['mean', 'mean + bucketing', *order]
  rows = analysis.tidy(records)
  acc: dict = {}
  for r in rows:  # mean over seeds
    key = (r['momentum'], _short_rule(r['rule']).replace('GM', 'RFA'), _short_attack(r['attack']))
    acc.setdefault(key, []).append(r['test_accuracy'])
  seeds = sorted({len(v) for v in acc.values()})
  acc = {k: sum(v) / len(v) for k, v in acc.items()}
  cells = [
    {'momentum': f'worker momentum β = {b:g}', 'rule': n, 'attack': a, 'test_accuracy': v}
    for (b, n, a), v in acc.items()
  ]
  analysis.plot_heatmaps(
    cells,
    os.path.join(figures, 'repro_bucketing.png'),
    panel_key='momentum',
    row_key='rule',
    col_key='attack',
    value='test_accuracy',
    row_label='',
    col_label='attack',
    row_order=order,
    col_order=attacks,
    panel_order=['worker momentum β = 0', 'worker momentum β = 0.9'],
    title=(
      f'Bucketing study on digits (n = 25, f = 5, label-sorted, {_steps(records)} steps): '
      f'final test accuracy under {", ".join(attacks)}'
    ),
    value_label='final test accuracy\n(mean of the seeds)',
  )
  lines = []
  for beta in sorted({k[0] for k in acc}):  # the heatmap's panel order
    lines.append(f'**worker momentum β = {beta:g}**\n')
    lines.append('| aggregator | ' + ' | '.join(attacks) + ' | worst attack |')
    lines.append('|---|' + '---|' * (len(attacks) + 1))
    for name in order:
      accs = {a: v for (b, n, a), v in acc.items() if b == beta and n == name}
      if not accs:
        continue
      vals = [f'{accs[a]:.2f}' if a in accs else '' for a in attacks]
      attacked = [v for a, v in accs.items() if a != 'no attack']
      worst = f'{min(attacked):.2f}' if attacked else ''
      lines.append(f'| {name} | ' + ' | '.join(vals) + f' | {worst} |')
    lines.append('')
  lines.append(f'seeds per cell: {seeds}')
  ours = sweeps.load_results(out)
  lines.append(f'runs: {len(ours)}; summed group wall time: {_wall(ours) / 60:.1f} min')
  if baseline:
    b = sweeps.load_results(baseline)
    lines.append(f'baseline runs: {len(b)}; summed group wall time: {_wall(b) / 60:.1f} min')
  return '\n'.join(lines)


if __name__ == '__main__':
  define_flags()
  app.run(main)
