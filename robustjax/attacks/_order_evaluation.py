"""The optimal attacks' exact evaluation of a sorted-form defender on the honest rows and f
copies of a candidate: an L-statistic (mean, median, trimmed mean; `Pipeline.order_weights`) or
a mean around the median (MeaMed; `Pipeline.median_window`), from honest order statistics found
once per call instead of the defender's selection network over n rows per candidate.

References:
  Checked against the defenders on every candidate in tests/test_attacks.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from robustjax import _sorting
from robustjax.aggregators._coordinatewise import _sum_rows, median_window, median_window_positions
from robustjax.attacks._line import _along_line
from robustjax.stack import flatten


def _weight_windows(weights: np.ndarray) -> list[tuple[int, int, float]]:
  """The maximal runs [a, b) of one nonzero weight β: Σ_p w_p v_(p) = Σ β · Σ_{a<=p<b} v_(p)."""
  runs, a = [], 0
  for p in range(1, len(weights) + 1):
    if p == len(weights) or weights[p] != weights[a]:
      if weights[a]:
        runs.append((a, p, float(weights[a])))
      a = p
  return runs


# Up to this many ranks are selected one pruned network each (`_sorting.select_each`: 0.8-1.1 ms
# per rank at 52 × 100,000 on both cores), more by sorting the columns once (`select_layered`:
# 12.6 ms there, as 11-12 ranks; BENCHMARKS.md).
_FEW_RANKS = 8


def _by_networks(count: int, n_h: int) -> bool:
  """Whether `count` networks (ranks, or groups of ranks summed) beat sorting the n_h rows."""
  return count <= _FEW_RANKS and n_h <= _sorting.NETWORK_MAX_N


def _sorted_rows(x, ranks) -> dict:
  """{q: the q-th smallest value of each column of x (n_h, D)} for q in ranks, NaN sorted as +∞
  (as the rules treat it), once per call: one pruned network per rank for a few ranks, by
  bisection for a few ranks of many rows, else the columns sorted by the layered network."""
  ranks = list(ranks)
  if _by_networks(len(ranks), x.shape[0]):
    rows = _sorting.select_each(x, ranks, nan_last=True)
  else:
    rows = _sorting.select_large(x, ranks)
  return dict(zip(ranks, rows))


def _clamp_pairs(a: int, b: int, f: int, n_h: int) -> list[tuple[int | None, int | None]]:
  """The honest ranks (lo, hi) between which the candidate is clamped, one pair per position of
  the window [a, b) that f copies can reach: (a − f + j, max(b − f, a) + j) for j < min(f, b − a),
  None for a rank below 0 (−∞) or from n_h (+∞)."""
  pairs = [(a - f + j, max(b - f, a) + j) for j in range(min(f, b - a))]
  return [(lo if lo >= 0 else None, hi if hi < n_h else None) for lo, hi in pairs]


def _sorted_rows_statistic(x, weights: np.ndarray, f: int):
  """c -> an L-statistic defender's output on the rows of x (n_h, D) and f copies of the column
  c, without its sort.

  The defender outputs, per coordinate, Σ_p w_p v_(p) over the sorted values v of the honest
  column plus f copies of the candidate value c: a sum over windows [a, b) of one weight β
  (`_weight_windows`: one window for the mean, the median and the trimmed mean). With the honest
  column sorted once (s_0 <= … <= s_{n_h−1}; s_q = −∞ for q < 0 and +∞ for q >= n_h), the sum
  of positions a … b − 1 of the combined column is

    Σ_{q=a}^{b−f−1} s_q + Σ_{j<min(f, b−a)} clamp(c, s_{a−f+j}, s_{max(b−f, a)+j}),

  exactly (the f copies shift the window by up to f places; each clamp is the value a pair of
  honest order statistics lets through). The first sum does not depend on c (summed once per
  call); a candidate costs one fused elementwise pass over 2·min(f, b − a) sorted rows: none
  for the mean (no sort at all), four for the median, 2f for the trimmed mean. The rows come
  once per call from one pruned network each when they are few (the median's four; the trimmed
  mean's 2f < 8, its candidate-free rows then one summed network), else from the columns sorted
  by the layered network. The clamp never forms ∞ − ∞, so candidates beyond the float range and
  infinite honest values give the rule's own output. Non-finite honest values sort as +∞ (NaN
  included), as the rules treat them; the candidate is rounded to the stack's dtype as the
  Byzantine rows are.

  References:
    Checked exhaustively against the sorted combined column in tests/test_attacks.py.
  """
  n_h = x.shape[0]
  fixed = np.zeros(n_h)  # weight of each sorted honest row in the candidate-free sum
  windows = []  # (β, [(low rank or None for −∞, high rank or None for +∞), ...])
  for a, b, beta in _weight_windows(weights):
    fixed[a : max(b - f, a)] += beta
    windows.append((beta, _clamp_pairs(a, b, f, n_h)))
  ranks = sorted({q for _, pairs in windows for pair in pairs for q in pair if q is not None})
  support = tuple(q for q in range(n_h) if fixed[q])
  if not ranks and np.all(fixed == fixed[0]):  # the mean: the order does not matter, no sort
    const = jnp.matmul(jnp.full((n_h,), fixed[0], x.dtype), x, precision=jax.lax.Precision.HIGHEST)
    row = {}
  elif (
    support
    and np.all(fixed[list(support)] == fixed[support[0]])
    and _by_networks(len(ranks) + 1, n_h)
  ):
    # A few clamp ranks (the trimmed mean at small f): each from its own network, and the
    # candidate-free rows (one weight) as one summed network, instead of sorting the columns.
    *parts, total = _sorting.select_each(x, [*ranks, support], nan_last=True)
    row = dict(zip(ranks, parts))
    const = fixed[support[0]] * total
  else:
    row = _sorted_rows(x, sorted(set(ranks) | set(support)))
    const = functools.reduce(jnp.add, [fixed[q] * row[q] for q in support], jnp.zeros_like(x[0]))

  def statistic(c):
    out = const
    for beta, pairs in windows:
      clamped = [_sorting.clamp(c, row.get(lo), row.get(hi)) for lo, hi in pairs]
      out = out + beta * functools.reduce(jnp.add, clamped)
    return out

  return statistic


def _clip_ranks(weights: np.ndarray, n_h: int, f: int) -> list[int]:
  """The honest ranks `_clipped_window_statistic` reads: a − f, a, b − 1 − f and b − 1 of each
  window [a, b) of the weights, those in range."""
  windows = _weight_windows(weights)
  return sorted({q for a, b, _ in windows for q in (a - f, a, b - 1 - f, b - 1) if 0 <= q < n_h})


def _clips_windows(weights: np.ndarray, n_h: int, f: int) -> bool:
  """Whether `_clipped_window_statistic` is the cheaper evaluation of this L-statistic.

  The clipped form reads four honest order statistics per window and costs a pass over all n_h
  honest rows per candidate; the sorted form (`_sorted_rows_statistic`) reads 2·min(f, b − a)
  rows per window and candidate. The clipped form is taken where the sorted form's ranks are too
  many for one pruned network each (it would sort the columns: 18-27 ms at 52 × 100,000, against
  3-5 ms for the clipped form's four networks) and the clipped form's are not.
  """
  sorted_ranks = {
    q
    for a, b, _ in _weight_windows(weights)
    for pair in _clamp_pairs(a, b, f, n_h)
    for q in pair
    if q is not None
  }
  return (
    bool(sorted_ranks)
    and not _by_networks(len(sorted_ranks) + 1, n_h)
    and _by_networks(len(_clip_ranks(weights, n_h, f)), n_h)
  )


def _order_statistics(form: str, value, x, f: int):
  """`(statistic, batched)`: c -> the output of a defender of this sorted form (`_sorted_form`:
  an L-statistic or a mean around the median) on the rows of x and f copies of c, and whether
  its candidates gain from being evaluated together (the clipped form's pass over the honest
  rows does; the sorted forms' few rows do not)."""
  if form == 'weights' and _clips_windows(value, x.shape[0], f):
    return _clipped_window_statistic(x, value, f), True
  statistic = _sorted_rows_statistic if form == 'weights' else _median_window_statistic
  return statistic(x, value, f), False


def _order_statistics_evaluation(pipeline, honest, base, direction, f):
  """`(evaluate, batched)`: the order-statistic evaluation of this defender (`_order_statistics`)
  along the attack's line."""
  n_h = jax.tree.leaves(honest)[0].shape[0]
  statistic, batched = _order_statistics(*_sorted_form(pipeline, n_h + f), flatten(honest), f)
  return _along_line(statistic, honest, base, direction), batched


def _clipped_window_statistic(x, weights: np.ndarray, f: int):
  """c -> an L-statistic defender's output on the rows of x (n_h, D) and f copies of the column
  c, where the sorted rows (`_sorted_rows_statistic`) would need the columns sorted (the trimmed
  mean at f > 3): the rule's own clipped sum, from four honest order statistics per window.

  In sorted order the combined column (the honest values plus f copies of the candidate c) is
  w_p = clamp(c, s_{p−f}, s_p), with s the honest column's order statistics (s_q = −∞ below 0,
  +∞ from n_h). A window [a, b) of the defender's weights (`_weight_windows`) sums to

    (b − a)·lo + Σ_i (clip(v_i, lo, hi) − lo) − (n − b)(hi − lo),  lo = w_a, hi = w_{b−1},

  over all n combined values v (the a values below the window clip to lo, the n − b above it to
  hi), exactly, with ties; the honest rows and the f copies of c are summed apart. This is the
  trimmed mean's own formula around lo.

  Per call: the honest ranks a − f, a, b − 1 − f and b − 1 (`_clip_ranks`), one pruned network
  each where they are few. Per candidate: one fused elementwise pass over the n_h honest rows
  (four operations per entry), which vectorises over candidates (`batch_size` applies, unlike
  the sorted-row evaluation). With finite honest values the output is non-finite exactly when
  the defender's is, since lo and hi are window values; an honest NaN or ±∞ makes μ, and so every
  candidate's error, non-finite in both (+∞), so the honest rows are clipped as they are.
  At n_h = 52, f = 12 and 100,000 coordinates the trimmed mean's search took 12-19 ms, against
  29-58 ms with the columns sorted (BENCHMARKS.md).

  References:
    Checked against the defender on every candidate in tests/test_attacks.py.
  """
  n_h = x.shape[0]
  n = n_h + f
  ranks = _clip_ranks(weights, n_h, f)
  row = _sorted_rows(x, ranks) if ranks else {}
  windows = _weight_windows(weights)

  def statistic(c):
    out = jnp.zeros_like(c)
    for a, b, beta in windows:
      lo = _sorting.clamp(c, row.get(a - f), row.get(a))
      hi = _sorting.clamp(c, row.get(b - 1 - f), row.get(b - 1))
      clip = lambda r, lo=lo, hi=hi: _sorting.clamp_nan_last(r, lo, hi) - lo
      inner = _sum_rows(clip, x, nan_as_inf=False)
      inner = inner + f * (_sorting.clamp(c, lo, hi) - lo)
      if n > b:
        inner = inner - (n - b) * (hi - lo)
      out = out + beta * ((b - a) * lo + inner)
    return out

  return statistic


def _median_window_statistic(x, keep: int, f: int):
  """c -> a mean-around-the-median defender's output (MeaMed: `Properties.median_window`) on the
  rows of x (n_h, D) and f copies of the column c, without its selection network.

  In sorted order the combined column (the honest values plus f copies of the candidate c) is
  w_p = clamp(c, s_{p−f}, s_p), with s the honest column's order statistics (s_q = −∞ below 0,
  +∞ from n_h). The defender's own window search (`median_window`) runs on these values: the
  median, the window start among e + 1 = n − keep + 1 positions, its ends lo and hi; then, as the
  rule, lo + (Σ_i (clip(x_i, lo, hi) − lo) − (e − start)(hi − lo)) / keep. Every window covers
  the combined positions e … keep − 1, so the honest values ranked e … keep − 1 − f lie inside
  it whatever c is: they are summed once per call, as one clipped pass between s_e and
  s_{keep−1−f}. So a call reads the e + 1 lowest and highest honest values in order and the
  median's other ranks: peeled from the ends a rank per pass (`_sorting.select_ends`) and one
  network per middle rank for a small e, else all from the columns sorted once (`_sorted_rows`;
  at n_h = 52, e = 12, d = 10⁵ the sort took 13.6-20.3 ms, the ends 16.4 plus 4-9 for the middle
  networks; `_sorting.ends_pay`, BENCHMARKS.md); a candidate costs 2e + 3 clamps, the e
  comparisons of the window search, and the clip of the 2e edge rows and of c, instead of the
  defender's network over n rows. Non-finite honest values sort as +∞; the output is non-finite
  exactly when the defender's is (both count as +∞).

  References:
    Checked against the defender on every candidate in tests/test_attacks.py.
  """
  n_h = x.shape[0]
  n = n_h + f
  e = n - keep
  if e == 0:  # the mean of all n values
    total = _sum_rows(lambda r: r, x)
    return lambda c: (total + f * c) / n
  positions = median_window_positions(n, keep)
  # The e + 1 lowest and highest honest values in order, and the median's other ranks: peeled
  # from the ends and one network each where that costs less (`_sorting.ends_pay`), else all
  # from the columns sorted once.
  k = min(e + 1, n_h)
  ends = set(range(k)) | set(range(n_h - k, n_h))
  rest = sorted({q for p in positions for q in (p - f, p) if 0 <= q < n_h} - ends)
  if _sorting.ends_pay(n_h, k, len(rest)):
    low, high = _sorting.select_ends(x, k)
    row = {**dict(zip(range(k), low)), **dict(zip(range(n_h - k, n_h), high))}
    row.update(_sorted_rows(x, rest) if rest else {})
  else:
    row = _sorted_rows(x, sorted(ends | set(rest)))
  inside = range(e, keep - f)  # honest ranks inside every window: e … n_h − 1 − e
  edges = [q for q in range(n_h) if q not in inside]
  inside_sum = jnp.zeros_like(x[0])
  if len(inside):  # Σ of those ranks, as the rule sums a window: clipped to its ends
    a, b = row[inside[0]], row[inside[-1]]
    clipped = _sum_rows(lambda r: _sorting.clamp(r, a, b) - a, x)
    inside_sum = len(inside) * a + clipped - (n_h - 1 - inside[-1]) * (b - a)

  def statistic(c):
    w = {p: _sorting.clamp(c, row.get(p - f), row.get(p)) for p in positions}
    lo, hi, start = median_window(w, n, keep)  # the defender's own search
    clipped = [_sorting.clamp(row[q], lo, hi) - lo for q in edges] + [
      f * (_sorting.clamp(c, lo, hi) - lo)
    ]
    inner = functools.reduce(jnp.add, clipped) + (inside_sum - len(inside) * lo)
    return lo + (inner - (e - start) * (hi - lo)) / keep

  return statistic


def _repeated_row_statistic(form: str, value, r, n_h: int, f: int):
  """c -> the output of a defender of this sorted form (`_sorted_form`) on n_h copies of the row
  r and f copies of c (f < n_h).

  Sorted, the combined column is min(c, r) at positions below f, r from f to n_h − 1 and
  max(c, r) from n_h on: an L-statistic with weights w gives Σ_{p<f} w_p · min(c, r) +
  Σ_{f<=p<n_h} w_p · r + Σ_{p>=n_h} w_p · max(c, r). The median is r, so a mean of the keep
  values closest to it (MeaMed) takes the n_h copies of r first, then copies of c:
  (min(keep, n_h) · r + max(keep − n_h, 0) · c) / keep.
  """
  if form == 'keep':
    return lambda c: (min(value, n_h) * r + max(value - n_h, 0) * c) / value
  low, middle, high = (float(np.sum(w)) for w in np.split(np.asarray(value), [f, n_h]))
  return lambda c: low * jnp.minimum(c, r) + middle * r + high * jnp.maximum(c, r)


def _sorted_form(pipeline, n: int):
  """('weights', (n,) weights) for an L-statistic, ('keep', keep) for a mean around the median,
  None for a defender that is neither: what the order-statistic evaluation needs."""
  weights = pipeline.order_weights(n)
  if weights is not None:
    return 'weights', weights
  keep = pipeline.median_window(n)
  return None if keep is None else ('keep', keep)
