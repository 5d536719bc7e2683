"""Subset-search rules: minimum diameter averaging (MDA) and the smallest maximum eigenvalue
averager (SMEA).

Both return the mean of the (n − f)-subset of inputs that minimises a spread criterion, and both
criteria are functions of the n × n squared-distance matrix alone (one Gram product):

* MDA: the diameter of the subset, max_{i, j ∈ S} ‖x_i − x_j‖;
* SMEA: the largest eigenvalue of the subset's empirical covariance
  (1/|S|) Σ_{i∈S} (x_i − x̄_S)(x_i − x̄_S)ᵀ. Its non-zero eigenvalues are those of the centred
  Gram matrix of the subset divided by |S|, and that matrix is −½ J D_S J, with D_S the subset's
  squared-distance matrix and J = I − 11ᵀ/|S| the centring matrix: an |S| × |S| problem, not d × d.

Exact search enumerates the C(n, f) subsets (as the f inputs left out, a static index table built
at trace time) and evaluates them all, vectorised in bounded blocks (`lax.map` with a batch size).
When C(n, f) exceeds `max_subsets` (by default: 1e5 subsets, or a work budget of about a second
on CPU, see `is_exact`), a local search replaces it (see `mda`), with a Python warning at trace
time, i.e. once per compilation): the exponential search is never run silently.

References:
  El Mhamdi, Guerraoui, Guirguis, Hoang, Rouault, "Genuinely Distributed Byzantine Machine
  Learning", PODC 2020 (MDA); Rousseeuw, "Multivariate estimation with high breakdown point", 1985.
  Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Fixing by Mixing: A Recipe for Optimal
  Byzantine ML under Heterogeneity", AISTATS 2023 (SMEA).
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from robustjax import stack as st
from robustjax._checks import check_choice, check_f, check_positive_int, num_workers
from robustjax._lapack import eigh, eigvalsh
from robustjax.aggregators._base import Properties, register

__all__ = ['mda', 'smea']

DEFAULT_MAX_SUBSETS = 100_000
"""With `max_subsets=None`, the largest C(n, f) searched exactly (see `mda` for measurements)."""

# With `max_subsets=None`, the exact search also needs C(n, f) · (n − f)^p within a work budget
# (p = 2 for the diameters, p = 3 for the eigenvalue problems). Measured on a busy 2-core CPU:
# MDA at C(26, 6) · 20² ≈ 9e7 took 1.4 s; SMEA at C(22, 6) · 16³ ≈ 3e8 took 1.2 s, and at
# C(40, 4) · 36³ ≈ 4e9 took 15 s.
_WORK_BUDGET = {'mda': (2, 1e8), 'smea': (3, 3e8)}

_BLOCK_ELEMENTS = 1 << 20  # subsets per block × (n − f)²: bounds the memory of one block


@functools.lru_cache(maxsize=32)
def _left_out_sets(n: int, f: int) -> np.ndarray:
  """(C(n, f), f) int32: every set of f indices out of n, in lexicographic order."""
  combos = itertools.chain.from_iterable(itertools.combinations(range(n), f))
  return np.fromiter(combos, dtype=np.int32, count=math.comb(n, f) * f).reshape(-1, f)


def _kept(left_out: jax.Array, n: int) -> jax.Array:
  """(n − f,) the indices not in `left_out` (f,), in increasing order."""
  out = jnp.any(jnp.arange(n)[:, None] == left_out[None, :], axis=1)
  return jnp.argsort(out, stable=True)[: n - left_out.shape[0]]


def _sub(d: jax.Array, kept: jax.Array) -> jax.Array:
  return d[kept[:, None], kept[None, :]]


def _diameter(d: jax.Array, kept: jax.Array) -> jax.Array:
  """The squared diameter of the subset (+inf if it holds a non-finite input)."""
  return jnp.max(_sub(d, kept))


def _centred_gram(ds: jax.Array) -> jax.Array:
  """−½ J D J for a finite squared-distance matrix D (double centring)."""
  rows = jnp.mean(ds, axis=1, keepdims=True)
  return -0.5 * (ds - rows - rows.T + jnp.mean(rows))


def _top_eig(d: jax.Array, kept: jax.Array) -> jax.Array:
  """|S| × the top eigenvalue of the subset's covariance (+inf if it holds a non-finite input)."""
  ds = _sub(d, kept)
  ok = jnp.isfinite(ds)
  g = _centred_gram(jnp.where(ok, ds, 0.0))
  return jnp.where(jnp.all(ok), eigvalsh(g)[-1], jnp.inf)


def _diameter_out_candidates(d: jax.Array, kept: jax.Array):
  """Positions (in `kept`) of the two ends of the subset's diameter: the only useful swaps out."""
  ds = _sub(d, kept)
  flat = jnp.argmax(ds)
  m = kept.shape[0]
  return jnp.stack([flat // m, flat % m]), None


def _eig_out_candidates(d: jax.Array, kept: jax.Array):
  """Positions of the two inputs with the largest weight along the top principal direction, and
  that direction (in sample space: the top eigenvector of the centred Gram matrix)."""
  ds = _sub(d, kept)
  ok = jnp.isfinite(ds)
  _, vecs = eigh(_centred_gram(jnp.where(ok, ds, 0.0)))
  top = vecs[:, -1]
  weight = jnp.where(jnp.all(ok, axis=1), jnp.abs(top), jnp.inf)
  return jax.lax.top_k(weight, 2)[1], top


_POWER_STEPS = 20


def _eig_screen(d: jax.Array, cands: jax.Array, warm: jax.Array) -> jax.Array:
  """Estimates of the candidates' top eigenvalues: power iteration warm-started from `warm`."""

  def one(kept, v):
    ds = _sub(d, kept)
    ok = jnp.isfinite(ds)
    g = _centred_gram(jnp.where(ok, ds, 0.0))

    def step(_, v):
      w = g @ v
      return w / jnp.maximum(jnp.linalg.norm(w), 1e-30)

    v = jax.lax.fori_loop(0, _POWER_STEPS, step, v / jnp.maximum(jnp.linalg.norm(v), 1e-30))
    return jnp.where(jnp.all(ok), v @ (g @ v), jnp.inf)

  return jax.vmap(one)(cands, warm)


TIES = ('left_out', 'kept')
"""Tie rules of the exact search: the first minimiser in lexicographic order of the f inputs left
out (`'left_out'`, the default), or of the n − f inputs kept (`'kept'`, ByzFL's: it scans
`itertools.combinations(range(n), n - f)` and keeps the first strict minimum). Complements
reverse the lexicographic order, so `'kept'` is the last minimiser in left-out order."""


def _exact_mask(d: jax.Array, f: int, objective, ties: str = 'left_out') -> jax.Array:
  """(n,) bool mask of the (n − f)-subset minimising `objective` (ties: see `TIES`)."""
  n = d.shape[0]
  m = n - f
  table = jnp.asarray(_left_out_sets(n, f))
  count = table.shape[0]
  batch = max(1, min(count, _BLOCK_ELEMENTS // (m * m)))
  values = jax.lax.map(lambda out: objective(d, _kept(out, n)), table, batch_size=batch)
  values = jnp.where(jnp.isnan(values), jnp.inf, values)
  if ties == 'kept':
    best = count - 1 - jnp.argmin(values[::-1])
  else:
    best = jnp.argmin(values)
  out = table[best]
  return ~jnp.any(jnp.arange(n)[:, None] == out[None, :], axis=1)


def _local_search_mask(
  d: jax.Array, f: int, objective, out_candidates, rounds: int, screen=None
) -> jax.Array:
  """(n,) bool mask of an (n − f)-subset found by swap local search (an approximation).

  Start: the n − f inputs nearest the medoid (the input whose n − f nearest, itself included, have
  the smallest summed squared distance). Each round tries every swap of one of the two inputs
  named by `out_candidates` with one of the f inputs left out, and keeps the best swap if it lowers
  the objective; it stops at the first round without improvement, or after `rounds` rounds.
  With `screen` (cheap estimates of the candidates' objectives, warm-started from the auxiliary
  vector `out_candidates` returns), the best-screened swap is then checked with the exact
  objective, so the objective decreases strictly from round to round.
  """
  n = d.shape[0]
  m = n - f
  crit = jnp.sum(jnp.sort(d, axis=1)[:, :m], axis=1)
  center = jnp.argmin(jnp.where(jnp.isnan(crit), jnp.inf, crit))
  _, start = jax.lax.top_k(-d[center], m)
  keep0 = jnp.zeros((n,), bool).at[start].set(True)

  def value(kept):
    v = objective(d, kept)
    return jnp.where(jnp.isnan(v), jnp.inf, v)

  def kept_of(keep):
    return jnp.argsort(~keep, stable=True)[:m]

  def cond(carry):
    it, _, _, improved = carry
    return improved & (it < rounds)

  def body(carry):
    it, keep, val, _ = carry
    kept = kept_of(keep)
    outside = jnp.argsort(keep, stable=True)[:f]
    pos, warm = out_candidates(d, kept)
    k = pos.shape[0]
    cands = jnp.broadcast_to(kept, (k, f, m))
    cands = cands.at[jnp.arange(k)[:, None], :, pos[:, None]].set(outside[None, :])
    cands = cands.reshape(-1, m)
    if screen is None:
      vals = jax.vmap(value)(cands)
      b = jnp.argmin(vals)
      best = vals[b]
    else:
      starts = jnp.broadcast_to(warm, (k, f, m))
      starts = starts.at[jnp.arange(k)[:, None], :, pos[:, None]].set(0.0).reshape(-1, m)
      est = screen(d, cands, starts)
      b = jnp.argmin(jnp.where(jnp.isnan(est), jnp.inf, est))
      best = value(cands[b])
    better = best < val
    new_keep = jnp.zeros((n,), bool).at[cands[b]].set(True)
    return it + 1, jnp.where(better, new_keep, keep), jnp.minimum(best, val), better

  init = (jnp.int32(0), keep0, value(kept_of(keep0)), jnp.bool_(True))
  _, keep, _, _ = jax.lax.while_loop(cond, body, init)
  return keep


def is_exact(rule: str, n: int, f: int, max_subsets: int | None = None) -> bool:
  """Whether `rule` ('mda' or 'smea') searches all C(n, f) subsets with this `max_subsets`."""
  count = math.comb(n, f)
  if max_subsets is not None:
    return count <= max_subsets
  power, budget = _WORK_BUDGET[rule]
  return count <= DEFAULT_MAX_SUBSETS and count * (n - f) ** power <= budget


def _subset_mask(rule, d, f, max_subsets, rounds, objective, out_candidates, screen, ties):
  n = d.shape[0]
  if is_exact(rule, n, f, max_subsets):
    return _exact_mask(d, f, objective, ties)
  limit = (
    f'max_subsets={max_subsets}'
    if max_subsets is not None
    else f'the default limits ({DEFAULT_MAX_SUBSETS} subsets and a work budget)'
  )
  warnings.warn(
    f'{rule}: C(n, f) = C({n}, {f}) = {math.comb(n, f)} subsets exceeds {limit}; '
    f'using a local-search approximation (the result is approximate, not the exact {rule})',
    stacklevel=3,
  )
  return _local_search_mask(d, f, objective, out_candidates, rounds, screen)


def _subset_rule(
  rule, stack, f, max_subsets, local_search_rounds, ties, objective, candidates, screen
):
  keep, finite = _subset_mask_rule(
    rule, stack, f, max_subsets, local_search_rounds, ties, objective, candidates, screen
  )
  n = keep.shape[0]
  weights = keep.astype(st.acc_dtype(stack)) / (n - f)
  return st.weighted_sum(weights, stack, finite=finite)


def _subset_mask_rule(
  rule, stack, f, max_subsets, local_search_rounds, ties, objective, candidates, screen
):
  """The kept mask and which workers are finite."""
  n = num_workers(stack, rule)
  check_f(rule, n, f)
  if max_subsets is not None:
    check_positive_int(rule, 'max_subsets', max_subsets)
  rounds = n if local_search_rounds is None else local_search_rounds
  check_positive_int(rule, 'local_search_rounds', rounds)
  check_choice(rule, 'ties', ties, TIES)
  d, finite, _ = st.scaled_sq_dists(stack)
  if f == 0:
    return jnp.ones((n,), bool), finite
  mask = _subset_mask(rule, d, f, max_subsets, rounds, objective, candidates, screen, ties)
  return mask, finite


_STATIC = ('f', 'max_subsets', 'local_search_rounds', 'ties')


@functools.partial(jax.jit, static_argnames=_STATIC)
def mda_mask(
  stack, *, f: int, max_subsets: int | None = None, local_search_rounds=None, ties='left_out'
):
  """(n,) bool: the subset `mda` averages, same arguments (for analysis and tests)."""
  return _subset_mask_rule(
    'mda',
    stack,
    f,
    max_subsets,
    local_search_rounds,
    ties,
    _diameter,
    _diameter_out_candidates,
    None,
  )[0]


@functools.partial(jax.jit, static_argnames=_STATIC)
def smea_mask(
  stack, *, f: int, max_subsets: int | None = None, local_search_rounds=None, ties='left_out'
):
  """(n,) bool: the subset `smea` averages, same arguments (for analysis and tests)."""
  return _subset_mask_rule(
    'smea',
    stack,
    f,
    max_subsets,
    local_search_rounds,
    ties,
    _top_eig,
    _eig_out_candidates,
    _eig_screen,
  )[0]


@register(
  'mda',
  properties=Properties(distance_based=True, exponential=True),
)
@functools.partial(jax.jit, static_argnames=_STATIC)
def mda(
  stack,
  *,
  f: int,
  max_subsets: int | None = None,
  local_search_rounds: int | None = None,
  ties: str = 'left_out',
):
  """Minimum diameter averaging: the mean of the (n − f)-subset of smallest diameter.

  MDA_f(x) = x̄_{S*}, S* = argmin_{|S| = n − f} max_{i, j ∈ S} ‖x_i − x_j‖. Ties are frequent
  (every subset holding the diameter pair of another ties with it): by default the first subset
  in lexicographic order of the f inputs left out; ``ties='kept'`` takes the first in order of
  the inputs kept, as ByzFL does (see `TIES`).

  Exact when C(n, f) ≤ `max_subsets` (default: C(n, f) ≤ 1e5 and C(n, f) · (n − f)² ≤ 1e8, about
  a second on a 2-core CPU): every subset is evaluated from the n × n distance matrix, in blocks
  of bounded memory. Beyond, an approximation (a Python warning says so at trace time):
  local search from the n − f inputs nearest the medoid, swapping one end of the current diameter
  (removing any other input cannot shrink it) with one of the f inputs left out while the diameter
  decreases, at most `local_search_rounds` rounds. The result is a local minimum: its diameter is
  never below the exact one, and it can be above it.

  .. warning::
    Published code differs on what happens beyond the exact range (exhaustive search regardless,
    or another heuristic); here the switch is explicit through `max_subsets`.

  Cost: one n × n × d Gram product and one weighted pass over the stack; plus, exact, C(n, f)
  subsets × (n − f)²; the approximation costs O(f (n − f)²) per round (timings in
  BENCHMARKS.md).

  Non-finite inputs (NaN / ±Inf, or a rescaled square that overflows) are at +inf distance, so
  with at most f of them the chosen subset (exact or approximate) holds none; with more, every
  subset holds one and the output is NaN.

  Args:
    stack: a pytree stack (leading worker axis n) or an (n, d) array.
    f: the declared number of Byzantine inputs (static).
    max_subsets: the largest C(n, f) searched exactly (static); None (default) for the measured
      limits above; an int lifts the work budget (the caller accepts the cost).
    local_search_rounds: the most swap rounds of the approximation (static); default n.
    ties: the exact search's tie rule (static): `'left_out'` or `'kept'` (ByzFL's), see `TIES`.

  Returns:
    One tree like a slice of the stack.

  Raises:
    ValueError: f < 0, 2f ≥ n, non-positive counts, an empty stack or mismatched leading axes;
      the message names the rule.

  References:
    El Mhamdi, Guerraoui, Guirguis, Hoang, Rouault, "Genuinely Distributed Byzantine Machine
    Learning", PODC 2020.
  """
  return _subset_rule(
    'mda',
    stack,
    f,
    max_subsets,
    local_search_rounds,
    ties,
    _diameter,
    _diameter_out_candidates,
    None,
  )


@register(
  'smea',
  properties=Properties(distance_based=True, exponential=True),
)
@functools.partial(jax.jit, static_argnames=_STATIC)
def smea(
  stack,
  *,
  f: int,
  max_subsets: int | None = None,
  local_search_rounds: int | None = None,
  ties: str = 'left_out',
):
  """Smallest maximum eigenvalue averager: the mean of the (n − f)-subset of least top variance.

  SMEA_f(x) = x̄_{S*}, S* = argmin_{|S| = n − f} λ_max((1/|S|) Σ_{i∈S} (x_i − x̄_S)(x_i − x̄_S)ᵀ)
  (ties: as in `mda`, by `ties`). The top eigenvalue is
  that of the subset's centred Gram matrix −½ J D_S J (over |S|), computed with a batched
  `eigvalsh` of (n − f) × (n − f) matrices: no d × d covariance is ever formed.

  Exact when C(n, f) ≤ `max_subsets` (default: C(n, f) ≤ 1e5 and C(n, f) · (n − f)³ ≤ 3e8, about
  a second on a 2-core CPU). Beyond, an approximation (a Python warning says so at trace
  time): local search from the n − f inputs nearest the medoid. Each round considers swapping one
  of the two inputs with the largest weight in the top principal direction with one of the f
  inputs left out; the 2f candidates are ranked by 20 steps of power iteration warm-started from
  the current top eigenvector, and the best one is accepted only if its exact top eigenvalue is
  lower; at most `local_search_rounds` rounds, stopping at the first round without improvement.
  The result is a local minimum, never below the exact optimum.

  Cost: one n × n × d Gram product and one weighted pass; plus, exact, C(n, f) eigenvalue problems
  of size n − f (O((n − f)³) each); the approximation costs two (n − f)-sized eigenproblems and
  O(f (n − f)²) per round (timings in BENCHMARKS.md).

  Args:
    stack: a pytree stack (leading worker axis n) or an (n, d) array.
    f: the declared number of Byzantine inputs (static).
    max_subsets: the largest C(n, f) searched exactly (static); None (default) for the measured
      limits above; an int lifts the work budget (the caller accepts the cost).
    local_search_rounds: the most swap rounds of the approximation (static); default n.
    ties: the exact search's tie rule (static): `'left_out'` or `'kept'` (ByzFL's), see `TIES`.

  Returns:
    One tree like a slice of the stack.

  Raises:
    ValueError: f < 0, 2f ≥ n, non-positive counts, an empty stack or mismatched leading axes;
      the message names the rule.

  References:
    Allouah et al., "Fixing by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity",
    AISTATS 2023.
  """
  return _subset_rule(
    'smea',
    stack,
    f,
    max_subsets,
    local_search_rounds,
    ties,
    _top_eig,
    _eig_out_candidates,
    _eig_screen,
  )
