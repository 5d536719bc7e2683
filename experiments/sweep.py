r"""Run a sweep (resumable, seeds vmapped) and analyse it: tidy CSV, worst-case table, figures.

Examples:
  python experiments/sweep.py run --config=experiments/configs/sweep_byzfl.py:fast \
      --out=/tmp/sweeps/byzfl
  python experiments/sweep.py analyse --out=/tmp/sweeps/byzfl
  python experiments/sweep.py run --config=experiments/configs/sweep_smoke.py --out=/tmp/s \
      --set num_steps=10 --max_groups=2

``run`` writes ``<out>/sweep.json`` and ``<out>/runs/<run_id>.json`` (one per finished run,
written atomically); rerunning the same command skips finished runs, so a killed sweep resumes.
``analyse`` writes ``<out>/analysis/``: ``runs.csv`` (one row per run), ``curves.csv`` (one row
per run and evaluated step), ``worst_case.csv`` / ``worst_case.md`` (per rule, f and
heterogeneity: min over attacks, the learning rate chosen by max over lr of min over attacks),
``heatmap.png`` (f × heterogeneity per rule) and ``curves.png`` (accuracy curves of the worst
attack).

A config file defines ``get_config(variant) -> {'name', 'base', 'grid'}`` (see
``experiments/configs/sweep_byzfl.py``); ``--config=path.py:variant`` picks a variant.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `experiments.configs.*` imports from the repository root
  sys.path.insert(0, ROOT)


def load_sweep(spec: str) -> dict:
  """``'path/to/config.py[:variant]'`` -> the sweep dict ``{'name', 'base', 'grid'}``."""
  path, _, variant = spec.partition(':')
  if not os.path.exists(path):
    raise SystemExit(f'sweep config {path!r} not found')
  mod_spec = importlib.util.spec_from_file_location('_sweep_config', path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(variant)


def _literal(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sub = p.add_subparsers(dest='cmd', required=True)
  r = sub.add_parser('run', help='run (or resume) a sweep')
  r.add_argument('--config', required=True, help='path/to/sweep_config.py[:variant]')
  r.add_argument('--out', required=True, help='output directory')
  r.add_argument(
    '--set',
    action='append',
    default=[],
    metavar='FIELD=VALUE',
    help='override a base config field (Python literal), repeatable',
  )
  r.add_argument('--max_groups', type=int, default=None, help='stop after N groups')
  r.add_argument('--no_vmap', action='store_true', help='run the members of a group one by one')
  r.add_argument('--quiet', action='store_true', help='no progress lines')
  a = sub.add_parser('analyse', help='tables and figures of a (possibly partial) sweep')
  a.add_argument('--out', required=True)
  a.add_argument(
    '--metric',
    default='test_accuracy',
    help='test_accuracy (final) or max_test_accuracy (best evaluation)',
  )
  a.add_argument('--title', default=None)
  args = p.parse_args(argv)

  if args.cmd == 'run':
    from robustjax import sweeps

    sweep = load_sweep(args.config)
    base = sweep['base']
    for item in args.set:
      k, _, v = item.partition('=')
      base[k] = _literal(v)
    summary = sweeps.run_sweep(
      base,
      sweep['grid'],
      args.out,
      vmap=not args.no_vmap,
      max_groups=args.max_groups,
      progress=not args.quiet,
      name=sweep.get('name', 'sweep'),
    )
    print(summary)
  else:
    from robustjax import analysis

    paths = analysis.analyse(args.out, metric=args.metric, title=args.title)
    for k, v in paths.items():
      print(f'{k}: {v}')


if __name__ == '__main__':
  main()
