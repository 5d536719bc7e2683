"""A name -> function registry with a helpful error for unknown names."""

from __future__ import annotations

from collections.abc import Callable, Iterator


class Registry:
  """A mapping from names to functions of one kind (aggregators, attacks, ...).

  Example:
    >>> REGISTRY = Registry('aggregator')
    >>> @REGISTRY.register('mean')
    ... def mean(stack, *, f=0): ...
    >>> REGISTRY.get('mean') is mean
    True
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._fns: dict[str, Callable] = {}

  def register(self, name: str, fn: Callable | None = None):
    """Registers `fn` under `name`; usable as a decorator."""

    def _add(fn: Callable) -> Callable:
      if name in self._fns:
        raise ValueError(f'{self.kind} {name!r} is already registered')
      self._fns[name] = fn
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
    except KeyError:
      raise ValueError(
        f'unknown {self.kind} {name!r}; known {self.kind}s: {", ".join(self.names())}'
      ) from None

  def names(self) -> list[str]:
    """The registered names, sorted."""
    return sorted(self._fns)

  def __contains__(self, name: str) -> bool:
    return name in self._fns

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def items(self):
    return [(k, self._fns[k]) for k in self.names()]
