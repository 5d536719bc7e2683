"""Distance-based selection rules: Krum, MultiKrum, Bulyan and MoNNA.

Each rule computes weights from the geometry of the stack (one n × n matrix of squared distances,
or the n distances to one point), then combines the inputs with `robustjax.stack.weighted_sum`.
The n × n work (scores, selection) is negligible next to the Gram product for any realistic d.

Scale: the distances come from `stack.scaled_sq_dists` (the stack divided by a robust power-of-two
scale), so the selection is the same for inputs at 1e-20, 1 or 1e20.

Non-finite inputs (the edge-case table of Krum, MultiKrum, Bulyan and MoNNA):

=================================  ===============================================================
input                              output
=================================  ===============================================================
≤ f slices with NaN / ±Inf, or     such a worker is at +inf distance from every other, its score
huge (rescaled square overflows)   is +inf: never selected; the output is finite
more than f such slices            NaN wherever the selection needs a slice or a score that is not
                                   finite (Krum: every score is +inf once n − f − 1 < k finite
                                   neighbours remain); MoNNA: NaN only if a non-finite slice is
                                   among the n − f nearest of the trusted input
every slice non-finite             NaN
=================================  ===============================================================

References:
  Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent", NeurIPS 2017 (Krum, MultiKrum).
  El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium",
  ICML 2018 (Bulyan).
  Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan, "Robust Collaborative Learning with Linear
  Gradient Overhead", ICML 2023 (MoNNA).
  Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Fixing by Mixing: A Recipe for Optimal
  Byzantine ML under Heterogeneity", AISTATS 2023 (MultiKrum with m = n − f, its κ).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from robustjax import stack as st
from robustjax._checks import check_f, check_positive_int, num_workers
from robustjax.aggregators._base import Properties, lower_bound_ratio, register

__all__ = ['krum', 'multikrum', 'multikrum_sketch', 'bulyan', 'monna', 'krum_scores']


def _check_num_neighbors(rule: str, n: int, f: int, num_neighbors) -> int:
  if num_neighbors is None:
    return n - f - 2
  check_positive_int(rule, 'num_neighbors', num_neighbors)
  if isinstance(num_neighbors, bool):
    raise ValueError(f'{rule}: num_neighbors must be an int; got {num_neighbors!r}')
  if num_neighbors > n - 1:
    raise ValueError(
      f'{rule}: num_neighbors must be <= n - 1 (the other inputs); got {num_neighbors}, n={n}'
    )
  return num_neighbors


def _check_krum(rule: str, stack, f, num_neighbors) -> tuple[int, int]:
  """n and the neighbour count. The default count n − f − 2 needs n > 2f + 2 (the paper); an
  explicit count needs only n > 2f and 1 ≤ num_neighbors ≤ n − 1 (ByzFL runs Krum at n = 3, f = 1
  with n − f − 1 = 1 neighbour)."""
  n = num_workers(stack, rule)
  if num_neighbors is None:
    check_f(rule, n, f, min_n=2 * f + 3, condition='n > 2f + 2 (or an explicit num_neighbors)')
  else:
    check_f(rule, n, f)
  return n, _check_num_neighbors(rule, n, f, num_neighbors)


def _scores_from_dists(d: jax.Array, k: int) -> jax.Array:
  """(n,) Krum scores: sum of the k smallest entries of each row of `d`, self excluded."""
  n = d.shape[0]
  others = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, d)
  neg_nearest, _ = jax.lax.top_k(-others, k)
  scores = -jnp.sum(neg_nearest, axis=1)
  return jnp.where(jnp.isnan(scores), jnp.inf, scores)


# Above this many workers the scores come from row blocks of the distance matrix (`_scores`):
# the full n × n float32 matrix would take 4 n² bytes (1 GiB at n = 16384).
BLOCKED_ABOVE = 4096


def _sum_smallest_bisect(d: jax.Array, k: int, iters: int = 24) -> jax.Array:
  """Per row of `d` (+inf allowed), the sum of its k smallest entries, the k-th smallest found by
  bisection to 2⁻²⁴ of the row's finite range: O(iters) passes over the row instead of a
  `top_k` of size k or n − k (a partial sort), for the sketch's scores whose own error is far
  larger. +inf where fewer than k entries are finite."""
  finite = jnp.isfinite(d)
  dz = jnp.where(finite, d, 0.0)
  lo = jnp.zeros(d.shape[0], d.dtype)
  hi = jnp.max(dz, axis=1)

  def body(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    enough = jnp.sum(d <= mid[:, None], axis=1) >= k
    return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

  _, t = jax.lax.fori_loop(0, iters, body, (lo, hi))
  below = d < t[:, None]
  out = jnp.sum(jnp.where(below, dz, 0.0), axis=1) + (k - jnp.sum(below, axis=1)) * t
  return jnp.where(jnp.sum(finite, axis=1) >= k, out, jnp.inf)


def _blocked_scores(stack, k: int, block: int, exact: bool = True) -> jax.Array:
  """(n,) Krum scores (k nearest others, in the scaled units of `stack.scaled_sq_dists`) without
  the n × n matrix: one (block × n) panel of distances at a time.

  The stack is centred on its robust centre and divided by its robust scale (`normaliser`) once
  (one (n, D) copy), then each panel is one (block × D) × (D × n) product. A score is the sum of
  the k smallest distances to the others: for k ≥ n/2 the row's sum minus its n − k largest
  (the worker itself counted at +inf), with a `top_k` of size n − k; +inf where fewer than k
  finite neighbours exist. ``exact=False`` finds the k-th smallest by bisection instead
  (`_sum_smallest_bisect`: a few passes over the panel rather than a partial sort), for scores
  that are approximate anyway (the sketch).
  """
  norm = st.normaliser(stack)
  center = st.tree_index(stack, norm.center)
  inv = (1.0 / norm.scale).astype(st.acc_dtype(stack))
  x = jnp.concatenate(
    [
      (st.as_matrix(leaf) - jnp.asarray(c).reshape(1, -1).astype(st.acc_dtype(stack))) * inv
      for leaf, c in zip(jax.tree.leaves(stack), jax.tree.leaves(center))
    ],
    axis=1,
  )
  n = x.shape[0]
  sq = jnp.sum(x * x, axis=1)
  finite = jnp.isfinite(sq) & (sq <= float(jnp.finfo(sq.dtype).max) / (16.0 * n * n))
  x = jnp.where(finite[:, None], x, 0.0)
  nb = -(-n // block)
  rows = jnp.pad(x, ((0, nb * block - n), (0, 0))).reshape(nb, block, -1)
  ids = jnp.arange(nb * block, dtype=jnp.int32).reshape(nb, block)
  drop = n - k  # the worker itself and the n − 1 − k farthest others

  def panel(args):
    xb, ib = args
    g = jnp.matmul(xb, x.T, precision=jax.lax.Precision.HIGHEST)  # (block, n)
    sb = jnp.take(sq, jnp.minimum(ib, n - 1))
    fb = jnp.take(finite, jnp.minimum(ib, n - 1))
    d = jnp.maximum(sb[:, None] + sq[None, :] - 2.0 * g, 0.0)
    d = jnp.where(fb[:, None] & finite[None, :], d, jnp.inf)
    d = jnp.where(ib[:, None] == jnp.arange(n)[None, :], jnp.inf, d)
    if not exact:
      return _sum_smallest_bisect(d, k)
    if k <= drop:  # few neighbours: sum the k smallest directly
      return -jnp.sum(jax.lax.top_k(-d, k)[0], axis=1)
    top, _ = jax.lax.top_k(d, drop)
    n_inf = jnp.sum(~jnp.isfinite(d), axis=1)
    total = jnp.sum(jnp.where(jnp.isfinite(d), d, 0.0), axis=1)
    kept = total - jnp.sum(jnp.where(jnp.isfinite(top), top, 0.0), axis=1)
    return jnp.where(n_inf <= drop, kept, jnp.inf)

  scores = jax.lax.map(panel, (rows, ids)).reshape(-1)[:n]
  return jnp.where(jnp.isnan(scores), jnp.inf, scores)


def _scores(stack, k: int, block: int | None, exact: bool = True) -> jax.Array:
  """Krum scores (scaled units): the n × n matrix, or row panels when `block` is set or n is
  above `BLOCKED_ABOVE` (then 1024 rows at a time; ``exact=False``: bisection, see
  `_blocked_scores`)."""
  n = st.num_workers(stack, 'krum')
  if block is None and n > BLOCKED_ABOVE:
    block = 1024
  if block is None:
    d, _, _ = st.scaled_sq_dists(stack)
    return _scores_from_dists(d, k)
  check_positive_int('krum', 'block', block)
  return _blocked_scores(stack, k, min(int(block), n), exact)


def _lowest_weights(scores: jax.Array, m: int) -> jax.Array:
  """(n,) weights 1/m on the m lowest scores (ties: lower index first), 0 elsewhere."""
  n = scores.shape[0]
  _, idx = jax.lax.top_k(-scores, m)
  return jnp.zeros((n,), scores.dtype).at[idx].set(1.0 / m)


@functools.partial(jax.jit, static_argnames=('f', 'num_neighbors'))
def krum_scores(stack, *, f: int, num_neighbors: int | None = None) -> jax.Array:
  """(n,) Krum scores: score(i) = Σ of squared distances from x_i to its nearest other inputs.

  Args:
    stack: a pytree stack (leading worker axis n) or an (n, d) array.
    f: the declared number of Byzantine inputs.
    num_neighbors: how many nearest other inputs enter the score; default n − f − 2 (the paper).

  Returns:
    A float32 (float64 for float64 leaves) array of shape (n,), in the inputs' squared units
    (+inf where that overflows); +inf for non-finite inputs.
  """
  _, k = _check_krum('krum_scores', stack, f, num_neighbors)
  d, _, scale = st.scaled_sq_dists(stack)
  return _scores_from_dists(d, k) * (scale * scale)


def _check_m(rule, n, f, m) -> int:
  if m is None:
    m = n - f
  check_positive_int(rule, 'm', m)
  if m > n:
    raise ValueError(f'{rule}: m must be <= n; got m={m}, n={n}')
  return m


def _weights_from_dists(rule, d2, f, m, num_neighbors):
  """(weights, readable): MultiKrum's selection from the (n, n) scaled squared distances."""
  n, k = _check_krum(rule, d2, f, num_neighbors)
  scores = _scores_from_dists(d2, k)
  return _lowest_weights(scores, _check_m(rule, n, f, m)), jnp.isfinite(scores)


def _multikrum(rule, stack, f, m, num_neighbors, block=None):
  n, k = _check_krum(rule, stack, f, num_neighbors)
  m = _check_m(rule, n, f, m)
  scores = _scores(stack, k, block)
  # A selected input of infinite score was chosen without the information Krum needs: NaN.
  if m == 1:  # Krum: read the one selected slice, not a weighted pass over the whole stack
    i = jnp.argmin(scores)  # ties: the lowest index, as `_lowest_weights`
    readable = jnp.isfinite(scores[i])
    return jax.tree.map(
      lambda x: jnp.where(readable, x[i].astype(st.result_dtype(x.dtype)), jnp.nan), stack
    )
  return st.weighted_sum(_lowest_weights(scores, m), stack, finite=jnp.isfinite(scores))


@register(
  'krum',
  properties=Properties(
    kappa=lambda n, f, **_: 6 * (1 + lower_bound_ratio(n, f)),
    kappa_reference='Allouah et al. 2023: Krum, κ = 6(1 + f/(n−2f))',
    orthogonal_equivariant=True,
    distance_based=True,
    weights_from_dists=lambda d2, *, f, num_neighbors=None: _weights_from_dists(
      'krum', d2, f, 1, num_neighbors
    ),
  ),
)
@functools.partial(jax.jit, static_argnames=('f', 'num_neighbors'))
def krum(stack, *, f: int, num_neighbors: int | None = None):
  """Krum: the input with the smallest sum of squared distances to its nearest neighbours.

  score(i) = Σ_{j ∈ N_i} ‖x_i − x_j‖², where N_i are the `num_neighbors` inputs nearest to x_i
  (x_i itself excluded); Krum returns the input of lowest score (ties: the lowest index).

  .. warning::
    The paper (and this default) uses n − f − 2 neighbours. ByzFL uses n − f − 1; pass
    ``num_neighbors=n - f - 1`` to reproduce it. Some code uses unsquared distances: here they are
    squared, as in the paper.

  Cost: one n × n × d Gram product (`stack.scaled_sq_dists`), O(n² log n) for the scores, and a read
  of the selected input's slice.

  Robustness: (f, κ)-robust with κ ≤ 6(1 + f/(n − 2f)) (Allouah et al., 2023).

  Args:
    stack: a pytree stack (leading worker axis n) or an (n, d) array.
    f: the declared number of Byzantine inputs (static).
    num_neighbors: neighbours in the score (static); default n − f − 2.

  Returns:
    One tree like a slice of the stack: the selected input.

  Raises:
    ValueError: f < 0, 2f ≥ n, n ≤ 2f + 2 with the default num_neighbors, num_neighbors
      outside [1, n − 1], an empty stack or mismatched leading axes; the message names the rule.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.0], [0.1], [0.2], [0.3], [100.0]])
    >>> krum(x, f=1)
    Array([0.1], dtype=float32)

  References:
    Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
    NeurIPS 2017.
  """
  return _multikrum('krum', stack, f, 1, num_neighbors)


@register(
  'multikrum',
  properties=Properties(
    kappa=lambda n, f, m=None, **_: 6 * (1 + lower_bound_ratio(n, f)) if m == 1 else None,
    kappa_reference='m = 1 is Krum; the m > 1 bound of arXiv:2602.03899 is not encoded',
    orthogonal_equivariant=True,
    distance_based=True,
    weights_from_dists=lambda d2, *, f, m=None, num_neighbors=None, block=None: _weights_from_dists(
      'multikrum', d2, f, m, num_neighbors
    ),
  ),
)
@functools.partial(jax.jit, static_argnames=('f', 'm', 'num_neighbors', 'block'))
def multikrum(stack, *, f: int, m: int | None = None, num_neighbors: int | None = None, block=None):
  """MultiKrum: the average of the m inputs of lowest Krum score (m = 1 is Krum).

  Scores as in `krum`: the sum of squared distances to the `num_neighbors` nearest other inputs.
  The m lowest-scored inputs are selected with `jax.lax.top_k` (ties: the lowest index first)
  and averaged with weights 1/m.

  .. warning::
    Default m = n − f, as in ByzFL and in Allouah et al. (2023) whose robustness analysis covers
    it; the original paper leaves m to the user. Default neighbour count n − f − 2 (the paper);
    ByzFL uses n − f − 1 (pass ``num_neighbors=n - f - 1``). Some code sums the selected inputs
    instead of averaging them: here they are averaged.

  Cost: one n × n × d Gram product, O(n² log n) for the scores, one weighted pass over the stack.
  Memory: the n × n distance matrix up to n = `BLOCKED_ABOVE` (4096) workers; beyond, or with
  ``block`` set, the exact scores come from panels of ``block`` rows (`_blocked_scores`: at most
  block × n distances at a time, one centred copy of the stack). For an approximate rule at a
  fraction of the cost see `multikrum_sketch`.

  Args:
    stack: a pytree stack (leading worker axis n) or an (n, d) array.
    f: the declared number of Byzantine inputs (static).
    m: how many inputs to average (static), 1 ≤ m ≤ n; default n − f.
    num_neighbors: neighbours in the score (static); default n − f − 2.
    block: rows of the distance matrix per panel (static); default: the whole matrix up to
      n = 4096, 1024 rows beyond.

  Returns:
    One tree like a slice of the stack.

  Raises:
    ValueError: f < 0, 2f ≥ n, n ≤ 2f + 2 with the default num_neighbors, m outside [1, n],
      num_neighbors outside [1, n − 1], an empty stack or mismatched leading axes; the message
      names the rule.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.0], [0.1], [0.2], [0.3], [100.0]])
    >>> multikrum(x, f=1)  # the mean of the 4 lowest-scored inputs
    Array([0.15], dtype=float32)

  References:
    Blanchard et al., NeurIPS 2017; Allouah et al., "Fixing by Mixing", AISTATS 2023.
  """
  return _multikrum('multikrum', stack, f, m, num_neighbors, block)


@register(
  'multikrum_sketch',
  properties=Properties(
    kappa_reference='approximate MultiKrum: no proof known; κ̂ against k measured',
    distance_based=True,
  ),
)
@functools.partial(jax.jit, static_argnames=('f', 'm', 'num_neighbors', 'k', 'block'))
def multikrum_sketch(
  stack,
  *,
  f: int,
  m: int | None = None,
  num_neighbors: int | None = None,
  k: int = 256,
  key=None,
  block=None,
):
  """Approximate MultiKrum for many workers: the selection from a k-dimensional sketch.

  The Krum scores are computed on y_i = Rᵀ x_i / √k (`stack.random_projection`: a keyed ±1
  Johnson–Lindenstrauss matrix drawn in chunks, never materialised as d × k), whose pairwise
  distances match the inputs' to a relative error of order √(2/k); the m lowest-scored inputs
  are then averaged in full dimension. Exactly MultiKrum's definition otherwise (n − f − 2
  neighbours, m = n − f, ties to the lower index).

  Cost: n · d · k for the sketch (one streaming pass) + n² · k for the scores + one weighted pass,
  against n² · d for `multikrum`; memory n × k plus one panel of the scores (row blocks of the
  distance matrix above n = 4096, or with ``block``, where the sum of the nearest distances
  comes from a bisection for the k-th one: a few passes instead of a partial sort).

  .. warning::
    An approximation: inputs whose exact scores are within the sketch's error of each other may
    be ranked differently (BENCHMARKS.md gives the measured agreement with the exact selection
    and κ̂ against k). A fixed key makes the projection predictable to an attacker who knows it,
    and against a known R the rule is not robust for k < d: inputs offset along R's null space
    look like the honest mean in the sketch and are selected however far they are
    (docs/multikrum.md, the null-space witness). Pass a fresh ``key`` per step in adversarial
    settings (`as_optax`, the training engine, does).

  Args:
    stack: a pytree stack (leading worker axis n) or an (n, d) array.
    f: the declared number of Byzantine inputs (static).
    m: how many inputs to average (static), 1 ≤ m ≤ n; default n − f.
    num_neighbors: neighbours in the score (static); default n − f − 2.
    k: the sketch dimension (static).
    key: the projection's `jax.random` key (default key 0).
    block: rows per panel of the sketch's distance matrix (static; see `multikrum`).

  Returns:
    One tree like a slice of the stack.

  Raises:
    ValueError: as `multikrum`, and k < 1.

  References:
    Blanchard et al., NeurIPS 2017 (MultiKrum); Johnson and Lindenstrauss 1984, Achlioptas,
    "Database-friendly random projections", PODS 2001 (±1 projections).
  """
  n, nn = _check_krum('multikrum_sketch', stack, f, num_neighbors)
  check_positive_int('multikrum_sketch', 'k', k)
  if m is None:
    m = n - f
  check_positive_int('multikrum_sketch', 'm', m)
  if m > n:
    raise ValueError(f'multikrum_sketch: m must be <= n; got m={m}, n={n}')
  y = st.random_projection(stack, k, jax.random.key(0) if key is None else key)
  scores = _scores(y, nn, block, exact=False)
  return st.weighted_sum(_lowest_weights(scores, m), stack, finite=jnp.isfinite(scores))


def iterated_krum_selection(d: jax.Array, *, f: int, theta: int, num_neighbors: int) -> jax.Array:
  """(theta,) indices chosen by Krum applied repeatedly to a shrinking pool (Bulyan's first stage).

  At step t the pool holds p = n − t inputs (the winners so far removed) and an input's score is the
  sum of its distances to its `num_neighbors − t` nearest others still in the pool (n − f − 2 at the
  start gives p − f − 2, the paper's count for a pool of size p). One n × n distance matrix, rows
  sorted once; each step is O(n²).
  """
  n = d.shape[0]
  others = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, d)
  order = jnp.argsort(others, axis=1)
  vals = jnp.take_along_axis(others, order, axis=1)

  def step(t, carry):
    removed, chosen = carry
    k = num_neighbors - t
    live = ~removed[order]
    rank = jnp.cumsum(live, axis=1)
    use = live & (rank <= k)
    scores = jnp.sum(jnp.where(use, vals, 0.0), axis=1)
    scores = jnp.where(removed | jnp.isnan(scores), jnp.inf, scores)
    i = jnp.argmin(scores)
    return removed.at[i].set(True), chosen.at[t].set(i.astype(jnp.int32))

  init = (jnp.zeros((n,), bool), jnp.zeros((theta,), jnp.int32))
  _, chosen = jax.lax.fori_loop(0, theta, step, init)
  return chosen


@register(
  'bulyan',
  properties=Properties(distance_based=True),
)
@functools.partial(jax.jit, static_argnames=('f', 'num_neighbors'))
def bulyan(stack, *, f: int, num_neighbors: int | None = None):
  """Bulyan: iterated Krum selects θ = n − 2f inputs, then a coordinate-wise trimmed average.

  1. Selection: Krum picks an input from the pool, which is removed; repeat θ = n − 2f times. The
     neighbour count shrinks with the pool: a pool of p inputs uses p − f − 2 neighbours (all
     computed from one n × n distance matrix).
  2. Aggregation: per coordinate, the average of the β = θ − 2f selected values closest to the
     coordinate-wise median of the selection.

  .. warning::
    `num_neighbors` is the count for the full pool (default n − f − 2, the paper); it decreases by
    one with each removed input. ByzFL's Krum uses p − f − 1: pass ``num_neighbors=n - f - 1``.

  Cost: one n × n × d Gram product, O(θ n²) for the selection, one gather of the θ selected
  inputs and a coordinate-wise selection over them.

  Args:
    stack: a pytree stack (leading worker axis n) or an (n, d) array.
    f: the declared number of Byzantine inputs (static); needs n ≥ 4f + 3.
    num_neighbors: neighbours in the first Krum step (static); default n − f − 2.

  Returns:
    One tree like a slice of the stack.

  Raises:
    ValueError: f < 0, n < 4f + 3, num_neighbors outside [1, n − 1], an empty stack or mismatched
      leading axes; the message names the rule.

  References:
    El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium",
    ICML 2018.
  """
  from robustjax.aggregators._coordinatewise import mean_closest_to_median

  n = num_workers(stack, 'bulyan')
  check_f('bulyan', n, f, min_n=4 * f + 3, condition='n >= 4f + 3')
  k = _check_num_neighbors('bulyan', n, f, num_neighbors)
  theta = n - 2 * f
  d, finite, _ = st.scaled_sq_dists(stack)
  chosen = iterated_krum_selection(d, f=f, theta=theta, num_neighbors=k)
  out = mean_closest_to_median(st.tree_index(stack, chosen), keep=theta - 2 * f)
  complete = jnp.all(finite[chosen])
  return jax.tree.map(lambda x: jnp.where(complete, x, jnp.nan), out)


@register(
  'monna',
  properties=Properties(distance_based=True, trusted_input=(0,)),
)
@functools.partial(jax.jit, static_argnames=('f', 'trusted_index'))
def monna(stack, *, f: int, trusted_index: int = 0):
  """MoNNA: the mean of the n − f nearest neighbours of a trusted input (itself included).

  Distances are measured from x_t (t = `trusted_index`, an input known to be honest, e.g. the
  server's own gradient) by one exact pass, ‖x_i − x_t‖² (no Gram product). The n − f nearest
  (ties: the lowest index) are averaged with weights 1/(n − f). Non-finite inputs are at +inf.

  Cost: one pass over the stack for the distances, one weighted pass to combine.

  Args:
    stack: a pytree stack (leading worker axis n) or an (n, d) array.
    f: the declared number of Byzantine inputs (static).
    trusted_index: the index of the trusted input (static), 0 ≤ trusted_index < n.

  Returns:
    One tree like a slice of the stack.

  Raises:
    ValueError: f < 0, 2f ≥ n, trusted_index out of range, an empty stack or mismatched leading
      axes; the message names the rule.

  References:
    Farhadkhani et al., "Robust Collaborative Learning with Linear Gradient Overhead", ICML 2023.
  """
  n = num_workers(stack, 'monna')
  check_f('monna', n, f)
  if not isinstance(trusted_index, int) or not 0 <= trusted_index < n:
    raise ValueError(f'monna: trusted_index must be an int in [0, n); got {trusted_index!r}, n={n}')
  trusted = st.tree_index(stack, trusted_index)
  d, _ = st.scaled_sq_dists_to(stack, trusted, member=trusted_index)  # only their order matters
  finite = jnp.isfinite(d)
  d = jnp.where(finite, d, jnp.inf)
  return st.weighted_sum(_lowest_weights(d, n - f), stack, finite=finite)
