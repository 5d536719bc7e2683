"""A robust rule as an optax aggregator: drop Byzantine-robust aggregation into an optax chain.

optax's `optax.experimental.aggregating` defines the protocol "per-worker gradients → one
update": an `Aggregator` whose `update` takes a stack of per-element updates (leading axis n) and
returns one update. `as_optax` wraps any robustjax rule (a registered name, a callable, or a
`robustjax.preaggregators.Pipeline`) in that protocol, and `robust_optimizer` chains it with an
ordinary optax optimiser:

  >>> import jax, jax.numpy as jnp, optax
  >>> from robustjax.optax_adapter import robust_optimizer
  >>> opt = robust_optimizer('trimmed_mean', optax.sgd(0.1), f=1, pre=('nnm',))
  >>> params = jnp.zeros(3)
  >>> state = opt.init(params)
  >>> worker_grads = jnp.ones((5, 3))  # e.g. jax.vmap(jax.grad(loss), (None, 0))(params, batches)
  >>> updates, state = opt.update(worker_grads, state, params)

State: the aggregator carries a `jax.random` key (split each step, for stochastic
pre-aggregators such as bucketing) and, for centered clipping, the previous aggregate (the centre
of the next step), so the whole update stays a pure function.

References:
  optax, `optax.experimental.aggregating` (the Aggregator protocol).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax
from optax.experimental import aggregating

from robustjax import preaggregators

__all__ = ['RobustAggregatorState', 'as_optax', 'robust_optimizer']

_CENTERED = ('centered_clipping',)


class RobustAggregatorState(NamedTuple):
  """The state of `as_optax`: the step key and the previous aggregate (centered clipping)."""

  key: jax.Array
  center: Any


def _uses_center(pipeline) -> bool:
  return pipeline.stages[-1].name in _CENTERED


def as_optax(rule, *, f: int, pre=(), key=None, **params) -> aggregating.Aggregator:
  """Wraps a robust rule as an `optax.experimental.aggregating.Aggregator`.

  Args:
    rule: a registered aggregator name, a callable `rule(stack, *, f, ...)`, or a `Pipeline`
      (then `pre` and `params` must be empty).
    f: the number of Byzantine workers the rule tolerates.
    pre: pre-aggregators applied before the rule (see `robustjax.preaggregators.compose`).
    key: the initial `jax.random` key for stochastic pre-aggregators (default `key(0)`).
    **params: static parameters of the aggregator (e.g. `tau=1.0`).

  Returns:
    An `Aggregator` whose `update(worker_updates, state, params=None)` maps a stack of per-worker
    updates (leading axis n) to one update.

  Raises:
    ValueError: for unknown names or bad parameters (from `compose`).
  """
  if isinstance(rule, preaggregators.Pipeline):
    if pre or params:
      raise ValueError('as_optax: pass pre-aggregators and parameters inside the Pipeline')
    pipeline = preaggregators.as_rule(rule, f)
  else:
    pipeline = preaggregators.compose(rule, pre=pre, f=f, **params)
  key0 = jax.random.key(0) if key is None else key
  centered = _uses_center(pipeline)

  def init_fn(params):
    center = jax.tree.map(lambda p: jax.numpy.zeros_like(p), params) if centered else ()
    return RobustAggregatorState(key=key0, center=center)

  def update_fn(worker_updates, state, params=None, **extra_args):
    del params, extra_args
    key, sub = jax.random.split(state.key)
    runtime = {'center': state.center} if centered else {}
    agg = pipeline(worker_updates, key=sub, **runtime)
    return agg, RobustAggregatorState(key=key, center=agg if centered else ())

  return aggregating.Aggregator(init=init_fn, update=update_fn)


def robust_optimizer(
  rule, optimizer: optax.GradientTransformation, *, f: int, pre=(), key=None, **params
) -> optax.GradientTransformation:
  """An optax optimiser that first aggregates per-worker gradients with a robust rule.

  `optax.experimental.aggregating.process(identity, as_optax(rule, ...), optimizer)`: its
  `update` takes the stack of per-worker gradients (leading axis n) and returns the optimiser's
  update for the parameters.

  Args:
    rule: as in `as_optax`.
    optimizer: any optax gradient transformation (applied to the robust aggregate).
    f, pre, key, **params: as in `as_optax`.
  """
  return aggregating.process(
    optax.identity(), as_optax(rule, f=f, pre=pre, key=key, **params), optimizer
  )
