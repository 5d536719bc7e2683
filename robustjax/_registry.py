"""A name -> function registry, with declared properties per entry and a helpful error for
unknown names."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


class Registry:
  """A mapping from names to functions of one kind (aggregators, attacks, ...).

  Each entry may carry a *properties* object (what consumers need to know about it: a robustness
  bound, an equivariance, a state); consumers ask `properties(name_or_fn)` instead of listing
  names.

  Example:
    >>> REGISTRY = Registry('aggregator')
    >>> @REGISTRY.register('mean')
    ... def mean(stack, *, f=0): ...
    >>> REGISTRY.get('mean') is mean
    True
  """

  def __init__(self, kind: str, default_properties: Any = None):
    self.kind = kind
    self._fns: dict[str, Callable] = {}
    self._props: dict[str, Any] = {}
    self._names_by_id: dict[int, str] = {}
    self._default = default_properties

  def register(self, name: str, fn: Callable | None = None, *, properties: Any = None):
    """Registers `fn` under `name` (with optional `properties`); usable as a decorator."""

    def _add(fn: Callable) -> Callable:
      if name in self._fns:
        raise ValueError(f'{self.kind} {name!r} is already registered')
      self._fns[name] = fn
      self._props[name] = self._default if properties is None else properties
      self._names_by_id.setdefault(id(fn), name)
      return fn

    return _add if fn is None else _add(fn)

  def get(self, name: str | Callable) -> Callable:
    """Returns the function registered under `name` (a callable is returned as is).

    Raises:
      ValueError: if `name` is unknown; the message lists the known names.
    """
    if callable(name):
      return name
    try:
      return self._fns[name]
    except (KeyError, TypeError):
      raise ValueError(
        f'unknown {self.kind} {name!r}; known {self.kind}s: {", ".join(self.names())}'
      ) from None

  def name_of(self, fn: Callable) -> str | None:
    """The name `fn` is registered under (by identity), or None."""
    return self._names_by_id.get(id(fn))

  def properties(self, name_or_fn) -> Any:
    """The declared properties of a registered name or function (the default for others)."""
    name = name_or_fn if isinstance(name_or_fn, str) else self.name_of(name_or_fn)
    if isinstance(name_or_fn, str) and name not in self._fns:
      self.get(name)  # raises, listing the known names
    return self._props.get(name, self._default)

  def names(self) -> list[str]:
    """The registered names, sorted."""
    return sorted(self._fns)

  def __contains__(self, name: str) -> bool:
    return name in self._fns

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def items(self):
    return [(k, self._fns[k]) for k in self.names()]
