"""Byzantine attacks: `attack(honest_stack, *, f, key=None, **params) -> byzantine_stack`.

An attack takes the stack of the n_h honest inputs (a pytree whose leaves share a leading worker
axis, or an (n_h, d) array) and returns the f Byzantine inputs: a stack with the same pytree
structure, leaf shapes and dtypes, and a leading axis of size f. The server then sees
n = n_h + f inputs; `assemble` builds that full stack with the Byzantine slices in given or
random positions. Attacks are omniscient (they see every honest input); randomness comes only from
an explicit `jax.random` key. Look an attack up by name with `get(name)`; `names()` lists them.

μ and σ below are the coordinate-wise mean and standard deviation of the honest inputs. They are
computed with matvecs over the worker axis (`robustjax.stack.weighted_sum`): on XLA:CPU a
reduction `x.mean(0)` over the worker axis is about 100× slower than `ones(n) @ x`.

Registered attacks (all f slices identical unless noted):

- ``sign_flip``: −μ; ``variant='negate'``: slice j is −y_j (each Byzantine worker negates its own).
- ``alie``: μ − z·σ, z from (n, f) by one of three conventions (Baruch et al., NeurIPS 2019).
- ``ipm``: −ε·μ (Xie, Koyejo, Gupta, UAI 2019).
- ``mimic``: a copy of honest input ``index`` (Karimireddy, He, Jaggi, ICLR 2022).
- ``gaussian``: N(mean, std²) per coordinate, independent slices.
- ``inf`` / ``nan``: every entry +inf (or ``value``) / NaN (bad-input tests).
- ``min_max`` / ``min_sum``: μ + γ·p with γ the largest value meeting a distance constraint
  (Shejwalkar & Houmansadr, NDSS 2021).
- ``optimal_alie`` / ``optimal_ipm``: μ − τ·σ / −τ·μ with τ maximising the defender's error
  (Allouah et al., AISTATS 2023), candidates evaluated together with ``vmap``.

Stateful and data-level attacks (not in the registry, since their signature differs):
`mimic_heuristic_init` / `mimic_heuristic` (the mimic variant that tracks a direction during a
warm-up, with explicit state), and the label maps `flip_labels` / `permute_labels`.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from robustjax import attacks
  >>> honest = jax.random.normal(jax.random.key(0), (10, 5))
  >>> byz = attacks.get('alie')(honest, f=3)            # (3, 5)
  >>> full = attacks.assemble(honest, byz, key=jax.random.key(1))
  >>> full.stack.shape, full.honest_mask.sum()
  ((13, 5), Array(10, dtype=int32))
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from robustjax import preaggregators
from robustjax._checks import check_positive_int, num_workers
from robustjax._registry import Registry
from robustjax.stack import flatten, pairwise_sq_dists, sq_dists_to, tree_index, weighted_sum

__all__ = [
  'REGISTRY',
  'register',
  'get',
  'names',
  'sign_flip',
  'alie',
  'alie_z',
  'ipm',
  'mimic',
  'MimicState',
  'mimic_heuristic_init',
  'mimic_heuristic',
  'gaussian',
  'inf',
  'nan',
  'min_max',
  'min_sum',
  'optimal_alie',
  'optimal_ipm',
  'orthogonally_equivariant',
  'flip_labels',
  'label_permutation',
  'permute_labels',
  'Assembled',
  'assemble',
]

REGISTRY = Registry('attack')
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Helpers: validation, honest statistics, repetition.


def _check_attack(rule: str, honest, f) -> int:
  """Validates the honest stack and f >= 1; returns n_h."""
  n_h = num_workers(honest, rule)
  if not isinstance(f, int) or isinstance(f, bool):
    raise ValueError(f'{rule}: f must be a Python int (a static argument); got {f!r}')
  if f < 1:
    raise ValueError(
      f'{rule}: f must be >= 1 (the number of Byzantine inputs to produce); got f={f}'
    )
  return n_h


def _check_float(rule: str, name: str, value, *, positive=False, nonneg=False) -> None:
  """Validates a float parameter when it is concrete (traced values pass through)."""
  if isinstance(value, jax.core.Tracer):
    return
  try:
    v = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise ValueError(f'{rule}: {name} must be a number; got {value!r}') from None
  if v.ndim != 0:
    raise ValueError(f'{rule}: {name} must be a scalar; got shape {v.shape}')
  if not np.isfinite(v):
    raise ValueError(f'{rule}: {name} must be finite; got {value!r}')
  if positive and not v > 0:
    raise ValueError(f'{rule}: {name} must be > 0; got {value!r}')
  if nonneg and not v >= 0:
    raise ValueError(f'{rule}: {name} must be >= 0; got {value!r}')


def _acc(x) -> jax.Array:
  """A leaf in its accumulation dtype (float32 at least)."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize >= 4:
    return x
  return x.astype(jnp.float32)


def _upcast(tree):
  return jax.tree.map(_acc, tree)


def _mean(honest):
  """μ: the coordinate-wise mean of the honest inputs (a matvec per leaf), accumulation dtype."""
  n_h = num_workers(honest, 'mean')
  w = jnp.full((n_h,), 1.0 / n_h, jnp.float32)
  return weighted_sum(w, _upcast(honest), ignore_nonfinite=False)


def _std(honest, mu, ddof: int):
  """σ: the coordinate-wise standard deviation (centred second moment, a matvec per leaf)."""
  n_h = num_workers(honest, 'std')
  if n_h - ddof < 1:
    raise ValueError(f'std: needs more than ddof={ddof} honest inputs; got {n_h}')
  sq = jax.tree.map(lambda x, m: jnp.square(_acc(x) - m[None]), honest, mu)
  w = jnp.full((n_h,), 1.0 / (n_h - ddof), jnp.float32)
  return jax.tree.map(jnp.sqrt, weighted_sum(w, sq, ignore_nonfinite=False))


def _tree_vdot(a, b) -> jax.Array:
  """Σ over leaves of ⟨a, b⟩ (trees without a worker axis)."""
  parts = [
    jnp.vdot(_acc(x).ravel(), _acc(y).ravel())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  ]
  return functools.reduce(jnp.add, parts)


def _stack_dot(stack, point) -> jax.Array:
  """(n,) inner products ⟨x_i, point⟩, a matvec per leaf summed over leaves."""
  parts = []
  for x, p in zip(jax.tree.leaves(stack), jax.tree.leaves(point)):
    xm = _acc(x).reshape(x.shape[0], -1)
    parts.append(jnp.matmul(xm, _acc(p).reshape(-1).astype(xm.dtype), precision=_HIGHEST))
  return functools.reduce(jnp.add, parts)


def _axpy(a, x, y):
  """a·x + y leaf by leaf."""
  return jax.tree.map(lambda u, v: a * u + v, x, y)


def _repeat(point, f: int, like):
  """f copies of `point` (a tree without the worker axis) in the dtypes of the stack `like`."""
  return jax.tree.map(
    lambda p, x: jnp.broadcast_to(jnp.asarray(p).astype(x.dtype)[None], (f,) + x.shape[1:]),
    point,
    like,
  )


def _cast_like(stack, like):
  return jax.tree.map(lambda x, l: jnp.asarray(x).astype(l.dtype), stack, like)


# ----------------------------------------------------------------------------------------------
# Simple attacks.


@register('sign_flip')
def sign_flip(honest, *, f: int, key=None, variant: str = 'mean', own=None):
  """Sign flipping: every Byzantine input is −μ (or each Byzantine worker negates its own input).

  Args:
    honest: the honest stack (n_h slices).
    f: the number of Byzantine inputs to produce (>= 1).
    key: unused (deterministic attack).
    variant: ``'mean'`` (default): all f slices are −μ, the negated honest mean.
      ``'negate'``: slice j is −y_j, where y is `own` (the f Byzantine workers' own honestly
      computed inputs) or, when `own` is None, the first f honest slices.
    own: optional stack of f slices, the Byzantine workers' own honest inputs (``'negate'``).

  Returns:
    A stack of f slices with the honest stack's structure and dtypes.

  Raises:
    ValueError: f < 1, an unknown variant, or ``'negate'`` without enough slices.

  References:
    Allen-Zhu, Ebrahimian, Li, Alistarh, "Byzantine-resilient non-convex SGD", ICLR 2021;
    Karimireddy, He, Jaggi, "Learning from history for Byzantine robust optimization", ICML 2021.
  """
  n_h = _check_attack('sign_flip', honest, f)
  if variant == 'mean':
    return _repeat(jax.tree.map(jnp.negative, _mean(honest)), f, honest)
  if variant == 'negate':
    src = honest if own is None else own
    m = num_workers(src, 'sign_flip')
    if m < f:
      what = 'own' if own is not None else 'the honest stack'
      raise ValueError(f"sign_flip: variant='negate' needs f={f} slices in {what}; got {m}")
    del n_h
    return _cast_like(jax.tree.map(lambda x: -jnp.asarray(x)[:f], src), honest)
  raise ValueError(f"sign_flip: variant must be 'mean' or 'negate'; got {variant!r}")


_ALIE_VARIANTS = ('paper', 'karimireddy', 'byzfl')


def alie_z(n: int, f: int, variant: str = 'paper', tau: float = 1.5) -> jax.Array:
  """ALIE's scale z (the Byzantine input is μ − z·σ).

  With s = ⌊n/2 + 1⌋ − f (the number of honest inputs the attacker needs on its side):

  - ``'paper'`` (Baruch et al. 2019): z = Φ⁻¹((n − s)/n);
  - ``'karimireddy'`` (code of Karimireddy, He, Jaggi 2021/2022): z = Φ⁻¹((n − f − s)/(n − f));
  - ``'byzfl'`` (ByzFL's fixed factor): z = −τ, i.e. the input is μ + τ·σ.

  Φ⁻¹ is `jax.scipy.special.ndtri`. n is the total number of workers (honest + Byzantine).

  Raises:
    ValueError: if s < 1 (f too large for the formula: the cdf argument reaches 1) or the cdf
      argument is not in (0, 1), or an unknown variant.
  """
  check_positive_int('alie', 'n', n)
  check_positive_int('alie', 'f', f)
  if variant not in _ALIE_VARIANTS:
    raise ValueError(f'alie: variant must be one of {_ALIE_VARIANTS}; got {variant!r}')
  if variant == 'byzfl':
    _check_float('alie', 'tau', tau)
    return -jnp.asarray(tau, jnp.float32)
  if f >= n:
    raise ValueError(f'alie: needs f < n; got n={n}, f={f}')
  s = math.floor(n / 2 + 1) - f
  if s < 1:
    raise ValueError(
      f'alie: s = floor(n/2 + 1) - f must be >= 1 (f too large for the {variant!r} z rule); '
      f'got n={n}, f={f}, s={s}'
    )
  p = (n - s) / n if variant == 'paper' else (n - f - s) / (n - f)
  if not 0.0 < p < 1.0:
    raise ValueError(f'alie: the cdf argument must be in (0, 1); got {p} for n={n}, f={f}')
  return jax.scipy.special.ndtri(jnp.asarray(p, jnp.float32))


@register('alie')
def alie(
  honest,
  *,
  f: int,
  key=None,
  variant: str = 'paper',
  tau: float = 1.5,
  ddof: int = 0,
  n: int | None = None,
):
  """A Little Is Enough: every Byzantine input is μ − z·σ.

  .. warning::
    Implementations differ in z, in its sign and in σ. ``variant='paper'`` (default) uses
    Baruch et al.'s z = Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − f; ``'karimireddy'`` the cdf
    (n − f − s)/(n − f) of Karimireddy et al.'s code; ``'byzfl'`` ByzFL's fixed μ + τ·σ (τ = 1.5).
    σ uses ``ddof`` (default 0, the population standard deviation; the published PyTorch codes use
    ``torch.std`` / ``var(ddof=1)``, i.e. ``ddof=1``).

  Args:
    honest: the honest stack (n_h slices).
    f: the number of Byzantine inputs (>= 1).
    key: unused.
    variant: ``'paper'``, ``'karimireddy'`` or ``'byzfl'`` (see `alie_z`).
    tau: the fixed factor of ``'byzfl'``.
    ddof: delta degrees of freedom of σ (0 or 1).
    n: the total number of workers in z's formula; default n_h + f.

  Returns:
    A stack of f identical slices. Cost: two streaming passes over the honest stack.

  Raises:
    ValueError: f < 1, f too large for the z rule (s < 1), unknown variant, bad ddof.

  References:
    Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses For Distributed
    Learning", NeurIPS 2019.
  """
  n_h = _check_attack('alie', honest, f)
  if ddof not in (0, 1):
    raise ValueError(f'alie: ddof must be 0 or 1; got {ddof!r}')
  total = n_h + f if n is None else n
  z = alie_z(total, f, variant, tau)
  mu = _mean(honest)
  sigma = _std(honest, mu, ddof)
  return _repeat(_axpy(-z, sigma, mu), f, honest)


@register('ipm')
def ipm(honest, *, f: int, key=None, eps=0.1):
  """Inner product manipulation (fall of empires): every Byzantine input is −ε·μ.

  ε = 0.1 (default) targets medians / Krum, ε > 1 the mean (Xie et al.). ByzFL calls ε "tau"
  (default 2.0).

  Args:
    honest: the honest stack.
    f: the number of Byzantine inputs (>= 1).
    key: unused.
    eps: the factor ε (> 0 when concrete; a traced value is accepted).

  References:
    Xie, Koyejo, Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
    Manipulation", UAI 2019.
  """
  _check_attack('ipm', honest, f)
  _check_float('ipm', 'eps', eps, positive=True)
  mu = _mean(honest)
  return _repeat(jax.tree.map(lambda m: -eps * m, mu), f, honest)


@register('mimic')
def mimic(honest, *, f: int, key=None, index: int = 0):
  """Mimic: every Byzantine input copies honest input `index` (over-weighting one worker).

  For the heuristic that chooses the copied worker during a warm-up, see `mimic_heuristic`.

  References:
    Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing",
    ICLR 2022.
  """
  n_h = _check_attack('mimic', honest, f)
  if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
    if not isinstance(index, jax.Array):
      raise ValueError(f'mimic: index must be an int; got {index!r}')
  elif not 0 <= index < n_h:
    raise ValueError(f'mimic: index must be in [0, n_h={n_h}); got {index}')
  return _repeat(tree_index(honest, index), f, honest)


class MimicState(NamedTuple):
  """The explicit state of `mimic_heuristic`.

  Attributes:
    step: int32 scalar, the number of rounds seen.
    mu: the running mean of the honest means (a tree, no worker axis, float32).
    z: the tracked unit direction (a tree like `mu`).
    target: int32 scalar, the honest index copied (fixed once ``step >= warmup``).
  """

  step: jax.Array
  mu: Any
  z: Any
  target: jax.Array


def mimic_heuristic_init(honest, *, key) -> MimicState:
  """The initial state of `mimic_heuristic`: z drawn N(0, I) from `key` (Karimireddy et al.'s code
  seeds a fixed generator; here the key makes it explicit). `honest` gives shapes only."""
  num_workers(honest, 'mimic_heuristic')
  if key is None:
    raise ValueError('mimic_heuristic_init: needs a key (z starts as a random direction)')
  leaves, treedef = jax.tree.flatten(honest)
  keys = jax.random.split(key, len(leaves))
  z = [jax.random.normal(k, x.shape[1:], _acc(x[:1]).dtype) for k, x in zip(keys, leaves)]
  mu = [jnp.zeros(x.shape[1:], _acc(x[:1]).dtype) for x in leaves]
  return MimicState(
    step=jnp.zeros((), jnp.int32),
    mu=jax.tree.unflatten(treedef, mu),
    z=jax.tree.unflatten(treedef, z),
    target=jnp.zeros((), jnp.int32),
  )


def _tree_normalize(t):
  nrm = jnp.sqrt(_tree_vdot(t, t))
  return jax.tree.map(lambda x: x / jnp.where(nrm > 0, nrm, 1.0), t)


def mimic_heuristic(honest, state: MimicState, *, f: int, warmup: int, argmax: bool = True):
  """Mimic, heuristic variant: track the top direction of honest heterogeneity, then copy.

  During the first `warmup` rounds (state.step < warmup), with t = state.step and x̄ this round's
  honest mean:
    μ ← t/(t+1)·μ + x̄/(t+1);  c = Σ_i ⟨x_i − μ, z⟩ (x_i − μ);  z ← t/(t+1)·z + c/‖c‖/(t+1);
    z ← z/‖z‖;  target ← argmax_i ⟨x_i, z⟩ (argmin if ``argmax=False``),
  and the Byzantine inputs copy this round's target. Afterwards the target is fixed and copied.
  This follows Karimireddy et al.'s code (`MimicVariantAttacker`); its state is explicit, so the
  function is pure and jittable (`f`, `warmup`, `argmax` static).

  Args:
    honest: the honest stack of this round.
    state: from `mimic_heuristic_init` or the previous call.
    f: the number of Byzantine inputs (>= 1).
    warmup: the number of warm-up rounds (>= 1).
    argmax: copy the input most (True) or least (False) aligned with z.

  Returns:
    (byzantine stack of f slices, new state).

  Cost: during warm-up four streaming passes (two matvecs, a weighted sum, a copy), then a copy.

  References:
    Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing",
    ICLR 2022 (the mimic attack and its variant).
  """
  n_h = _check_attack('mimic_heuristic', honest, f)
  check_positive_int('mimic_heuristic', 'warmup', warmup)

  def warm(st):
    t = st.step.astype(jnp.float32)
    xbar = _mean(honest)
    mu = jax.tree.map(lambda m, x: t / (t + 1) * m + x / (t + 1), st.mu, xbar)
    w = _stack_dot(honest, st.z) - _tree_vdot(mu, st.z)  # ⟨x_i − μ, z⟩
    c = weighted_sum(w, _upcast(honest), ignore_nonfinite=False)
    c = jax.tree.map(lambda ci, m: ci - jnp.sum(w) * m, c, mu)
    z = jax.tree.map(lambda zi, ci: t / (t + 1) * zi + ci / (t + 1), st.z, _tree_normalize(c))
    z = _tree_normalize(z)
    scores = _stack_dot(honest, z)
    target = jnp.argmax(scores) if argmax else jnp.argmin(scores)
    return MimicState(st.step, mu, z, target.astype(jnp.int32))

  new = jax.lax.cond(state.step < warmup, warm, lambda st: st, state)
  new = new._replace(step=state.step + 1)
  del n_h
  return _repeat(tree_index(honest, new.target), f, honest), new


@register('gaussian')
def gaussian(honest, *, f: int, key=None, mean=0.0, std=1.0):
  """Gaussian noise: each entry of each Byzantine input is drawn from N(mean, std²), independently.

  Args:
    honest: the honest stack (gives shapes and dtypes).
    f: the number of Byzantine inputs (>= 1).
    key: required; the draws are reproducible from it.
    mean, std: the distribution (ByzFL's defaults 0 and 1).
  """
  _check_attack('gaussian', honest, f)
  if key is None:
    raise ValueError('gaussian: needs a key')
  _check_float('gaussian', 'mean', mean)
  _check_float('gaussian', 'std', std, nonneg=True)
  leaves, treedef = jax.tree.flatten(honest)
  keys = jax.random.split(key, len(leaves))
  out = [
    (mean + std * jax.random.normal(k, (f,) + x.shape[1:], _acc(x[:1]).dtype)).astype(x.dtype)
    for k, x in zip(keys, leaves)
  ]
  return jax.tree.unflatten(treedef, out)


def _fill(honest, f: int, value):
  return jax.tree.map(lambda x: jnp.full((f,) + x.shape[1:], value, x.dtype), honest)


@register('inf')
def inf(honest, *, f: int, key=None, value=float('inf')):
  """Every entry of every Byzantine input is `value` (+inf by default; −inf or 1e38 also useful)."""
  _check_attack('inf', honest, f)
  return _fill(honest, f, value)


@register('nan')
def nan(honest, *, f: int, key=None):
  """Every entry of every Byzantine input is NaN."""
  _check_attack('nan', honest, f)
  return _fill(honest, f, float('nan'))


# ----------------------------------------------------------------------------------------------
# Min-max / min-sum (Shejwalkar & Houmansadr, NDSS 2021).

_DIRECTIONS = ('unit', 'std', 'sign')


def _perturbation(rule, direction, mu, honest):
  if direction == 'unit':
    nrm = jnp.sqrt(_tree_vdot(mu, mu))
    return jax.tree.map(lambda m: -m / jnp.where(nrm > 0, nrm, 1.0), mu)
  if direction == 'std':
    return jax.tree.map(jnp.negative, _std(honest, mu, 0))
  if direction == 'sign':
    return jax.tree.map(lambda m: -jnp.sign(m), mu)
  raise ValueError(f'{rule}: direction must be one of {_DIRECTIONS}; got {direction!r}')


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
  if direction not in _DIRECTIONS:
    raise ValueError(f'{rule}: direction must be one of {_DIRECTIONS}; got {direction!r}')
  mu = _mean(honest)
  p = _perturbation(rule, direction, mu, honest)
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


# ----------------------------------------------------------------------------------------------
# Optimal ALIE / IPM against the real defender.


def _takes_f(fn) -> bool:
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return True
  return 'f' in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _deviation(out, mu) -> jax.Array:
  """‖out − μ‖ summed over leaves; a non-finite output counts as +inf (the defender broke)."""
  parts = [
    jnp.sum(jnp.square(_acc(o) - m)) for o, m in zip(jax.tree.leaves(out), jax.tree.leaves(mu))
  ]
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


# Registered rules with F(Qx) = Q F(x) for every orthogonal Q (distances, norms and weighted
# means of the inputs only): the rules `subspace=None` reduces automatically.
_ORTHOGONAL_EQUIVARIANT = frozenset({'mean', 'krum', 'multikrum', 'nnm', 'bucketing', 'clipping'})


def _span_worthwhile(rule) -> bool:
  """Equivariant and with a distance-based stage (cheap rules gain less than the QR costs)."""
  return orthogonally_equivariant(rule) and any(
    stage.name in ('krum', 'multikrum', 'nnm') for stage in rule.stages
  )


def orthogonally_equivariant(rule) -> bool:
  """Whether `rule` is known to satisfy F(Qx) = Q F(x) for every orthogonal Q.

  True for a `Pipeline` made only of the registered mean, krum, multikrum, nnm, bucketing and
  clipping (rules that use only distances, norms and weighted means of their inputs); False for
  anything else, including user callables (which may still be equivariant: pass
  ``subspace=True`` to the optimal attacks yourself).
  """
  if not isinstance(rule, preaggregators.Pipeline):
    return False
  from robustjax import aggregators

  for stage in rule.stages:
    reg = preaggregators.REGISTRY if stage is not rule.stages[-1] else aggregators.REGISTRY
    if stage.name not in _ORTHOGONAL_EQUIVARIANT or stage.name not in reg:
      return False
    if reg.get(stage.name) is not stage.fn:
      return False
  return True


def _map(fn, xs, batch_size):
  if batch_size is None:
    return jax.vmap(fn)(xs)
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


@functools.partial(
  jax.jit,
  static_argnames=(
    'kind',
    'f',
    'rule',
    'num_scales',
    'num_refine',
    'refine_rounds',
    'batch_size',
    'return_scale',
    'ddof',
    'subspace',
  ),
)
def _optimal_jit(
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
  subspace,
):
  if isinstance(rule, preaggregators.Pipeline):
    defender = lambda s, k: rule(s, k)
  else:  # a plain callable (stack, key=None) -> tree
    defender = lambda s, k: rule(s) if k is None else rule(s, key=k)
  mu = _mean(honest)
  if kind == 'alie':
    base, direction = mu, jax.tree.map(jnp.negative, _std(honest, mu, ddof))
  else:
    base, direction = jax.tree.map(jnp.zeros_like, mu), jax.tree.map(jnp.negative, mu)
  if scales is None:
    scales = jnp.linspace(0.0, 1.0, num_scales, dtype=jnp.float32) * max_scale
  if subspace:
    evaluate = _line_evaluator(*_span_coordinates(honest, base, direction), defender, f, key)
  else:
    evaluate = _line_evaluator(honest, base, direction, defender, f, key)
  tau, _ = _search(evaluate, scales, num_refine, refine_rounds, batch_size)
  out = _repeat(_axpy(tau, direction, base), f, honest)
  return (out, tau) if return_scale else out


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
  ddof=0,
):
  n_h = _check_attack(name, honest, f)
  if f >= n_h:
    raise ValueError(
      f'{name}: needs fewer Byzantine than honest inputs (n > 2f); got n_h={n_h}, f={f}'
    )
  check_positive_int(name, 'num_scales', num_scales, minimum=2)
  check_positive_int(name, 'num_refine', num_refine)
  check_positive_int(name, 'refine_rounds', refine_rounds, minimum=0)
  if batch_size is not None:
    check_positive_int(name, 'batch_size', batch_size)
  if isinstance(rule, preaggregators.Pipeline) and defender_f is None:
    pipeline = rule
  elif callable(rule) and not isinstance(rule, preaggregators.Pipeline) and not _takes_f(rule):
    pipeline = rule
  else:
    pipeline = preaggregators.as_rule(rule, f if defender_f is None else defender_f)
  dim = sum(int(np.prod(np.shape(x)[1:])) for x in jax.tree.leaves(honest))
  if subspace is None:
    subspace = dim > n_h + 2 and _span_worthwhile(pipeline)
  elif subspace not in (True, False):
    raise ValueError(f'{name}: subspace must be None, True or False; got {subspace!r}')
  if scales is None:
    _check_float(name, 'max_scale', max_scale, positive=True)
  else:
    scales = jnp.asarray(scales, jnp.float32)
    if scales.ndim != 1 or scales.shape[0] < 2:
      raise ValueError(
        f'{name}: scales must be a 1-d array of >= 2 values; got shape {scales.shape}'
      )
    num_scales = int(scales.shape[0])
  return _optimal_jit(
    honest,
    key,
    scales,
    jnp.asarray(max_scale, jnp.float32),
    kind=name.removeprefix('optimal_'),
    f=f,
    rule=pipeline,
    num_scales=num_scales,
    num_refine=num_refine,
    refine_rounds=refine_rounds,
    batch_size=batch_size,
    return_scale=return_scale,
    ddof=ddof,
    subspace=bool(subspace),
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
    rule: the defender, anything `robustjax.preaggregators.as_rule` accepts: a registered
      aggregator name, a `(name, params)` pair, a `Pipeline` (pre-aggregators + aggregator, e.g.
      `compose('krum', pre=['nnm'], f=f)`), an aggregator function `rule(stack, *, f, ...)`, or
      any callable `(stack, key=None) -> tree` (a callable without an `f` parameter is not
      given f).
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
      clipping, ...; *not* coordinate-wise rules such as median or trimmed mean). None (default)
      turns it on when d > n_h + 2 for a Pipeline made only of the registered rules
      mean / krum / multikrum / nnm / bucketing / clipping with at least one of krum / multikrum /
      nnm (for cheaper defenders the QR costs more than it saves); True forces it (your
      responsibility), False turns it off. On CPU the QR runs in LAPACK (OpenBLAS): on a busy
      machine set ``OPENBLAS_NUM_THREADS=1`` (measured: 30 ms instead of 0.1-1.2 s at
      d = 1e5, n_h = 52).

  Returns:
    A stack of f identical slices (and τ if `return_scale`).

  Raises:
    ValueError: f < 1, f >= n_h, bad counts; the defender's own checks (e.g. Krum's n > 2f + 2).
"""


@register('optimal_alie')
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
    ddof,
  )


optimal_alie.__doc__ = (
  """Optimal ALIE: μ − τ·σ with the scale τ >= 0 that maximises the defender's error.
"""
  + _OPT_DOC
  + """
  References:
    Baruch et al., NeurIPS 2019 (ALIE); Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan,
    "Fixing by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity", AISTATS 2023.
"""
)


@register('optimal_ipm')
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


# ----------------------------------------------------------------------------------------------
# Label flipping (data level).


def _check_classes(rule, num_classes):
  if (
    not isinstance(num_classes, (int, np.integer))
    or isinstance(num_classes, bool)
    or num_classes < 2
  ):
    raise ValueError(f'{rule}: num_classes must be an int >= 2; got {num_classes!r}')


def flip_labels(labels, num_classes: int):
  """Label flipping: y ↦ (C − 1) − y. Byzantine workers compute honest gradients on these labels.

  References:
    Allen-Zhu et al., ICLR 2021; Allouah et al., AISTATS 2023 (the "LF" attack).
  """
  _check_classes('flip_labels', num_classes)
  labels = jnp.asarray(labels)
  return (num_classes - 1 - labels).astype(labels.dtype)


def label_permutation(num_classes: int, *, key) -> jax.Array:
  """A random permutation π of the C labels, reproducible from `key` (a bijection, not
  necessarily without fixed points)."""
  _check_classes('label_permutation', num_classes)
  if key is None:
    raise ValueError('label_permutation: needs a key')
  return jax.random.permutation(key, num_classes).astype(jnp.int32)


def permute_labels(labels, num_classes: int, *, key):
  """Label flipping by a random permutation: y ↦ π(y), π = `label_permutation(C, key=key)`."""
  perm = label_permutation(num_classes, key=key)
  labels = jnp.asarray(labels)
  return perm[labels].astype(labels.dtype)


# ----------------------------------------------------------------------------------------------
# The full stack the server sees.


class Assembled(NamedTuple):
  """The output of `assemble`.

  Attributes:
    stack: the full stack of n = n_h + f slices.
    positions: int32 (f,), where Byzantine slice j sits in `stack`.
    honest_mask: bool (n,), True at honest slices.
  """

  stack: Any
  positions: jax.Array
  honest_mask: jax.Array


def assemble(honest, byzantine, *, key=None, positions=None) -> Assembled:
  """Interleaves honest and Byzantine slices into the stack the server sees.

  Byzantine slice j goes to `positions[j]`; the honest slices fill the other positions in their
  order. With `key` (and no `positions`) the positions are f distinct indices drawn uniformly;
  with neither, the Byzantine slices come last. One gather over the stack; jittable (positions
  may be traced; concrete positions are validated).

  Args:
    honest: a stack of n_h slices.
    byzantine: a stack of f slices with the same structure (f may be 0).
    key: draws random positions.
    positions: f distinct ints in [0, n).

  Returns:
    An `Assembled(stack, positions, honest_mask)`.

  Raises:
    ValueError: mismatched structures, both key and positions, or invalid concrete positions.
  """
  n_h = num_workers(honest, 'assemble')
  if jax.tree.structure(honest) != jax.tree.structure(byzantine):
    raise ValueError('assemble: honest and byzantine stacks must have the same pytree structure')
  leaves_b = jax.tree.leaves(byzantine)
  f = int(leaves_b[0].shape[0]) if leaves_b and leaves_b[0].ndim else 0
  if f:
    num_workers(byzantine, 'assemble')
  n = n_h + f
  if key is not None and positions is not None:
    raise ValueError('assemble: pass key or positions, not both')
  if positions is None:
    if key is None:
      positions = jnp.arange(n_h, n, dtype=jnp.int32)
    else:
      positions = jnp.sort(jax.random.permutation(key, n)[:f]).astype(jnp.int32)
  else:
    if not isinstance(positions, jax.core.Tracer):
      p = np.asarray(positions)
      if p.shape != (f,):
        raise ValueError(f'assemble: positions must have shape ({f},); got {p.shape}')
      if f and (p.min() < 0 or p.max() >= n or len(np.unique(p)) != f):
        raise ValueError(f'assemble: positions must be {f} distinct ints in [0, {n}); got {p}')
    positions = jnp.asarray(positions, jnp.int32)
  is_byz = jnp.zeros((n,), bool).at[positions].set(True)
  slot = jnp.zeros((n,), jnp.int32).at[positions].set(jnp.arange(f, dtype=jnp.int32))
  honest_rank = jnp.cumsum(~is_byz) - 1
  src = jnp.where(is_byz, n_h + slot, honest_rank)
  full = jax.tree.map(
    lambda h, b: jnp.concatenate([jnp.asarray(h), jnp.asarray(b).astype(h.dtype)], axis=0)[src],
    honest,
    byzantine,
  )
  return Assembled(full, positions, ~is_byz)
