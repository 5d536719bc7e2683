"""A `lax.cond` that stays one branch under `vmap`.

Under `jax.vmap` with a batched predicate, `lax.cond` becomes a select: both branches run for
every batch element. Where one branch is a fast path that is only valid when a check holds and
the other is always right (the checked fast path and its exact fallback), `cond_if_all` keeps
one branch under `vmap`: the fast one when the check holds for every batch element, else the
fallback for all of them. Derivatives (forward and reverse, also of the vmapped function) are
each element's own branch's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap


def cond_if_all(pred, fast_fn, exact_fn, *operands):
  """``lax.cond(pred, fast_fn, exact_fn, *operands)``; under `vmap`, `fast_fn` for the whole
  batch when `pred` holds for every element, else `exact_fn` for the whole batch.

  `exact_fn` must be right for every element, `fast_fn` wherever `pred` holds: under `vmap` an
  element whose own `pred` holds may get `exact_fn`'s result. Everything the branches read that
  may be batched or differentiated must come in `operands` (a closed-over batched value is an
  error; a closed-over differentiated one would get no derivative).

  Args:
    pred: a bool scalar.
    fast_fn, exact_fn: functions of `operands` with outputs of the same structure and types.
    *operands: the branches' arguments (pytrees of arrays).

  Returns:
    The chosen branch's output.
  """

  @custom_vmap
  def batched(pred, operands):
    return jax.lax.cond(pred, fast_fn, exact_fn, *operands)

  @batched.def_vmap
  def _rule(axis_size, in_batched, pred, operands):
    pred_batched, operands_batched = in_batched
    axes = tuple(jax.tree.map(lambda b: 0 if b else None, operands_batched))
    fast = jax.vmap(fast_fn, in_axes=axes, axis_size=axis_size)
    exact = jax.vmap(exact_fn, in_axes=axes, axis_size=axis_size)
    # Recursion: an outer vmap of this rule keeps one branch too.
    out = cond_if_all(jnp.all(pred) if pred_batched else pred, fast, exact, *operands)
    return out, jax.tree.map(lambda _: True, out)

  # custom_vmap has no transpose rule, so the derivative is given here: each branch's, chosen
  # by `pred` elementwise. (A `lax.cond` over the tangents would choose one, but once batched, as
  # this rule is under `vmap`, it selects them through `stop_gradient`, which cannot be
  # transposed.) Both branches' derivatives are computed when differentiating.
  @jax.custom_jvp
  def run(pred, *operands):
    return batched(pred, operands)

  @run.defjvp
  def _jvp(primals, tangents):
    pred, *values = primals
    _, *dvalues = tangents
    out = batched(pred, tuple(values))
    _, fast = jax.jvp(fast_fn, tuple(values), tuple(dvalues))
    _, exact = jax.jvp(exact_fn, tuple(values), tuple(dvalues))
    return out, jax.tree.map(lambda a, b: jnp.where(pred, a, b), fast, exact)

  return run(pred, *operands)
