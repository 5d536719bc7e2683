"""Trace-time validation shared by every rule: clear `ValueError`s naming the rule."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def num_workers(stack, rule: str) -> int:
  """Returns n, the common leading-axis size of every leaf of `stack`.

  Raises:
    ValueError: if the stack has no leaves, a leaf is a scalar, the leading axes differ, or n = 0.
  """
  leaves = jax.tree.leaves(stack)
  if not leaves:
    raise ValueError(f'{rule}: the stack is empty (a pytree with no leaves)')
  sizes = set()
  for leaf in leaves:
    dtype = getattr(leaf, 'dtype', None)
    if dtype is not None and not (
      jnp.issubdtype(dtype, jnp.floating)
      or jnp.issubdtype(dtype, jnp.integer)
      or jnp.issubdtype(dtype, jnp.bool_)
    ):
      raise ValueError(
        f'{rule}: leaves must be real numbers (float, or int / bool promoted to float32); '
        f'got a {jnp.dtype(dtype).name} leaf'
      )
    shape = getattr(leaf, 'shape', ())
    if len(shape) == 0:
      raise ValueError(f'{rule}: every leaf needs a leading worker axis; got a scalar leaf')
    sizes.add(shape[0])
  if len(sizes) != 1:
    raise ValueError(
      f'{rule}: every leaf must have the same leading (worker) axis; got sizes {sorted(sizes)}'
    )
  n = sizes.pop()
  if n == 0:
    raise ValueError(f'{rule}: the stack is empty (leading axis of size 0)')
  return n


def check_f(rule: str, n: int, f: int, *, min_n: int | None = None, condition: str = '') -> None:
  """Checks 0 <= f and 2f < n (and n >= min_n with `condition` describing it).

  Raises:
    ValueError: naming `rule` and the violated condition.
  """
  if isinstance(f, jax.core.Tracer):
    raise ValueError(
      f'{rule}: f must be a static Python int, not a traced value (mark it static, e.g. '
      f'jax.jit(..., static_argnames="f"), or close over it)'
    )
  if not isinstance(f, int) or isinstance(f, bool):
    raise ValueError(f'{rule}: f must be a Python int (a static argument); got {f!r}')
  if f < 0:
    raise ValueError(f'{rule}: f must be >= 0; got f={f}')
  if 2 * f >= n:
    raise ValueError(f'{rule}: needs n > 2f (an honest majority); got n={n}, f={f}')
  if min_n is not None and n < min_n:
    raise ValueError(f'{rule}: needs {condition or f"n >= {min_n}"}; got n={n}, f={f}')


def check_positive_int(rule: str, name: str, value, *, minimum: int = 1) -> None:
  """Checks that a static count is a Python int >= `minimum`."""
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f'{rule}: {name} must be an int >= {minimum}; got {value!r}')


def check_choice(rule: str, name: str, value, choices) -> None:
  """Checks that a static option is one of `choices` (of the same type: True is not 1)."""

  def same(c):
    return isinstance(value, type(c)) and isinstance(value, bool) == isinstance(c, bool)

  if not any(same(c) and value == c for c in choices):
    raise ValueError(f'{rule}: {name} must be one of {tuple(choices)}; got {value!r}')


def check_positive(rule: str, name: str, value, *, allow_zero: bool = False) -> None:
  """Checks a real parameter (> 0, or >= 0) when it is concrete: a Python number or a concrete
  array (traced values pass unchecked; they cannot be inspected at trace time)."""
  if isinstance(value, bool):
    raise ValueError(f'{rule}: {name} must be a number; got {value!r}')
  if value is None or isinstance(value, jax.core.Tracer):
    return
  try:
    arr = np.asarray(value, dtype=float)
  except (TypeError, ValueError):
    raise ValueError(f'{rule}: {name} must be a number; got {value!r}') from None
  cond = '>= 0' if allow_zero else '> 0'
  if np.any(np.isnan(arr)) or np.any(arr < 0) or (not allow_zero and np.any(arr == 0)):
    shown = arr.item() if arr.size == 1 else value
    raise ValueError(f'{rule}: {name} must be {cond}; got {name}={shown!r}')


def check_like_slice(rule: str, name: str, tree, stack) -> None:
  """Checks that `tree` has the structure of one slice of `stack` and each leaf its shape."""
  leaves, slices = jax.tree.leaves(tree), jax.tree.leaves(stack)
  if jax.tree.structure(tree) != jax.tree.structure(stack) and len(leaves) != len(slices):
    raise ValueError(
      f'{rule}: {name} must have the pytree structure of one slice of the stack '
      f'({len(slices)} leaves); got {len(leaves)} leaves'
    )
  for i, (a, x) in enumerate(zip(leaves, slices)):
    want, got = tuple(x.shape[1:]), tuple(jnp.shape(a))
    if got != want and math.prod(got) != math.prod(want):
      raise ValueError(
        f'{rule}: {name} leaf {i} must have the shape of one slice of the stack, {want}; got {got}'
      )


def named_static_errors(rule: str, fn):
  """Wraps a jitted rule so that a traced value passed for a static argument (f, m, counts) is
  reported naming the rule and the argument, instead of JAX's generic hashing error."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    traced = [k for k, v in kwargs.items() if isinstance(v, jax.core.Tracer)]
    if not traced:
      return fn(*args, **kwargs)
    try:
      return fn(*args, **kwargs)
    except ValueError as err:
      if 'Non-hashable static arguments' not in str(err):
        raise
      raise ValueError(
        f'{rule}: {", ".join(traced)} must be static (a Python int), not a traced value: pass '
        f'it as a constant, or mark it static in your jax.jit (static_argnames)'
      ) from None

  return wrapper
