"""Robust aggregators: pure, jitted functions `rule(stack, *, f, **params) -> tree`.

Every rule takes a stack (a pytree whose leaves share a leading worker axis of size n, or an
(n, d) array) and returns one tree with the worker axis removed. Counts (f, m, iteration counts)
are static arguments; misuse raises a `ValueError` at trace time naming the rule and the violated
condition. `get(name)` looks a rule up by name; `names()` lists them.

Example:
  >>> import jax.numpy as jnp
  >>> from robustjax import aggregators
  >>> x = jnp.arange(12.0).reshape(4, 3)
  >>> aggregators.get('median')(x, f=1)
"""

from robustjax.aggregators._base import REGISTRY
from robustjax.aggregators._coordinatewise import *  # noqa: F403
from robustjax.aggregators._iterative import *  # noqa: F403
from robustjax.aggregators._krum import *  # noqa: F403
from robustjax.aggregators._subset import *  # noqa: F403

get = REGISTRY.get
names = REGISTRY.names
