"""Trace-time validation shared by every rule: clear `ValueError`s naming the rule."""

from __future__ import annotations

import jax


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
