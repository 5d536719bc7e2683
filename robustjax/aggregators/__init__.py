"""Robust aggregators: pure, jitted functions `rule(stack, *, f, **params) -> tree`.

Every rule takes a stack (a pytree whose leaves share a leading worker axis of size n, or an
(n, d) array) and returns one tree with the worker axis removed. Counts (f, m, iteration counts)
are static arguments; misuse raises a `ValueError` at trace time naming the rule and the violated
condition. `get(name)` looks a rule up by name; `names()` lists them; `properties(name)` gives
what the rule declares (its κ bound, equivariance, state; see `Properties`).

Example:
  >>> import jax.numpy as jnp
  >>> from robustjax import aggregators
  >>> x = jnp.arange(12.0).reshape(4, 3)
  >>> aggregators.get('median')(x, f=1)
"""

from robustjax.aggregators._adaptive import adaptive_multikrum, gap_multikrum
from robustjax.aggregators._base import REGISTRY, Properties, register
from robustjax.aggregators._coding import draco
from robustjax.aggregators._coordinatewise import (
  meamed,
  mean,
  mean_closest_to_median,
  median,
  trimmed_mean,
)
from robustjax.aggregators._iterative import caf, centered_clipping, geometric_median
from robustjax.aggregators._krum import (
  bulyan,
  krum,
  krum_scores,
  monna,
  multikrum,
  multikrum_sketch,
)
from robustjax.aggregators._subset import is_exact, mda, mda_mask, smea, smea_mask

get = REGISTRY.get
names = REGISTRY.names
properties = REGISTRY.properties

__all__ = [
  'REGISTRY',
  'Properties',
  'adaptive_multikrum',
  'bulyan',
  'caf',
  'centered_clipping',
  'draco',
  'gap_multikrum',
  'geometric_median',
  'get',
  'is_exact',
  'krum',
  'krum_scores',
  'mda',
  'mda_mask',
  'meamed',
  'mean',
  'mean_closest_to_median',
  'median',
  'monna',
  'multikrum',
  'multikrum_sketch',
  'names',
  'properties',
  'register',
  'smea',
  'smea_mask',
  'trimmed_mean',
]
