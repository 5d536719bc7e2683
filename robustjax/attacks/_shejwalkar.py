"""Min-max / min-sum (Shejwalkar & Houmansadr, NDSS 2021)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from robustjax._checks import check_choice
from robustjax.attacks._base import (
  _axpy,
  _check_attack,
  _check_float,
  _mean,
  _repeat,
  _stack_dot,
  _std,
  _tree_vdot,
  _upcast,
  register,
)
from robustjax.stack import pairwise_sq_dists, sq_dists_to

_DIRECTIONS = ('unit', 'std', 'sign')


def _perturbation(direction, mu, honest):
  if direction == 'unit':
    nrm = jnp.sqrt(_tree_vdot(mu, mu))
    return jax.tree.map(lambda m: -m / jnp.where(nrm > 0, nrm, 1.0), mu)
  if direction == 'std':
    return jax.tree.map(jnp.negative, _std(honest, mu, 0))
  return jax.tree.map(lambda m: -jnp.sign(m), mu)  # 'sign'


def _bisect_max(g, thr, hi, iters: int):
  """The largest γ in [0, hi] with g(γ) <= thr, g convex with g(0) <= thr, by bisection."""

  def body(_, lohi):
    lo, hi = lohi
    mid = 0.5 * (lo + hi)
    ok = g(mid) <= thr
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, iters, body, (jnp.zeros_like(hi), hi))
  return lo


def _shejwalkar(rule, honest, f, direction, tol, return_gamma, kind):
  _check_attack(rule, honest, f)
  _check_float(rule, 'tol', tol, positive=True)
  check_choice(rule, 'direction', direction, _DIRECTIONS)
  mu = _mean(honest)
  p = _perturbation(direction, mu, honest)
  # ‖μ + γp − x_i‖² = a_i − 2γ b_i + γ² c: one pass for a, one matvec for b, then O(n) per γ.
  a = sq_dists_to(_upcast(honest), mu)
  b = _stack_dot(honest, p) - _tree_vdot(mu, p)  # ⟨x_i − μ, p⟩
  c = _tree_vdot(p, p)
  d = pairwise_sq_dists(honest)
  if kind == 'max':
    thr = jnp.max(d)
    g = lambda gam: jnp.max(a - 2.0 * gam * b + gam * gam * c)
  else:
    thr = jnp.max(jnp.sum(d, axis=1))
    g = lambda gam: jnp.sum(a - 2.0 * gam * b + gam * gam * c)
  # Any single i violates the constraint once γ√c > √thr + √a_i: a bracket [0, hi].
  safe_c = jnp.where(c > 0, c, 1.0)
  hi = (jnp.sqrt(thr) + jnp.sqrt(jnp.min(a))) / jnp.sqrt(safe_c) * 1.01 + 1e-30
  iters = int(math.ceil(math.log2(1.0 / float(tol)))) + 1
  gamma = _bisect_max(g, thr, hi, iters)
  gamma = jnp.where((c > 0) & jnp.isfinite(gamma), gamma, 0.0)
  out = _repeat(_axpy(gamma, p, mu), f, honest)
  return (out, gamma) if return_gamma else out


@register('min_max')
def min_max(
  honest, *, f: int, key=None, direction: str = 'unit', tol=1e-6, return_gamma: bool = False
):
  """Min-max: μ + γ·p, γ the largest with max_i ‖μ + γp − x_i‖ <= max_{i,j} ‖x_i − x_j‖.

  The malicious input is never farther from any honest input than the two farthest honest inputs
  are from each other. p is ``'unit'`` −μ/‖μ‖ (default, the paper's code default), ``'std'`` −σ, or
  ``'sign'`` −sign(μ).

  .. warning::
    The paper's code searches γ from γ_init = 50 with a halving step until the step is below
    1e-5, which need not find the largest feasible γ. Here the constraint, convex in γ, is written
    as O(n) quadratics a_i − 2γ b_i + γ²c (one pass over the honest stack for the coefficients),
    and γ is found by bisection on a bracket [0, γ_hi] that provably contains the boundary: γ is
    the largest feasible value up to a relative tolerance `tol` of the bracket.

  Args:
    honest: the honest stack (n_h >= 2 slices).
    f: the number of Byzantine inputs (>= 1).
    key: unused.
    direction: ``'unit'``, ``'std'`` or ``'sign'``.
    tol: relative bisection tolerance (of the bracket).
    return_gamma: also return γ.

  Returns:
    A stack of f identical slices (and γ if `return_gamma`). Cost: the honest pairwise distances
    (one Gram product) plus three streaming passes.

  References:
    Shejwalkar, Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
    Defenses for Federated Learning", NDSS 2021.
  """
  return _shejwalkar('min_max', honest, f, direction, tol, return_gamma, 'max')


@register('min_sum')
def min_sum(
  honest, *, f: int, key=None, direction: str = 'unit', tol=1e-6, return_gamma: bool = False
):
  """Min-sum: μ + γ·p with γ the largest value such that
  Σ_i ‖μ + γp − x_i‖² <= max_i Σ_j ‖x_i − x_j‖².

  The malicious input's summed squared distance to the honest inputs stays within the largest
  honest one. Directions, bisection and cost as in `min_max` (see its warning).

  References:
    Shejwalkar, Houmansadr, NDSS 2021.
  """
  return _shejwalkar('min_sum', honest, f, direction, tol, return_gamma, 'sum')
