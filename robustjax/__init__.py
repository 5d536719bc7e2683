"""robustjax: Byzantine-robust distributed training in JAX.

Modules (the stages of the training step in brackets):
  stack           the stack primitives: centred distances, weighted combination, flatten, assemble
  aggregators     robust aggregators and their declared properties, `aggregators.get(name)`
  preaggregators  NNM, bucketing, clipping, ARC
  pipeline        the one resolver: `as_rule(spec, f)` -> a `Pipeline` (pre-aggregators + rule)
  attacks         Byzantine attacks as `Attack` objects, `attacks.get(spec)` [attack]
  coding          gradient codes (LAD, DRACO, ...), `coding.make(spec)` [encoding]
  compression     compressors and error feedback [compression]
  optax_adapter   `as_optax(rule)` / `robust_optimizer`: a robust rule in an optax chain [server]
  parallel        meshes, placement, coordinate-sharded aggregation
  distributed     multi-process start-up and the checks all processes agree on
  host            the host allocator: a step's freed memory kept for the next (XLA:CPU)
  training        the staged step, `build(config)`, `train_and_evaluate` [the step]
  sweeps          resumable grids of runs, seeds vmapped
  analysis        tidy tables, worst cases, figures of sweeps
  robustness      the (f, κ) ratio, the κ⋆ search, bounds
  data, models    datasets and heterogeneous splits; flax NNX models
  configs         the shipped configs (`configs.get('default', 'smoke')`); the `robustjax` command
                  is `robustjax.cli` (`python -m robustjax`)
"""

from robustjax import (
  aggregators,
  analysis,
  attacks,
  coding,
  compression,
  configs,
  data,
  distributed,
  host,
  models,
  optax_adapter,
  parallel,
  pipeline,
  preaggregators,
  robustness,
  stack,
  sweeps,
  training,
)

__version__ = '0.1.0'

__all__ = [
  'aggregators',
  'analysis',
  'attacks',
  'coding',
  'compression',
  'configs',
  'data',
  'distributed',
  'host',
  'models',
  'optax_adapter',
  'parallel',
  'pipeline',
  'preaggregators',
  'robustness',
  'stack',
  'sweeps',
  'training',
]
