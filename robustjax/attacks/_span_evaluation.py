"""The optimal attacks' exact evaluation of a distance-based defender in the span of the honest
inputs and the attack's line: on exact coordinates there for an orthogonally equivariant
defender (`_span_coordinates`), and, for a mixing pre-aggregator (NNM) then an aggregator, with
the mixing weights chosen from the distances along the line (`_mixing_evaluator`).

References:
  Checked against the defenders on every candidate in tests/test_attacks.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from robustjax.attacks._base import _axpy, _mean, _repeat
from robustjax.attacks._line import _deviation
from robustjax.attacks._order_evaluation import (
  _order_statistics,
  _repeated_row_statistic,
  _sorted_form,
)
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
