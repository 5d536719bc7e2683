"""Coordinate-wise aggregators: mean, median, trimmed mean, MeaMed.

Each rule works coordinate by coordinate over the worker axis. The order statistics are exact and
computed with compare-exchange networks built at trace time over the n worker slices
(`robustjax._sorting`): on XLA:CPU the whole rule is one fused elementwise loop over the
coordinates, much faster than `jnp.sort` / `jnp.median` along the worker axis (BENCHMARKS.md). A
pytree stack with several leaves is first flattened into one (n, D) matrix (so the network is
compiled once, whatever the number of leaves) and the result is unflattened.

Non-finite inputs: NaN is mapped to +inf before selecting, so with at most f non-finite
(NaN / ±Inf) values per coordinate, `median`, `trimmed_mean` and `meamed` only ever combine finite
values. With more (median: at least n/2), a coordinate whose result would depend on a non-finite
value is NaN (never a fabricated ±inf); an all-NaN stack gives NaN. `mean` is the non-robust
baseline and propagates them.

Dtypes: integer and bool stacks are promoted to float32 (their average is not an integer);
complex stacks are refused.

Numerics: computations run in float32 (float64 for float64 leaves); the result has each leaf's
dtype.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np

from robustjax import _sorting
from robustjax import stack as stk
from robustjax._checks import check_f, check_positive_int
from robustjax.aggregators._base import Properties, lower_bound_ratio, register

__all__ = ['mean', 'median', 'trimmed_mean', 'meamed', 'mean_closest_to_median']

# The networks are compute-bound elementwise loops: on XLA:CPU, letting LLVM use 512-bit vectors
# (where the CPU has them; XLA's default is 256) made them 1.3–1.6× faster (BENCHMARKS.md). A
# debug option of the compiler, harmless elsewhere; it applies when the rule is the outermost jit
# (pass the same `compiler_options` to your own `jax.jit` to get it inside a larger step).
CPU_COMPILER_OPTIONS = {'xla_cpu_prefer_vector_width': '512'}


def outermost(args) -> bool:
  """Whether a jitted function called on `args` (a pytree) now is the outermost jit (no leaf is
  a tracer): the only one that `jax.jit` lets take `compiler_options`."""
  return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args))


def _jit_f(fn):
  """`jax.jit` with `f` static, and `CPU_COMPILER_OPTIONS` when called outside any trace.

  JAX accepts `compiler_options` only on a top-level jit, so inside a caller's trace (jit, vmap,
  grad) the plain jitted function is used and the options are the caller's choice. Outside any
  trace, on CPU, a stack of `_sorting.NETWORK_MAX_N` < n <= `_sorting.WIDE_NETWORK_MAX_N` workers
  is compiled with XLA:CPU's legacy loop emitter and traced inside `_sorting.wide_networks()`,
  so that the rule runs as one unrolled network there too (BENCHMARKS.md).
  """
  plain = jax.jit(fn, static_argnames=('f',))
  tuned = jax.jit(fn, static_argnames=('f',), compiler_options=CPU_COMPILER_OPTIONS)
  # A function object of its own: jax caches traces by function, and this one's differ.
  wide = jax.jit(
    functools.wraps(fn)(lambda *args, **kwargs: fn(*args, **kwargs)),
    static_argnames=('f',),
    compiler_options={**CPU_COMPILER_OPTIONS, **_sorting.WIDE_NETWORK_COMPILER_OPTIONS},
  )

  @functools.wraps(fn)
  def rule(stack, **kwargs):
    leaves = jax.tree.leaves(stack)
    if not outermost(leaves):
      return plain(stack, **kwargs)
    if _wide_network(leaves):
      try:
        with _sorting.wide_networks():
          return wide(stack, **kwargs)
      except jax.errors.JaxRuntimeError as error:  # an XLA without the legacy emitter's option
        if 'compile option' not in str(error):
          raise
        _WIDE.available = False
    return tuned(stack, **kwargs)

  rule.plain = plain
  return rule


_WIDE = types.SimpleNamespace(available=True)


def _wide_network(leaves) -> bool:
  """Whether a stack with these (concrete) leaves runs `_jit_f`'s wide-network variant."""
  if not _WIDE.available or not leaves or not hasattr(leaves[0], 'shape') or not leaves[0].shape:
    return False
  n = leaves[0].shape[0]
  return _sorting.NETWORK_MAX_N < n <= _sorting.WIDE_NETWORK_MAX_N and (
    jax.default_backend() == 'cpu'
  )


def _columnwise(fn, stack, *, nan_if_nonfinite: bool = False):
  """Applies `fn` ((n, D) matrix -> (D,) vector) to the stack, float leaf dtypes preserved.

  With `nan_if_nonfinite`, a non-finite result (the rule had to use a non-finite value: more of
  them in the coordinate than it tolerates) becomes NaN, never a fabricated ±inf.
  """

  def wrapped(x):
    out = fn(x)
    return jnp.where(jnp.isfinite(out), out, jnp.nan) if nan_if_nonfinite else out

  leaves = jax.tree.leaves(stack)
  if len(leaves) == 1:
    leaf = jnp.asarray(leaves[0])
    out = wrapped(stk.as_matrix(leaf))
    return jax.tree.unflatten(
      jax.tree.structure(stack), [out.reshape(leaf.shape[1:]).astype(stk.result_dtype(leaf.dtype))]
    )
  return stk.unflatten(wrapped(stk.flatten(stack)), stack)


def _unrolled(x: jax.Array) -> bool:
  """Whether the rules run as one unrolled network over the rows (else by bisection)."""
  return x.shape[0] <= _sorting.network_max_n(2)


def _mean_weights(n: int, f: int, **_) -> np.ndarray:
  return np.full((n,), 1.0 / n)


def _median_weights(n: int, f: int, **_) -> np.ndarray:
  w = np.zeros((n,))
  if n % 2:
    w[n // 2] = 1.0
  else:
    w[n // 2 - 1 : n // 2 + 1] = 0.5
  return w


def _trimmed_mean_weights(n: int, f: int, **_) -> np.ndarray:
  w = np.zeros((n,))
  w[f : n - f] = 1.0 / (n - 2 * f)
  return w


def _sum_rows(fn, x: jax.Array, *, nan_as_inf: bool = True) -> jax.Array:
  """Σ_i fn(x_i) over the worker axis (NaN counted as +inf, or left to fn with `nan_as_inf`
  False), fn elementwise."""
  rows = _sorting.nan_as_inf if nan_as_inf else (lambda r: r)
  if _unrolled(x):
    return sum(fn(rows(x[i])) for i in range(x.shape[0]))
  # Large n: a matvec (a reduction over the worker axis is ~100× slower on XLA:CPU).
  ones = jnp.ones((x.shape[0],), x.dtype)
  return jnp.dot(ones, fn(rows(x)), precision=jax.lax.Precision.HIGHEST)


def _median_ranks(n: int) -> list[int]:
  """The one or two middle ranks (0-based) of n values."""
  return [n // 2] if n % 2 else [n // 2 - 1, n // 2]


def _median(x: jax.Array) -> jax.Array:
  ranks = _median_ranks(x.shape[0])
  if len(ranks) == 1:
    (m,) = _sorting.order_statistics(x, ranks)
    return m
  a, b = _sorting.order_statistics(x, ranks, symmetric=True)
  return 0.5 * a + 0.5 * b


def median_window_positions(n: int, keep: int) -> list[int]:
  """The sorted positions `median_window` reads: the e + 1 lowest, the e + 1 highest
  (e = n − keep) and the median's one or two."""
  return sorted({*range(n - keep + 1), *range(keep - 1, n), *_median_ranks(n)})


def median_window(w: dict, n: int, keep: int):
  """The window of the `keep` sorted values closest to the median (ties: the lower window).

  In sorted order w_0 <= ... <= w_{n-1} those values are a window [s, s + keep − 1], s in
  [0, e] with e = n − keep. Moving the window up by one swaps w_j for w_{j+keep}, which is better
  iff w_{j+keep} − m < m − w_j; that difference grows with j, so s is the number of j < e for
  which it holds.

  Args:
    w: {position: the sorted value there} for `median_window_positions(n, keep)`, arrays of one
      shape (a value per coordinate).
    n, keep: 1 <= keep < n.

  Returns:
    (lo, hi, start): w_s, w_{s+keep−1} and s (as a float).
  """
  e = n - keep
  mid = _median_ranks(n)
  med = w[mid[0]] if len(mid) == 1 else 0.5 * w[mid[0]] + 0.5 * w[mid[1]]

  def move(j, window, low, next_low, high):
    # Window j -> j + 1 (low = w_j, next_low = w_{j+1}, high = w_{j+keep}) if that is closer.
    lo, hi, start = window
    up = (high - med) < (med - low)  # strict: ties keep the lower window
    return jnp.where(up, next_low, lo), jnp.where(up, high, hi), jnp.where(up, j + 1.0, start)

  window = (w[0], w[keep - 1], jnp.zeros_like(med))
  for j in range(e):
    window = move(j, window, w[j], w[j + 1], w[j + keep])
  return window


def _mean_closest(x: jax.Array, keep: int) -> jax.Array:
  """Per coordinate, the mean of the `keep` values closest to the median (ties: lower first).

  Up to `NETWORK_MAX_N` rows only the order statistics `median_window` reads are selected (one
  pruned network, the whole rule one fused loop over the coordinates); the window sum then comes
  from one clipped pass: Σ_window w = Σ_i clip(x_i, lo, hi) − s·lo − (e − s)·hi with lo = w_s,
  hi = w_{s+keep−1}. Beyond, three bisections instead (`_mean_closest_bisected`).
  """
  n = x.shape[0]
  e = n - keep
  if e == 0:
    return _sum_rows(lambda r: r, x) / n
  if not _unrolled(x):
    return _mean_closest_bisected(x, keep)
  positions = median_window_positions(n, keep)
  w = dict(zip(positions, _sorting.order_statistics(x, positions)))
  lo, hi, start = median_window(w, n, keep)
  inner = _sum_rows(lambda r: _sorting.clamp(r, lo, hi) - lo, x) - (e - start) * (hi - lo)
  return lo + inner / keep


def _mean_closest_bisected(x: jax.Array, keep: int) -> jax.Array:
  """`_mean_closest` beyond the unrolled network, from three bisections instead of a sort.

  Per block of columns in cache (`_sorting.select_bisect`): the median m (its one or two ranks),
  then the distances δ_i = |x_i − m| (as rounded, x_i − m = ±δ_i exactly) and D, the keep-th
  smallest δ. The keep closest values are those with δ < D and, of those at δ = D, the lower ones
  first: `take_low` = min(r, #{x_i − m = −D}) at −D, the other r − take_low at +D, with
  r = keep − #{δ < D}. Their sum around m comes from one clipped sum,
  Σ_i clip(x_i − m, −D, D) + D (#{x_i − m <= −D} − take_low) − D (#{x_i − m >= D} − take_high).
  """
  mid = _median_ranks(x.shape[0])

  def window(block, stats):
    med = stats[0] if len(mid) == 1 else 0.5 * stats[0] + 0.5 * stats[1]
    centred = _sorting.nan_as_inf(block) - med
    bound = _sorting.bisect_columns(jnp.abs(centred), [keep - 1])[0]
    # #{c <= −D}, #{c < −D}, #{c < D} in one counting pass.
    below, under_low, under_high = _sorting.count_below(
      centred, jnp.stack([-bound, -bound, bound]), strict=(False, True, True)
    ).astype(centred.dtype)
    inside = jnp.maximum(under_high - below, 0)  # #{|c| < D}: none where D = 0
    low_at = below - under_low  # #{c = −D}
    above = x.shape[0] - under_high
    clipped = _sum_rows(lambda c: _sorting.clamp(c, -bound, bound), centred)
    take_low = jnp.minimum(keep - inside, low_at)
    take_high = keep - inside - take_low
    total = clipped + bound * (below - take_low) - bound * (above - take_high)
    return med + total / keep

  return _sorting.select_bisect(x, mid, then=window)


def mean_closest_to_median(stack, *, keep: int):
  """Per coordinate, the mean of the `keep` values closest to the coordinate median.

  Internal helper (no validation, not jitted) shared by `meamed` (keep = n − f) and Bulyan's
  last step (keep = β). Values at exactly the cut-off distance are taken lower values first.

  Args:
    stack: a pytree with leading worker axis n.
    keep: 1 <= keep <= n.

  Returns:
    A tree with the stack's structure, the worker axis removed.
  """

  def fn(x):
    return _mean_closest(x, keep)

  return _columnwise(fn, stack, nan_if_nonfinite=True)


@register(
  'mean',
  properties=Properties(
    kappa=lambda n, f, **_: 0.0 if f == 0 else None,
    kappa_reference='the honest mean when f = 0; not robust (κ⋆ = ∞) when f ≥ 1',
    orthogonal_equivariant=True,
    coordinatewise=True,
    order_weights=_mean_weights,
    robust=False,
  ),
)
@functools.partial(jax.jit, static_argnames=('f',))
def mean(stack, *, f: int = 0):
  """The plain average (1/n) Σ_i x_i: the non-robust baseline.

  One matvec `(ones(n) / n) @ x` per leaf (`weighted_sum` with `ignore_nonfinite=False`): a single
  streaming pass over the stack. On XLA:CPU, `x.mean(0)` is about 100× slower than this matvec.

  .. warning::
    Not robust: a single NaN, ±Inf or huge Byzantine slice makes the output non-finite or
    arbitrary. That is its point, as a baseline.

  Args:
    stack: a pytree of arrays with a common leading worker axis n, or an (n, d) array.
    f: the declared number of Byzantine workers; only validated (0 <= f, 2f < n).

  Returns:
    A tree with the stack's structure and dtypes, the worker axis removed.

  Raises:
    ValueError: for an empty stack, mismatched leading axes, f < 0 or 2f >= n.

  Examples:
    >>> mean(jnp.array([[1.0, 2.0], [3.0, 6.0]]))
    Array([2., 4.], dtype=float32)
  """
  n = stk.num_workers(stack, 'mean')
  check_f('mean', n, f)
  weights = jnp.full((n,), 1.0 / n, stk.acc_dtype(stack))
  return stk.weighted_sum(weights, stack, ignore_nonfinite=False)


@register(
  'median',
  properties=Properties(
    kappa=lambda n, f, **_: ((n + 1) // 2 - 1) / (n // 2 + 1 - f),
    kappa_reference=(
      'κ⋆ = (⌈n/2⌉ − 1)/(⌊n/2⌋ + 1 − f) exactly (proof in docs/robustness.md); '
      'Allouah et al. 2023 prove κ = 4(1 + f/(n−2f))²'
    ),
    coordinatewise=True,
    order_weights=_median_weights,
  ),
)
@_jit_f
def median(stack, *, f: int = 0):
  """Coordinate-wise median (CWMed).

  Per coordinate, the median of the n values; for even n the mean of the two middle values (the
  NumPy / `jnp.median` convention; some codes return the lower middle value instead).

  Robustness: (f, κ)-robust with κ <= 4(1 + f/(n − 2f))² (Allouah et al., 2023), for any f < n/2.
  NaN is treated as +inf, so with fewer than n/2 non-finite values in a coordinate the result is
  finite and lies within the range of the finite values.

  Cost: a pruned Batcher selection network over the n worker slices (≈ 440 compare-exchanges for
  n = 64), fused by XLA into one elementwise pass. Read through one value, this network stays one
  pass up to n = `robustjax._sorting.ONE_OUTPUT_NETWORK_MAX_N` (160), past the 128 rows of the
  other rules' networks, and up to `robustjax._sorting.WIDE_NETWORK_MAX_N` (224) when the rule is
  called outside any jit on CPU (see `trimmed_mean`). Beyond, the middle value comes from a
  bisection of its bits (`_sorting.select_bisect`: a byte at a time, 8 counting passes each, over
  blocks of columns in cache); for even n the upper middle value is read from the lower one in one
  more pass.

  Args:
    stack: a pytree of arrays with a common leading worker axis n, or an (n, d) array.
    f: the declared number of Byzantine workers; only validated (0 <= f, 2f < n).

  Returns:
    A tree with the stack's structure and dtypes, the worker axis removed.

  Raises:
    ValueError: for an empty stack, mismatched leading axes, f < 0 or 2f >= n.

  Examples:
    >>> median(jnp.array([[1.0], [5.0], [2.0], [100.0]]), f=1)
    Array([3.5], dtype=float32)

  References:
    D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-robust distributed learning: towards
    optimal statistical rates", ICML 2018.
  """
  n = stk.num_workers(stack, 'median')
  check_f('median', n, f)
  return _columnwise(_median, stack, nan_if_nonfinite=True)


@register(
  'trimmed_mean',
  properties=Properties(
    kappa=lambda n, f, **_: lower_bound_ratio(n, f),
    kappa_reference=(
      'κ⋆ = f/(n−2f) exactly (proof in docs/robustness.md); '
      'Allouah et al. 2023 prove κ = (6f/(n−2f))(1 + f/(n−2f))'
    ),
    coordinatewise=True,
    order_weights=_trimmed_mean_weights,
  ),
)
@_jit_f
def trimmed_mean(stack, *, f: int):
  """Coordinate-wise trimmed mean (CWTM_f).

  Per coordinate, drop the f largest and the f smallest values and average the n − 2f others.
  Computed without sorting every value: with lo and hi the (f+1)-th smallest and (f+1)-th largest
  values, Σ_{middle} x = Σ_i clip(x_i, lo, hi) − f·lo − f·hi (written around lo for precision).

  Robustness: (f, κ)-robust with κ <= (6f/(n − 2f))(1 + f/(n − 2f)) (Allouah et al., 2023). With
  at most f non-finite values per coordinate (NaN counts as +inf) the result is finite.

  Cost: one selection network for the two order statistics, and one more elementwise pass, fused
  into the same loop. Above `robustjax._sorting.NETWORK_MAX_N` (128) workers, for f ≤ 3
  (`_sorting.EXTREMES_MAX_RANK`) the two order statistics come from insertion chains
  (4 (f + 1) min / max per entry, `_sorting.select_extremes`), else from a bisection of their bits
  (`_sorting.select_bisect`: a byte at a time, whatever f), each block of columns clipped and
  summed while it is in cache. Called outside any jit on CPU with up to
  `robustjax._sorting.WIDE_NETWORK_MAX_N` (224) workers, the rule is compiled with XLA:CPU's legacy
  loop emitter, which keeps the network one vectorised loop there (0.59-0.71 ns per worker ·
  coordinate against 1.38-1.98 by bisection at f = n/8 on a Zen 5 core; BENCHMARKS.md). Inside a
  caller's jit the caller's compiler options apply, and the limit is 128.

  Args:
    stack: a pytree of arrays with a common leading worker axis n, or an (n, d) array.
    f: the number of values trimmed at each end; needs n > 2f.

  Returns:
    A tree with the stack's structure and dtypes, the worker axis removed.

  Raises:
    ValueError: for an empty stack, mismatched leading axes, f < 0 or 2f >= n.

  Examples:
    >>> trimmed_mean(jnp.array([[1.0], [5.0], [2.0], [100.0]]), f=1)
    Array([3.5], dtype=float32)

  References:
    D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-robust distributed learning: towards
    optimal statistical rates", ICML 2018.
  """
  n = stk.num_workers(stack, 'trimmed_mean')
  check_f('trimmed_mean', n, f)

  def trimmed(x, lo, hi):
    inner = _sum_rows(lambda r: _sorting.clamp(r, lo, hi) - lo, x) - f * (hi - lo)
    return lo + inner / (n - 2 * f)

  def fn(x):
    if f == 0:
      return _sum_rows(lambda r: r, x) / n
    if _unrolled(x):
      return trimmed(x, *_sorting.order_statistics(x, [f, n - f - 1]))

    def then(block, stats):  # each column block clipped and summed while it is in cache
      return trimmed(block, stats[0], stats[1])

    if f <= _sorting.EXTREMES_MAX_RANK:
      return _sorting.select_extremes(x, f, then=then)
    return _sorting.select_large(x, [f, n - f - 1], then=then)

  return _columnwise(fn, stack, nan_if_nonfinite=True)


@register(
  'meamed',
  properties=Properties(coordinatewise=True, median_window=lambda n, f, **_: n - f),
)
@_jit_f
def meamed(stack, *, f: int):
  """Mean around the median (MeaMed_f).

  Per coordinate, the average of the n − f values closest to the coordinate median (the median as
  in `median`: mean of the two middle values for even n).

  .. warning::
    Ties at the cut-off distance (values at exactly the same distance on both sides of the median)
    are broken towards the lower values here; ByzFL breaks them in `argpartition` order. The result
    differs only when such exact ties straddle the cut-off.

  Robustness: with at most f non-finite values per coordinate (NaN counts as +inf) the result is
  finite: the n − f closest values are finite.

  Cost: one pruned selection network (the median and the f + 1 lowest and highest order
  statistics: in sorted order the n − f closest values form a window, see `_mean_closest`) and one
  clipped pass, fused into one loop: about the cost of `trimmed_mean`. Above
  `robustjax._sorting.NETWORK_MAX_N` (128) workers, two bisections per block of columns instead
  (`_sorting.select_bisect`): the median, then the distance of the (n − f)-th closest value, and
  one clipped sum around the median (`_mean_closest_bisected`): 1.2-1.9 times the trimmed mean's
  cost there. Called outside any jit on CPU, the network serves up to
  `robustjax._sorting.WIDE_NETWORK_MAX_N` (224) workers (see `trimmed_mean`).

  Args:
    stack: a pytree of arrays with a common leading worker axis n, or an (n, d) array.
    f: the declared number of Byzantine workers; needs n > 2f.

  Returns:
    A tree with the stack's structure and dtypes, the worker axis removed.

  Raises:
    ValueError: for an empty stack, mismatched leading axes, f < 0 or 2f >= n.

  Examples:
    >>> meamed(jnp.array([[1.0], [5.0], [2.0], [100.0]]), f=1)
    Array([2.6666667], dtype=float32)

  References:
    C. Xie, O. Koyejo, I. Gupta, "Generalized Byzantine-tolerant SGD", arXiv:1802.10116, 2018.
  """
  n = stk.num_workers(stack, 'meamed')
  check_f('meamed', n, f)
  check_positive_int('meamed', 'n - f', n - f)
  return mean_closest_to_median(stack, keep=n - f)
