r"""Compare aggregation rules under attacks: one short robust training per (rule, attack) pair.

Prints a table of final test accuracies (rows: rules, columns: attacks). The defaults train an MLP
on the embedded digits data (no download) with n = 16 workers of which f = 3 are Byzantine, under
no attack, IPM with ε = 10 (the Byzantine inputs are −10·μ: the mean moves against the honest
direction), Gaussian noise (σ = 3) and ALIE:

  robustjax compare
  robustjax compare --rules=mean,median,nnm+krum --attacks='alie,ipm(eps=0.5)' \
      --config.num_steps=500 --config.split=dirichlet --config.alpha=0.5

Any field of the config (robustjax/configs/default.py) can be overridden with --config.<field>;
the rule and attack of each run come from --rules / --attacks.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

from robustjax import configs
from robustjax._spec import slug

_DEFAULT_CONFIG = configs.path('default')

FLAGS = flags.FLAGS


def define_flags():
  """Defines the command's absl flags (the `robustjax` command calls it)."""
  config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Base training configuration.')
  flags.DEFINE_list(
    'rules', ['mean', 'trimmed_mean', 'nnm+krum'], 'Rule specs (pre+...+aggregator).'
  )
  flags.DEFINE_list(
    'attacks', ['none', 'ipm(eps=10.0)', 'gaussian(std=3.0)', 'alie'], 'Attack specs.'
  )
  flags.DEFINE_string('workdir', None, 'Output directory (default: a temporary one).')


def _split_list(values):
  """Rejoins list items split inside parentheses (``ipm(eps=0.5,x=1)``)."""
  out, cur = [], ''
  for v in values:
    cur = f'{cur},{v}' if cur else v
    if cur.count('(') == cur.count(')'):
      out.append(cur)
      cur = ''
  if cur:
    out.append(cur)
  return out


def compare(config, rules, attacks, workdir):
  """Runs every (rule, attack) pair; returns {(rule, attack): summary}."""
  from robustjax import training

  results = {}
  width = max(len(x) for x in (*rules, *attacks))
  for attack in attacks:
    for rule in rules:
      c = config.copy_and_resolve_references()
      c.rule, c.attack = rule, attack
      c.checkpoint_every = 0
      c.progress = False
      name = f'{slug(rule)}__{slug(attack)}'
      t0 = time.perf_counter()
      summary = training.train_and_evaluate(c, os.path.join(workdir, name))
      summary['seconds'] = time.perf_counter() - t0
      results[(rule, attack)] = summary
      acc = summary['final']['test_accuracy']
      print(
        f'  {rule:>{width}s} | {attack:<{width}s} test accuracy {acc:6.1%}  '
        f'({summary["seconds"]:.1f} s)',
        flush=True,
      )
  return results


def table(results, rules, attacks) -> str:
  """The final test accuracies as a markdown table whose columns line up in a terminal."""
  cells = [
    [rule, *(f'{results[(rule, a)]["final"]["test_accuracy"]:.1%}' for a in attacks)]
    for rule in rules
  ]
  head = ['rule', *attacks]
  widths = [max(len(r[j]) for r in [head, *cells]) for j in range(len(head))]

  def line(row):
    padded = [c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
    return '| ' + ' | '.join(padded) + ' |'

  sep = '|' + '|'.join('-' * (w + 1) + (':' if j else '-') for j, w in enumerate(widths)) + '|'
  return '\n'.join([line(head), sep, *(line(r) for r in cells)])


def plot(results, rules, attacks, path, title) -> str:
  """A grouped bar chart of the final test accuracies (one group per attack, a bar per rule)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np

  acc = np.array([[results[(r, a)]['final']['test_accuracy'] for a in attacks] for r in rules])
  width = 0.8 / len(rules)
  fig, ax = plt.subplots(
    figsize=(max(5.0, 1.1 + 0.9 * len(attacks) * max(1, len(rules) / 2)), 3.4),
    layout='constrained',
  )
  x = np.arange(len(attacks))
  for i, rule in enumerate(rules):
    bars = ax.bar(x + (i - (len(rules) - 1) / 2) * width, acc[i], width, label=rule)
    ax.bar_label(bars, [f'{v:.0%}' for v in acc[i]], fontsize=7, padding=1)
  ax.set_xticks(x, attacks, fontsize=8)
  ax.set_xlabel('attack')
  ax.set_ylabel('final test accuracy')
  ax.set_ylim(0, min(1.0, float(np.nanmax(acc)) * 1.15 + 0.02))
  ax.legend(title='rule', fontsize=7, title_fontsize=8, loc='lower left')
  ax.set_title(title, fontsize=9, wrap=True)
  ax.grid(axis='y', alpha=0.3)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  rules, attacks = _split_list(FLAGS.rules), _split_list(FLAGS.attacks)
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix='robustjax_compare_')
  print(
    f'{config.dataset} / {config.model}: n={config.num_workers} workers, '
    f'f={config.num_byzantine} Byzantine, {config.split} split, {config.num_steps} steps of '
    f'batch {config.batch_size}, momentum {config.momentum}; outputs in {workdir}',
    flush=True,
  )
  t0 = time.perf_counter()
  results = compare(config, rules, attacks, workdir)
  text = table(results, rules, attacks)
  print(f'\nFinal test accuracy ({time.perf_counter() - t0:.0f} s in all):\n')
  print(text)
  with open(os.path.join(workdir, 'compare.json'), 'w') as fh:
    json.dump({f'{r}|{a}': s['final'] for (r, a), s in results.items()}, fh, indent=2)
  with open(os.path.join(workdir, 'compare.md'), 'w') as fh:
    fh.write(text + '\n')
  title = (
    f'{config.dataset} / {config.model}: n={config.num_workers}, f={config.num_byzantine}, '
    f'{config.split} split, {config.num_steps} steps'
  )
  figure = plot(results, rules, attacks, os.path.join(workdir, 'compare.png'), title)
  print(f'\ntable: {os.path.join(workdir, "compare.md")}; figure: {figure}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
