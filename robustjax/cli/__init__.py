"""The ``robustjax`` command: one entry point per job, runnable from any directory.

  robustjax train   --config=default:smoke --workdir=/tmp/run       # one training run
  robustjax compare --rules=mean,nnm+krum --attacks=alie,ipm          # rules × attacks table
  robustjax sweep   run --config=sweep_smoke --out=/tmp/sweep        # a grid (resumable)
  robustjax kappa   --study=kappa --ns=10                           # the (f, κ) search
  robustjax coding  --config=lad:smoke --workdir=/tmp/lad            # LAD / Com-LAD study
  robustjax multikrum --config=multikrum:smoke --workdir=/tmp/mk     # MultiKrum in practice
  robustjax configs                                                  # the shipped configs

``python -m robustjax`` is the same command. ``--config=NAME[:variant]`` names a config shipped in
`robustjax.configs`; a path to a config file works too. User errors (unknown names, impossible
n / f, bad values, misspelled config fields) print one line and exit with status 2; ``--verbose``
shows the traceback. Ctrl-C exits with status 130 (a training run says where its checkpoint is).
"""

from __future__ import annotations

import ast
import importlib
import os
import sys

__all__ = ['main', 'COMMANDS']

COMMANDS = {
  'train': ('robustjax.cli.train', 'one training run (resumable)'),
  'compare': ('robustjax.cli.compare', 'a table of rules × attacks'),
  'sweep': ('robustjax.cli.sweep', 'run / analyse / report a sweep'),
  'kappa': ('robustjax.cli.kappa', 'the (f, κ)-robustness search over rules'),
  'coding': ('robustjax.cli.coding', 'the LAD / Com-LAD gradient-coding study'),
  'multikrum': ('robustjax.cli.multikrum', 'MultiKrum in practice: f unknown, large n, privacy'),
  'configs': (None, 'list the shipped configs'),
}

_PARSED = []  # the commands parsed in this process
_ACTIVE = {}  # the command whose flags are defined: {'module': ..., 'flags': names}

# The errors a user's input causes; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, KeyError, OSError)


def _usage() -> str:
  lines = ['usage: robustjax COMMAND [flags]   (robustjax COMMAND --help for its flags)', '']
  lines += [f'  {name:8s} {what}' for name, (_, what) in COMMANDS.items()]
  return '\n'.join(lines)


def _one_line(err: BaseException) -> str:
  """An error's message on one line (unwrapping the quoted, escaped texts of KeyError)."""
  text = err
  while isinstance(text, BaseException):
    text = text.args[0] if text.args else ''
  text = str(text).strip()
  for _ in range(3):  # KeyError reprs nest: "'\\'field\\'\\nDid you mean ...'"
    if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':
      try:
        text = str(ast.literal_eval(text)).strip()
        continue
      except (ValueError, SyntaxError):
        pass
    break
  return '; '.join(line.strip() for line in text.splitlines() if line.strip())


def _resolve_configs(args: list[str]) -> list[str]:
  from robustjax import configs

  out = []
  for a in args:
    if a.startswith('--config='):
      value = configs.resolve(a[len('--config=') :])
      if not os.path.isfile(value.partition(':')[0]):
        raise ValueError(
          f'--config={value}: no such config file or shipped config; shipped configs: '
          f'{", ".join(configs.names())}'
        )
      a = '--config=' + value
    out.append(a)
  return out


def _define_flags(module) -> None:
  """Defines `module`'s absl flags, first removing another command's (several commands may run
  in one process: tests, notebooks; two of them define ``--config``)."""
  from absl import flags

  if _ACTIVE.get('module') is module:
    return
  for name in _ACTIVE.get('flags', ()):
    if name in flags.FLAGS:
      delattr(flags.FLAGS, name)
  before = set(flags.FLAGS)
  module.define_flags()
  _ACTIVE.update(module=module, flags=set(flags.FLAGS) - before)


def main(argv: list[str] | None = None) -> int:
  """Runs ``robustjax COMMAND [flags]``; returns the exit status."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ('-h', '--help', 'help'):
    print(_usage())
    return 0 if len(argv) >= 2 else 2
  cmd, rest = argv[1], argv[2:]
  if cmd not in COMMANDS:
    print(f'robustjax: unknown command {cmd!r}; commands: {", ".join(COMMANDS)}', file=sys.stderr)
    return 2
  verbose = '--verbose' in rest or os.environ.get('ROBUSTJAX_TRACEBACK') == '1'
  rest = [a for a in rest if a != '--verbose']
  if cmd == 'configs':
    from robustjax import configs

    for name in configs.names():
      doc = (importlib.import_module(f'robustjax.configs.{name}').__doc__ or '').strip()
      print(f'{name:18s} {doc.splitlines()[0] if doc else ""}')
    return 0
  module = importlib.import_module(COMMANDS[cmd][0])
  _define_flags(module)
  from absl import app, flags

  if any(a in ('-h', '--help', '--helpfull') for a in rest):
    print((module.__doc__ or '').strip())
    print()
    print(flags.FLAGS.module_help(module.__name__))
    return 0

  try:
    args = [f'robustjax {cmd}'] + _resolve_configs(rest)
  except ValueError as err:
    print(f'robustjax {cmd}: {err}', file=sys.stderr)
    return 2
  sys.argv = args  # ml_collections' config flags read their overrides from sys.argv
  # A config flag defines one override flag per field when parsed (``config.rule``): drop those of
  # an earlier call, so that main() can run again in one process (tests, notebooks).
  if _PARSED:
    for name in [n for n in flags.FLAGS if n.startswith('config.')]:
      delattr(flags.FLAGS, name)
  _PARSED.append(cmd)
  try:
    remaining = flags.FLAGS(args)
  except (flags.Error, AttributeError, KeyError, ValueError) as err:
    if verbose:
      raise
    message = _one_line(err)
    if isinstance(err, (AttributeError, KeyError)):
      message = f'unknown config field {message}'
    print(f'robustjax {cmd}: {message}', file=sys.stderr)
    return 2
  if not flags.FLAGS['verbosity'].present:
    from absl import logging

    logging.set_verbosity(logging.WARNING)
  try:
    module.main(remaining)
  except app.UsageError as err:
    print(f'robustjax {cmd}: {_one_line(err)}', file=sys.stderr)
    return 2
  except USER_ERRORS as err:
    if verbose:
      raise
    print(f'robustjax {cmd}: error: {_one_line(err)}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f'robustjax {cmd}: interrupted', file=sys.stderr)
    return 130
  return 0
