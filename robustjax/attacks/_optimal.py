"""Optimal ALIE / IPM: the attack scale maximising the real defender's error."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from robustjax import _sorting
from robustjax._checks import check_choice, check_positive_int
from robustjax.aggregators._coordinatewise import (
  CPU_COMPILER_OPTIONS,
  _sum_rows,
  median_window,
  median_window_positions,
  outermost,
)
from robustjax.attacks._base import (
  _acc,
  _axpy,
  _check_attack,
  _check_float,
  _mean,
  _repeat,
  _std,
  register,
)
from robustjax.pipeline import Pipeline, as_rule
from robustjax.stack import (
  acc_dtype,
  as_matrix,
  centred_gram,
  dists_from_gram,
  flatten,
  normaliser,
  num_workers,
  overflow_limit,
  result_dtype,
  sq_dists_to,
  unflatten,
  unreadable,
)


def _sum_sq(x, pieces: int = 2) -> jax.Array:
  """Σ x², over `pieces` slices of the flattened array summed apart: on XLA:CPU the reduction
  with the evaluator's elementwise pass fused into it ran 3-4x slower as one piece."""
  x = x.reshape(-1)
  cut = -(-x.shape[0] // pieces)
  return functools.reduce(
    jnp.add, [jnp.sum(jnp.square(x[i : i + cut])) for i in range(0, x.shape[0], cut)]
  )


def _deviation(out, mu) -> jax.Array:
  """‖out − μ‖ summed over leaves; a non-finite output counts as +inf (the defender broke)."""
  parts = [_sum_sq(_acc(o) - m) for o, m in zip(jax.tree.leaves(out), jax.tree.leaves(mu))]
  dev = jnp.sqrt(functools.reduce(jnp.add, parts))
  return jnp.where(jnp.isnan(dev), jnp.inf, dev)


def _line_evaluator(honest, base, direction, rule, f, key):
  """τ -> ‖rule(honest ∪ {base + τ·direction}×f) − μ‖, with μ the honest mean."""
  mu = _mean(honest)

  def evaluate(tau):
    byz = _repeat(_axpy(tau, direction, base), f, honest)
    full = jax.tree.map(lambda h, b: jnp.concatenate([h, b], axis=0), honest, byz)
    return _deviation(rule(full, key), mu)

  return evaluate


def _weight_windows(weights: np.ndarray) -> list[tuple[int, int, float]]:
  """The maximal runs [a, b) of one nonzero weight β: Σ_p w_p v_(p) = Σ β · Σ_{a<=p<b} v_(p)."""
  runs, a = [], 0
  for p in range(1, len(weights) + 1):
    if p == len(weights) or weights[p] != weights[a]:
      if weights[a]:
        runs.append((a, p, float(weights[a])))
      a = p
  return runs


# Up to this many ranks are selected one pruned network each (`_sorting.select_each`: 0.8 ms per
# rank at 52 × 100,000 on both cores, 1.9 on one), more by sorting the columns once
# (`select_layered`: 15–20 ms there; at 8 ranks the two cost the same on one core).
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
    rows = _sorting.select_large(x, ranks, chunk=512)
  return dict(zip(ranks, rows))


def _candidate_column(tau, base, direction, honest) -> jax.Array:
  """The Byzantine row base + τ·direction, flattened like the honest stack, rounded to its dtype
  as the Byzantine rows are, NaN as +∞."""
  point = jax.tree.map(lambda b: b[0], _repeat(_axpy(tau, direction, base), 1, honest))
  c = flatten(jax.tree.map(lambda p: p[None], point))[0]
  return jnp.where(jnp.isnan(c), jnp.inf, c)


def _clamp_pairs(a: int, b: int, f: int, n_h: int) -> list[tuple[int | None, int | None]]:
  """The honest ranks (lo, hi) between which the candidate is clamped, one pair per position of
  the window [a, b) that f copies can reach: (a − f + j, max(b − f, a) + j) for j < min(f, b − a),
  None for a rank below 0 (−∞) or from n_h (+∞)."""
  pairs = [(a - f + j, max(b - f, a) + j) for j in range(min(f, b - a))]
  return [(lo if lo >= 0 else None, hi if hi < n_h else None) for lo, hi in pairs]


def _along_line(statistic, honest, base, direction):
  """τ -> the same error as `_line_evaluator`, from `statistic` (c -> the defender's output on
  the honest rows and f copies of c, flattened like `stack.flatten`) at the candidate
  c = base + τ·direction (`_candidate_column`)."""
  mu = _mean(honest)

  def evaluate(tau):
    c = _candidate_column(tau, base, direction, honest)
    return _deviation(unflatten(statistic(c), honest), mu)

  return evaluate


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
  s_{keep−1−f}. So a call reads the e + 1 lowest and highest honest values in order
  (`_sorting.select_ends`, e + 1 passes: 15-19 ms at n_h = 52, e = 12, d = 10⁵, against
  42-64 ms to sort the columns; BENCHMARKS.md; the columns are sorted where e is too large or
  the rows too many for it to pay) and the median's other ranks (one network each);
  a candidate costs 2e + 3 clamps, the e comparisons of the window search, and the clip of the
  2e edge rows and of c, instead of the defender's network over n rows. Non-finite honest values
  sort as +∞; the output is non-finite exactly when the defender's is (both count as +∞).

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
  # The e + 1 lowest and highest honest values in order, then the median's other ranks; the
  # columns sorted where peeling the ends would cost more (`_sorting.ends_pay`).
  k = min(e + 1, n_h)
  if _sorting.ends_pay(n_h, k):
    low, high = _sorting.select_ends(x, k)
    row = {**dict(zip(range(k), low)), **dict(zip(range(n_h - k, n_h), high))}
    rest = sorted({q for p in positions for q in (p - f, p) if 0 <= q < n_h} - row.keys())
    row.update(_sorted_rows(x, rest) if rest else {})
  else:
    row = _sorted_rows(x, range(n_h))
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


def _span_coordinates(honest, base, direction):
  """Exact coordinates of the honest inputs, base and direction in an orthonormal basis of
  their span (k = n_h + 2 columns): the R factor of a QR decomposition of [x_1 … x_{n_h}, b, v].

  Returns plain arrays (n_h, k), (k,), (k,). Distances, norms and inner products are those of the
  original vectors (up to float32 rounding), so an orthogonally equivariant rule evaluated on them
  gives the same error ‖F − μ‖. Cost: one QR of a D × k matrix (about one Gram product).
  """
  one = lambda t: flatten(jax.tree.map(lambda x: jnp.asarray(x)[None], t))
  a = jnp.concatenate([flatten(honest), one(base), one(direction)], axis=0)
  r = jnp.linalg.qr(a.T, mode='r')
  n_h = a.shape[0] - 2
  return r[:, :n_h].T, r[:, n_h], r[:, n_h + 1]


def _line_sq_dists(honest, mu, base, direction, f: int):
  """τ -> the (n, n) squared distances among the stack [honest; c × f], c = b + τv, and which of
  its rows are finite, as `stack.scaled_sq_dists` gives them for that stack (in units of a
  power-of-two scale; +inf to and from an unreadable row), without a pass over d per candidate.

  Once per call: the honest distances from one centred Gram product (around μ, the honest mean,
  in the scale of the spread around it), A_i = ‖x_i − b‖² (exact differences) and
  B_i = ⟨x_i − b, v⟩ from one pass each, V = ‖v‖²; then ‖x_i − c‖² = A_i − 2τ B_i + τ² V
  costs O(n_h) per candidate. A candidate at a non-finite distance, or whose squared distance
  exceeds what the Gram keeps finite (`stack.overflow_limit`), is unreadable, as the defender's
  own Gram finds it.
  """
  n_h = num_workers(honest, 'optimal attack')
  n = n_h + f
  scale = normaliser(honest, mu).scale
  gram, finite_h = centred_gram(honest, center=mu, scale=scale)
  d2_h = dists_from_gram(gram, finite_h)
  base_sq = sq_dists_to(honest, base, scale=scale)  # A_i
  inv = 1.0 / scale
  base_dot, dir_sq = 0.0, 0.0  # B_i, V
  for x, c, u in zip(*(jax.tree.leaves(t) for t in (honest, base, direction)), strict=True):
    xm = as_matrix(x)
    um = jnp.asarray(u).reshape(-1).astype(xm.dtype) * inv
    cm = jnp.asarray(c).reshape(1, -1).astype(xm.dtype)
    # One fused pass (a product of the scaled differences wrote them out first: 5 ms at
    # 52 × 10⁵ on a Zen 4 VM).
    base_dot = base_dot + jnp.sum((xm - cm) * um, axis=1) * inv
    dir_sq = dir_sq + jnp.sum(jnp.square(um))
  limit = overflow_limit(n, gram.dtype)
  eye = jnp.eye(f, dtype=bool)

  def sq_dists(tau):
    to_c = base_sq - 2.0 * tau * base_dot + tau * tau * dir_sq
    readable = jnp.all(~finite_h | (jnp.isfinite(to_c) & (to_c <= limit)))
    hc = jnp.where(finite_h & readable, jnp.maximum(to_c, 0.0), jnp.inf)
    cc = jnp.where(readable | eye, 0.0, jnp.inf).astype(hc.dtype)
    top = jnp.concatenate([d2_h, jnp.broadcast_to(hc[:, None], (n_h, f))], axis=1)
    bottom = jnp.concatenate([jnp.broadcast_to(hc[None], (f, n_h)), cc], axis=1)
    finite = jnp.concatenate([finite_h, jnp.broadcast_to(readable, (f,))])
    return jnp.concatenate([top, bottom]), finite

  return sq_dists


def _reference_mixings(d2, n_h: int, mixing):
  """The two mixings most candidates share, from the (n, n) distances of any candidate (only the
  honest block is read): `(near, far)`, the candidate at distance 0 from every honest input (each
  honest row takes as many of its f copies as it can) and beyond every honest distance (each
  takes as few as it can: none for NNM told f). The candidates' rows among themselves are at
  distance 0 in both."""
  n = d2.shape[0]
  honest_block = d2[:n_h, :n_h]
  top = jnp.finfo(d2.dtype).max

  def at(dist):
    out = jnp.full((n, n), dist, d2.dtype).at[:n_h, :n_h].set(honest_block)
    return mixing(out.at[n_h:, n_h:].set(0.0))

  return at(0.0), at(top)


# How `_mixing_evaluator` evaluates a candidate (`_mixing_branch`).
FULL_PRODUCT, REFERENCE_PRODUCTS, ALL_NEAR, ALL_FAR = range(4)


def _mixing_branch(mix_h, mix_c, bad, near, far, far_shared=True):
  """`(branch, takes_near)`: which evaluation a candidate takes, and which honest rows mix like
  the near reference (`_reference_mixings`), from its mixing's honest weights `mix_h`
  (n_h + 1, n_h) (the honest outputs, then the Byzantine one), weights on c `mix_c` (n_h + 1,)
  and unreadable outputs `bad`. A row mixes like a reference where its weights on the honest
  rows equal the reference row's bit for bit. ALL_NEAR / ALL_FAR where every output is readable
  and every honest row mixes like the near / far reference with the same weight on c;
  REFERENCE_PRODUCTS where every honest row mixes like one of them; else FULL_PRODUCT. Where
  `far_shared` is false (the far reference's rows were taken to be one row's and are not), no
  candidate reads the far reference."""
  n_h = near.shape[0]
  takes_near = jnp.all(mix_h[:n_h] == near, axis=1)
  takes_far = jnp.all(mix_h[:n_h] == far, axis=1) & far_shared
  alike = ~jnp.any(bad) & jnp.all(mix_c[:n_h] == mix_c[0])
  branch = jnp.where(
    alike & jnp.all(takes_far),
    ALL_FAR,
    jnp.where(
      alike & jnp.all(takes_near),
      ALL_NEAR,
      jnp.where(jnp.all(takes_near | takes_far), REFERENCE_PRODUCTS, FULL_PRODUCT),
    ),
  )
  return branch, takes_near


def _mixing_evaluator(honest, base, direction, pipeline, f: int, key):
  """τ -> the same error as `_line_evaluator`, for a mixing pre-aggregator (NNM: declares
  `Properties.mixing_from_dists`) followed by an aggregator that is not orthogonally equivariant
  (e.g. nnm+trimmed_mean), without the mixing's Gram product and, for most candidates, without
  its mixing product.

  The mixing weights W (n × n) depend only on the pairwise distances, so they are chosen from
  the distances among the honest inputs and the candidate (`_line_sq_dists`: one centred Gram
  product of the honest inputs per call, then O(n_h) per candidate) by the pre-aggregator's own
  `mixing_from_dists`. The f Byzantine inputs are one row c, so the mixed stack is W applied to
  the honest rows plus c times the summed Byzantine columns of W, and the f Byzantine outputs
  (one row of W) are computed once: one (n_h + 1) × n_h × d product per candidate, the honest
  rows cleaned of non-finite entries once per call, and an output that uses an input it cannot
  read is NaN, as the pre-aggregator's `weighted_sum` with `finite` gives. The aggregator itself
  then runs on the mixed stack. A candidate costs one mixing product and the aggregator, where
  the defender takes a Gram product, a mixing product over n rows and the aggregator. Exact up
  to the rounding of the distances (a near tie between two distances may fall the other way).

  Most candidates need no product: an honest row's neighbourhood holds all or none of the f
  copies of c except where c's distance falls among the row's farthest neighbours, so its
  weights on the honest rows are those of one of two reference mixings (`_reference_mixings`),
  whose products are made once per call. Where every honest row's weights equal, bit for bit,
  those of a reference row, the honest rows' share is read from the references' products and
  only the Byzantine output's row is a product (a matrix-vector one); otherwise the full
  product runs (`_mixing_branch`, a `lax.switch`: a branch where the candidates are mapped one
  at a time, as in the search). The two references' products are kept per call, two more
  arrays the size of the honest stack.

  Most of those candidates need no aggregator network either, where the aggregator is an
  L-statistic or a mean around the median (`_order_statistics`: the trimmed mean, the median,
  MeaMed): where every honest row mixes like the near reference or every one like the far one,
  with the same weight α on c in every row (all f copies near; none far where the defender is
  told f), the mixed honest rows are the reference's plus α·c, and the aggregator's output (it
  is coordinate-wise and translation equivariant) is α·c plus its output on the reference's
  rows and f copies of the Byzantine output minus α·c. Each reference's order
  statistics are found once per call, and such a candidate costs the Byzantine output's product
  and a pass over a few rows (the clipped trimmed mean: over the reference's rows), as the
  order-statistic evaluation of the aggregator alone does; exact up to the rounding of the
  translation. Where the defender is told f, every honest row's far neighbourhood is the n_h
  honest rows: the far reference is one row, its product a matrix-vector one and its statistic
  a closed form (`_repeated_row_statistic`). At n = 64 (12 Byzantine), d = 10⁵ on a Zen 4 VM
  the search of 32 candidates took 0.075-0.10 s against 0.16-0.19 with the aggregator's network
  on every candidate (nnm + trimmed mean, nnm + median; BENCHMARKS.md).

  References:
    Checked against the defender on every candidate in tests/test_attacks.py.
  """
  mu = _mean(honest)
  pre, agg = pipeline.stages
  line_sq_dists = _line_sq_dists(honest, mu, base, direction, f)
  mixing = lambda d2: pre.properties.mixing_from_dists(d2, f=pipeline.f, **dict(pre.params))
  n_h = num_workers(honest, 'optimal attack')
  hi = jax.lax.Precision.HIGHEST
  clean = lambda x: jnp.where(jnp.isfinite(x), x, 0.0)
  honest_rows = [clean(as_matrix(x)) for x in jax.tree.leaves(honest)]  # once per call
  near, far = (m[:n_h, :n_h] for m in _reference_mixings(line_sq_dists(0.0)[0], n_h, mixing))
  # Once per call: the honest rows' share of each reference mixing, leaf by leaf, one product
  # after the other (side by side they contended for the cores: 14-15 ms each on a Zen 4 VM,
  # 3.7 alone; one product of both, sliced, copied the slices).
  near_rows = [jnp.matmul(near.astype(r.dtype), r, precision=hi) for r in honest_rows]
  # far + 0, read after near_rows (0 even where the product overflowed to ±inf or NaN)
  far_after = far + jnp.minimum(jnp.abs(jnp.nan_to_num(near_rows[-1][0, 0])), 0.0)
  # Where the defender is told f, NNM's far neighbourhoods (n − f rows) are the n_h honest rows:
  # every row is the first, whose product broadcasts (written out, it cost more than the
  # product). A mixing whose far rows differ takes the full product instead (`far_shared`).
  far_shared = jnp.asarray(True)
  if pipeline.f == f:
    far_shared = jnp.all(far == far[:1])
    far_rows = [jnp.matmul(far_after[:1].astype(r.dtype), r, precision=hi) for r in honest_rows]
  else:
    far_rows = [jnp.matmul(far_after.astype(r.dtype), r, precision=hi) for r in honest_rows]
  statistics = _reference_statistics(pipeline, honest, near_rows, far_rows, f)

  def evaluate(tau):
    d2, finite = line_sq_dists(tau)
    mix = mixing(d2)
    # The f Byzantine outputs share one row of weights: the n_h + 1 distinct outputs, each a
    # combination of the honest rows and c (its f columns summed).
    mix_h, mix_c = mix[: n_h + 1, :n_h], jnp.sum(mix[: n_h + 1, n_h:], axis=1)
    bad = unreadable(jnp.concatenate([mix_h, mix_c[:, None]], axis=1), finite[: n_h + 1])
    point = _repeat(_axpy(tau, direction, base), 1, honest)
    branch, takes_near = _mixing_branch(mix_h, mix_c, bad, near, far, far_shared)

    def mixed_leaf(from_references, x, rows, near_x, far_x, c):
      w = mix_h.astype(rows.dtype)
      if from_references:
        shares = jnp.where(takes_near[:, None], near_x, far_x)
        byzantine = jnp.matmul(w[n_h], rows, precision=hi)
        out = jnp.concatenate([shares, byzantine[None]])
      else:
        out = jnp.matmul(w, rows, precision=hi)
      out = out + mix_c.astype(rows.dtype)[:, None] * clean(as_matrix(c))
      out = jnp.where(bad[:, None], jnp.nan, out).astype(result_dtype(x.dtype))
      out = jnp.concatenate([out, jnp.broadcast_to(out[n_h:], (f - 1, out.shape[1]))])
      return out.reshape((n_h + f,) + x.shape[1:])

    def error(from_references):
      leaves = map(
        functools.partial(mixed_leaf, from_references),
        jax.tree.leaves(honest),
        honest_rows,
        near_rows,
        far_rows,
        jax.tree.leaves(point),
      )
      mixed = jax.tree.unflatten(jax.tree.structure(honest), list(leaves))
      return _deviation(agg(mixed, pipeline.f, key, {}), mu)

    def sorted_error(statistic):
      # Every honest mixed row is the reference's plus shift = α·c (α = 0 for the far one
      # where the defender is told f): the aggregator's output is shift plus its output on the
      # reference's rows and f copies of the Byzantine output minus shift (it is
      # coordinate-wise and translation equivariant).
      c = flatten(point)[0]  # finite: every output is readable here
      byzantine = jnp.concatenate(
        [jnp.matmul(mix_h[n_h].astype(r.dtype), r, precision=hi) for r in honest_rows]
      )
      byzantine = byzantine + mix_c[n_h].astype(c.dtype) * c
      shift = mix_c[0].astype(c.dtype) * c
      return _deviation(unflatten(shift + statistic(byzantine - shift), honest), mu)

    if statistics is None:  # the aggregator's own network on the mixed stack
      return jax.lax.cond(branch == FULL_PRODUCT, lambda: error(False), lambda: error(True))
    branches = [lambda: error(False), lambda: error(True)]
    branches += [functools.partial(sorted_error, statistic) for statistic in statistics]
    return jax.lax.switch(branch, branches)

  return evaluate


def _reference_statistics(pipeline, honest, near_rows, far_rows, f: int):
  """`(near, far)`: c -> the aggregator's output on a reference mixing's honest rows
  (`_reference_mixings`; `near_rows`, `far_rows` leaf by leaf) and f copies of c, by its
  order-statistic evaluation (`_order_statistics`), found once per call; None where the
  aggregator has no sorted form, is not translation equivariant (weights that do not sum to
  one: the candidates' shift would not pass through it), or a leaf is rounded when mixed (not
  in its accumulation dtype)."""
  agg = dataclasses.replace(pipeline, stages=pipeline.stages[-1:], name=pipeline.stages[-1].name)
  n_h = num_workers(honest, 'optimal attack')
  form = _sorted_form(agg, n_h + f)
  dtype = acc_dtype(honest)
  if form is None or any(jnp.dtype(x.dtype) != dtype for x in jax.tree.leaves(honest)):
    return None
  if form[0] == 'weights' and not np.isclose(np.sum(form[1]), 1.0):
    return None
  statistics = []
  for rows in (near_rows, far_rows):
    x = jnp.concatenate(rows, axis=1)
    if x.shape[0] == 1:  # one row shared by the n_h honest rows
      statistics.append(_repeated_row_statistic(*form, x[0], n_h, f))
    else:
      statistics.append(_order_statistics(*form, x, f)[0])
  return tuple(statistics)


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


def _mixing_form(pipeline) -> bool:
  """A mixing pre-aggregator (declares `mixing_from_dists`: NNM) then a deterministic aggregator,
  what `_mixing_evaluator` evaluates."""
  return (
    len(pipeline.stages) == 2
    and pipeline.stages[0].properties.mixing_from_dists is not None
    and not pipeline.stochastic
  )


def _span_kind(pipeline) -> str:
  """How the span reduction applies: the whole defender ('span') or only its mixing."""
  if not pipeline.orthogonally_equivariant and _mixing_form(pipeline):
    return 'span_mixing'
  return 'span'


def evaluation_shortcut(rule, n_h: int, f: int, dim: int) -> str | None:
  """The exact shortcut the optimal attacks take against `rule` by default, from its properties.

  ``'span'``: orthogonally equivariant and distance-based (cheaper rules gain less than the QR
  costs), with dim > n_h + 2: candidates evaluated on the coordinates of the span of the honest
  inputs, μ and the direction. ``'span_mixing'``: a mixing pre-aggregator (NNM) then an
  aggregator that is not orthogonally equivariant (``'nnm+trimmed_mean'``), with dim > n_h + 2:
  the mixing weights chosen from the distances among the honest inputs and the candidate (one
  centred Gram product of the honest inputs per call), the aggregator run on the mixed stack.
  ``'order_statistics'``: an L-statistic (mean, median, trimmed mean; `Pipeline.order_weights`)
  or a mean around the median (MeaMed; `Pipeline.median_window`): candidates evaluated from
  honest order statistics found once per call. None: the defender itself is run on every
  candidate.

  Args:
    rule: anything `robustjax.pipeline.as_rule` accepts (resolved with `f`).
    n_h, f: honest and Byzantine inputs; dim: coordinates per input.
  """
  pipeline = rule if isinstance(rule, Pipeline) else as_rule(rule, f)
  if dim > n_h + 2 and pipeline.distance_based:
    if pipeline.orthogonally_equivariant:
      return 'span'
    if _mixing_form(pipeline):
      return 'span_mixing'
  if _sorted_form(pipeline, n_h + f) is not None:
    return 'order_statistics'
  return None


def _map(fn, xs, batch_size):
  if batch_size is None:
    return jax.vmap(fn)(xs)
  if batch_size == 1:
    # One at a time without `vmap` (`lax.map` vmaps each batch, even of one): a `lax.cond` in
    # fn stays a branch instead of a selection between both sides.
    return jax.lax.map(fn, xs)
  return jax.lax.map(fn, xs, batch_size=batch_size)


def _search(evaluate, scales, num_refine: int, refine_rounds: int, batch_size):
  """Grid search then refinement rounds, every round's candidates evaluated together.

  All evaluated (scale, value) pairs are kept. Each round places `num_refine` points strictly
  between the best scale's two nearest evaluated neighbours or, when the best is the largest
  scale evaluated so far, extends the search geometrically (largest · 4^j, j = 1..num_refine),
  like the expansion phase of a line search. The rounds run in a `fori_loop` (the defender is
  traced twice, whatever the number of rounds). Returns (best scale, its value).
  """
  k0 = scales.shape[0]
  total = k0 + refine_rounds * num_refine
  vals0 = _map(evaluate, scales, batch_size)
  pts = jnp.full((total,), jnp.inf, scales.dtype).at[:k0].set(scales)
  vals = jnp.full((total,), -jnp.inf, vals0.dtype).at[:k0].set(vals0)
  steps = jnp.arange(1, num_refine + 1, dtype=scales.dtype)
  frac = steps / (num_refine + 1)

  def round_(r, carry):
    pts, vals = carry
    count = k0 + r * num_refine
    order = jnp.argsort(pts)  # unfilled slots (+inf) sort last
    sp, sv = pts[order], vals[order]
    b = jnp.argmax(sv)
    lo = sp[jnp.maximum(b - 1, 0)]
    hi = sp[jnp.minimum(b + 1, count - 1)]
    top = sp[count - 1]
    expand = (b == count - 1) & (top > 0)
    new = jnp.where(expand, top * 4.0**steps, lo + (hi - lo) * frac)
    new_vals = _map(evaluate, new, batch_size)
    pts = jax.lax.dynamic_update_slice(pts, new, (count,))
    vals = jax.lax.dynamic_update_slice(vals, new_vals, (count,))
    return pts, vals

  if refine_rounds:
    pts, vals = jax.lax.fori_loop(0, refine_rounds, round_, (pts, vals))
  b = jnp.argmax(vals)
  return pts[b], vals[b]


SEARCHES = ('grid', 'byzfl')


def _byzfl_search(evaluate, evals: int, start, delta, ratio):
  """ByzFL 0.0.11's sequential line search, step for step (one evaluation per step).

  Expansion from τ = start: propose best + δ; better (strictly) → accept and δ ← 2δ; else
  δ ← ratio·δ and switch to contraction, where each step proposes best + δ, accepts it if
  strictly better, and shrinks δ ← ratio·δ. `evals` evaluations in all (the first at start).
  A `fori_loop`: the defender is traced once. Returns (best scale, its value).
  """
  best_y = evaluate(start)

  def step(_, carry):
    best_x, best_y, delta, expanding = carry
    prop_x = best_x + delta
    prop_y = evaluate(prop_x)
    better = prop_y > best_y
    best_x = jnp.where(better, prop_x, best_x)
    best_y = jnp.where(better, prop_y, best_y)
    delta = jnp.where(expanding & better, 2.0 * delta, ratio * delta)
    return best_x, best_y, delta, expanding & better

  init = (start, best_y, delta, jnp.asarray(True))
  best_x, best_y, _, _ = jax.lax.fori_loop(0, evals - 1, step, init)
  return best_x, best_y


def _optimal_search(
  honest,
  key,
  scales,
  max_scale,
  *,
  kind,
  f,
  rule,
  num_scales,
  num_refine,
  refine_rounds,
  batch_size,
  return_scale,
  ddof,
  shortcut,
  search,
  evals,
  line,
  direction,
):
  defender = lambda s, k: rule(s, k)
  acc = acc_dtype(honest)
  mu = _mean(honest)
  if kind == 'alie':
    sigma = _std(honest, mu, ddof)
    base, direction = mu, sigma if direction == 'plus' else jax.tree.map(jnp.negative, sigma)
  else:
    base, direction = jax.tree.map(jnp.zeros_like, mu), jax.tree.map(jnp.negative, mu)
  if shortcut == 'span':
    evaluate = _line_evaluator(*_span_coordinates(honest, base, direction), defender, f, key)
  elif shortcut == 'span_mixing':
    evaluate = _mixing_evaluator(honest, base, direction, rule, f, key)
    batch_size = 1  # one at a time: batching adds traffic, and the evaluator's branch stays one
  elif shortcut == 'order_statistics':
    evaluate, batched = _order_statistics_evaluation(rule, honest, base, direction, f)
    if not batched:
      batch_size = 1  # each candidate is one pass over a few rows: batching only adds traffic
  else:
    evaluate = _line_evaluator(honest, base, direction, defender, f, key)
  if search == 'byzfl':
    start, delta, ratio = (jnp.asarray(v, acc) for v in line)
    tau, _ = _byzfl_search(evaluate, evals, start, delta, ratio)
  else:
    if scales is None:
      scales = jnp.linspace(0.0, 1.0, num_scales, dtype=acc) * max_scale.astype(acc)
    tau, _ = _search(evaluate, scales.astype(acc), num_refine, refine_rounds, batch_size)
  out = _repeat(_axpy(tau, direction, base), f, honest)
  return (out, tau) if return_scale else out


_STATIC = (
  'kind',
  'f',
  'rule',
  'num_scales',
  'num_refine',
  'refine_rounds',
  'batch_size',
  'return_scale',
  'ddof',
  'shortcut',
  'search',
  'evals',
  'direction',
)
# The search as the outermost jit takes the coordinate-wise rules' CPU options (512-bit vectors:
# the trimmed mean's clipped evaluation ran in 0.75-0.85x the time; BENCHMARKS.md); inside a
# caller's jit the plain one is traced, and the options are the caller's.
_optimal_plain = jax.jit(_optimal_search, static_argnames=_STATIC)
_optimal_tuned = jax.jit(
  _optimal_search, static_argnames=_STATIC, compiler_options=CPU_COMPILER_OPTIONS
)


def _optimal(
  name,
  honest,
  f,
  rule,
  key,
  scales,
  max_scale,
  num_scales,
  num_refine,
  refine_rounds,
  batch_size,
  return_scale,
  defender_f,
  subspace,
  order_statistics=None,
  ddof=0,
  search='grid',
  evals=20,
  start=0.0,
  delta=10.0,
  ratio=0.8,
  direction='minus',
):
  n_h = _check_attack(name, honest, f)
  check_choice(name, 'search', search, SEARCHES)
  check_choice(name, 'direction', direction, ('minus', 'plus'))
  if search == 'byzfl':
    check_positive_int(name, 'evals', evals)
    _check_float(name, 'start', start)
    _check_float(name, 'delta', delta)
    _check_float(name, 'ratio', ratio)
    if not 0.5 < float(ratio) < 1.0 or float(delta) == 0.0:
      raise ValueError(
        f'{name}: the byzfl search needs 0.5 < ratio < 1 and delta != 0; got ratio={ratio}, '
        f'delta={delta}'
      )
  if f >= n_h:
    raise ValueError(
      f'{name}: needs fewer Byzantine than honest inputs (n > 2f); got n_h={n_h}, f={f}'
    )
  check_positive_int(name, 'num_scales', num_scales, minimum=2)
  check_positive_int(name, 'num_refine', num_refine)
  check_positive_int(name, 'refine_rounds', refine_rounds, minimum=0)
  if batch_size is not None:
    check_positive_int(name, 'batch_size', batch_size)
  if isinstance(rule, Pipeline) and defender_f is None:
    pipeline = rule
  else:
    pipeline = as_rule(rule, f if defender_f is None else defender_f)
  dim = sum(int(np.prod(np.shape(x)[1:])) for x in jax.tree.leaves(honest))
  default = evaluation_shortcut(pipeline, n_h, f, dim)
  if subspace is None:
    subspace = default in ('span', 'span_mixing')
  elif subspace not in (True, False):
    raise ValueError(f'{name}: subspace must be None, True or False; got {subspace!r}')
  sorted_form = _sorted_form(pipeline, n_h + f)
  if order_statistics is None:
    order_statistics = default == 'order_statistics' and not subspace
  elif order_statistics not in (True, False):
    raise ValueError(
      f'{name}: order_statistics must be None, True or False; got {order_statistics!r}'
    )
  if order_statistics and sorted_form is None:
    raise ValueError(
      f'{name}: order_statistics=True needs a defender that declares `order_weights` '
      f'(an L-statistic: mean, median, trimmed_mean) or `median_window` (meamed); '
      f'{pipeline.spec!r} does not'
    )
  if order_statistics and subspace:
    raise ValueError(f'{name}: choose subspace or order_statistics, not both')
  if scales is None:
    _check_float(name, 'max_scale', max_scale, positive=True)
  else:
    scales = jnp.asarray(scales)
    if scales.ndim != 1 or scales.shape[0] < 2:
      raise ValueError(
        f'{name}: scales must be a 1-d array of >= 2 values; got shape {scales.shape}'
      )
    num_scales = int(scales.shape[0])
  search_fn = _optimal_tuned if outermost((honest, key, scales)) else _optimal_plain
  return search_fn(
    honest,
    key,
    scales,
    jnp.asarray(max_scale),
    kind=name.removeprefix('optimal_'),
    f=f,
    rule=pipeline,
    num_scales=num_scales,
    num_refine=num_refine,
    refine_rounds=refine_rounds,
    batch_size=batch_size,
    return_scale=return_scale,
    ddof=ddof,
    shortcut=_span_kind(pipeline) if subspace else 'order_statistics' if order_statistics else None,
    search=search,
    evals=evals if search == 'byzfl' else 0,
    line=(float(start), float(delta), float(ratio)),
    direction=direction,
  )


_OPT_DOC = """
  The defender `rule` is evaluated as the server would run it, on the full stack of n_h + f
  inputs (honest first, then the f identical Byzantine ones; the rules are permutation invariant,
  and a stochastic defender gets `key`, the same for every candidate, so that candidates are
  compared under common randomness). The objective is ‖rule(stack) − μ‖ (a non-finite output
  counts as +inf). The candidate scales are evaluated together (`vmap`, or `lax.map` in batches
  of `batch_size` to bound memory): first the grid `scales` (default `num_scales` points in
  [0, max_scale]), then `refine_rounds` rounds of `num_refine` points strictly between the best
  scale's two evaluated neighbours, or, when the best is the largest scale evaluated so far,
  at that scale times 4, 16, …, 4^num_refine (an expansion, since the error can keep growing past
  the grid; it reaches farther than a doubling line search of as many evaluations).
  Evaluations: num_scales + refine_rounds · num_refine (32 by default). Everything is jittable
  and deterministic given `key`. Cost: the evaluations, each one defender call on an
  (n_h + f)-slice stack, or far less with `subspace`.

  .. warning::
    Published code (ByzFL, after Allouah et al. 2023) runs a sequential expansion / contraction
    line search (~20 evaluations from τ = 0, step 10 doubling, then shrinking by 0.8). Both are
    heuristics for a non-concave objective (often a sawtooth: a rule stops selecting the
    Byzantine inputs past a threshold), so neither is guaranteed to find the global maximum;
    `experiments/benchmark_attacks.py` compares the two. Against the mean, whose error grows
    without bound, the result is simply the largest scale evaluated.

  Args:
    honest: the honest stack (n_h slices, n_h > f).
    f: the number of Byzantine inputs (>= 1).
    rule: the defender, anything `robustjax.pipeline.as_rule` accepts: a registered
      aggregator name, a spec string (``'nnm+krum'``), a `(name, params)` pair, a `Pipeline`, or
      a callable `rule(stack, *, f=..., key=...)` (given f and key only if it takes them).
    key: optional key passed to a stochastic defender.
    scales: optional 1-d array of first-round candidates (overrides max_scale / num_scales).
    max_scale, num_scales: the default grid.
    num_refine, refine_rounds: the refinement.
    batch_size: evaluate candidates in batches (`jax.lax.map`) instead of all at once.
    return_scale: also return the chosen scale τ.
    defender_f: the f the defender is told (default: a Pipeline's own f, else f).
    subspace: evaluate the candidates on exact coordinates in the (n_h + 2)-dimensional span of
      the honest inputs, μ and the attack direction (one QR, then every candidate costs
      O(n² (n_h + 2)) instead of a pass over d coordinates). Exact only for orthogonally
      equivariant defenders (F(Qx) = Q F(x): mean, Krum, MultiKrum, NNM, bucketing, static
      clipping, ...; *not* coordinate-wise rules such as median or trimmed mean). After a mixing
      pre-aggregator (NNM) such a rule is still sped up: only the mixing weights are chosen
      without a pass over d (from one centred Gram product of the honest inputs per call, no
      QR), and the rule runs on the mixed stack (``'nnm+trimmed_mean'``; one mixing product and
      the rule per candidate, candidates one at a time: `batch_size` is not used). None
      (default) turns it on when d > n_h + 2 for a Pipeline whose stages all declare
      `orthogonal_equivariant` and one declares `distance_based` (for cheaper defenders the QR
      costs more than it saves), or that is a mixing pre-aggregator then a deterministic
      aggregator (`evaluation_shortcut`); True forces it (your responsibility for a defender
      that is neither), False turns it off. On CPU the QR runs
      in LAPACK (OpenBLAS): on a busy machine set ``OPENBLAS_NUM_THREADS=1`` (threads contend
      in the QR; see BENCHMARKS.md).
    order_statistics: evaluate the candidates exactly from a few honest order statistics
      found once per call, for a defender that is an L-statistic (declares `order_weights`:
      mean, median, trimmed mean) or a mean around the median (declares `median_window`:
      meamed), instead of running the defender's selection network over n rows per candidate.
      Per candidate one elementwise pass: over a few sorted rows (clamps of the candidate
      between pairs of honest order statistics: four rows for the median, 2f for the trimmed
      mean at f <= 3, none for the mean, about 6e for MeaMed with e = n − keep; candidates one
      at a time, `batch_size` not used), or, for the trimmed mean at larger f, the rule's own
      clipped sum over the honest rows between two clamped cut-offs (four honest ranks per
      call instead of sorting the columns; candidates batched as `batch_size` says). None
      (default) turns it on for such a defender (see `evaluation_shortcut`); False runs the
      defender itself on every candidate.

    search: ``'grid'`` (default: the vmapped grid and refinement above) or ``'byzfl'``: ByzFL
      0.0.11's sequential expansion / contraction line search, step for step, with its
      parameters `evals` (20), `start` (0.0), `delta` (10.0) and `ratio` (0.8), for reproducing
      published ByzFL numbers (one defender evaluation per step, in a `fori_loop`).
    direction (optimal_alie): ``'minus'`` (μ − τσ, Baruch et al.; default) or ``'plus'``
      (μ + τσ, ByzFL's; use it with ``ddof=1`` to reproduce ByzFL's attack).

  Returns:
    A stack of f identical slices (and τ if `return_scale`).

  Raises:
    ValueError: f < 1, f >= n_h, bad counts; the defender's own checks (e.g. Krum's n > 2f + 2).
"""


@register('optimal_alie', needs_rule=True)
def optimal_alie(
  honest,
  *,
  f: int,
  rule,
  key=None,
  scales=None,
  max_scale=10.0,
  num_scales: int = 12,
  num_refine: int = 4,
  refine_rounds: int = 5,
  batch_size: int | None = None,
  ddof: int = 0,
  return_scale: bool = False,
  defender_f: int | None = None,
  subspace: bool | None = None,
  order_statistics: bool | None = None,
  direction: str = 'minus',
  search: str = 'grid',
  evals: int = 20,
  start: float = 0.0,
  delta: float = 10.0,
  ratio: float = 0.8,
):
  if ddof not in (0, 1):
    raise ValueError(f'optimal_alie: ddof must be 0 or 1; got {ddof!r}')

  return _optimal(
    'optimal_alie',
    honest,
    f,
    rule,
    key,
    scales,
    max_scale,
    num_scales,
    num_refine,
    refine_rounds,
    batch_size,
    return_scale,
    defender_f,
    subspace,
    order_statistics,
    ddof,
    search,
    evals,
    start,
    delta,
    ratio,
    direction,
  )


optimal_alie.__doc__ = (
  """Optimal ALIE: μ − τ·σ (or μ + τ·σ) with the scale τ that maximises the defender's error.
"""
  + _OPT_DOC
  + """
  References:
    Baruch et al., NeurIPS 2019 (ALIE); Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan,
    "Fixing by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity", AISTATS 2023.
"""
)


@register('optimal_ipm', needs_rule=True)
def optimal_ipm(
  honest,
  *,
  f: int,
  rule,
  key=None,
  scales=None,
  max_scale=10.0,
  num_scales: int = 12,
  num_refine: int = 4,
  refine_rounds: int = 5,
  batch_size: int | None = None,
  return_scale: bool = False,
  defender_f: int | None = None,
  subspace: bool | None = None,
  order_statistics: bool | None = None,
  search: str = 'grid',
  evals: int = 20,
  start: float = 0.0,
  delta: float = 10.0,
  ratio: float = 0.8,
):
  return _optimal(
    'optimal_ipm',
    honest,
    f,
    rule,
    key,
    scales,
    max_scale,
    num_scales,
    num_refine,
    refine_rounds,
    batch_size,
    return_scale,
    defender_f,
    subspace,
    order_statistics,
    search=search,
    evals=evals,
    start=start,
    delta=delta,
    ratio=ratio,
  )


optimal_ipm.__doc__ = (
  """Optimal IPM: −τ·μ with the scale τ >= 0 that maximises the defender's error.
"""
  + _OPT_DOC
  + """
  References:
    Xie, Koyejo, Gupta, UAI 2019 (IPM); Allouah et al., AISTATS 2023.
"""
)
