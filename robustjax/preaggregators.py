"""Pre-aggregators (stack -> stack) and their composition with an aggregator.

A pre-aggregator is a pure function `fn(stack, *, f, **params) -> stack` (stochastic ones also
take an explicit `key`), jitted with its counts static, registered with its declared
`robustjax.aggregators.Properties`. `robustjax.pipeline.compose` / `as_rule` chain
pre-aggregators and an aggregator into one `Pipeline`.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from robustjax import preaggregators, pipeline
  >>> x = jax.random.normal(jax.random.key(0), (10, 5))
  >>> mixed = preaggregators.nnm(x, f=2)                 # (10, 5)
  >>> rule = pipeline.as_rule('clipping(c=1.0)+nnm+trimmed_mean', f=2)
  >>> out = jax.jit(rule)(x)

Non-finite inputs (the edge-case table):

===========  ==========================================================================
rule         a slice with NaN / ±Inf entries, or a norm that overflows after rescaling
===========  ==========================================================================
nnm          at +inf distance from everyone: never a neighbour of a finite slice while at
             most f slices are bad; its own mixed output is NaN (so is that of a finite
             slice with fewer than n − f finite neighbours: more than f bad slices)
bucketing    its non-finite entries count as 0 inside its own bucket (`combine_rows`); other
             buckets are untouched (at most f buckets are affected)
clipping     its norm counts as +inf, so it is clipped to the zero vector
arc          the same as clipping (its norm is among the k largest since k ≥ f)
===========  ==========================================================================

Norms and distances are computed on the stack divided by a robust power-of-two scale
(`robustjax.stack.normaliser`), so slices at 1e20 are clipped and mixed as slices at 1.

References:
  Allouah et al., "Fixing by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity",
  AISTATS 2023 (NNM). Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous
  Datasets via Bucketing", ICLR 2022. Allouah et al., "The Vital Role of Gradient Clipping in
  Byzantine-Resilient Distributed Learning", arXiv:2405.14432, 2024 (ARC).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from robustjax._checks import check_f, check_positive, check_positive_int, num_workers
from robustjax._registry import Registry
from robustjax.aggregators import Properties
from robustjax.stack import (
  acc_dtype,
  result_dtype,
  scaled_sq_dists,
  scaled_sq_dists_to,
  weighted_sum,
)

__all__ = [
  'REGISTRY',
  'register',
  'get',
  'names',
  'nnm',
  'bucketing',
  'clipping',
  'arc',
  'clipping_factors',
  'arc_factors',
  'scale_slices',
  'combine_rows',
  'bucketing_rows',
]

REGISTRY = Registry('pre-aggregator', default_properties=Properties())
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names


def scale_slices(stack, factors):
  """x_i · factors_i per leaf; a slice with factor 0 becomes exactly 0 (even its NaN entries)."""

  def one(x):
    x = jnp.asarray(x)
    acc = jnp.promote_types(result_dtype(x.dtype), jnp.float32)
    b = (-1,) + (1,) * (x.ndim - 1)
    sc = factors.astype(acc).reshape(b)
    return jnp.where(sc != 0, x.astype(acc) * sc, 0.0).astype(result_dtype(x.dtype))

  return jax.tree.map(one, stack)


def combine_rows(stack, index, weight, *, written: bool = False):
  """Output slice b = Σ_j weight[b, j] · x_{index[b, j]}, non-finite entries counted as 0.

  The form every pre-aggregator with `Properties.row_combination` (clipping, ARC, bucketing)
  produces. By default it is assembled slice by slice: inside a larger jit, XLA fuses it into a
  coordinate-wise aggregator's network that follows instead of writing the combined stack
  (`robustjax.pipeline` uses it up to `_sorting.NETWORK_MAX_N` workers; the trace grows with
  k · s). With `written` (a standalone pre-aggregator, whose output is the combined stack) it is
  one gather of k rows per column j of `index`, summed: one fused pass that writes the k slices
  (bucketing at n = 64, d = 10⁶: 34 ms, against 113 as a k × n weighted sum; inside a pipeline
  the gathers kept the network from fusing them, 2.5-2.9x slower; BENCHMARKS.md).

  Args:
    stack: a pytree with leading worker axis n.
    index: (k, s) int worker indices (may be traced).
    weight: (k, s) weights (a padding entry has weight 0).
    written: the gathered form, for an output that is written out (static).
  """
  k, width = index.shape

  def clean(rows, w):
    return jnp.where(jnp.isfinite(rows), rows, 0.0) * w

  def one(x):
    x = jnp.asarray(x)
    acc = jnp.promote_types(result_dtype(x.dtype), jnp.float32)
    w = weight.astype(acc)
    if written:
      column = (k,) + (1,) * (x.ndim - 1)
      parts = [
        clean(jnp.take(x, index[:, j], axis=0).astype(acc), w[:, j].reshape(column))
        for j in range(width)
      ]
      return functools.reduce(jnp.add, parts).astype(result_dtype(x.dtype))
    out = []
    for b in range(k):
      parts = [
        clean(jax.lax.dynamic_index_in_dim(x, index[b, j], 0, keepdims=False).astype(acc), w[b, j])
        for j in range(width)
      ]
      out.append(functools.reduce(jnp.add, parts))
    return jnp.stack(out).astype(result_dtype(x.dtype))

  return jax.tree.map(one, stack)


def _scaling_rows(factors):
  """(index, weight) of a row scaling: slice i is x_i · factors_i."""
  return jnp.arange(factors.shape[0])[:, None], factors[:, None]


_SCALE = jax.jit(scale_slices)
_SCALE_DONATED = jax.jit(scale_slices, donate_argnums=0)


def _scale(donate: bool):
  """`scale_slices` jitted, donating the stack's buffers when asked (and outside a trace)."""
  if donate not in (True, False):
    raise ValueError(f'donate must be True or False; got {donate!r}')
  return _SCALE_DONATED if donate else _SCALE


def _clip_factors(nrm, radius):
  """min(1, radius / ‖x_i‖) per slice, 0 for a slice with a non-finite norm."""
  ok = jnp.isfinite(nrm)
  safe = jnp.where(ok & (nrm > 0), nrm, 1.0)
  return jnp.where(ok, jnp.where(nrm > radius, radius / safe, 1.0), 0.0)


@register(
  'nnm',
  properties=Properties(
    kappa=lambda n, f, inner: (8 * f / (n - f)) * (inner + 1),
    kappa_reference='Allouah et al. 2023: NNM ∘ F is (f, (8f/(n − f))(κ_F + 1))-robust',
    orthogonal_equivariant=True,
    distance_based=True,
    mixing_from_dists=lambda d2, *, f: _nnm_mixing(d2, f),
  ),
)
@functools.partial(jax.jit, static_argnames=('f',))
def nnm(stack, *, f: int):
  """Nearest-neighbour mixing: y_i = the mean of the n − f nearest neighbours of x_i (x_i included).

  Computed as an n × n weight matrix W (W_ij = 1/(n − f) if x_j is among the n − f nearest
  neighbours of x_i, else 0, from `stack.scaled_sq_dists` and `lax.top_k`) applied to the stack with
  one `weighted_sum`: never an n × (n − f) × d tensor. Ties are broken towards the lower index
  (`lax.top_k`), which changes nothing when the tied inputs are equal.

  Edge cases: a slice with non-finite entries or an overflowing rescaled norm is at +inf distance
  from every other slice, so with at most f of them it is never a neighbour of a finite slice;
  its own output is NaN (the rule that follows treats it as the non-finite input it was). A finite
  slice with fewer than n − f finite neighbours (more than f non-finite slices) also gets NaN.
  Distances are computed on the rescaled stack (`stack.scaled_sq_dists`): inputs at 1e20 mix as
  inputs at 1.

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
  num_workers(stack, 'nnm')
  d2, finite, _ = scaled_sq_dists(stack)
  return weighted_sum(_nnm_mixing(d2, f), stack, finite=finite)


def _nnm_mixing(d2, f: int):
  """NNM's (n, n) weights from the squared distances: 1/(n − f) on each row's n − f nearest."""
  n = d2.shape[0]
  check_f('nnm', n, f)
  k = n - f
  _, idx = jax.lax.top_k(-d2, k)
  return jnp.zeros((n, n), d2.dtype).at[jnp.arange(n)[:, None], idx].set(1.0 / k)


@functools.partial(jax.jit, static_argnames=('f', 's'))
def bucketing_rows(stack, *, f: int = 0, key, s: int = 2):
  """`bucketing` as (index, weight), each (⌈n/s⌉, s): bucket b averages the inputs
  index[b, :] (the last bucket's padding has weight 0). Validated like `bucketing`."""
  n = num_workers(stack, 'bucketing')
  check_f('bucketing', n, f)
  check_positive_int('bucketing', 's', s)
  if key is None:
    raise ValueError('bucketing: needs an explicit jax.random key (key=...)')
  nb = -(-n // s)
  pad = nb * s - n
  perm = jnp.concatenate([jax.random.permutation(key, n), jnp.zeros((pad,), jnp.int32)])
  size = jnp.minimum(s, n - jnp.arange(nb) * s).astype(acc_dtype(stack))
  real = (jnp.arange(nb * s) < n).reshape(nb, s)
  return perm.reshape(nb, s), jnp.where(real, 1.0 / size[:, None], 0.0)


@register(
  'bucketing',
  properties=Properties(
    orthogonal_equivariant=True, stochastic=True, row_combination=bucketing_rows
  ),
)
@functools.partial(jax.jit, static_argnames=('f', 's'))
def bucketing(stack, *, f: int = 0, key, s: int = 2):
  """Bucketing: shuffle the inputs with `key`, return the means of consecutive buckets of size s.

  The output has ⌈n/s⌉ slices; when s does not divide n the last bucket holds the n mod s
  remaining inputs (as in ByzFL).

  .. warning::
    The aggregator that follows sees ⌈n/s⌉ inputs of which up to f are bad, so it needs
    2f < ⌈n/s⌉ (and `compose` passes it the same f). Karimireddy et al. use s = 2 in most
    experiments; s = 2 is the default here.

  Edge cases: a slice's non-finite entries count as 0 in its own bucket's mean (`combine_rows`),
  and do not reach other buckets.

  Cost: one pass that reads the stack and writes the ⌈n/s⌉ means (`combine_rows`, one gather of
  ⌈n/s⌉ rows per position in a bucket).

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
  index, weight = bucketing_rows(stack, f=f, key=key, s=s)
  return combine_rows(stack, index, weight, written=True)


def clipping_factors(stack, *, f: int = 0, c):
  """The (n,) factors of `clipping`, validated like it."""
  n = num_workers(stack, 'clipping')
  check_f('clipping', n, f)
  check_positive('clipping', 'c', c)
  return _clipping_factors(stack, c)


@jax.jit
def _clipping_factors(stack, c):
  sq, scale = scaled_sq_dists_to(stack)
  nrm = jnp.sqrt(sq)
  return _clip_factors(nrm, jnp.asarray(c, acc_dtype(stack)) / scale)


@register(
  'clipping',
  properties=Properties(
    orthogonal_equivariant=True,
    row_combination=lambda x, **kw: _scaling_rows(clipping_factors(x, **kw)),
  ),
)
def clipping(stack, *, f: int = 0, c, donate: bool = False):
  """Static clipping: x_i · min(1, c / ‖x_i‖).

  Edge cases: a slice whose norm is not finite (NaN / ±Inf entries, or one whose square
  overflows even on the rescaled stack) is clipped to the zero vector (its norm counts as +inf,
  and its non-finite entries are replaced, since 0 · NaN = NaN). Norms are computed on the stack
  divided by a robust power-of-two scale (`stack.normaliser`), so honest slices at 1e20 are
  clipped, not zeroed.

  Cost: two streaming passes (the norms, the scaling), three where a squared norm overflows or
  underflows (a scale pass first, `stack.scaled_sq_dists_to`). In a pipeline followed by a
  coordinate-wise aggregator, only the factors are computed (`clipping_factors`) and the
  scaling is fused into the aggregator (`robustjax.pipeline`).

  Args:
    stack: a pytree whose leaves share a leading worker axis n, or an (n, d) array.
    f: the number of Byzantine inputs (static; checked 0 ≤ f and 2f < n, otherwise unused).
    c: the clipping radius c > 0 (may be traced; checked when it is concrete).
    donate: write the result into the stack's buffers (`jax.jit` buffer donation; the stack
      must not be used afterwards). Called outside any trace only; saves allocating a fresh
      stack (a 64 × 10⁶ float32 stack on CPU: 139 ms → 72 ms for the whole call, BENCHMARKS.md).

  Returns:
    The clipped stack, same structure and dtypes.

  Raises:
    ValueError: for an empty or inconsistent stack, f < 0, 2f ≥ n or c ≤ 0.
  """
  return _scale(donate)(stack, clipping_factors(stack, f=f, c=c))


@functools.partial(jax.jit, static_argnames=('f',))
def arc_factors(stack, *, f: int):
  """The (n,) factors of `arc`, validated like it."""
  n = num_workers(stack, 'arc')
  check_f('arc', n, f)
  k = (2 * f * (n - f)) // n
  nrm = jnp.sqrt(scaled_sq_dists_to(stack)[0])  # only ratios of norms matter
  key_norm = jnp.where(jnp.isfinite(nrm), nrm, jnp.inf)
  smallest, _ = jax.lax.top_k(-key_norm, n - k)
  return _clip_factors(nrm, -smallest[-1])


@register(
  'arc',
  properties=Properties(
    orthogonal_equivariant=True, row_combination=lambda x, **kw: _scaling_rows(arc_factors(x, **kw))
  ),
)
def arc(stack, *, f: int, donate: bool = False):
  """Adaptive robust clipping: clip the k largest-norm inputs to the largest norm of the rest.

  k = ⌊2 (f/n) (n − f)⌋ (computed in integers as ⌊2f(n − f)/n⌋), the radius is the (n − k)-th
  smallest norm, and every input is clipped to it (x_i · min(1, radius/‖x_i‖)), which changes only
  the k largest (ties at the radius are unchanged). k ≥ f whenever 2f < n.

  Edge cases: non-finite norms count as +inf (they are among the k largest while at most f are
  bad) and such slices are clipped to the zero vector, as in `clipping`.

  Cost: as `clipping` (two streaming passes, the norms and the scaling; a scale pass first where
  a squared norm overflows or underflows) plus a top-k over n norms; fused into a coordinate-wise
  aggregator that follows in a pipeline, as `clipping`.

  Args:
    stack: a pytree whose leaves share a leading worker axis n, or an (n, d) array.
    f: the number of Byzantine inputs (static; 0 ≤ f and 2f < n).
    donate: write the result into the stack's buffers, as in `clipping`.

  Returns:
    The clipped stack, same structure and dtypes.

  Raises:
    ValueError: for an empty or inconsistent stack, f < 0 or 2f ≥ n.

  References:
    Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan, "The Vital Role of Gradient Clipping in
    Byzantine-Resilient Distributed Learning", arXiv:2405.14432, 2024; ByzFL's `ARC`.
  """
  return _scale(donate)(stack, arc_factors(stack, f=f))
