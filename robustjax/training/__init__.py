"""The simulation engine: robust training with workers as an array axis, on one device or many.

One staged step (`_engine`): gradients (per worker, or per data subset) → encoding
(`robustjax.coding`, identity by default) → compression (+ error feedback) → worker momentum →
attack → pre-aggregation + aggregation (through `robustjax.optax_adapter.as_optax`) → optax
update; one step signature ``step(state, data, report=None) -> (state, metrics)`` for every backend
(``vmap``, ``shard_map``, ``pmap``); one run loop (`make_advance` + `chunks`) shared by
`train_and_evaluate` and `robustjax.sweeps`.

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

from robustjax.parallel import (
  AXIS,
  make_mesh,
  put,
  replicated,
  worker_sharded,
)
from robustjax.training._engine import (
  BACKENDS,
  Problem,
  TrainSpec,
  TrainState,
  init_state,
  least_squares_problem,
  make_eval,
  make_problem,
  make_step,
  sharded_worker_stage,
  when_reported,
)
from robustjax.training._loop import (
  Checkpointer,
  ConfigMismatchError,
  chunks,
  make_advance,
  result_fields,
  train_and_evaluate,
)
from robustjax.training._setup import Experiment, build, check_hyperparameters, make_optimizer

__all__ = [
  'AXIS',
  'BACKENDS',
  'Checkpointer',
  'ConfigMismatchError',
  'Experiment',
  'Problem',
  'TrainSpec',
  'TrainState',
  'build',
  'check_hyperparameters',
  'chunks',
  'init_state',
  'least_squares_problem',
  'make_advance',
  'make_eval',
  'make_mesh',
  'make_optimizer',
  'make_problem',
  'make_step',
  'put',
  'replicated',
  'result_fields',
  'sharded_worker_stage',
  'train_and_evaluate',
  'when_reported',
  'worker_sharded',
]
