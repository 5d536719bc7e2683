"""The one resolver: anything that names a rule becomes a `Pipeline` here, and only here.

A *rule* in robustjax is pre-aggregators (stack → stack) followed by an aggregator
(stack → tree). Everything that accepts "a rule" — the training engine, the κ search, the optimal
attacks, the optax adapter, sweeps — calls `as_rule(x, f)`, which accepts:

* a registered aggregator name, ``'median'``;
* a spec string, pre-aggregators then the aggregator joined by ``+``, with keyword parameters as
  Python literals: ``'clipping(c=2.0)+nnm+multikrum(m=3)'`` (parsed once, here);
* a ``(name_or_callable, {params})`` pair;
* a registered function (``aggregators.krum``) or any callable ``rule(stack, *, f=..., key=...)``;
* a `Pipeline` (returned with its f replaced).

A `Pipeline` is frozen and hashable (a static argument of `jax.jit`), and answers what consumers
need to know from the rules' declared properties (`robustjax.aggregators.Properties`): its proven
κ bound, orthogonal equivariance, whether it carries a state across steps. It follows the one state
protocol of robustjax, optax's init / update pair:

  >>> import jax, jax.numpy as jnp
  >>> from robustjax import pipeline
  >>> rule = pipeline.as_rule('nnm+centered_clipping(tau=1.0)', f=1)
  >>> state = rule.init(jnp.zeros(3))            # {'center': zeros}: the previous aggregate
  >>> x = jax.random.normal(jax.random.key(0), (6, 3))
  >>> agg, state = rule.update(x, state)          # state['center'] is now agg
  >>> rule.orthogonally_equivariant, rule.kappa_bound(6)
  (False, None)

This module is the only place in robustjax that inspects signatures (to learn whether a stage
takes ``f`` and ``key``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from robustjax import aggregators, preaggregators
from robustjax import stack as stk
from robustjax._checks import check_f
from robustjax._registry import Registry
from robustjax._sorting import NETWORK_MAX_N
from robustjax._spec import parse_rule
from robustjax.aggregators import Properties
from robustjax.stack import weighted_sum

__all__ = ['Pipeline', 'Stage', 'compose', 'as_rule', 'accepts', 'check_params']


def accepts(fn: Callable, name: str, *, var_keyword: bool = True) -> bool:
  """Whether `fn` takes a keyword argument `name` (or ``**kwargs`` when `var_keyword`)."""
  try:
    ps = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return name in ps or (var_keyword and any(p.kind is p.VAR_KEYWORD for p in ps.values()))


def check_params(owner: str, fn: Callable, params: Mapping, reserved=()) -> None:
  """Raises a `ValueError` naming the accepted parameters if `params` has one `fn` does not take.

  `reserved` are the arguments the caller supplies itself (the stack, f, key, ...), which are
  not offered as parameters. Functions taking ``**kwargs`` accept anything.
  """
  try:
    ps = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return
  if any(p.kind is p.VAR_KEYWORD for p in ps.values()):
    return
  accepted = [
    n
    for n, p in ps.items()
    if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in reserved
  ][0 if reserved else 1 :]
  accepted = [n for n in accepted if n not in reserved]
  unknown = [k for k in params if k not in accepted]
  if unknown:
    raise ValueError(
      f'{owner}: unknown parameter{"s" if len(unknown) > 1 else ""} '
      f'{", ".join(repr(k) for k in unknown)}; accepted: {", ".join(accepted) or "none"}'
    )


def _key_optional(fn: Callable) -> bool:
  """Whether `fn`'s ``key`` parameter has a default (then the stage runs without a key)."""
  try:
    p = inspect.signature(fn).parameters.get('key')
  except (TypeError, ValueError):
    return False
  return p is not None and p.default is not inspect.Parameter.empty


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


def _fn_name(fn: Callable) -> str:
  return getattr(fn, '__name__', None) or type(fn).__name__


def _format(name: str, params: tuple) -> str:
  if not params:
    return name
  return f'{name}({", ".join(f"{k}={v!r}" for k, v in params)})'


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a pipeline: a function, its static parameters, its declared properties."""

  name: str
  fn: Callable
  params: tuple
  properties: Properties = dataclasses.field(compare=False)
  takes_f: bool = dataclasses.field(compare=False)
  takes_key: bool = dataclasses.field(compare=False)
  key_optional: bool = dataclasses.field(default=False, compare=False)

  @property
  def spec(self) -> str:
    """The stage as a spec string, ``'multikrum(m=3)'``."""
    return _format(self.name, self.params)

  def __call__(self, stack, f, key, runtime):
    kw = dict(self.params)
    kw.update(runtime)
    if self.takes_f:
      kw['f'] = f
    if self.takes_key:
      kw['key'] = key
    return self.fn(stack, **kw)


def _stage(spec, registry: Registry, kind: str) -> Stage:
  params: Mapping[str, Any] | None = None
  if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], Mapping):
    spec, params = spec
  if isinstance(spec, str):
    name, fn = spec, registry.get(spec)
  elif callable(spec):
    name, fn = registry.name_of(spec) or _fn_name(spec), spec
  else:
    raise ValueError(
      f'compose: each {kind} must be a registered name, a callable or a (name, params) pair; '
      f'got {spec!r}'
    )
  if params and 'f' in params:
    raise ValueError(f'compose: pass f to compose(), not in the parameters of {name!r}')
  if params:
    check_params(name, fn, params, reserved=('stack', 'f', 'key'))
  return Stage(
    name=name,
    fn=fn,
    params=_hashable_params(f'compose ({name})', params),
    properties=registry.properties(fn),
    takes_f=accepts(fn, 'f'),
    takes_key=accepts(fn, 'key', var_keyword=False),
    key_optional=_key_optional(fn),
  )


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """Pre-aggregators followed by an aggregator: one rule `pipeline(stack, key=None, **kw)`.

  Frozen and hashable (functions compare by identity, parameters are stored as sorted tuples), so
  it can be a static argument of `jax.jit`. Build it with `as_rule` or `compose`.

  Attributes:
    stages: the pre-aggregator stages then the aggregator stage.
    f: the number of Byzantine inputs, passed to every stage that accepts `f`.
    name: the stage names joined by '+', e.g. 'nnm+trimmed_mean'.
  """

  stages: tuple
  f: int
  name: str

  # ---- what the stages are -------------------------------------------------------------------

  @property
  def aggregator(self) -> Callable:
    """The aggregator function (the last stage)."""
    return self.stages[-1].fn

  @property
  def pre(self) -> tuple:
    """The pre-aggregator functions, in order."""
    return tuple(s.fn for s in self.stages[:-1])

  @property
  def spec(self) -> str:
    """The pipeline as a spec string with its parameters, ``'nnm+multikrum(m=3)'``."""
    return '+'.join(s.spec for s in self.stages)

  # ---- properties, from the stages' declarations --------------------------------------------

  @property
  def stochastic(self) -> bool:
    """Whether some stage takes a `key` (then calling the pipeline needs one)."""
    return any(s.takes_key for s in self.stages)

  @property
  def orthogonally_equivariant(self) -> bool:
    """F(Qx) = Q F(x) for every orthogonal Q: every stage declares it."""
    return all(s.properties.orthogonal_equivariant for s in self.stages)

  @property
  def distance_based(self) -> bool:
    """Some stage computes pairwise distances."""
    return any(s.properties.distance_based for s in self.stages)

  @property
  def coordinatewise(self) -> bool:
    """Every stage acts coordinate by coordinate."""
    return all(s.properties.coordinatewise for s in self.stages)

  def order_weights(self, n: int) -> np.ndarray | None:
    """For a lone aggregator that is an L-statistic (`Properties.order_weights`): the (n,)
    weights of the sorted values in each coordinate, with this pipeline's f; else None."""
    last = self.stages[-1]
    if len(self.stages) != 1 or last.properties.order_weights is None:
      return None
    w = last.properties.order_weights(n, self.f, **dict(last.params))
    return np.asarray(w, dtype=np.float64)

  def median_window(self, n: int) -> int | None:
    """For a lone aggregator that averages the values closest to the coordinate median
    (`Properties.median_window`): how many it keeps out of n, with this pipeline's f; else None."""
    last = self.stages[-1]
    if len(self.stages) != 1 or last.properties.median_window is None:
      return None
    return int(last.properties.median_window(n, self.f, **dict(last.params)))

  @property
  def exponential(self) -> bool:
    """Some stage's exact form enumerates subsets."""
    return any(s.properties.exponential for s in self.stages)

  @property
  def trusted_input(self) -> tuple:
    """Input positions the aggregator assumes honest (MoNNA's trusted input)."""
    return self.stages[-1].properties.trusted_input

  @property
  def robust(self) -> bool:
    """The aggregator is robust (False for the mean, the non-robust baseline)."""
    return self.stages[-1].properties.robust

  @property
  def center_state(self) -> bool:
    """The aggregator carries its previous output as ``center`` (centered clipping)."""
    return self.stages[-1].properties.center_state

  def kappa_bound(self, n: int) -> float | None:
    """The proven upper bound on κ⋆ for n inputs, composed through the pre-aggregators.

    None where no proof is known (see each rule's `Properties.kappa_reference`) or 2f ≥ n.
    """
    f = self.f
    if 2 * f >= n:
      return None
    last = self.stages[-1]
    k = last.properties.kappa(n, f, **dict(last.params)) if last.properties.kappa else None
    for s in reversed(self.stages[:-1]):
      if k is None or s.properties.kappa is None:
        return None
      k = s.properties.kappa(n, f, k)
    return k

  # ---- the state protocol --------------------------------------------------------------------

  def init(self, like) -> dict:
    """The state carried across steps: ``{'center': zeros like `like`}`` for a rule with a
    centre (the previous aggregate), the rule's declared ``state_init`` for another state (e.g.
    adaptive MultiKrum's estimate ``f_hat``), else ``{}``. `like` is one slice."""
    if self.center_state:
      return {'center': jax.tree.map(jnp.zeros_like, like)}
    last = self.stages[-1]
    if last.properties.state_init is not None:
      return last.properties.state_init(like, f=self.f, **dict(last.params))
    return {}

  def update(self, stack, state, key=None):
    """``(aggregate, new state)``: the rule applied with its state (optax's update protocol).

    A declared ``state_next`` sees the stack the aggregator saw (after the pre-aggregators)."""
    last = self.stages[-1]
    if last.properties.state_next is None:
      out = self(stack, key, **state)
      return out, ({'center': out} if self.center_state else {})
    out, seen = self._apply(stack, key, state)
    return out, last.properties.state_next(seen, out, state, f=self.f, **dict(last.params))

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
    if key is None:
      need = [s.name for s in self.stages if s.takes_key and not s.key_optional]
      if need:
        raise ValueError(
          f'{self.name}: {", ".join(need)} needs a jax.random key: call pipeline(stack, key)'
        )
    return self._apply(stack, key, runtime_kwargs)[0]

  def _apply(self, stack, key, runtime_kwargs):
    """``(aggregate, the stack the aggregator saw)``.

    Fusion: when the stage before a coordinate-wise aggregator declares
    `Properties.row_combination` (clipping, ARC, bucketing), only its (index, weight) are
    computed; the mean then becomes one weighted sum of the original stack, and a network-based
    rule (up to `_sorting.NETWORK_MAX_N` inputs) reads the combined slices as they are formed,
    fused into its loop. No intermediate stack is written. When the stage before the aggregator
    declares `Properties.mixing_from_dists` (NNM) and the aggregator `weights_from_dists` (Krum,
    MultiKrum), both run in distance space (`_in_distance_space`); before a coordinate-wise
    aggregator (one leaf, or on CPU leaves of one dtype), the mixing and the aggregator run
    together over column blocks (`_mixed_by_column_blocks`).
    """
    takers = [i for i, s in enumerate(self.stages) if s.takes_key]
    keys = {}
    if takers and key is not None:
      sub = jax.random.split(key, len(takers))
      keys = {i: sub[j] for j, i in enumerate(takers)}
    last, agg = len(self.stages) - 1, self.stages[-1]
    for i, s in enumerate(self.stages[:-1]):
      # A mixing stage right before a stateless aggregator called without runtime arguments:
      # the two run together, in distance space or over column blocks.
      mixing_last = (
        i == last - 1
        and s.properties.mixing_from_dists is not None
        and not runtime_kwargs
        and agg.properties.state_next is None
      )
      if (
        mixing_last
        and agg.properties.weights_from_dists is not None
        and jax.tree.leaves(stack)[0].shape[0] <= DISTANCE_FUSION_MAX_N
      ):
        return _in_distance_space(s, agg, stack, self.f), None
      if mixing_last and agg.properties.coordinatewise and _fuses_mixing(jax.tree.leaves(stack)):
        return _mixed_by_column_blocks(s, agg, stack, self.f, keys.get(last)), None
      combination = s.properties.row_combination
      if i != last - 1 or combination is None or not agg.properties.coordinatewise:
        stack = s(stack, self.f, keys.get(i), {})
        continue
      kw = dict(s.params, f=self.f, **({'key': keys.get(i)} if s.takes_key else {}))
      index, weight = combination(stack, **kw)
      k, n = index.shape[0], jax.tree.leaves(stack)[0].shape[0]
      weights = agg.properties.order_weights
      uniform = weights is not None and np.ptp(weights(k, self.f, **dict(agg.params))) == 0
      if uniform and not runtime_kwargs and agg.properties.state_next is None:
        # The mean of the combined slices: one weighted sum of the inputs.
        check_f(agg.name, k, self.f)
        per_input = jnp.zeros((n,), weight.dtype).at[index].add(weight / k)
        return weighted_sum(per_input, stack, ignore_nonfinite=True), None
      if n <= NETWORK_MAX_N:
        stack = preaggregators.combine_rows(stack, index, weight)
      else:
        stack = s(stack, self.f, keys.get(i), {})
    return agg(stack, self.f, keys.get(last), runtime_kwargs), stack


# Distance-space fusion holds a few (n, n) matrices: up to Krum's own full-matrix bound.
DISTANCE_FUSION_MAX_N = 4096


def _mixing(pre, stack, f: int):
  """`(gram, finite, W)`: the scaled Gram of the stack, which slices are readable, and the n × n
  mixing a `mixing_from_dists` pre-aggregator chooses from the distances."""
  gram, finite, _ = stk.scaled_gram(stack)
  mix = pre.properties.mixing_from_dists(stk.dists_from_gram(gram, finite), f=f, **dict(pre.params))
  return gram, finite, mix


def _in_distance_space(pre, agg, stack, f: int):
  """A mixing pre-aggregator then a distance-selecting aggregator, from one Gram product.

  With G the centred Gram of the (rescaled) inputs and W the mixing, the mixed inputs' centred
  Gram is W G Wᵀ (each row of W sums to one, so the centre cancels), their distances follow, the
  aggregator's weights a are chosen from them, and the aggregate is Σ_j (aᵀW)_j x_j: one Gram
  product and one weighted sum over the stack, where the stages one after the other take two
  Gram products, an n × n × d mixing product and a weighted sum. Non-finite inputs as in the
  stages (`stack.unreadable`): a mixed input that uses one is unreadable, and an aggregate that
  selects an unreadable mixed input (or no readable one) is NaN.
  """
  gram, finite, mix = _mixing(pre, stack, f)
  readable = ~stk.unreadable(mix, finite)
  hi = jax.lax.Precision.HIGHEST
  mixed_gram = jnp.matmul(jnp.matmul(mix, gram, precision=hi), mix.T, precision=hi)
  mixed_dists = stk.dists_from_gram(mixed_gram, readable)
  a, chosen_readable = agg.properties.weights_from_dists(mixed_dists, f=f, **dict(agg.params))
  bad = stk.unreadable(a, chosen_readable & readable)
  out = weighted_sum(jnp.matmul(a, mix, precision=hi), stack)
  return jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), out)


def _fuses_mixing(leaves) -> bool:
  """Whether `_mixed_by_column_blocks` runs on these leaves: one leaf, or on CPU leaves of one
  dtype (one loop body rounds to one dtype). Off CPU the blocks are one piece, which for several
  leaves would first concatenate them: a copy of the stack beside the mixed one the fused piece
  forms, where the stages write only the mixed one."""
  if len(leaves) == 1:
    return True
  return jax.default_backend() == 'cpu' and len({stk.result_dtype(x.dtype) for x in leaves}) == 1


def _mixed_by_column_blocks(pre, agg, stack, f: int, key):
  """A mixing pre-aggregator then a coordinate-wise aggregator, the mixed stack never written.

  The mixing W (n × n) is chosen from one Gram product, as the pre-aggregator does; then, over
  column blocks kept in cache (`stack.map_columns_of_matrices`: one loop over the blocks of all
  the leaves, so that the aggregator's network is compiled once whatever the number of leaves),
  each block is mixed (W times the block, its non-finite entries counted as 0, the rows that use
  an input they cannot read set to NaN, rounded to the leaves' dtype: the pre-aggregator's own
  output) and the aggregator runs on the mixed block. The stages one after the other write the
  n mixed slices and read them back: nnm + trimmed_mean at n = 64, d = 10⁶ took 232-240 ms this
  way against 350-432 on an Intel Xeon VM, most of it the n × n × d mixing product
  (BENCHMARKS.md). Which stacks take this path: `_fuses_mixing`.
  """
  _, finite, mix = _mixing(pre, stack, f)
  bad = stk.unreadable(mix, finite)[:, None]
  leaves, treedef = jax.tree.flatten(stack)
  leaves = [jnp.asarray(x) for x in leaves]
  dtype = stk.result_dtype(leaves[0].dtype)
  mats = [stk.as_matrix(x) for x in leaves]
  w = mix.astype(mats[0].dtype)
  hi = jax.lax.Precision.HIGHEST

  def block(xb):
    clean = jnp.where(jnp.isfinite(xb), xb, 0.0)
    mixed = jnp.where(bad, jnp.nan, jnp.matmul(w, clean, precision=hi)).astype(dtype)
    return agg(mixed, f, key, {})

  rows = stk.map_columns_of_matrices(block, mats, dtype)
  return jax.tree.unflatten(treedef, [r.reshape(x.shape[1:]) for r, x in zip(rows, leaves)])


def _check_f(owner: str, f) -> None:
  if not isinstance(f, int) or isinstance(f, bool) or f < 0:
    raise ValueError(f'{owner}: f must be a Python int >= 0 (a static argument); got f={f!r}')


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

  Returns:
    A `Pipeline`.

  Raises:
    ValueError: for an unknown name (listing the known ones), a malformed entry, f not an int
      ≥ 0, or an unhashable parameter.

  Examples:
    >>> rule = compose('trimmed_mean', pre=[('clipping', {'c': 1.0}), 'nnm'], f=2)
    >>> rule.name
    'clipping+nnm+trimmed_mean'
  """
  _check_f('compose', f)
  if isinstance(pre, str) or (
    isinstance(pre, tuple) and len(pre) == 2 and isinstance(pre[1], Mapping)
  ):
    pre = [pre]
  stages = [_stage(p, preaggregators.REGISTRY, 'pre-aggregator') for p in pre]
  agg = _stage(aggregator, aggregators.REGISTRY, 'aggregator')
  if aggregator_params:
    agg = _with_params(agg, aggregator_params)
  stages.append(agg)
  return Pipeline(stages=tuple(stages), f=f, name='+'.join(s.name for s in stages))


def as_rule(x, f: int) -> Pipeline:
  """Turns a name, a spec string, a callable, a `(name, params)` pair or a Pipeline into a Pipeline.

  Examples:
    >>> as_rule('median', f=1).name
    'median'
    >>> as_rule('nnm+multikrum(m=3)', f=1).spec
    'nnm+multikrum(m=3)'
  """
  _check_f('as_rule', f)
  if isinstance(x, Pipeline):
    return x if x.f == f else dataclasses.replace(x, f=f)
  if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str):
    base = as_rule(x[0], f)  # a name or spec string, with extra aggregator parameters
    return dataclasses.replace(
      base, stages=base.stages[:-1] + (_with_params(base.stages[-1], x[1]),)
    )
  if isinstance(x, str):
    pre, agg, params = parse_rule(x)
    return compose(agg, pre=pre, f=f, **params)
  if callable(x) or isinstance(x, tuple):
    return compose(x, f=f)
  raise ValueError(
    f'as_rule: expected a rule name, a spec string, a (name, params) pair, a callable or a '
    f'Pipeline; got {x!r}'
  )


def _with_params(stage: Stage, params: Mapping) -> Stage:
  if 'f' in params:
    raise ValueError(f'compose: pass f to compose(), not in the parameters of {stage.name!r}')
  if params:
    check_params(stage.name, stage.fn, params, reserved=('stack', 'f', 'key'))
  merged = {**dict(stage.params), **dict(params)}
  return dataclasses.replace(stage, params=_hashable_params(f'compose ({stage.name})', merged))
