"""What every attack shares: the `Attack` object, the registry, honest statistics, validation.

An attack is registered once, as a function, with its *kind* declared next to it:

* ``'update'``: ``fn(honest, *, f, key=None, **params) -> byzantine`` (f slices);
* ``'stateful'``: ``fn(honest, state, *, f, **params) -> (byzantine, state)``, with
  ``init(honest_example, *, key) -> state``;
* ``'data'``: ``fn(labels, num_classes, **params) -> labels``: the Byzantine workers compute
  honest gradients on altered labels, and nothing replaces their messages;
* ``'none'``: the Byzantine workers behave honestly (a baseline where the rule still assumes f).

`get(spec)` resolves a name, a spec string (``'ipm(eps=0.5)'``), a ``(name, params)`` pair or a
callable into one `Attack`, whose ``init`` / ``apply`` have the same shape for every kind. The
defender is handed to the attacks that declare ``needs_rule`` (the optimal ones) through
``apply(..., rule=...)``, by the engine, in one place.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from robustjax._checks import check_choice, num_workers
from robustjax._registry import Registry
from robustjax._spec import parse_spec
from robustjax.stack import acc_dtype, weighted_sum

__all__ = ['Attack', 'Kind', 'REGISTRY', 'register', 'get', 'names', 'KINDS']

KINDS = ('update', 'stateful', 'data', 'none')

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Kind:
  """What an attack declares at registration (see the module docstring).

  Attributes:
    kind: one of `KINDS`.
    needs_rule: the attack evaluates the defender (it receives ``rule=`` from `Attack.apply`).
    init: for stateful attacks, ``init(honest_example, *, key) -> state``.
  """

  kind: str = 'update'
  needs_rule: bool = False
  init: Callable | None = None


REGISTRY = Registry('attack', default_properties=Kind())


def register(name: str, *, kind: str = 'update', needs_rule: bool = False, init=None):
  """Registers an attack function with its declared kind (a decorator)."""
  check_choice(f'attack {name!r}', 'kind', kind, KINDS)
  if (kind == 'stateful') != (init is not None):
    raise ValueError(f'attack {name!r}: a stateful attack (and only one) declares init')
  return REGISTRY.register(name, properties=Kind(kind, needs_rule, init))


@dataclasses.dataclass(frozen=True)
class Attack:
  """A resolved attack: a function, its static parameters and its declared kind.

  Hashable (a static argument of a jitted step). Every kind has the same protocol:
  ``state = attack.init(key, honest_example)`` and
  ``byzantine, state = attack.apply(state, honest, key, f=f, rule=pipeline)``. Calling it,
  ``attack(honest, f=f, key=key)``, is the stateless shortcut for update attacks.

  Attributes:
    name: the registered name (or the callable's name).
    fn: the attack function.
    params: its static keyword parameters, a sorted tuple of (name, value) pairs.
    declared: the `Kind` it was registered with.
  """

  name: str
  fn: Callable
  params: tuple
  declared: Kind

  @property
  def kind(self) -> str:
    return self.declared.kind

  @property
  def data_level(self) -> bool:
    """The attack alters the Byzantine workers' data (labels), not their messages."""
    return self.kind == 'data'

  @property
  def replaces_messages(self) -> bool:
    """The attack replaces the Byzantine workers' messages after they are computed."""
    return self.kind in ('update', 'stateful')

  @property
  def spec(self) -> str:
    if not self.params:
      return self.name
    return f'{self.name}({", ".join(f"{k}={v!r}" for k, v in self.params)})'

  def init(self, key, honest_example):
    """The attack's state (``()`` for stateless attacks). `honest_example` gives shapes."""
    if self.kind != 'stateful':
      return ()
    return self.declared.init(honest_example, key=key)

  def apply(self, state, honest, key, *, f: int, rule=None):
    """``(byzantine stack of f slices, new state)`` from the honest stack.

    Args:
      state: from `init` or the previous call.
      honest: the honest stack (what the omniscient attacker sees).
      key: this step's attack key.
      f: the number of Byzantine slices to produce.
      rule: the defender (a `robustjax.pipeline.Pipeline`), used by attacks that declare
        ``needs_rule`` unless their parameters name one.
    """
    kw = dict(self.params)
    if self.declared.needs_rule and 'rule' not in kw:
      if rule is None:
        raise ValueError(f'{self.name}: needs the defender (apply(..., rule=pipeline))')
      kw['rule'] = rule
    if self.kind == 'stateful':
      return self.fn(honest, state, f=f, **kw)
    if self.kind != 'update':
      raise ValueError(f'{self.name}: a {self.kind!r} attack does not replace messages')
    return self.fn(honest, f=f, key=key, **kw), state

  def relabel(self, labels, num_classes: int):
    """The Byzantine workers' labels (data-level attacks)."""
    if not self.data_level:
      raise ValueError(f'{self.name}: only data-level attacks alter labels')
    return self.fn(labels, num_classes, **dict(self.params))

  def __call__(self, honest, *, f: int, key=None, **params):
    """The stateless shortcut: ``fn(honest, f=f, key=key, **params)`` (update attacks)."""
    if self.kind != 'update':
      raise ValueError(f'{self.name}: a {self.kind!r} attack is used through init / apply')
    return self.fn(honest, f=f, key=key, **{**dict(self.params), **params})


def _hashable(name, params: Mapping) -> tuple:
  items = tuple(sorted(params.items()))
  for k, v in items:
    try:
      hash(v)
    except TypeError:
      raise ValueError(f'attack {name}: parameter {k}={v!r} is not hashable') from None
  return items


def get(spec) -> Attack:
  """Resolves an attack once: a name, a spec string, a ``(name, params)`` pair, a callable
  (an update attack) or an `Attack`.

  Raises:
    ValueError: for an unknown name (listing every attack with its kind) or bad parameters.

  Example:
    >>> get('ipm(eps=0.5)').params
    (('eps', 0.5),)
  """
  if isinstance(spec, Attack):
    return spec
  params: Mapping = {}
  if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], Mapping):
    spec, params = spec
  if isinstance(spec, str):
    name, parsed = parse_spec(spec)
    if name not in REGISTRY:
      known = ', '.join(f'{n} ({REGISTRY.properties(n).kind})' for n in REGISTRY.names())
      raise ValueError(f'unknown attack {name!r}; known attacks: {known}')
    fn = REGISTRY.get(name)
    params = {**parsed, **dict(params)}
  elif callable(spec):
    fn = spec
    name = REGISTRY.name_of(fn) or getattr(fn, '__name__', type(fn).__name__)
  else:
    raise ValueError(f'attacks.get: expected a name, a spec string or a callable; got {spec!r}')
  if 'f' in params:
    raise ValueError(f'attack {name}: f is the number of Byzantine workers, not a parameter')
  if params:
    from robustjax.pipeline import check_params

    reserved = ('honest', 'f', 'key', 'state', 'labels', 'num_classes')
    check_params(f'attack {name}', fn, params, reserved=reserved)
  return Attack(name, fn, _hashable(name, dict(params)), REGISTRY.properties(fn))


def names(kind: str | None = None) -> list[str]:
  """Every registered attack (of one kind, if given), sorted."""
  return [n for n in REGISTRY.names() if kind is None or REGISTRY.properties(n).kind == kind]


def _check_attack(rule: str, honest, f) -> int:
  """Validates the honest stack and f >= 1; returns n_h."""
  n_h = num_workers(honest, rule)
  if not isinstance(f, int) or isinstance(f, bool):
    raise ValueError(f'{rule}: f must be a Python int (a static argument); got {f!r}')
  if f < 1:
    raise ValueError(
      f'{rule}: f must be >= 1 (the number of Byzantine inputs to produce); got f={f}'
    )
  return n_h


def _check_float(rule: str, name: str, value, *, positive=False, nonneg=False) -> None:
  """Validates a float parameter when it is concrete (traced values pass through)."""
  if isinstance(value, jax.core.Tracer):
    return
  try:
    v = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise ValueError(f'{rule}: {name} must be a number; got {value!r}') from None
  if v.ndim != 0:
    raise ValueError(f'{rule}: {name} must be a scalar; got shape {v.shape}')
  if not np.isfinite(v):
    raise ValueError(f'{rule}: {name} must be finite; got {value!r}')
  if positive and not v > 0:
    raise ValueError(f'{rule}: {name} must be > 0; got {value!r}')
  if nonneg and not v >= 0:
    raise ValueError(f'{rule}: {name} must be >= 0; got {value!r}')


def _acc(x) -> jax.Array:
  """A leaf in its accumulation dtype (float32 at least)."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize >= 4:
    return x
  return x.astype(jnp.float32)


def _upcast(tree):
  return jax.tree.map(_acc, tree)


def _mean(honest):
  """μ: the coordinate-wise mean of the honest inputs (a matvec per leaf), accumulation dtype."""
  n_h = num_workers(honest, 'mean')
  w = jnp.full((n_h,), 1.0 / n_h, acc_dtype(honest))
  return weighted_sum(w, _upcast(honest), ignore_nonfinite=False)


def _std(honest, mu, ddof: int):
  """σ: the coordinate-wise standard deviation (centred second moment, a matvec per leaf)."""
  n_h = num_workers(honest, 'std')
  if n_h - ddof < 1:
    raise ValueError(f'std: needs more than ddof={ddof} honest inputs; got {n_h}')
  sq = jax.tree.map(lambda x, m: jnp.square(_acc(x) - m[None]), honest, mu)
  w = jnp.full((n_h,), 1.0 / (n_h - ddof), acc_dtype(honest))
  return jax.tree.map(jnp.sqrt, weighted_sum(w, sq, ignore_nonfinite=False))


def _tree_vdot(a, b) -> jax.Array:
  """Σ over leaves of ⟨a, b⟩ (trees without a worker axis)."""
  parts = [
    jnp.vdot(_acc(x).ravel(), _acc(y).ravel())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  ]
  return functools.reduce(jnp.add, parts)


def _stack_dot(stack, point) -> jax.Array:
  """(n,) inner products ⟨x_i, point⟩, a matvec per leaf summed over leaves."""
  parts = []
  for x, p in zip(jax.tree.leaves(stack), jax.tree.leaves(point)):
    xm = _acc(x).reshape(x.shape[0], -1)
    parts.append(jnp.matmul(xm, _acc(p).reshape(-1).astype(xm.dtype), precision=_HIGHEST))
  return functools.reduce(jnp.add, parts)


def _axpy(a, x, y):
  """a·x + y leaf by leaf."""
  return jax.tree.map(lambda u, v: a * u + v, x, y)


def _repeat(point, f: int, like):
  """f copies of `point` (a tree without the worker axis) in the dtypes of the stack `like`."""
  return jax.tree.map(
    lambda p, x: jnp.broadcast_to(jnp.asarray(p).astype(x.dtype)[None], (f,) + x.shape[1:]),
    point,
    like,
  )


def _cast_like(stack, like):
  return jax.tree.map(lambda x, l: jnp.asarray(x).astype(l.dtype), stack, like)
