"""robustjax: Byzantine-robust distributed training in JAX.

Modules:
  stack           the stack primitives (pairwise distances, weighted combination, flattening)
  aggregators     robust aggregators, `aggregators.get(name)`
  attacks         Byzantine attacks, `attacks.get(name)`, and `attacks.assemble`
  data            datasets (`data.load`) and heterogeneous splits (`data.split`)
  models          flax NNX models (`models.make`)
  optax_adapter   `as_optax(rule)` / `robust_optimizer`: a robust rule inside an optax chain
  preaggregators  NNM, bucketing, clipping, ARC, and `compose` (pre-aggregators + an aggregator)
"""

from robustjax import (
  aggregators,
  attacks,
  coding,
  compression,
  data,
  models,
  optax_adapter,
  preaggregators,
  robustness,
  stack,
)

__version__ = '0.1.0'

__all__ = [
  'aggregators',
  'attacks',
  'coding',
  'compression',
  'data',
  'models',
  'optax_adapter',
  'preaggregators',
  'robustness',
  'stack',
]
