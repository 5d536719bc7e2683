"""The optimal attacks' objective along the attack's line, τ -> ‖F(honest ∪ {b + τ·v} × f) − μ‖
(μ the honest mean): by running the defender on the stack (`_line_evaluator`), or from a
statistic of the candidate column that gives the defender's output (`_along_line`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from robustjax.attacks._base import _acc, _axpy, _mean, _repeat
from robustjax.stack import flatten, unflatten


def _sum_sq(x, pieces: int = 2) -> jax.Array:
  """Σ x², over `pieces` slices of the flattened array summed apart: on XLA:CPU the reduction
  with the evaluator's elementwise pass fused into it ran 3-4x slower as one piece."""
  x = x.reshape(-1)
  cut = -(-x.shape[0] // pieces)
  return functools.reduce(
    jnp.add, [jnp.sum(jnp.square(x[i : i + cut])) for i in range(0, x.shape[0], cut)]
  )


def _deviation(out, mu) -> jax.Array:
  """‖out − μ‖ summed over leaves; a non-finite output counts as +inf (the defender broke)."""
  parts = [_sum_sq(_acc(o) - m) for o, m in zip(jax.tree.leaves(out), jax.tree.leaves(mu))]
  dev = jnp.sqrt(functools.reduce(jnp.add, parts))
  return jnp.where(jnp.isnan(dev), jnp.inf, dev)


def _line_evaluator(honest, base, direction, rule, f, key):
  """τ -> ‖rule(honest ∪ {base + τ·direction}×f) − μ‖, with μ the honest mean."""
  mu = _mean(honest)

  def evaluate(tau):
    byz = _repeat(_axpy(tau, direction, base), f, honest)
    full = jax.tree.map(lambda h, b: jnp.concatenate([h, b], axis=0), honest, byz)
    return _deviation(rule(full, key), mu)

  return evaluate


def _candidate_column(tau, base, direction, honest) -> jax.Array:
  """The Byzantine row base + τ·direction, flattened like the honest stack, rounded to its dtype
  as the Byzantine rows are, NaN as +∞."""
  point = jax.tree.map(lambda b: b[0], _repeat(_axpy(tau, direction, base), 1, honest))
  c = flatten(jax.tree.map(lambda p: p[None], point))[0]
  return jnp.where(jnp.isnan(c), jnp.inf, c)


def _along_line(statistic, honest, base, direction):
  """τ -> the same error as `_line_evaluator`, from `statistic` (c -> the defender's output on
  the honest rows and f copies of c, flattened like `stack.flatten`) at the candidate
  c = base + τ·direction (`_candidate_column`)."""
  mu = _mean(honest)

  def evaluate(tau):
    c = _candidate_column(tau, base, direction, honest)
    return _deviation(unflatten(statistic(c), honest), mu)

  return evaluate
