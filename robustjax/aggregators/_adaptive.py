"""MultiKrum when the number of Byzantine inputs is unknown: rules given only a bound f_max.

MultiKrum averages the m = n − f inputs of lowest Krum score; declared too low, f lets attacks
through, declared too high, it throws honest gradients away. Both rules here take the declared
``f`` as an upper bound f_max only (Krum's neighbour count n − f_max − 2 needs n > 2 f_max + 2)
and choose how many inputs to drop, b̂ ∈ {0, …, f_max}, from the data:

- `gap_multikrum`, per step: a gap in the sorted Krum scores. Honest inputs have scores of one
  size (their neighbours are honest); an input far from the honest ones has a score larger by a
  factor. Among the last f_max + 1 positions, b̂ counts the scores beyond the first jump by more
  than ``ratio`` (0 when there is none).
- `adaptive_multikrum`, across steps: per step, the number of outliers by a robust z-score of the
  inputs' distances to the coordinate-wise median (distance > median + ``threshold`` · MAD /
  0.6745, the Hampel / Leys et al. rule), capped at f_max; an exponential moving average of that
  count is carried across steps with the rule state protocol (``f_hat``, initialised to f_max:
  conservative until the data say otherwise), and b̂ = ⌈f̂⌉.

Both then average the n − b̂ lowest-scored inputs (a mask, so b̂ is a traced value: one compiled
program for every b̂). Neither has a proven κ bound; `robustjax.robustness` measures their κ̂
(the stateful rule evaluated per step, its instantaneous count).

Non-finite inputs: as MultiKrum (an input with a NaN / Inf slice has score +inf, counts as an
outlier and is never selected while fewer than n − b̂ finite inputs remain).

References:
  Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017 (Krum, MultiKrum).
  Hampel, "The influence curve and its role in robust estimation", JASA 1974; Leys, Ley, Klein,
  Bernard, Licata, "Detecting outliers: do not use standard deviation around the mean, use
  absolute deviation around the median", J. Exp. Soc. Psych. 2013 (the MAD outlier rule).
  Tibshirani, Walther, Hastie, "Estimating the number of clusters in a data set via the gap
  statistic", JRSS-B 2001 (choosing a count from the largest gap).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from robustjax import stack as st
from robustjax.aggregators._base import Properties, register
from robustjax.aggregators._coordinatewise import median
from robustjax.aggregators._krum import _check_krum, _scores_from_dists

__all__ = ['gap_multikrum', 'adaptive_multikrum', 'gap_count', 'mad_outlier_count']


def _drop_highest(scores: jax.Array, dropped, stack, n: int):
  """The mean of the n − dropped inputs of lowest score (ties: lower index first); NaN when a
  selected input has an infinite score (the rule had to use a slice it cannot read)."""
  order = jnp.argsort(scores, stable=True)
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  keep = rank < n - dropped
  w = keep.astype(scores.dtype) / jnp.maximum(n - dropped, 1).astype(scores.dtype)
  return st.weighted_sum(w, stack, finite=jnp.isfinite(scores))


def gap_count(scores: jax.Array, f_max: int, ratio: float) -> jax.Array:
  """b̂ ∈ {0, …, f_max}: how many of the highest scores lie beyond the first large jump.

  With s_(1) ≤ … ≤ s_(n) sorted, the jump after position j is s_(j+1) / s_(j). Scanning
  j = n − f_max, …, n − 1 upwards, the first jump above `ratio` gives b̂ = n − j; none gives 0.
  The *first* jump, not the largest: an adversary who puts one input moderately far and another
  much farther makes the second jump the largest, and a rule dropping only what lies beyond the
  largest jump would keep the first input (the κ search found that variant unbounded, κ̂ ≈ 1.5e3
  at n = 10, f = 2). Beyond the first large jump everything is dropped; below it, the scores grow
  by at most `ratio` per input, which bounds how far a kept input can be.
  """
  n = scores.shape[0]
  s = jnp.sort(scores)
  tiny = jnp.finfo(s.dtype).tiny
  j = jnp.arange(n - f_max - 1, n - 1)  # 0-based position before each candidate jump
  lo, hi = s[j], s[j + 1]
  # Finite to infinite (a non-finite or overflowing input) is a jump; infinite to infinite is not
  # (inf / inf would be NaN).
  jumps = jnp.where(
    jnp.isfinite(lo), jnp.where(jnp.isfinite(hi), hi / jnp.maximum(lo, tiny), jnp.inf), 0.0
  )
  big = jumps > ratio
  first = jnp.argmax(big)  # the first True (0 when none: then `big[first]` is False)
  return jnp.where(big[first], n - 1 - j[first], 0).astype(jnp.int32)


@register(
  'gap_multikrum',
  properties=Properties(
    kappa_reference='no proof known; κ̂ measured by robustjax.robustness',
    orthogonal_equivariant=True,
    distance_based=True,
  ),
)
@functools.partial(jax.jit, static_argnames=('f', 'ratio'))
def gap_multikrum(stack, *, f: int, ratio: float = 1.5):
  """MultiKrum that drops the inputs beyond the largest jump of its sorted scores (f unknown).

  Krum scores with n − f − 2 neighbours (f is the bound f_max), sorted; b̂ = `gap_count` (what
  lies beyond the first jump by more than `ratio` among the last f + 1 positions; none: no input
  dropped); returns the mean of the n − b̂ lowest-scored inputs. With b̂ = f it is MultiKrum with
  m = n − f; with b̂ = 0, the mean.

  Cost: MultiKrum's (one n × n × d Gram product, O(n log n) for the count).

  Args:
    stack: a pytree stack (leading worker axis n) or an (n, d) array.
    f: an upper bound f_max on the Byzantine inputs (static); n > 2f + 2.
    ratio: the smallest jump factor that counts as a gap (static, > 1).

  Returns:
    One tree like a slice of the stack.

  Raises:
    ValueError: f < 0, n ≤ 2f + 2, ratio ≤ 1, an empty stack or mismatched leading axes.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.0], [0.1], [0.2], [0.3], [0.4], [0.5], [0.6], [100.0]])
    >>> gap_multikrum(x, f=2)  # one outlier seen: the mean of the other seven
    Array([0.3], dtype=float32)

  References:
    Blanchard et al. 2017 (MultiKrum); Tibshirani et al. 2001 (counting from the largest gap).
  """
  n, k = _check_krum('gap_multikrum', stack, f, None)
  if not ratio > 1:
    raise ValueError(f'gap_multikrum: ratio must be > 1; got {ratio}')
  d, _, _ = st.scaled_sq_dists(stack)
  scores = _scores_from_dists(d, k)
  return _drop_highest(scores, gap_count(scores, f, ratio), stack, n)


def mad_outlier_count(stack, f_max: int, threshold: float) -> jax.Array:
  """The number of inputs (at most f_max) whose distance to the coordinate-wise median exceeds
  median + threshold · MAD / 0.6745 of those distances; non-finite inputs count as outliers."""
  med = median(stack, f=0)
  dist = jnp.sqrt(st.scaled_sq_dists_to(stack, med)[0])  # the test is scale-invariant
  finite = jnp.isfinite(dist)
  center = jnp.nanmedian(jnp.where(finite, dist, jnp.nan))
  mad = jnp.nanmedian(jnp.where(finite, jnp.abs(dist - center), jnp.nan)) / 0.6745
  out = ~finite | (dist > center + threshold * jnp.maximum(mad, 1e-12 * center))
  return jnp.minimum(jnp.sum(out), f_max).astype(jnp.float32)


def _init_f_hat(like, f: int = 0, **_):
  return {'f_hat': jnp.asarray(float(f), jnp.float32)}


def _next_f_hat(stack, out, state, f: int = 0, momentum: float = 0.9, threshold: float = 3.0, **_):
  del out
  count = mad_outlier_count(stack, f, threshold)
  return {'f_hat': momentum * state['f_hat'] + (1.0 - momentum) * count}


@register(
  'adaptive_multikrum',
  properties=Properties(
    kappa_reference='no proof known; κ̂ measured by robustjax.robustness (per-step count)',
    orthogonal_equivariant=True,
    distance_based=True,
    state_init=_init_f_hat,
    state_next=_next_f_hat,
  ),
)
@functools.partial(jax.jit, static_argnames=('f', 'momentum', 'threshold'))
def adaptive_multikrum(stack, *, f: int, f_hat=None, momentum: float = 0.9, threshold: float = 3.0):
  """MultiKrum with an estimate of the number of outliers carried across steps (f unknown).

  Each step counts the outliers (`mad_outlier_count`: distance to the coordinate-wise median
  beyond median + `threshold` · MAD, at most f); the state ``f_hat`` (initialised to f: the bound)
  is their exponential moving average, f̂ ← momentum · f̂ + (1 − momentum) · count, updated by
  the rule state protocol (`robustjax.pipeline.Pipeline.update`) after each call. The rule drops
  the ⌈f̂⌉ highest Krum scores (n − f − 2 neighbours) and averages the rest. Called without
  ``f_hat`` (one-shot use, the κ search) it uses this step's count.

  Cost: MultiKrum's plus one coordinate-wise median (the count).

  Args:
    stack: a pytree stack (leading worker axis n) or an (n, d) array.
    f: an upper bound f_max on the Byzantine inputs (static); n > 2f + 2.
    f_hat: the carried estimate (a traced scalar), or None.
    momentum: the moving average's weight on the past, in [0, 1) (static).
    threshold: the MAD multiple beyond which an input is an outlier (static, > 0).

  Returns:
    One tree like a slice of the stack.

  Raises:
    ValueError: f < 0, n ≤ 2f + 2, momentum outside [0, 1), threshold ≤ 0.

  References:
    Blanchard et al. 2017 (MultiKrum); Hampel 1974, Leys et al. 2013 (the MAD outlier rule).
  """
  n, k = _check_krum('adaptive_multikrum', stack, f, None)
  if not 0 <= momentum < 1:
    raise ValueError(f'adaptive_multikrum: momentum must be in [0, 1); got {momentum}')
  if not threshold > 0:
    raise ValueError(f'adaptive_multikrum: threshold must be > 0; got {threshold}')
  if f_hat is None:
    f_hat = mad_outlier_count(stack, f, threshold)
  dropped = jnp.clip(jnp.ceil(jnp.asarray(f_hat, jnp.float32) - 1e-6), 0, f).astype(jnp.int32)
  d, _, _ = st.scaled_sq_dists(stack)
  scores = _scores_from_dists(d, k)
  return _drop_highest(scores, dropped, stack, n)
