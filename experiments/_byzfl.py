"""ByzFL 0.0.11, imported for the side-by-side benchmarks (an optional dependency: torch and
``pip install --no-deps byzfl==0.0.11``)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

# robustjax stage name -> (ByzFL 0.0.11 class name, whether its constructor takes f).
STAGES = {
  'mean': ('Average', False),
  'median': ('Median', False),
  'trimmed_mean': ('TrMean', True),
  'meamed': ('Meamed', True),
  'geometric_median': ('GeometricMedian', False),
  'krum': ('Krum', True),
  'multikrum': ('MultiKrum', True),
  'centered_clipping': ('CenteredClipping', False),
  'mda': ('MDA', True),
  'smea': ('SMEA', True),
  'monna': ('MoNNA', True),
  'caf': ('CAF', True),
  'nnm': ('NNM', True),
  'bucketing': ('Bucketing', False),
  'clipping': ('Clipping', False),
  'arc': ('ARC', True),
}
# Stages whose ByzFL defaults are not robustjax's: a comparison must set their parameters.
DEFAULTS_DIFFER = ('geometric_median', 'centered_clipping', 'bucketing', 'clipping')


def import_byzfl(submodule: str):
  """`byzfl.<submodule>`, without ByzFL's package __init__ where that fails (it imports its
  benchmark module, which needs torchvision, matplotlib and seaborn)."""
  try:
    import byzfl  # noqa: F401

    return importlib.import_module(f'byzfl.{submodule}')
  except ImportError:
    spec = importlib.util.find_spec('byzfl')
    if spec is None or not spec.submodule_search_locations:
      raise
    for mod in [m for m in sys.modules if m == 'byzfl' or m.startswith('byzfl.')]:
      del sys.modules[mod]
    pkg = types.ModuleType('byzfl')
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules['byzfl'] = pkg
    return importlib.import_module(f'byzfl.{submodule}')
