"""Pre-aggregators (stack -> stack) and their composition with an aggregator.

A pre-aggregator is a pure function `fn(stack, *, f, **params) -> stack` (stochastic ones also
take an explicit `key`), jitted with its counts static. `compose` chains pre-aggregators and an
aggregator into one `Pipeline`: a frozen, hashable dataclass, so it can be a static argument of
`jax.jit`, and a drop-in for an aggregator.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from robustjax import preaggregators as pre
  >>> rule = pre.compose('trimmed_mean', pre=[('clipping', {'c': 1.0}), 'nnm'], f=2)
  >>> rule.name
  'clipping+nnm+trimmed_mean'
  >>> x = jax.random.normal(jax.random.key(0), (10, 5))
  >>> out = jax.jit(rule)(x)            # or jax.jit(step, static_argnames=('rule',))

Non-finite inputs (the edge-case table):

===========  ==========================================================================
rule         a slice with NaN / ±Inf entries, or an overflowing norm (1e38 in float32)
===========  ==========================================================================
nnm          at +inf distance from everyone: never a neighbour of a finite slice while at
             most f slices are bad; its own mixed output ignores its non-finite entries
bucketing    `weighted_sum` treats its non-finite entries as 0 inside its own bucket; other
             buckets are untouched (at most f buckets are affected)
clipping     its norm counts as +inf, so it is clipped to the zero vector
arc          the same as clipping (its norm is among the k largest since k ≥ f)
===========  ==========================================================================

References:
  Allouah et al., "Fixing by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity",
  AISTATS 2023 (NNM). Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous
  Datasets via Bucketing", ICLR 2022. Allouah et al., "The Vital Role of Gradient Clipping in
  Byzantine-Resilient Distributed Learning", arXiv:2405.14432, 2024 (ARC).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from robustjax import aggregators
from robustjax._checks import check_f, check_positive_int, num_workers
from robustjax._registry import Registry
from robustjax._spec import parse_rule
from robustjax.stack import norms, pairwise_sq_dists, weighted_sum

__all__ = [
  'REGISTRY',
  'register',
  'get',
  'names',
  'nnm',
  'bucketing',
  'clipping',
  'arc',
  'Pipeline',
  'compose',
  'as_rule',
]

REGISTRY = Registry('pre-aggregator')
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names


def _scale_slices(stack, scale, ok):
  """x_i · scale_i per leaf; slices with ok_i False become exactly 0 (even NaN entries)."""

  def one(x):
    x = jnp.asarray(x)
    b = (-1,) + (1,) * (x.ndim - 1)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    y = x.astype(acc) * scale.reshape(b).astype(acc)
    return jnp.where(ok.reshape(b), y, 0.0).astype(x.dtype)

  return jax.tree.map(one, stack)


def _clip_to(stack, radius):
  """Clips every slice to norm ≤ radius; slices with a non-finite norm become 0."""
  nrm = norms(stack)
  ok = jnp.isfinite(nrm)
  safe = jnp.where(ok & (nrm > 0), nrm, 1.0)
  scale = jnp.where(nrm > radius, radius / safe, 1.0)
  return _scale_slices(stack, scale, ok)


@register('nnm')
@functools.partial(jax.jit, static_argnames=('f',))
def nnm(stack, *, f: int):
  """Nearest-neighbour mixing: y_i = the mean of the n − f nearest neighbours of x_i (x_i included).

  Computed as an n × n weight matrix W (W_ij = 1/(n − f) if x_j is among the n − f nearest
  neighbours of x_i, else 0, from `pairwise_sq_dists` and `lax.top_k`) applied to the stack with
  one `weighted_sum`: never an n × (n − f) × d tensor. Ties are broken towards the lower index
  (`lax.top_k`), which changes nothing when the tied inputs are equal.

  Edge cases: a slice with non-finite entries or an overflowing norm is at +inf distance from
  every other slice, so with at most f of them it is never a neighbour of a finite slice; its own
  output averages its neighbours with its non-finite entries counted as 0 (`weighted_sum`).

  Cost: one n × n × d Gram product plus one n × n × d weighted combination (two matmuls).
  Robustness: NNM ∘ F is (f, κ')-robust with κ' ≤ (8f/(n − f))(κ_F + 1) (Allouah et al., 2023).

  Args:
    stack: a pytree whose leaves share a leading worker axis n, or an (n, d) array.
    f: the number of Byzantine inputs tolerated (static; 0 ≤ f and 2f < n).

  Returns:
    A stack of n mixed slices, same structure and dtypes.

  Raises:
    ValueError: for an empty or inconsistent stack, f < 0 or 2f ≥ n.

  References:
    Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Fixing by Mixing: A Recipe for
    Optimal Byzantine ML under Heterogeneity", AISTATS 2023.
  """
  n = num_workers(stack, 'nnm')
  check_f('nnm', n, f)
  d2 = pairwise_sq_dists(stack)
  k = n - f
  _, idx = jax.lax.top_k(-d2, k)
  w = jnp.zeros((n, n), d2.dtype).at[jnp.arange(n)[:, None], idx].set(1.0 / k)
  return weighted_sum(w, stack)


@register('bucketing')
@functools.partial(jax.jit, static_argnames=('f', 's'))
def bucketing(stack, *, f: int = 0, key, s: int = 2):
  """Bucketing: shuffle the inputs with `key`, return the means of consecutive buckets of size s.

  The output has ⌈n/s⌉ slices; when s does not divide n the last bucket holds the n mod s
  remaining inputs (as in ByzFL). Implemented as a ⌈n/s⌉ × n weight matrix applied with one
  `weighted_sum`.

  .. warning::
    The aggregator that follows sees ⌈n/s⌉ inputs of which up to f are bad, so it needs
    2f < ⌈n/s⌉ (and `compose` passes it the same f). Karimireddy et al. use s = 2 in most
    experiments; s = 2 is the default here.

  Edge cases: a slice's non-finite entries count as 0 in its own bucket's mean (`weighted_sum`),
  and do not reach other buckets.

  Cost: one n × n/s × d weighted combination.

  Args:
    stack: a pytree whose leaves share a leading worker axis n, or an (n, d) array.
    f: the number of Byzantine inputs (static; checked 0 ≤ f and 2f < n, otherwise unused).
    key: a `jax.random` key (required: the permutation is drawn from it).
    s: the bucket size (static int ≥ 1).

  Returns:
    A stack of ⌈n/s⌉ bucket means, same structure and dtypes.

  Raises:
    ValueError: for an empty or inconsistent stack, f < 0, 2f ≥ n, s < 1 or a missing key.

  References:
    Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing",
    ICLR 2022.
  """
  n = num_workers(stack, 'bucketing')
  check_f('bucketing', n, f)
  check_positive_int('bucketing', 's', s)
  if key is None:
    raise ValueError('bucketing: needs an explicit jax.random key (key=...)')
  nb = -(-n // s)
  perm = jax.random.permutation(key, n)
  pos = jnp.arange(n)
  bucket = pos // s
  size = jnp.minimum(s, n - bucket * s).astype(jnp.float32)
  w = jnp.zeros((nb, n), jnp.float32).at[bucket, perm].set(1.0 / size)
  return weighted_sum(w, stack)


@register('clipping')
def clipping(stack, *, f: int = 0, c):
  """Static clipping: x_i · min(1, c / ‖x_i‖).

  Edge cases: a slice whose norm is not finite (NaN / ±Inf entries, or 1e38 whose square
  overflows in float32) is clipped to the zero vector (its norm counts as +inf, and its
  non-finite entries are replaced, since 0 · NaN = NaN).

  Cost: two streaming passes (norms, then scaling).

  Args:
    stack: a pytree whose leaves share a leading worker axis n, or an (n, d) array.
    f: the number of Byzantine inputs (static; checked 0 ≤ f and 2f < n, otherwise unused).
    c: the clipping radius c > 0 (may be traced; checked when it is a Python number).

  Returns:
    The clipped stack, same structure and dtypes.

  Raises:
    ValueError: for an empty or inconsistent stack, f < 0, 2f ≥ n or c ≤ 0.
  """
  n = num_workers(stack, 'clipping')
  check_f('clipping', n, f)
  if isinstance(c, bool) or (isinstance(c, (int, float)) and not c > 0):
    raise ValueError(f'clipping: c must be > 0; got c={c!r}')
  return _clipping(stack, c)


@jax.jit
def _clipping(stack, c):
  return _clip_to(stack, jnp.asarray(c, jnp.float32))


@register('arc')
@functools.partial(jax.jit, static_argnames=('f',))
def arc(stack, *, f: int):
  """Adaptive robust clipping: clip the k largest-norm inputs to the largest norm of the rest.

  k = ⌊2 (f/n) (n − f)⌋ (computed in integers as ⌊2f(n − f)/n⌋), the radius is the (n − k)-th
  smallest norm, and every input is clipped to it (x_i · min(1, radius/‖x_i‖)), which changes only
  the k largest (ties at the radius are unchanged). k ≥ f whenever 2f < n.

  Edge cases: non-finite norms count as +inf (they are among the k largest while at most f are
  bad) and such slices are clipped to the zero vector, as in `clipping`.

  Cost: two streaming passes (norms, scaling) plus a top-k over n norms.

  Args:
    stack: a pytree whose leaves share a leading worker axis n, or an (n, d) array.
    f: the number of Byzantine inputs (static; 0 ≤ f and 2f < n).

  Returns:
    The clipped stack, same structure and dtypes.

  Raises:
    ValueError: for an empty or inconsistent stack, f < 0 or 2f ≥ n.

  References:
    Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan, "The Vital Role of Gradient Clipping in
    Byzantine-Resilient Distributed Learning", arXiv:2405.14432, 2024; ByzFL's `ARC`.
  """
  n = num_workers(stack, 'arc')
  check_f('arc', n, f)
  k = (2 * f * (n - f)) // n
  nrm = norms(stack)
  ok = jnp.isfinite(nrm)
  key_norm = jnp.where(ok, nrm, jnp.inf)
  smallest, _ = jax.lax.top_k(-key_norm, n - k)
  radius = -smallest[-1]
  safe = jnp.where(ok & (nrm > 0), nrm, 1.0)
  scale = jnp.where(nrm > radius, radius / safe, 1.0)
  return _scale_slices(stack, scale, ok)


# ----------------------------------------------------------------------------------------------
# Composition.


def _hashable_params(owner: str, params: Mapping[str, Any] | None) -> tuple:
  items = tuple(sorted((params or {}).items()))
  for k, v in items:
    try:
      hash(v)
    except TypeError:
      raise ValueError(
        f'{owner}: parameter {k}={v!r} is not hashable; a Pipeline stores its parameters so it '
        'can be a static jit argument: pass arrays (e.g. a centre) as runtime kwargs instead'
      ) from None
  return items


def _accepts(fn: Callable, name: str) -> bool:
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return False
  ps = sig.parameters
  return name in ps or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps.values())


def _accepts_exactly(fn: Callable, name: str) -> bool:
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def _fn_name(fn: Callable) -> str:
  return getattr(fn, '__name__', None) or type(fn).__name__


@dataclasses.dataclass(frozen=True)
class _Stage:
  """One stage of a pipeline: a function, its static parameters, and what it accepts."""

  name: str
  fn: Callable
  params: tuple
  takes_f: bool = dataclasses.field(compare=False)
  takes_key: bool = dataclasses.field(compare=False)

  def __call__(self, stack, f, key, runtime):
    kw = dict(self.params)
    kw.update(runtime)
    if self.takes_f:
      kw['f'] = f
    if self.takes_key:
      kw['key'] = key
    return self.fn(stack, **kw)


def _stage(spec, registry: Registry, kind: str) -> _Stage:
  params: Mapping[str, Any] | None = None
  if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], Mapping):
    spec, params = spec
  if isinstance(spec, str):
    name, fn = spec, registry.get(spec)
  elif callable(spec):
    name, fn = _fn_name(spec), spec
  else:
    raise ValueError(
      f'compose: each {kind} must be a registered name, a callable or a (name, params) pair; '
      f'got {spec!r}'
    )
  if params and 'f' in params:
    raise ValueError(f'compose: pass f to compose(), not in the parameters of {name!r}')
  return _Stage(
    name=name,
    fn=fn,
    params=_hashable_params(f'compose ({name})', params),
    takes_f=_accepts(fn, 'f'),
    takes_key=_accepts_exactly(fn, 'key'),
  )


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """Pre-aggregators followed by an aggregator: one rule `pipeline(stack, key=None, **kw)`.

  Frozen and hashable (functions compare by identity, parameters are stored as sorted tuples), so
  it can be a static argument of `jax.jit`; `jax.jit(pipeline)` also works. Build it with
  `compose` or `as_rule`.

  Attributes:
    f: the number of Byzantine inputs, passed to every stage that accepts `f`.
    name: a readable name, the stage names joined by '+', e.g. 'nnm+trimmed_mean'.
    stages: the pre-aggregator stages then the aggregator stage.
  """

  stages: tuple
  f: int
  name: str

  @property
  def aggregator(self) -> Callable:
    """The aggregator function (the last stage)."""
    return self.stages[-1].fn

  @property
  def pre(self) -> tuple:
    """The pre-aggregator functions, in order."""
    return tuple(s.fn for s in self.stages[:-1])

  @property
  def stochastic(self) -> bool:
    """Whether some stage takes a `key` (then calling the pipeline needs one)."""
    return any(s.takes_key for s in self.stages)

  def __call__(self, stack, key=None, **runtime_kwargs):
    """Applies the pre-aggregators in order, then the aggregator.

    Args:
      stack: a pytree whose leaves share a leading worker axis n, or an (n, d) array.
      key: a `jax.random` key, split into one subkey per stage that accepts `key` (in order);
        required when such a stage exists.
      **runtime_kwargs: traced arguments for the aggregator (e.g. `center=` for
        centered clipping).

    Returns:
      The aggregate: a tree with the worker axis removed.

    Raises:
      ValueError: if a stage needs a key and none is given (plus the stages' own errors).
    """
    takers = [i for i, s in enumerate(self.stages) if s.takes_key]
    keys = {}
    if takers:
      if key is None:
        need = ', '.join(self.stages[i].name for i in takers)
        raise ValueError(f'{self.name}: {need} needs a jax.random key: call pipeline(stack, key)')
      sub = jax.random.split(key, len(takers))
      keys = {i: sub[j] for j, i in enumerate(takers)}
    for i, s in enumerate(self.stages[:-1]):
      stack = s(stack, self.f, keys.get(i), {})
    last = len(self.stages) - 1
    return self.stages[-1](stack, self.f, keys.get(last), runtime_kwargs)


def compose(aggregator, pre=(), *, f: int, **aggregator_params) -> Pipeline:
  """Composes pre-aggregators and an aggregator into one jittable, hashable rule.

  Args:
    aggregator: a registered aggregator name, a callable `rule(stack, *, f, ...)`, or a
      `(name_or_callable, {params})` pair.
    pre: a sequence of pre-aggregators, applied in order; each a registered pre-aggregator name,
      a callable `fn(stack, *, f, ...) -> stack`, or a `(name_or_callable, {params})` pair. A
      stage whose signature has a `key` parameter is stochastic.
    f: the number of Byzantine inputs (a Python int ≥ 0), passed to every stage that accepts `f`.
    **aggregator_params: static (hashable) parameters of the aggregator, e.g. `iters=3`.
      Arrays that change between calls (a centre) go to the pipeline call instead.

  Returns:
    A `Pipeline`: `pipeline(stack, key=None, **runtime_kwargs) -> tree`, with `.f` and `.name`.

  Raises:
    ValueError: for an unknown name (listing the known ones), a malformed entry, f not an int
      ≥ 0, or an unhashable parameter.

  Examples:
    >>> rule = compose('trimmed_mean', pre=[('clipping', {'c': 1.0}), 'nnm'], f=2)
    >>> rule.name
    'clipping+nnm+trimmed_mean'
    >>> cc = compose('centered_clipping', pre=['nnm'], f=1, tau=0.5)
    >>> # v = cc(stack, center=v_prev)             # the previous aggregate, a runtime kwarg
    >>> bk = compose('median', pre=[('bucketing', {'s': 2})], f=1)
    >>> # out = bk(stack, jax.random.key(0))       # the key drives the permutation
  """
  if not isinstance(f, int) or isinstance(f, bool) or f < 0:
    raise ValueError(f'compose: f must be a Python int >= 0; got f={f!r}')
  if isinstance(pre, (str, tuple)) and (
    isinstance(pre, str) or (len(pre) == 2 and isinstance(pre[1], Mapping))
  ):
    pre = [pre]
  stages = [_stage(p, REGISTRY, 'pre-aggregator') for p in pre]
  agg = _stage(aggregator, aggregators.REGISTRY, 'aggregator')
  if aggregator_params:
    merged = dict(agg.params)
    merged.update(aggregator_params)
    agg = dataclasses.replace(agg, params=_hashable_params(f'compose ({agg.name})', merged))
  stages.append(agg)
  return Pipeline(stages=tuple(stages), f=f, name='+'.join(s.name for s in stages))


def as_rule(x, f: int) -> Pipeline:
  """Turns a name, a spec string, a callable, a `(name, params)` pair or a Pipeline into a Pipeline.

  A spec string names pre-aggregators then the aggregator, joined by '+', with optional keyword
  parameters: `'clipping(c=2.0)+nnm+multikrum(m=3)'` (see `robustjax._spec`).

  A Pipeline is returned with its f replaced by `f` (same stages); anything else is
  `compose(x, f=f)`.

  Examples:
    >>> as_rule('median', f=1).name
    'median'
    >>> as_rule('nnm+multikrum(m=3)', f=1).name
    'nnm+multikrum'
  """
  if isinstance(x, Pipeline):
    if not isinstance(f, int) or isinstance(f, bool) or f < 0:
      raise ValueError(f'as_rule: f must be a Python int >= 0; got f={f!r}')
    return x if x.f == f else dataclasses.replace(x, f=f)
  if isinstance(x, str) and ('+' in x or '(' in x):
    pre, agg, params = parse_rule(x)
    return compose(agg, pre=pre, f=f, **params)
  return compose(x, f=f)
