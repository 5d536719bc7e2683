"""The simulation engine: robust training with workers as an array axis, on one device or many.

A step is one jitted function of an explicit `TrainState` (params, optimiser state, worker
momentums, aggregator state, attack state, RNG key): per-worker gradients by ``jax.vmap`` over the
worker axis (``jax.shard_map`` across devices, each device vmapping over its workers), the attack
on the last f rows, pre-aggregation + aggregation (a `robustjax.preaggregators.Pipeline`) and an
optax update. See `_engine` for the algorithm and `_steps` for the multi-device layout.

Typical use (what ``experiments/train.py`` does):

  >>> from robustjax import training
  >>> from experiments.configs import default  # doctest: +SKIP
  >>> config = default.get_config('smoke')  # doctest: +SKIP
  >>> summary = training.train_and_evaluate(config, '/tmp/run')  # doctest: +SKIP

Or step by step:

  >>> exp = training.build(config)  # doctest: +SKIP
  >>> state = exp.init_state()  # doctest: +SKIP
  >>> state, metrics = exp.step(state)  # doctest: +SKIP
  >>> exp.evaluate(state)  # doctest: +SKIP
"""

from robustjax.training._engine import (
  LABEL_FLIP_ATTACKS,
  STATEFUL_CENTER_AGGREGATORS,
  Problem,
  TrainSpec,
  TrainState,
  evaluate,
  init_state,
  make_problem,
  worker_updates,
)
from robustjax.training._loop import Checkpointer, train_and_evaluate
from robustjax.training._parallel import (
  AXIS,
  make_mesh,
  maybe_initialize_distributed,
  put,
  replicated,
  worker_sharded,
)
from robustjax.training._setup import (
  Experiment,
  build,
  make_optimizer,
  make_pipeline,
  parse_rule,
  parse_spec,
)
from robustjax.training._steps import BACKENDS, make_eval, make_step, sharded_worker_grads

__all__ = [
  'AXIS',
  'BACKENDS',
  'Checkpointer',
  'Experiment',
  'LABEL_FLIP_ATTACKS',
  'Problem',
  'STATEFUL_CENTER_AGGREGATORS',
  'TrainSpec',
  'TrainState',
  'build',
  'evaluate',
  'init_state',
  'make_eval',
  'make_mesh',
  'make_optimizer',
  'make_pipeline',
  'make_problem',
  'make_step',
  'maybe_initialize_distributed',
  'parse_rule',
  'parse_spec',
  'put',
  'replicated',
  'sharded_worker_grads',
  'train_and_evaluate',
  'worker_sharded',
  'worker_updates',
]
