"""Named configurations shipped with robustjax, usable from any directory.

Each module defines ``get_config(variant='')`` returning an ml_collections `ConfigDict`:

==================  ==========================================================================
name                what
==================  ==========================================================================
default             robust D-SGD with worker momentum on the embedded digits (variant: smoke)
lad                 the LAD / Com-LAD gradient-coding study (variants: sign_flip, smoke)
cifar10_resnet20    CIFAR-10 / ResNet-20 under ALIE, accelerator-sized (needs the datasets extra)
sweep_smoke         a tiny sweep (tests)
sweep_byzfl         ByzFL's benchmark grid (variants: mnist, fast, fast_baseline, smoke)
sweep_bucketing     Karimireddy et al.'s bucketing study (variants: fast, fast_baseline, smoke)
==================  ==========================================================================

On the command line ``--config=default:smoke`` names one (``robustjax train
--config=default:smoke``); a path ``--config=my_config.py:variant`` works as with any
ml_collections config file.

Example:
  >>> from robustjax import configs
  >>> config = configs.get('default', 'smoke')
  >>> config.num_workers
  8
"""

from __future__ import annotations

import importlib
import os

__all__ = ['names', 'get', 'path', 'resolve']

_HERE = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
  """The shipped configs' names."""
  return sorted(f[:-3] for f in os.listdir(_HERE) if f.endswith('.py') and not f.startswith('_'))


def path(name: str) -> str:
  """The file of a shipped config.

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  if name not in names():
    raise ValueError(f'unknown config {name!r}; shipped configs: {", ".join(names())}')
  return os.path.join(_HERE, f'{name}.py')


def get(name: str, variant: str = ''):
  """``get_config(variant)`` of the shipped config `name`."""
  path(name)
  return importlib.import_module(f'robustjax.configs.{name}').get_config(variant)


def resolve(value: str) -> str:
  """A ``--config`` value with a shipped config's name (``default:smoke``) turned into its file
  path (``…/robustjax/configs/default.py:smoke``); paths are returned unchanged."""
  name, sep, variant = value.partition(':')
  if os.sep in name or name.endswith('.py') or name not in names():
    return value
  return path(name) + sep + variant
