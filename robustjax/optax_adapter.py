"""A robust rule as an optax aggregator: drop Byzantine-robust aggregation into an optax chain.

optax's `optax.experimental.aggregating` defines the protocol "per-worker gradients → one
update": an `Aggregator` whose `update` takes a stack of per-element updates (leading axis n) and
returns one update. `as_optax` wraps any robustjax rule (anything `robustjax.pipeline.as_rule`
accepts: a name, a spec string, a Pipeline, a callable) in that protocol, and `robust_optimizer`
chains it with an ordinary optax optimiser. The training engine's server update is this adapter
(`robustjax.training`), so what users import is what the engine runs:

  >>> import jax, jax.numpy as jnp, optax
  >>> from robustjax.optax_adapter import robust_optimizer
  >>> opt = robust_optimizer('nnm+trimmed_mean', optax.sgd(0.1), f=1)
  >>> params = jnp.zeros(3)
  >>> state = opt.init(params)
  >>> worker_grads = jnp.ones((5, 3))  # e.g. jax.vmap(jax.grad(loss), (None, 0))(params, batches)
  >>> updates, state = opt.update(worker_grads, state, params)

State: the aggregator carries a `jax.random` key (split each step, for stochastic
pre-aggregators such as bucketing) and the rule's own state (`Pipeline.init` / `update`: for
centered clipping the previous aggregate, the centre of the next step), so the whole update stays
a pure function. With a `mesh`, the rule runs with the coordinates sharded over the devices
(`robustjax.parallel.sharded_update`).

References:
  optax, `optax.experimental.aggregating` (the Aggregator protocol).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax
from optax.experimental import aggregating

from robustjax.parallel import sharded_update
from robustjax.pipeline import as_rule

__all__ = ['RobustAggregatorState', 'as_optax', 'robust_optimizer']


class RobustAggregatorState(NamedTuple):
  """The state of `as_optax`: the step key (raw `key_data`, so it checkpoints as an array) and
  the rule's state (`Pipeline.init`)."""

  key: jax.Array
  rule: Any


def as_optax(rule, *, f: int, key=None, mesh=None) -> aggregating.Aggregator:
  """Wraps a robust rule as an `optax.experimental.aggregating.Aggregator`.

  Args:
    rule: anything `robustjax.pipeline.as_rule` accepts (``'nnm+trimmed_mean'``,
      ``('centered_clipping', {'tau': 1.0})``, a Pipeline, a callable).
    f: the number of Byzantine workers the rule tolerates.
    key: the initial `jax.random` key for stochastic pre-aggregators (default `key(0)`).
    mesh: optional ``('workers',)`` mesh: aggregate with the coordinates sharded over it.

  Returns:
    An `Aggregator` whose `update(worker_updates, state, params=None)` maps a stack of per-worker
    updates (leading axis n) to one update.

  Raises:
    ValueError: for unknown names or bad parameters (from `as_rule`).
  """
  pipeline = as_rule(rule, f)
  key0 = jax.random.key(0) if key is None else key
  apply = pipeline.update if mesh is None else sharded_update(pipeline, mesh)

  def init_fn(params):
    return RobustAggregatorState(key=jax.random.key_data(key0), rule=pipeline.init(params))

  def update_fn(worker_updates, state, params=None, **extra_args):
    del params, extra_args
    key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
    agg, rule_state = apply(worker_updates, state.rule, sub)
    return agg, RobustAggregatorState(key=jax.random.key_data(key), rule=rule_state)

  return aggregating.Aggregator(init=init_fn, update=update_fn)


def robust_optimizer(
  rule, optimizer: optax.GradientTransformation, *, f: int, key=None, mesh=None
) -> optax.GradientTransformation:
  """An optax optimiser that first aggregates per-worker gradients with a robust rule.

  `optax.experimental.aggregating.process(identity, as_optax(rule, ...), optimizer)`: its
  `update` takes the stack of per-worker gradients (leading axis n) and returns the optimiser's
  update for the parameters.

  Args:
    rule: as in `as_optax`.
    optimizer: any optax gradient transformation (applied to the robust aggregate).
    f, key, mesh: as in `as_optax`.
  """
  return aggregating.process(optax.identity(), as_optax(rule, f=f, key=key, mesh=mesh), optimizer)
