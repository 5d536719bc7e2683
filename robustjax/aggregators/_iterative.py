"""Iterative aggregators: geometric median (smoothed Weiszfeld), centered clipping, CAF.

Each iteration of `geometric_median` and `centered_clipping` is "weights from geometry, then
combine": the distances to the current point (`stack.sq_dists_to`) and the weighted combination
(`stack.weighted_sum`); `centered_clipping` updates the next distances from the last by one more
matrix-vector product where that is accurate enough. From a start in the span of the inputs both
can also run in n-space on the centred Gram matrix. `caf` needs only the n × n Gram matrix and one
final weighted combination: its filtering runs in n-space.

Scale: distances are computed on the stack divided by a robust power-of-two scale
(`stack.normaliser`), with ν (GM) and τ (CC) divided by the same scale, so inputs at 1e20 behave
as at 1.

Non-finite inputs (the edge-case table shared by the three rules):

=====================  =====================================================================
input slice            treatment
=====================  =====================================================================
NaN / ±Inf entries     its distance is not finite: weight 0 (Weiszfeld β_i = 0, CC clip 0,
                       CAF c_i = 0 from the start); `weighted_sum` then ignores its entries
finite but huge        its rescaled squared distance overflows: as above
more than f such       the output is computed from the finite slices alone (it is no longer
                       covered by the robustness guarantee)
every slice            NaN
=====================  =====================================================================

So up to f such slices (f < n/2) never make the output non-finite.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from robustjax._checks import (
  check_choice,
  check_f,
  check_like_slice,
  check_positive,
  check_positive_int,
  num_workers,
)
from robustjax._cond import cond_if_all
from robustjax._lapack import eigh
from robustjax.aggregators._base import REGISTRY, Properties, lower_bound_ratio, register
from robustjax.stack import (
  centred_gram,
  dots,
  inner,
  normaliser,
  plain_sq_dists_exact,
  result_dtype,
  scaled_gram,
  scaled_sq_dists_to,
  sq_distance,
  sq_dists_to,
  sq_norms,
  weighted_sum,
)

__all__ = ['geometric_median', 'centered_clipping', 'caf', 'CAF_TAU_MAX']

_GM_STARTS = ('small_norm_mean', 'median', 'mean')


def _small_norm_weights(sq):
  """Weights of the mean of the ⌈n/2⌉ inputs of smallest squared norm `sq` (n,) (non-finite
  norms count as +inf)."""
  n = sq.shape[0]
  sq = jnp.where(jnp.isfinite(sq), sq, jnp.inf)
  m = (n + 1) // 2
  _, idx = jax.lax.top_k(-sq, m)
  return jnp.zeros((n,), sq.dtype).at[idx].set(1.0 / m)


def _weiszfeld_in_span(gram, ok, a0, *, nu, iters, tol):
  """Smoothed Weiszfeld on the coefficients a of z = Σ a_j x_j (Σ a_j = 1), in n-space.

  With the centred Gram matrix G: ‖x_i − z‖² = G_ii − 2 (G a)_i + aᵀ G a, and a step's length
  ‖z' − z‖² = (a' − a)ᵀ G (a' − a): every iteration costs O(n²), not a pass over the stack.
  Rows of non-finite workers (ok False) are zero in G and get β = 0.
  """
  diag = jnp.diagonal(gram)

  def dists(a):
    ga = gram @ a
    return jnp.sqrt(jnp.maximum(diag - 2.0 * ga + a @ ga, 0.0))

  def body(state):
    a, _, it, _ = state
    dist = dists(a)
    beta = jnp.where(ok, 1.0 / jnp.maximum(nu, dist), 0.0)
    a_new = beta / jnp.sum(beta)
    delta = a_new - a
    step = jnp.sqrt(jnp.maximum(delta @ (gram @ delta), 0.0))
    scale = jnp.sum(jnp.where(ok, dist, 0.0)) / jnp.maximum(jnp.sum(ok), 1)
    return a_new, step, it + 1, step <= tol * scale

  def cond(state):
    _, _, it, done = state
    return (it < iters) & ~done

  state = (a0.astype(gram.dtype), jnp.asarray(jnp.inf, gram.dtype), jnp.asarray(0), False)
  a, _, _, _ = jax.lax.while_loop(cond, body, state)
  return a


GM_METHODS = ('auto', 'direct', 'gram')

# `geometric_median(method='auto')` iterates on the stack from its default start (two passes, a
# scale pass, then two passes per iteration) up to this many iterations, and in n-space (a Gram
# product, then O(n²) per iteration) beyond. Measured on a Zen 5 VM at n = 64, d = 10⁶, three
# rounds (BENCHMARKS.md): the direct path took 49–55 / 73–90 / 107–123 ms for 1 / 2 / 3
# iterations, the Gram path 70–78 / 74–76 / 73–97 ms.
GM_DIRECT_MAX_ITERS = 1


def gm_auto_method(iters: int, start: str) -> str:
  """The path `geometric_median(method='auto')` runs for `iters` iterations from `start`."""
  if start in ('median', 'given'):
    return 'direct'
  if start == 'small_norm_mean' and iters <= GM_DIRECT_MAX_ITERS:
    return 'direct'
  return 'gram'


@functools.partial(jax.jit, static_argnames=('f', 'iters', 'start', 'method'))
def _geometric_median(stack, init, *, f, nu, iters, tol, start, method):
  n = num_workers(stack, 'geometric_median')
  if method == 'gram':
    # The start lies in the span of the inputs: iterate on coefficients (one Gram product,
    # O(n²) per iteration, one final combination).
    gram, ok, scale = scaled_gram(stack)
    if start == 'mean':
      a0 = jnp.full((n,), 1.0 / n)
    else:
      a0 = _small_norm_weights(sq_norms(stack, scale=scale))
    a = _weiszfeld_in_span(gram, ok, a0, nu=nu / scale, iters=iters, tol=tol)
    return weighted_sum(a, stack, finite=ok)
  if start == 'small_norm_mean':
    sq, _ = scaled_sq_dists_to(stack)  # only their order matters
    z0 = weighted_sum(_small_norm_weights(sq), stack, finite=jnp.isfinite(sq))
  elif init is None:
    z0 = REGISTRY.get('median')(stack, f=f)
  else:
    check_like_slice('geometric_median', 'init', init, stack)
    z0 = init
  z0 = jax.tree.map(
    lambda x, p: jnp.asarray(p).astype(result_dtype(x.dtype)).reshape(x.shape[1:]), stack, z0
  )
  unit = normaliser(stack, z0).scale
  nu = nu / unit

  def body(state):
    z, _, it, _ = state
    dist = jnp.sqrt(sq_dists_to(stack, z, scale=unit))
    ok = jnp.isfinite(dist)
    beta = jnp.where(ok, 1.0 / jnp.maximum(nu, jnp.where(ok, dist, 1.0)), 0.0)
    z_new = weighted_sum(beta / jnp.sum(beta), stack, finite=ok)
    step = (jnp.sqrt(sq_distance(z_new, z)) / unit).astype(acc)
    scale = jnp.sum(jnp.where(ok, dist, 0.0)) / jnp.maximum(jnp.sum(ok), 1)
    return z_new, step, it + 1, step <= tol * scale

  def cond(state):
    _, _, it, done = state
    return (it < iters) & ~done

  acc = jax.eval_shape(sq_dists_to, stack, z0).dtype
  state = (z0, jnp.asarray(jnp.inf, acc), jnp.asarray(0), jnp.asarray(False))
  z, _, _, _ = jax.lax.while_loop(cond, body, state)
  return z


@register(
  'geometric_median',
  properties=Properties(
    kappa=lambda n, f, **_: 4 * (1 + lower_bound_ratio(n, f)) ** 2,
    kappa_reference='Allouah et al. 2023: GM, κ = 4(1 + f/(n−2f))² (the exact geometric median)',
    distance_based=True,
  ),
)
def geometric_median(
  stack, *, f: int = 0, nu=1e-6, iters: int = 100, tol=1e-6, init=None, method: str = 'auto'
):
  """Geometric median argmin_y Σ_i ‖y − x_i‖ by the smoothed Weiszfeld algorithm.

  Each iteration computes β_i = 1 / max(ν, ‖x_i − z‖) and z ← Σ β_i x_i / Σ β_i (Pillutla et al.,
  Algorithm 2 with uniform weights). The loop is a `lax.while_loop` that stops after `iters`
  iterations or once a step ‖z_{t+1} − z_t‖ is at most `tol` times the mean distance
  (1/n) Σ_i ‖x_i − z_t‖ (a scale- and translation-invariant test; RFA tests the relative change
  of the objective instead, which in float32 stalls at ~1e-7 while z still moves).

  .. warning::
    Conventions differ: RFA (Pillutla et al.) uses ν = 1e-6 and up to 100 iterations with a
    relative-tolerance stop; ByzFL 0.0.11 uses ν = 0.1, T = 3 fixed iterations started from 0.
    robustjax follows RFA. Its default start is *not* zero (a zero start is neither robust nor
    translation equivariant) but the mean of the ⌈n/2⌉ inputs of smallest norm, see `init`.

  Edge cases: a slice whose distance to z is not finite (NaN / ±Inf entries, or a square that
  overflows, like 1e38 in float32) gets β = 0, so up to f < n/2 such slices leave the output
  finite. The default start only averages finite inputs of at most median norm, so it is finite
  and no larger in norm than the largest honest input.

  Cost: two ways to run the same iterations (`method`). ``'gram'`` (n-space, for a start in the
  span of the inputs: the default, and `'mean'`): the iterations run on the coefficients of
  z = Σ a_j x_j, one centred Gram product (`stack.scaled_gram`), then O(n²) per iteration
  (‖x_i − z‖² = G_ii − 2 (G a)_i + aᵀ G a), then one combination, so the iteration count hardly
  matters. ``'direct'`` (any start but `'mean'`): the default start is two passes (the norms,
  then the mean of the smaller half), and each iteration one pass for the distances
  (`sq_dists_to`) and one for the combination (`weighted_sum`). ``'auto'`` iterates directly from
  `'median'` or a tree, and from the default start for `GM_DIRECT_MAX_ITERS` (1) iteration,
  where that was measured to cost less on CPU (BENCHMARKS.md).
  Robustness: (f, κ)-robust with κ ≤ 4(1 + f/(n − 2f))² (Allouah et al., AISTATS 2023), up to
  the optimisation error.

  Args:
    stack: a pytree whose leaves share a leading worker axis n, or an (n, d) array.
    f: the number of Byzantine inputs tolerated (static; only checked, 0 ≤ f and 2f < n, and
      passed to the `'median'` start).
    nu: the smoothing ν > 0 (absolute, in the units of the inputs).
    iters: the maximal number of Weiszfeld iterations (static int ≥ 1).
    tol: stop once ‖z_{t+1} − z_t‖ ≤ tol · (1/n) Σ_i ‖x_i − z_t‖; 0 stops only on a zero step.
    method: ``'auto'`` (default), ``'direct'`` or ``'gram'`` (static; see Cost). The two give
      the same iterates up to rounding.
    init: the start point. None or `'small_norm_mean'`: the mean of the ⌈n/2⌉ inputs of smallest
      norm (robust to fewer than n/2 bad slices, two passes); `'median'`: the registered
      coordinate-wise median (more passes, closer start); `'mean'`: the plain mean (not robust:
      one 1e38 slice makes every distance overflow); or a tree like one slice of the stack (e.g.
      the previous round's aggregate). A start exactly on an input x_k stalls there (β_k = 1/ν
      dominates every other weight: the classical Weiszfeld degeneracy), so never start on an
      input (e.g. at zeros when an input is zero). Measured (n = 64, d = 1e4, 8 shifted
      outliers, float32, tol = 1e-6): the default start stops after 5 iterations, 'median'
      after 5 and 'mean' after 6, all within 1.1e-5 of a 300-iteration run.

  Returns:
    A tree with the stack's structure and the worker axis removed, in each leaf's dtype.

  Raises:
    ValueError: for an empty or inconsistent stack, f < 0, 2f ≥ n, iters < 1, ν ≤ 0, tol < 0, an
      unknown `init` name or `method`, ``method='gram'`` with a start outside the inputs' span,
      or ``method='direct'`` with ``init='mean'``.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    >>> z = geometric_median(x, f=1)  # about (0.5, 0.5): the outlier barely moves it

  References:
    Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning", IEEE TSP 2022.
    Weiszfeld, "Sur le point pour lequel la somme des distances de n points donnés est minimum",
    Tohoku Math. J. 1937.
  """
  rule = 'geometric_median'
  n = num_workers(stack, rule)
  check_f(rule, n, f)
  check_positive_int(rule, 'iters', iters)
  check_positive(rule, 'nu', nu)
  check_positive(rule, 'tol', tol, allow_zero=True)
  check_choice(rule, 'method', method, GM_METHODS)
  if init is None or isinstance(init, str):
    start = init or 'small_norm_mean'
    if start not in _GM_STARTS:
      raise ValueError(f'{rule}: init must be None, a tree or one of {_GM_STARTS}; got {start!r}')
  else:
    start = 'given'
  path = gm_auto_method(iters, start) if method == 'auto' else method
  if path == 'gram' and start not in ('small_norm_mean', 'mean'):
    raise ValueError(
      f"{rule}: method='gram' needs a start in the inputs' span (init None or 'mean')"
    )
  if path == 'direct' and start == 'mean':
    raise ValueError(f"{rule}: method='direct' needs a start other than init='mean'")
  given = init if start == 'given' else None
  return _geometric_median(stack, given, f=f, nu=nu, iters=iters, tol=tol, start=start, method=path)


@register(
  'centered_clipping',
  properties=Properties(center_state=True),
)
def centered_clipping(
  stack, *, f: int = 0, center=None, tau=10.0, iters: int = 1, method: str = 'auto'
):
  """Centered clipping: v ← v + (1/n) Σ_i (x_i − v) · min(1, τ / ‖x_i − v‖), `iters` times.

  Starts from `center`, the previous aggregate: the rule is stateful across training steps, and
  the caller (the training loop) passes the aggregate it returned at the previous step. With
  ``center=None`` it starts from zeros, as the authors' code does at the first step.

  .. warning::
    The result depends on the start and on τ, which is in the units of the inputs. Karimireddy et
    al. use L = 1 iteration per step with worker momentum; τ = 10 here by default (tune it to the
    gradient scale). ByzFL 0.0.11's `CenteredClipping(m=None, L=1, tau=100.0)` is the same
    iteration, started from zeros and keeping its previous output as the next centre (τ = 100).

  Edge cases: a slice whose distance to v is not finite (NaN / ±Inf entries, or a square that
  overflows even after rescaling) gets clipping weight 0 (it is treated as if it had been clipped
  to v), so with a finite τ up to f such slices leave the output finite; if no slice is at a
  finite distance the output is NaN. With τ = +inf and finite inputs one iteration is the mean.
  When a squared distance overflows or underflows, the distances are computed on the stack
  divided by a power-of-two scale of the spread around v_l (τ likewise; around v_0 for the
  Gram), so inputs at 1e20 behave as at 1.

  Cost: two ways to run the same iterations (`method`).
  ``'direct'``: about 2L matrix-vector products over the stack. The distances to v_0 are one
  exact pass (`stack.scaled_sq_dists_to`; the norms at a first step from ``center=None``); each
  iteration's move v_{l+1} = (1 − Σ w_i) v_l + Σ w_i x_i, w_i = min(1, τ / ‖x_i − v_l‖) / n, is
  one (`weighted_sum`); the distances to v_{l+1} are updated from those to v_l by one more
  (‖x_i − v_{l+1}‖² = ‖x_i − v_l‖² − 2 ⟨x_i − v_l, δ⟩ + ‖δ‖², δ = v_{l+1} − v_l), or, where the
  update's estimated rounding error would exceed 8 times an exact pass's (inputs sharing a large
  component, a large move) or a distance is not finite and above underflow, recomputed by an
  exact pass (`_cc_distances`). An iteration costs about 2 streaming passes with the update, 3
  with the exact pass, on CPU (BENCHMARKS.md). Under `vmap` the update is kept only where every
  batch element can keep it.
  ``'gram'`` (n-space): one centred Gram product around v_0 (n² d), O(n²) per iteration, one
  final weighted pass (v_l stays an affine combination of v_0 and the inputs, so its distances
  follow from the Gram matrix). ``'auto'`` picks n-space for more than √n iterations
  (`cc_auto_method`), where it was measured to pay on CPU (BENCHMARKS.md).

  Args:
    stack: a pytree whose leaves share a leading worker axis n, or an (n, d) array.
    f: the number of Byzantine inputs tolerated (static; only checked: 0 ≤ f and 2f < n).
    center: the start v_0, a tree like one slice of the stack (a runtime argument); None: zeros.
    tau: the clipping radius τ > 0 (may be traced; checked when it is concrete).
    iters: the number of clipping iterations L (static int ≥ 1).
    method: ``'auto'`` (default), ``'direct'`` or ``'gram'`` (static; see Cost). The two give the
      same iterates up to rounding.

  Returns:
    A tree with the stack's structure and the worker axis removed, in each leaf's dtype.

  Raises:
    ValueError: for an empty or inconsistent stack, f < 0, 2f ≥ n, iters < 1, τ ≤ 0, an unknown
      method or a center unlike one slice of the stack.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 0.0], [1.2, 0.0], [0.8, 0.0], [50.0, 0.0]])
    >>> v = centered_clipping(x, f=1, center=jnp.ones(2), tau=1.0)

  References:
    Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization", ICML 2021.
  """
  rule = 'centered_clipping'
  n = num_workers(stack, rule)
  check_f(rule, n, f)
  check_positive_int(rule, 'iters', iters)
  check_positive(rule, 'tau', tau)
  check_choice(rule, 'method', method, CC_METHODS)
  if method == 'auto':
    method = cc_auto_method(iters, n)
  return _centered_clipping(stack, center, tau, f=f, iters=iters, method=method)


@functools.partial(jax.jit, static_argnames=('f', 'iters', 'method'))
def _centered_clipping(stack, center, tau, *, f, iters, method):
  rule = 'centered_clipping'
  n = num_workers(stack, rule)
  leaves, treedef = jax.tree.flatten(stack)
  if center is None:
    v = [jnp.zeros(x.shape[1:], result_dtype(x.dtype)) for x in leaves]
  else:
    check_like_slice(rule, 'center', center, stack)
    v = [
      jnp.asarray(c).astype(result_dtype(x.dtype)).reshape(x.shape[1:])
      for x, c in zip(leaves, jax.tree.leaves(center))
    ]
  v = jax.tree.unflatten(treedef, v)
  if method == 'gram':
    # The Gram in units of the spread around the start (τ likewise): no overflow at 1e20.
    scale = normaliser(stack, v).scale
    return _centered_clipping_gram(stack, v, tau / scale, scale, iters)

  def combine(w, v):
    # v ← (1 − Σ w_i) v + Σ w_i x_i, ignoring the non-finite entries of weight-0 slices.
    moved = weighted_sum(w, stack)
    return jax.tree.map(lambda c, m: _axpy(1.0 - jnp.sum(w), c, m), v, moved)

  # Distances to v_0 (None: the origin, as v is at a first step from zeros): the norms. Their
  # rounding error is an exact pass's (`_cc_distances`'s unit).
  sq, scale = scaled_sq_dists_to(stack, None if center is None else v)
  w, informed = _cc_weights(sq, tau / scale, n)
  err = sq

  def body(_, carry):
    v, w, _, sq, scale, err = carry
    v_next = combine(w, v)
    sq, scale, err = _cc_distances(stack, v, v_next, sq, scale, err)
    return (v_next, *_cc_weights(sq, tau / scale, n), sq, scale, err)

  if iters > 1:
    # The first move outside the loop gives the carry the stack's type (also when the stack is a
    # per-device slice inside `jax.shard_map` and the centre is replicated).
    carry = body(0, (v, w, informed, sq, scale, err))
    v, w, informed, *_ = jax.lax.fori_loop(2, iters, body, carry)
  v = combine(w, v)
  # No slice at a finite distance: nothing was learnt from the inputs.
  return jax.tree.map(lambda x: jnp.where(informed, x, jnp.nan), v)


def _cc_weights(sq, tau, n):
  """w_i = min(1, τ / ‖x_i − v‖) / n from distances and τ in the same units; weight 0 for a slice
  at a non-finite distance. Also whether any slice was at a finite distance."""
  dist = jnp.sqrt(sq)
  ok = jnp.isfinite(dist)
  w = jnp.where(ok, jnp.minimum(1.0, tau / jnp.where(ok, dist, 1.0)), 0.0) / n
  return w, jnp.any(ok)


# The direct path updates the distances while their estimated rounding error stays within this
# many times an exact pass's (`_cc_distances`).
CC_UPDATE_ERROR_RATIO = 8.0


def _cc_distances(stack, v, v_next, sq, scale, err):
  """The squared distances to v′ = `v_next` from those to v (`sq`, in units of `scale`): updated
  by one matrix-vector product where that is accurate enough, else one exact pass.

  With δ = v′ − v, ‖x_i − v′‖² = ‖x_i − v‖² − 2 (⟨x_i, δ⟩ − ⟨v, δ⟩) + ‖δ‖²: the ⟨x_i, δ⟩ are one
  matrix-vector product (`stack.dots`), about half the cost of an exact pass (differences first,
  `stack.sq_dists_to`) on CPU. The update adds rounding error of about u √d (2 (‖x_i‖ + ‖v‖) ‖δ‖ +
  ‖δ‖²) (probabilistic bounds for inner products of length d), which is large against a small new
  distance when the inputs share a large component; an exact pass errs by about u √d ‖x_i − v′‖².
  `err` carries the estimate in units of u √d (‖x_i‖ ≤ ‖x_i − v‖ + ‖v‖). The update is made only
  when the estimate after it stays within `CC_UPDATE_ERROR_RATIO` times an exact pass's for every
  input, checked first against the lower bound (‖x_i − v‖ − ‖δ‖)² of the new distance (so the
  product is skipped where it would not be kept), then against the new distances themselves;
  otherwise, and whenever the distances are rescaled or not all finite and above underflow, the
  exact pass (`stack.scaled_sq_dists_to`, which rescales when it must). The estimate assumes
  float32 arithmetic at least; for a low-precision stack δ is also rounded to its dtype, an error
  below that of the centre itself, which is stored in that dtype.

  Returns:
    `(sq, scale, err)` for v′.
  """
  delta = jax.tree.map(jnp.subtract, v_next, v)
  dd = sq_distance(v_next, v)
  vd = inner(v, delta)
  growth = 2.0 * (jnp.sqrt(sq) + 2.0 * jnp.sqrt(inner(v, v))) * jnp.sqrt(dd) + dd
  lower = jnp.square(jnp.maximum(jnp.sqrt(sq) - jnp.sqrt(dd), 0.0))
  bound = CC_UPDATE_ERROR_RATIO

  def exact(stack, v_next, *_):
    sq, scale = scaled_sq_dists_to(stack, v_next)
    return sq, scale, sq

  def updated(stack, v_next, delta, sq, err, growth, vd, dd):
    new = sq - 2.0 * (dots(stack, delta) - vd) + dd
    err = err + growth

    def keep(stack, v_next, new, err):
      return new, jnp.ones((), new.dtype), err

    ok = plain_sq_dists_exact(new) & jnp.all(err <= bound * new)
    return cond_if_all(ok, keep, exact, stack, v_next, new, err)

  likely = (scale == 1.0) & jnp.all(err + growth <= bound * lower)
  return cond_if_all(likely, updated, exact, stack, v_next, delta, sq, err, growth, vd, dd)


CC_METHODS = ('auto', 'direct', 'gram')

# `centered_clipping(method='auto')` runs in n-space when the iterations cost more than the
# n-space path. A direct iteration is two matrix-vector products over the n·d entries (the move
# and the distance update); the n-space path is a Gram product (n²d multiply-adds, at a rate that
# grows with n on CPU), a scale pass and the final combination. Measured on an Intel Xeon VM
# (BENCHMARKS.md, `--cc_switch`, after the distance update; two runs) the n-space path pays from
# L = 2 at n = 4, 3–4 at n = 8, 6–8 at n = 16, 10–12 at n = 64, 16–20 at n = 256 and 33–48 at
# n = 1024: about CC_GRAM_ITERS_PER_SQRT_N · √n iterations. Other hardware has other ratios.
CC_GRAM_ITERS_PER_SQRT_N = 1.0


def cc_auto_method(iters: int, n: int) -> str:
  """The path `centered_clipping(method='auto')` runs for `iters` iterations over n workers."""
  return 'gram' if iters > CC_GRAM_ITERS_PER_SQRT_N * math.sqrt(n) else 'direct'


def _centered_clipping_gram(stack, v0, tau, scale, iters):
  """Centered clipping in n-space: v_l = v_0 + Σ_j c_j (x_j − v_0), so with G the Gram matrix of
  the x_j − v_0 (divided by `scale`), ‖x_i − v_l‖² = G_ii − 2 (G c)_i + cᵀ G c and each
  iteration c ← (1 − Σ w) c + w, w_i = min(1, τ / ‖x_i − v_l‖) / n, costs O(n²). One Gram
  product and one final weighted pass over the stack, whatever the number of iterations."""
  n = num_workers(stack, 'centered_clipping')
  gram, finite = centred_gram(stack, center=v0, scale=scale)
  diag = jnp.diagonal(gram)

  def step(_, carry):
    c, _ = carry
    gc = gram @ c
    dist = jnp.sqrt(jnp.maximum(diag - 2.0 * gc + c @ gc, 0.0))
    ok = finite & jnp.isfinite(dist)
    w = jnp.where(ok, jnp.minimum(1.0, tau / jnp.where(ok, dist, 1.0)), 0.0) / n
    return (1.0 - jnp.sum(w)) * c + w, jnp.any(ok)

  c, informed = jax.lax.fori_loop(0, iters, step, (jnp.zeros((n,), gram.dtype), True))
  moved = weighted_sum(c, stack)
  keep = 1.0 - jnp.sum(c)
  v = jax.tree.map(lambda a, m: _axpy(keep, a, m), v0, moved)
  return jax.tree.map(lambda x: jnp.where(informed, x, jnp.nan), v)


def _axpy(a, c, m):
  """a · c + m in the accumulation dtype (float32 at least), cast back to c's dtype."""
  acc = jnp.promote_types(c.dtype, jnp.float32)
  return (a.astype(acc) * c.astype(acc) + m.astype(acc)).astype(c.dtype)


def _caf_top_eig(m, power_iters):
  """Top eigenpair of the symmetric PSD n × n matrix m: exact (eigh) or by power iteration."""
  if power_iters is None:
    lam, vec = eigh(m)
    return lam[-1], vec[:, -1]
  u = m[:, jnp.argmax(jnp.diagonal(m))]
  u = u / jnp.maximum(jnp.linalg.norm(u), jnp.finfo(m.dtype).tiny)

  def it(_, u):
    w = m @ u
    return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(m.dtype).tiny)

  u = jax.lax.fori_loop(0, power_iters, it, u)
  return u @ (m @ u), u


CAF_TAU_MAX = ('active', 'all')
"""CAF's τ_max conventions: over the inputs still weighted (c_i > 0, the default) or over all
inputs (ByzFL 0.0.11's `tau.max()`)."""


@register(
  'caf',
  properties=Properties(distance_based=True),
)
@functools.partial(jax.jit, static_argnames=('f', 'power_iters', 'tau_max'))
def caf(stack, *, f: int, power_iters: int | None = None, tau_max: str = 'active'):
  """CAF (covariance-bound agnostic filter): filter along the top principal direction.

  With weights c_i = 1, while Σ c_i > n − 2f: μ_c = Σ c_i x_i / Σ c_i,
  Σ_c = Σ c_i (x_i − μ_c)(x_i − μ_c)ᵀ / Σ c_i with top eigenpair (λ, v), τ_i = ((x_i − μ_c)ᵀ v)²,
  and c_i ← c_i (1 − τ_i / τ_max). Returns the μ_c with the smallest λ seen.

  The d × d covariance is never formed, and no d-space power iteration is run: with
  y_i = x_i − μ_c and p = c / Σc, the non-zero spectrum of Σ_c = Yᵀ diag(p) Y is that of the n × n
  matrix M = diag(√p) K diag(√p), K = Y Yᵀ the weighted-centred Gram matrix, and the projections
  are Y v = K diag(√p) u / √λ for M's top eigenvector u. K = J G Jᵀ with J = I − 1 pᵀ and G the
  Gram matrix centred at a robust input (`stack.scaled_gram`): entries between inputs near the bulk
  never mix with the squared distances to far-away ones, so a few huge rows (1e10 and beyond)
  cannot drown the honest geometry in rounding. τ is normalised by its largest value before
  squaring (only ratios τ_i / τ_max matter), so it cannot overflow either. So CAF costs one Gram
  product, at most n exact n × n eigendecompositions (O(n⁴) flops in all, independent of d), and
  one final weighted combination; d-space power iteration would cost two passes over the stack per
  power step per filtering round.

  .. warning::
    Conventions: the eigenpair is exact here (`eigh`); ByzFL 0.0.11 runs one power-iteration
    step from a random start in d-space (an approximation that differs run to run).
    `power_iters=k` uses k deterministic power steps on M instead. τ_max is by default the
    largest τ_i over the inputs still weighted (c_i > 0), so each round removes one more input
    and the loop ends within n rounds; ``tau_max='all'`` takes it over all inputs, as ByzFL does
    (the two agree in the first round; the loop then runs at most 10n rounds). With f = 0 the
    loop body never runs and the rule is the mean.

  Edge cases: slices with non-finite entries or a rescaled squared norm that overflows
  (`stack.centred_gram`) start with c_i = 0, i.e. they are filtered out before the first round;
  up to f < n/2 of them leave the output finite; with every slice non-finite the output is NaN.
  If λ = 0 (all weighted inputs equal) the loop stops.

  Args:
    stack: a pytree whose leaves share a leading worker axis n, or an (n, d) array.
    f: the number of Byzantine inputs tolerated (static; 0 ≤ f and 2f < n).
    power_iters: None for the exact top eigenpair, or a static number of power-iteration steps.
    tau_max: `'active'` (default) or `'all'` (ByzFL's), see `CAF_TAU_MAX` (static).

  Returns:
    A tree with the stack's structure and the worker axis removed, in each leaf's dtype.

  Raises:
    ValueError: for an empty or inconsistent stack, f < 0, 2f ≥ n, power_iters < 1 or an unknown
      tau_max.

  References:
    Allouah, Guerraoui, Stephan, "Towards Trustworthy Federated Learning with Untrusted
    Participants", ICML 2025 (arXiv:2505.01874), CAF; ByzFL's `CAF` for the loop structure.
  """
  rule = 'caf'
  n = num_workers(stack, rule)
  check_f(rule, n, f)
  if power_iters is not None:
    check_positive_int(rule, 'power_iters', power_iters)
  check_choice(rule, 'tau_max', tau_max, CAF_TAU_MAX)
  gram, ok, _ = scaled_gram(stack)
  c0 = ok.astype(gram.dtype)
  eye = jnp.eye(n, dtype=gram.dtype)
  target = n - 2 * f
  max_rounds = n if tau_max == 'active' else 10 * n

  def spectrum(c):
    p = c / jnp.sum(c)
    j = eye - p[None, :]
    k = j @ gram @ j.T
    sp = jnp.sqrt(p)
    m = sp[:, None] * k * sp[None, :]
    lam, u = _caf_top_eig(0.5 * (m + m.T), power_iters)
    return p, k, sp, lam, u

  def cond(state):
    c, _, _, done, it = state
    return (jnp.sum(c) > target) & ~done & (it < max_rounds)

  def body(state):
    c, best_p, best_lam, _, it = state
    p, k, sp, lam, u = spectrum(c)
    better = lam < best_lam
    best_p = jnp.where(better, p, best_p)
    best_lam = jnp.where(better, lam, best_lam)
    proj = jnp.where(ok, k @ (sp * u), 0.0)
    candidates = jnp.where(c > 0, proj, 0.0) if tau_max == 'active' else proj
    top = jnp.argmax(jnp.abs(candidates))
    peak = jnp.abs(candidates[top])
    done = ~(peak > 0)
    ratio = jnp.square(proj / jnp.where(done, 1.0, peak))
    c_new = jnp.maximum(c * (1.0 - ratio), 0.0)
    # The argmax gets exactly 0 (rounding in 1 − τ/τ_max must not leave it slightly active).
    c_new = jnp.where(jnp.arange(n) == top, 0.0, c_new)
    c = jnp.where(done, c, c_new)
    return c, best_p, best_lam, done, it + 1

  p0 = c0 / jnp.sum(c0)
  state = (c0, p0, jnp.asarray(jnp.inf, gram.dtype), jnp.asarray(False), jnp.asarray(0))
  _, best_p, _, _, _ = jax.lax.while_loop(cond, body, state)
  return weighted_sum(best_p, stack, finite=ok)
