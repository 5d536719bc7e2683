"""Empirical robustness analysis: the (f, κ) ratio, an adversarial search for κ⋆, known bounds.

A rule F is (f, κ)-robust (Allouah et al., AISTATS 2023) if for every input x_1..x_n and every
S ⊂ [n] with |S| = n − f:

    ‖F(x) − x̄_S‖² ≤ κ · (1/|S|) Σ_{i∈S} ‖x_i − x̄_S‖².

κ⋆ (Bareilles, Bouaziz, Fageot, El Mhamdi, arXiv:2602.03899, 2026) is the smallest such κ: the
supremum of the ratio over all inputs and all S. No rule has κ⋆ < f/(n − 2f) (`lower_bound`).

This module measures κ⋆ from below: `estimate_kappa` searches for inputs (honest set S *and*
Byzantine inputs, and which positions S occupies) with a large ratio, and returns the best ratio
found together with the witness that reaches it, so the lower bound can be re-checked exactly with
`ratio(rule, witness.stack, witness.honest)`. `upper_bound` returns the proven upper bounds taken
from the papers; a measured κ̂ above a proven bound is a contradiction (a bug in the rule, or an
error in the bound).

Normalisation: the ratio is invariant under translation and scaling of all inputs for rules that
are translation and scale equivariant (every rule here except those with absolute thresholds, e.g.
the smoothing ν of the geometric median or the radius τ of centered clipping). The search therefore
works on inputs normalised so that the honest inputs have mean 0 and mean squared deviation 1; for
the non-equivariant rules κ̂ is the supremum *at that scale*.

Example:
  >>> import jax
  >>> from robustjax import robustness
  >>> est = robustness.estimate_kappa('median', n=10, f=3, dim=4, key=jax.random.key(0))
  >>> est.kappa >= robustness.lower_bound(10, 3)
  True
  >>> robustness.ratio('median', est.witness.stack, est.witness.honest) == est.kappa
  True

References:
  Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Fixing by Mixing: A Recipe for Optimal
  Byzantine ML under Heterogeneity", AISTATS 2023 (the definition, the lower bound f/(n − 2f), the
  upper bounds for CWTM, Krum, GM, CWMed and NNM ∘ F).
  Bareilles, Bouaziz, Fageot, El Mhamdi, "Byzantine Machine Learning: MultiKrum and an optimal
  notion of robustness", arXiv:2602.03899, 2026 (κ⋆; bounds for MultiKrum and Krum).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from robustjax import stack as _stack
from robustjax.pipeline import as_rule

__all__ = [
  'Witness',
  'KappaEstimate',
  'ratio',
  'ratios',
  'estimate_kappa',
  'estimate_kappas',
  'canonical_witnesses',
  'default_dim',
  'search_1d',
  'lower_bound',
  'upper_bound',
  'benchmark',
]


def _bind(rule, f: int) -> Callable:
  """`fn(stack) -> tree`: the rule resolved once by `robustjax.pipeline.as_rule` with f bound."""
  pipe = as_rule(rule, f)
  return lambda x: pipe(x)


# --------------------------------------------------------------------------------------------------
# The ratio.


def _honest_mask(honest_index, n: int) -> np.ndarray:
  idx = np.asarray(honest_index)
  if idx.dtype == bool:
    if idx.shape != (n,):
      raise ValueError(f'ratio: a boolean honest mask must have shape ({n},); got {idx.shape}')
    mask = idx.copy()
  else:
    idx = idx.astype(int).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
      raise ValueError(f'ratio: honest indices must lie in [0, {n}); got {idx.tolist()}')
    if len(set(idx.tolist())) != idx.size:
      raise ValueError('ratio: honest indices must be distinct')
    mask = np.zeros(n, bool)
    mask[idx] = True
  if mask.sum() == 0:
    raise ValueError('ratio: the honest set S is empty')
  return mask


def ratio(rule, stack, honest_index) -> float:
  """The (f, κ) ratio ‖F(x) − x̄_S‖² / ((1/|S|) Σ_{i∈S} ‖x_i − x̄_S‖²) of one input.

  f is n − |S|. The rule runs in JAX (in the stack's dtype); the mean, the variance and the ratio
  are then computed in float64 NumPy from the inputs and the rule's output. 0/0 is 0 (F returns the
  honest mean of identical honest inputs); x/0 with x > 0 is +inf.

  Args:
    rule: anything `robustjax.pipeline.as_rule` accepts.
    stack: a stack (a pytree with a leading worker axis n, or an (n, d) array).
    honest_index: the indices of S (|S| = n − f), or a boolean mask of shape (n,).

  Returns:
    The ratio, a Python float.

  Raises:
    ValueError: for a malformed honest set, or whatever the rule raises for an infeasible f.
  """
  n = _stack.num_workers(stack, 'ratio')
  mask = _honest_mask(honest_index, n)
  f = int(n - mask.sum())
  fn = _bind(rule, f)
  out = fn(stack)
  x = np.asarray(_stack.flatten(stack), dtype=np.float64)
  y = np.concatenate(
    [np.asarray(leaf, dtype=np.float64).reshape(-1) for leaf in jax.tree.leaves(out)]
  )
  return _ratio_np(x, y, mask)


def _ratio_np(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> float:
  xs = x[mask]
  mu = xs.mean(axis=0)
  var = float(np.mean(np.sum((xs - mu) ** 2, axis=1)))
  num = float(np.sum((y - mu) ** 2))
  if var == 0.0:
    return 0.0 if num == 0.0 else math.inf
  return num / var


def _ratio_core(fn, x, mask):
  """float32 ratio of one (n, d) input with a float mask (n,); used inside vmap."""
  w = mask.astype(x.dtype)
  h = jnp.sum(w)
  mu = (w @ x) / h
  dev = x - mu
  var = jnp.sum(w * jnp.sum(dev * dev, axis=1)) / h
  y = fn(x).reshape(-1)
  num = jnp.sum((y - mu) ** 2)
  r = jnp.where(var > 0, num / jnp.where(var > 0, var, 1.0), jnp.where(num > 0, jnp.inf, 0.0))
  return r


def ratios(rule, xs, masks, *, f: int | None = None) -> jax.Array:
  """The ratio of a batch of inputs xs (B, n, d) with honest masks (B, n), vmapped (float32).

  One compiled evaluation per (rule, f, shape), cached across calls.
  """
  masks = jnp.asarray(masks)
  if f is None:
    f = int(masks.shape[1] - int(np.asarray(masks[0]).sum()))
  return _default_evaluator((as_rule(rule, f),))(jnp.asarray(xs), masks)[:, 0]


# --------------------------------------------------------------------------------------------------
# Bounds.


def lower_bound(n: int, f: int) -> float:
  """f / (n − 2f): no aggregation rule is (f, κ)-robust with a smaller κ (Allouah et al. 2023).

  Witness: f inputs at +u, n − 2f at 0, f at −u; S is either side plus the middle.
  """
  if 2 * f >= n:
    return math.inf
  return f / (n - 2 * f)


def _r(n, f):
  return f / (n - 2 * f)


def upper_bound(rule, n: int, f: int) -> float | None:
  """The proven upper bound on κ⋆ of a rule for n inputs, or None where no proof is known.

  Composed from the bounds each stage declares (`robustjax.aggregators.Properties.kappa`, with
  its reference): e.g. NNM ∘ F is (f, (8f/(n − f))(κ_F + 1))-robust (Allouah et al. 2023).

  Args:
    rule: anything `robustjax.pipeline.as_rule` accepts (``'nnm+krum'``, ``('multikrum',
      {'m': 1})``, a Pipeline).
    n, f: the numbers of inputs and of Byzantine inputs.
  """
  return as_rule(rule, f).kappa_bound(n)


# --------------------------------------------------------------------------------------------------
# The search.


@dataclasses.dataclass(frozen=True)
class Witness:
  """An input reaching a ratio: `ratio(rule, stack, honest)` re-evaluates it exactly.

  Attributes:
    stack: (n, dim) float32 array, all the inputs (honest and Byzantine).
    honest: (n,) bool mask of S.
    family: which part of the search found it.
  """

  stack: np.ndarray
  honest: np.ndarray
  family: str

  def save(self, path: str, **extra) -> None:
    """Writes the witness (and `extra` arrays / scalars) to a `.npz` file."""
    np.savez(path, stack=self.stack, honest=self.honest, family=self.family, **extra)

  @classmethod
  def load(cls, path: str) -> Witness:
    z = np.load(path)
    return cls(stack=z['stack'], honest=z['honest'], family=str(z['family']))


@dataclasses.dataclass(frozen=True)
class KappaEstimate:
  """The result of `estimate_kappa`.

  Attributes:
    kappa: the best ratio found, re-evaluated with `ratio` on the witness: a certified lower bound
      on κ⋆ (up to the float32 arithmetic of the rule itself).
    witness: the input reaching it.
    evaluated: how many configurations the search evaluated.
    seconds: wall time of the search (compilation included).
    per_family: the best (float32, batched) ratio seen per search family.
    per_restart: the best (float32) ratio of each restart.
    dim: the dimension searched.
  """

  kappa: float
  witness: Witness
  evaluated: int
  seconds: float
  per_family: dict
  per_restart: tuple = ()
  dim: int = 0


_HONEST_FAMILIES = ('gaussian', 'anisotropic', 'collinear', 'two_clusters', 'three_groups')
_BYZ_FAMILIES = ('point', 'spread', 'copies', 'mirror', 'extreme_line')


def _normalise(x, mask):
  """Affine map making the honest rows mean 0, mean squared deviation 1 (x: (n, d))."""
  w = mask.astype(x.dtype)
  h = jnp.sum(w)
  mu = (w @ x) / h
  dev = x - mu
  var = jnp.sum(w * jnp.sum(dev * dev, axis=1)) / h
  scale = jnp.where(var > 1e-30, jax.lax.rsqrt(jnp.maximum(var, 1e-30)), 1.0)
  return dev * scale


def _unit(v):
  return v / jnp.maximum(jnp.linalg.norm(v), 1e-30)


def _one_config(key, n: int, f: int, dim: int, max_scale: float):
  """One random input from the structured families: (x (n, d), mask (n,), hf, bf)."""
  h = n - f
  ks = jax.random.split(key, 20)
  idx = jnp.arange(h)
  u = _unit(jax.random.normal(ks[0], (dim,)))
  v = _unit(jax.random.normal(ks[1], (dim,)))
  g = jax.random.normal(ks[2], (h, dim))
  # Honest candidates.
  aniso = g * jnp.exp(jax.random.uniform(ks[3], (dim,), minval=-5.0, maxval=1.0))
  c = jax.random.randint(ks[4], (), 1, max(h, 2))
  t = jax.random.normal(ks[5], (h,))
  two_point = (idx >= c).astype(jnp.float32)
  heavy = jnp.where(idx == 0, 10.0 ** jax.random.uniform(ks[6], (), minval=0.0, maxval=2.0), 0.0)
  which_line = jax.random.randint(ks[7], (), 0, 3)
  line = jnp.select([which_line == 0, which_line == 1], [t, two_point], heavy + 0.01 * t)
  collinear = line[:, None] * u + 1e-4 * g
  noise = 10.0 ** jax.random.uniform(ks[8], (), minval=-4.0, maxval=-0.5)
  clusters = jnp.where((idx >= c)[:, None], u, v * 0.0) + noise * g
  top = (idx >= h - max(f, 1)).astype(jnp.float32)
  three = top[:, None] * u + 1e-3 * noise * g
  hf = jax.random.randint(ks[9], (), 0, len(_HONEST_FAMILIES))
  honest = jnp.stack([g, aniso, collinear, clusters, three])[hf]
  # Byzantine candidates (built in the frame of the raw honest set, normalised with it below).
  mu = jnp.mean(honest, axis=0)
  spread = jnp.sqrt(jnp.mean(jnp.sum((honest - mu) ** 2, axis=1)) + 1e-30)
  kb = jax.random.split(ks[10], 8)
  r = spread * 10.0 ** jax.random.uniform(kb[0], (), minval=-2.0, maxval=math.log10(max_scale))
  w = _unit(jax.random.normal(kb[1], (dim,)))
  gz = jax.random.normal(kb[2], (f, dim))
  point = mu + r * w + 1e-4 * spread * gz
  spread_b = mu + r * w + r * 10.0 ** jax.random.uniform(kb[3], (), minval=-3.0, maxval=0.0) * gz
  pick = jax.random.randint(kb[4], (f,), 0, h)
  copies = (
    honest[pick] + spread * 10.0 ** jax.random.uniform(kb[5], (), minval=-7.0, maxval=-1.0) * gz
  )
  far = jnp.argmax(jnp.sum((honest - mu) ** 2, axis=1))
  a = 10.0 ** jax.random.uniform(kb[6], (), minval=-1.0, maxval=1.0)
  mirror = mu - a * (honest[far] - mu) + 1e-3 * spread * gz
  s = jnp.sign(jax.random.normal(kb[7], ())) * r / spread
  extreme = mu + s * (honest[far] - mu) + 1e-4 * spread * gz
  bf = jax.random.randint(ks[11], (), 0, len(_BYZ_FAMILIES))
  # The three-group witness wants its mirror image half the time.
  bf = jnp.where((hf == 4) & (jax.random.uniform(ks[12]) < 0.5), 3, bf)
  byz = jnp.stack([point, spread_b, copies, mirror, extreme])[bf]
  full = jnp.concatenate([honest, byz], axis=0)
  perm = jax.random.permutation(ks[13], n)
  x = full[perm]
  mask = perm < h
  return _normalise(x, mask), mask, hf, bf


@functools.partial(jax.jit, static_argnames=('n', 'f', 'dim', 'batch', 'max_scale'))
def _generate(key, *, n, f, dim, batch, max_scale):
  keys = jax.random.split(key, batch)
  return jax.vmap(lambda k: _one_config(k, n, f, dim, max_scale))(keys)


@functools.lru_cache(maxsize=256)
def _batched_attack(name: str, f: int):
  """The attack, vmapped over honest sets and jitted once per (name, f) (shapes cached by jit)."""
  from robustjax import attacks

  atk = attacks.get(name)
  return jax.jit(jax.vmap(lambda hs, k: atk(hs, f=f, key=k)))


def _attack_configs(key, n, f, dim, batch, scales):
  """Configurations from the attacks of `robustjax.attacks` at a grid of scales.

  For each attack: honest sets (Gaussian around an offset μ, |μ| from 0 to 10 honest spreads), the
  attack's f inputs b, and the vmapped grid of scales s giving μ_H + s·(b − μ_H). Returns a list of
  (name, x (B, n, d), mask (B, n)). Attacks that fail on plain arrays, need the rule, or return
  non-finite inputs are skipped.
  """
  try:
    from robustjax import attacks
  except ImportError:
    return []
  if f == 0:
    return []
  h = n - f
  g = len(scales)
  bh = max(1, batch // g)
  out = []
  k_h, k_o, k_a, k_p = jax.random.split(key, 4)
  honest = jax.random.normal(k_h, (bh, h, dim))
  radius = jnp.asarray([0.0, 1.0, 3.0, 10.0])[jnp.arange(bh) % 4]
  offs = radius[:, None] * jax.vmap(_unit)(jax.random.normal(k_o, (bh, dim)))
  honest = honest + offs[:, None, :]
  scales = jnp.asarray(scales, jnp.float32)
  perm = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(k_p, bh))
  for name in attacks.names('update'):
    if attacks.get(name).declared.needs_rule:  # non-finite attacks are skipped below
      continue
    try:
      keys = jax.random.split(jax.random.fold_in(k_a, zlib.crc32(name.encode()) % (2**31)), bh)
      byz = _batched_attack(name, f)(honest, keys)
      byz = jnp.asarray(byz)
      if byz.shape != (bh, f, dim) or not bool(jnp.all(jnp.isfinite(byz))):
        continue
    except Exception:  # noqa: BLE001  (an attack that does not apply here is skipped)
      continue
    mu = jnp.mean(honest, axis=1, keepdims=True)
    zs = mu[:, None] + scales[None, :, None, None] * (byz - mu)[:, None]  # (bh, g, f, d)
    hs = jnp.broadcast_to(honest[:, None], (bh, g, h, dim))
    full = jnp.concatenate([hs, zs], axis=2)  # (bh, g, n, d)
    x = jnp.take_along_axis(full, perm[:, None, :, None], axis=2).reshape(bh * g, n, dim)
    mask = jnp.broadcast_to((perm < h)[:, None, :], (bh, g, n)).reshape(bh * g, n)
    x = jax.vmap(_normalise)(x, mask)
    # Pad to the common batch so the evaluation is not recompiled.
    pad = batch - x.shape[0]
    if pad > 0:
      x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)])
      mask = jnp.concatenate([mask, jnp.repeat(mask[:1], pad, axis=0)])
    out.append((name, x, mask))
  return out


@functools.partial(jax.jit, static_argnames=('trusted',))
def _force_trusted(x, mask, trusted):
  """Swaps rows so that the positions `trusted` hold honest inputs (x: (B, n, d), mask: (B, n))."""

  def one(x, m):
    for t in trusted:
      # The first honest position that is not itself trusted, swapped with t if t is Byzantine.
      cand = m & ~jnp.isin(jnp.arange(m.shape[0]), jnp.asarray(trusted))
      j = jnp.argmax(cand)
      swap = ~m[t] & cand[j]
      perm = jnp.arange(m.shape[0])
      perm = jnp.where(swap, perm.at[t].set(j).at[j].set(t), perm)
      x, m = x[perm], m[perm]
    return x, m

  return jax.vmap(one)(x, mask)


_ATTACK_SCALES = tuple(
  [float(s) for s in -np.geomspace(1e-2, 1e2, 8)] + [float(s) for s in np.geomspace(1e-2, 1e2, 8)]
)


# --------------------------------------------------------------------------------------------------
# The canonical witnesses of the lower bound.


def canonical_witnesses(n: int, f: int, dim: int = 1, trusted: tuple = ()):
  """The configurations behind κ⋆ ≥ f/(n − 2f), each with both of its honest sets.

  f inputs at +e₁ (group P), n − 2f at 0 (group M), f at −e₁ (group Q); the honest set is P ∪ M
  or Q ∪ M. Both sets have mean ±(f/(n − f))·e₁ and mean squared deviation f(n − 2f)/(n − f)², so
  whatever F returns, ‖F − x̄_S‖² ≥ (f/(n − f))² for one of them: the larger of the two ratios is
  at least f/(n − 2f), for *every* rule. Three arrangements of the groups over the positions (the
  rule may break ties by index); trusted positions always hold M (honest in both sets).

  Returns:
    x (6, n, dim) float32 and mask (6, n) bool, or empty arrays when f = 0.
  """
  if f == 0 or 2 * f >= n:
    return np.zeros((0, n, dim), np.float32), np.zeros((0, n), bool)
  m = n - 2 * f
  arrangements = [['P'] * f + ['M'] * m + ['Q'] * f, ['M'] * m + ['P'] * f + ['Q'] * f]
  arrangements.append(['M'] * m + [g for pair in zip('P' * f, 'Q' * f) for g in pair])
  xs, masks = [], []
  for labels in arrangements:
    labels = list(labels)
    for t in trusted:  # a trusted position holds M: swap it with an untrusted M position
      if labels[t] != 'M':
        j = next(i for i, g in enumerate(labels) if g == 'M' and i not in trusted)
        labels[t], labels[j] = labels[j], labels[t]
    lab = np.array(labels)
    x = np.zeros((n, dim), np.float32)
    x[lab == 'P', 0] = 1.0
    x[lab == 'Q', 0] = -1.0
    for side in 'PQ':
      xs.append(x)
      masks.append((lab == 'M') | (lab == side))
  return np.stack(xs), np.stack(masks)


# --------------------------------------------------------------------------------------------------
# Parametrised structured families, with a vmapped line search over their parameters.

FAMILY_PARAMETERS = ('log_sigma', 'u_c', 'v_c', 'u_1', 'v_1', 'u_2', 'v_2', 'log_rho')
FAMILY_CHOICES = ('a', 'c', 'f_1', 'order', 'reflect')


def _family_bounds(n: int, f: int, max_scale: float):
  """(lo, hi) of the continuous parameters and of the discrete choices."""
  far = math.asinh(max_scale)
  near = math.asinh(10.0)
  lo = np.array([-5.0, -near, -near, -far, -far, -far, -far, -5.0])
  hi = np.array([0.0, near, near, far, far, far, far, 1.0])
  h = n - f
  dlo = np.array([1, 0, 0, 0, 0])
  dhi = np.array([h, h - 1, f, 2, 1])
  return lo, hi, dlo, dhi


def _family_config(theta, choice, key, n: int, f: int, dim: int):
  """One configuration of the parametrised family: (x (n, d) normalised, mask (n,)).

  Honest: a inputs at 0, b at e₁, c at sinh(u_c)·e₁ + sinh(v_c)·e₂ (b = n − f − a − c), each
  jittered by 10^log_sigma. Byzantine: f₁ at sinh(u₁)·e₁ + sinh(v₁)·e₃ and f − f₁ at
  sinh(u₂)·e₁ + sinh(v₂)·e₃, jittered by 10^log_rho (collinear: v = 0; orthogonal: u = 0).
  `order`: honest inputs first, Byzantine first, or a random arrangement; `reflect`: a random
  Householder reflection of the whole input (for rules that are not orthogonally equivariant).
  """
  h = n - f
  a = jnp.clip(choice[0], 1, h)
  c = jnp.clip(choice[1], 0, h - a)
  f1, order, reflect = choice[2], choice[3], choice[4]
  e = jnp.eye(dim, dtype=jnp.float32)
  e1, e2, e3 = e[0], e[min(1, dim - 1)], e[min(2, dim - 1)]
  s = jnp.sinh(theta[1:7])
  sig, rho = 10.0 ** theta[0], 10.0 ** theta[7]
  k_g, k_p, k_r = jax.random.split(key, 3)
  g = jax.random.normal(k_g, (n, dim))
  i = jnp.arange(h)[:, None]
  honest = jnp.where(i < a, 0.0, jnp.where(i < h - c, e1, s[0] * e1 + s[1] * e2)) + sig * g[:h]
  j = jnp.arange(f)[:, None]
  byz = jnp.where(j < f1, s[2] * e1 + s[3] * e3, s[4] * e1 + s[5] * e3) + rho * g[h:]
  full = jnp.concatenate([honest, byz], axis=0)
  perm = jnp.select(
    [order == 0, order == 1],
    [jnp.arange(n), (jnp.arange(n) + h) % n],
    jax.random.permutation(k_p, n),
  )
  x, mask = full[perm], perm < h
  v = _unit(jax.random.normal(k_r, (dim,)))
  x = jnp.where(reflect > 0, x - 2.0 * (x @ v)[:, None] * v, x)
  return _normalise(x, mask), mask


@functools.partial(jax.jit, static_argnames=('n', 'f', 'dim'))
def _family_batch(theta, choice, seeds, *, n, f, dim):
  keys = jax.vmap(jax.random.key)(seeds)
  return jax.vmap(lambda t, c, k: _family_config(t, c, k, n, f, dim))(theta, choice, keys)


def _sample_family(rng: np.random.Generator, count: int, bounds):
  lo, hi, dlo, dhi = bounds
  theta = rng.uniform(lo, hi, size=(count, lo.size)).astype(np.float32)
  choice = rng.integers(dlo, dhi + 1, size=(count, dlo.size)).astype(np.int32)
  # Half the samples collinear or orthogonal: the structure of the known extremal configurations.
  flat = rng.random((count, 3)) < 0.5
  theta[:, [2, 4, 6]] *= ~flat
  seeds = rng.integers(0, 2**31 - 1, size=count).astype(np.uint32)
  return theta, choice, seeds


# --------------------------------------------------------------------------------------------------
# The search engine: one evaluation of B configurations for M rules at once, a pool of the best
# configurations per rule, then an exact re-evaluation.


class _Pool:
  """The best `size` configurations seen per output column, by float32 ratio."""

  def __init__(self, outputs: int, size: int):
    self.size = size
    self.items = [[] for _ in range(outputs)]  # (r, x, mask, family) per column

  def add(self, x, mask, r, family):
    x, mask, r = np.asarray(x), np.asarray(mask), np.asarray(r, np.float64)
    r = np.where(np.isnan(r), -1.0, r)
    for col, items in enumerate(self.items):
      top = np.argsort(-r[:, col], kind='stable')[: self.size]
      fam = family if isinstance(family, str) else None
      items.extend(
        (float(r[i, col]), x[i], mask[i], fam or family[i]) for i in top if r[i, col] > -1.0
      )
      items.sort(key=lambda t: -t[0])
      del items[self.size :]

  def best(self, col: int, k: int):
    return self.items[col][:k]


def _pad(x, mask, batch):
  """Pads a short batch (host arrays) with copies of its first row: one compiled shape."""
  x, mask = np.asarray(x), np.asarray(mask)
  pad = batch - x.shape[0]
  if pad <= 0:
    return x, mask
  return (
    np.concatenate([x, np.repeat(x[:1], pad, axis=0)]),
    np.concatenate([mask, np.repeat(mask[:1], pad, axis=0)]),
  )


def _family(theta, choice, seeds, trust, batch, *, n, f, dim):
  """Builds any number of family configurations, `batch` per compiled call: host (x, mask)."""
  xs, ms = [], []
  for i in range(0, theta.shape[0], batch):
    count = min(batch, theta.shape[0] - i)
    th, ch, sd = (
      np.concatenate([a[i : i + batch], np.repeat(a[i : i + 1], batch - count, axis=0)])
      for a in (theta, choice, seeds)
    )
    x, m = trust(*_family_batch(th, ch, sd, n=n, f=f, dim=dim))
    xs.append(np.asarray(x)[:count])
    ms.append(np.asarray(m)[:count])
  return np.concatenate(xs), np.concatenate(ms)


def _evaluate_in_batches(evaluate, x, mask, batch):
  """(count, M) float32 ratios of any number of configurations, `batch` per compiled call."""
  out = []
  for i in range(0, x.shape[0], batch):
    xb, mb = _pad(x[i : i + batch], mask[i : i + batch], batch)
    out.append(np.asarray(evaluate(xb, mb))[: min(batch, x.shape[0] - i)])
  return np.concatenate(out)


def _line_search(
  evaluate, theta, choice, seeds, cols, *, n, f, dim, bounds, batch, passes, grid, trust
):
  """Coordinate-wise line search over the family's parameters for K candidates, vmapped.

  Each pass sweeps every continuous parameter over `grid` values (the full range on the first
  pass, a window halving each pass around the current value after); the first pass also sweeps
  every discrete choice over its range. Each candidate keeps its best. `grid` is raised so that
  K × grid fills whole batches (a finer grid at the same cost). Returns (x, mask, r) of the final
  candidates and the number of configurations evaluated.
  """
  lo, hi, dlo, dhi = bounds
  p_cont, p_disc = lo.size, dlo.size
  k = theta.shape[0]
  grid = max(grid, (-(-k * grid // batch) * batch) // k)
  theta, choice = theta.copy(), choice.copy()
  best_r = np.full(k, -np.inf)
  evaluated = 0
  rows = np.arange(k)

  def score(th, ch, sd):
    nonlocal evaluated
    x, m = _build(th, ch, sd)
    r = _evaluate_in_batches(evaluate, x, m, batch)
    evaluated += th.shape[0]
    r = np.where(np.isnan(r), -1.0, r)
    return r

  def _build(th, ch, sd):
    return _family(th, ch, sd, trust, batch, n=n, f=f, dim=dim)

  rep_cols = np.repeat(cols, grid)
  rep_seeds = np.repeat(seeds, grid)
  for p in range(passes):
    for j in range(p_cont + (p_disc if p == 0 else 0)):
      if j < p_cont:
        if p == 0:
          values = np.linspace(lo[j], hi[j], grid)[None, :].repeat(k, 0)
        else:
          half = (hi[j] - lo[j]) * 0.5**p
          values = theta[:, j : j + 1] + half * np.linspace(-1.0, 1.0, grid)[None, :]
          values = np.clip(values, lo[j], hi[j])
        values[:, -1] = theta[:, j]  # the current value is always a candidate
        th = np.repeat(theta, grid, 0)
        th[:, j] = values.reshape(-1)
        ch = np.repeat(choice, grid, 0)
      else:
        d = j - p_cont
        values = np.round(np.linspace(dlo[d], dhi[d], grid))[None, :].repeat(k, 0)
        values[:, -1] = choice[:, d]
        th = np.repeat(theta, grid, 0)
        ch = np.repeat(choice, grid, 0)
        ch[:, d] = values.reshape(-1).astype(np.int32)
      r = score(th, ch, rep_seeds)[np.arange(k * grid), rep_cols].reshape(k, grid)
      pick = np.argmax(r, axis=1)
      theta, choice = th.reshape(k, grid, -1)[rows, pick], ch.reshape(k, grid, -1)[rows, pick]
      best_r = r[rows, pick]
  x, m = _build(theta, choice, seeds)
  return x, m, best_r, evaluated


@functools.partial(jax.jit, static_argnames=('proposals', 'limit'))
def _propose(key, x, mask, sigma, *, proposals, limit=1e4):
  """`proposals` perturbations of each of K configurations (K·P, n, d): one row or all rows."""
  k, n, d = x.shape
  k_noise, k_row, k_mode = jax.random.split(key, 3)
  noise = jax.random.normal(k_noise, (k, proposals, n, d))
  row = jax.random.randint(k_row, (k, proposals, 1), 0, n)
  one_row = jnp.arange(n)[None, None, :] == row
  all_rows = jax.random.uniform(k_mode, (k, proposals, 1)) < 0.5
  moved = (one_row | all_rows)[..., None]
  scale = sigma[:, None, None, None] * (1.0 + jnp.linalg.norm(x, axis=-1, keepdims=True))[:, None]
  prop = x[:, None] + jnp.where(moved, scale * noise / math.sqrt(d), 0.0)
  masks = jnp.repeat(mask, proposals, axis=0)
  out = jax.vmap(_normalise)(prop.reshape(k * proposals, n, d), masks)
  norm = jnp.linalg.norm(out, axis=-1, keepdims=True)  # no input beyond `limit` honest spreads
  return out * jnp.minimum(1.0, limit / jnp.maximum(norm, 1e-30)), masks


def _hill_climb(evaluate, x, mask, r, cols, key, *, steps, batch, limit=1e4):
  """A hill climber from K ≤ batch / 4 configurations: per step `batch // K` proposals each, an
  adaptive step size per configuration (× 1.5 on success, × 0.7 otherwise). Returns
  (x, r, evaluated)."""
  k = x.shape[0]
  size = batch // 4  # one compiled shape: K padded to batch / 4 configurations
  proposals = batch // size
  x = np.concatenate([x, np.repeat(x[:1], size - k, axis=0)])
  mask = np.concatenate([mask, np.repeat(mask[:1], size - k, axis=0)])
  cols = np.concatenate([cols, np.repeat(cols[:1], size - k)])
  best_r = np.concatenate(
    [np.asarray(r, np.float64), np.repeat(np.asarray(r[:1], np.float64), size - k)]
  )
  sigma = np.full(size, 0.3, np.float32)
  rows = np.arange(size)
  rep_cols = np.repeat(cols, proposals)
  for s in range(steps):
    px, pm = _propose(
      jax.random.fold_in(key, s), x, mask, sigma, proposals=proposals, limit=float(limit)
    )
    px = np.asarray(px)
    pr = np.asarray(evaluate(px, pm))
    pr = np.where(np.isnan(pr), -1.0, pr)[np.arange(batch), rep_cols].reshape(size, proposals)
    pick = np.argmax(pr, axis=1)
    better = pr[rows, pick] > best_r
    chosen = px.reshape(size, proposals, *x.shape[1:])[rows, pick]
    x = np.where(better[:, None, None], chosen, x)
    best_r = np.where(better, pr[rows, pick], best_r)
    sigma = np.clip(np.where(better, sigma * 1.5, sigma * 0.7), 1e-4, 3.0).astype(np.float32)
  return x[:k], best_r[:k], steps * k * proposals


def _exact_best(pipe, candidates):
  """(ratio, Witness) of the best of [(x, mask, family)] re-evaluated one by one with `ratio`."""
  best, best_r = None, -math.inf
  for x, m, fam in candidates:
    x, m = np.asarray(x, np.float32), np.asarray(m, bool)
    r = ratio(pipe, x, m)
    if r > best_r or best is None:
      best, best_r = Witness(stack=x, honest=m, family=fam), r
  return best_r, best


@functools.lru_cache(maxsize=64)
def _default_evaluator(pipes: tuple):
  """(B, n, d), (B, n) → (B, M) float32 ratios of M pipelines, vmapped over the batch, jitted."""

  def one(x, m):
    return jnp.stack([_ratio_core(p, x, m) for p in pipes])

  return jax.jit(jax.vmap(one))


def default_dim(rule, n: int, f: int = 0) -> int:
  """The search dimension: 1 for coordinate-wise rules (κ⋆ in d dimensions equals κ⋆ in one,
  docs/robustness.md), n − 1 otherwise (any n points span at most n − 1 dimensions, so for an
  orthogonally equivariant rule, whose output stays in that span, n − 1 loses nothing)."""
  return 1 if as_rule(rule, f).coordinatewise else max(1, n - 1)


def estimate_kappa(
  rule,
  n: int,
  f: int,
  dim: int | None = None,
  key=None,
  budget: int = 20_000,
  **options,
) -> KappaEstimate:
  """Searches for inputs maximising the (f, κ) ratio of one rule: a certified lower bound on κ⋆.

  `estimate_kappas` with one rule; see it for the search and the options.

  Args:
    rule: anything `robustjax.pipeline.as_rule` accepts.
    n, f: numbers of inputs and of Byzantine inputs (|S| = n − f).
    dim: dimension of each input; default `default_dim(rule, n, f)`.
    key: a `jax.random` key; the result is a deterministic function of it (default key 0).
    budget: configurations evaluated per restart, approximately.
    **options: as for `estimate_kappas`.
  """
  return estimate_kappas([rule], n, f, dim, key, budget, **options)[0]


def estimate_kappas(
  rules,
  n: int,
  f: int,
  dim: int | None = None,
  key=None,
  budget: int = 20_000,
  *,
  restarts: int = 1,
  batch: int = 512,
  attacks: bool = True,
  line_search: bool = True,
  local_fraction: float = 0.3,
  local_candidates: int = 32,
  grid: int = 8,
  passes: int = 2,
  max_scale: float = 1e3,
  top_k: int = 8,
  trusted: tuple[int, ...] | None = None,
  evaluate: Callable | None = None,
) -> list[KappaEstimate]:
  """Searches for inputs maximising the (f, κ) ratio of several rules on shared configurations.

  The adversary picks everything: the honest inputs S, the Byzantine inputs and which positions S
  occupies (tie-breaking by index is exercised). Every configuration is evaluated for every rule;
  each rule keeps its own best. The search, all of it vmapped (`batch` configurations per compiled
  call):

  0. the canonical witnesses of f/(n − 2f) with both honest sets (`canonical_witnesses`): so
     κ̂ ≥ f/(n − 2f) holds for every rule, by construction;
  1. random configurations of five structured honest families × five Byzantine placements (two
     clusters, three groups, collinear, anisotropic, Gaussian; a point, a cloud, near-copies, a
     mirror image, a line), and the attacks of `robustjax.attacks` at 16 scales;
  2. the parametrised family `FAMILY_PARAMETERS` / `FAMILY_CHOICES` (three honest clusters of any
     sizes, two Byzantine groups placed anywhere on and off the honest line, their spreads, the
     order of the positions), sampled, then a coordinate-wise line search over every parameter
     from the best `local_candidates` samples of each rule (`passes` sweeps of `grid` values);
  3. a hill climber (all inputs, or one at a time, with an adaptive step) from the best
     configurations found by any part, for `local_fraction` of the budget;

  repeated `restarts` times with independent keys (parts 1–3); the best over all restarts is
  kept. The best `top_k` configurations of each rule and the canonical witnesses are then
  re-evaluated one at a time with `ratio` (float64 around the rule's output): `kappa` is exactly
  `ratio(rule, witness.stack, witness.honest)`.

  Args:
    rules: a sequence of anything `robustjax.pipeline.as_rule` accepts.
    n, f: numbers of inputs and of Byzantine inputs.
    dim: dimension of each input; default the largest `default_dim` of the rules.
    key: a `jax.random` key (default key 0).
    budget: configurations evaluated per restart, approximately (the attacks come on top).
    restarts: independent repetitions of parts 1–3.
    batch: configurations per compiled call.
    attacks: whether part 1 includes the attacks.
    line_search: whether to run part 2's line search (its samples are always drawn).
    local_fraction: share of the budget spent in part 3.
    local_candidates: configurations per rule refined by parts 2 and 3.
    grid: values per parameter and pass in the line search.
    passes: sweeps of the line search.
    max_scale: the largest Byzantine distance tried, in honest spreads.
    top_k: configurations per rule re-evaluated exactly at the end.
    trusted: positions that must be honest; default: what the rules declare
      (`Pipeline.trusted_input`, `(0,)` for MoNNA). The adversary chooses every other position.
    evaluate: optional `(x (B, n, d), mask (B, n)) -> (B, len(rules))` float32 ratios replacing
      the vmapped rules in the search (a faster equivalent form, e.g. every m of MultiKrum from one
      sort). It only steers the search: every reported κ̂ is re-evaluated with `ratio` on the rule.

  Returns:
    One `KappaEstimate` per rule.

  Raises:
    ValueError: for an infeasible (n, f) (raised by a rule at trace time), or bad arguments.
  """
  t0 = time.perf_counter()
  if not (isinstance(n, int) and isinstance(f, int) and 0 <= f and n - f >= 1):
    raise ValueError(f'estimate_kappa: needs ints 0 <= f < n; got n={n}, f={f}')
  if restarts < 1 or batch < 1 or budget < 1:
    raise ValueError('estimate_kappa: restarts, batch and budget must be >= 1')
  pipes = tuple(as_rule(r, f) for r in rules)
  if dim is None:
    dim = max(default_dim(p, n, f) for p in pipes)
  for p in pipes:
    p(jnp.zeros((n, dim), jnp.float32))  # trace-time validation (an infeasible f raises here)
  if trusted is None:
    trusted = tuple(sorted({t for p in pipes for t in p.trusted_input}))
  trusted = tuple(trusted)
  if key is None:
    key = jax.random.key(0)
  evaluate = evaluate or _default_evaluator(pipes)
  outputs = len(pipes)
  pool = _Pool(outputs, max(top_k, local_candidates))
  per_family: list[dict] = [{} for _ in pipes]
  per_restart: list[list[float]] = [[] for _ in pipes]
  evaluated = 0

  def record(x, m, r, family):
    nonlocal evaluated
    pool.add(x, m, r, family)
    r = np.where(np.isnan(r), -1.0, np.asarray(r, np.float64))
    np.maximum(restart_best, r.max(axis=0), out=restart_best)
    fams = np.array([family] * r.shape[0] if isinstance(family, str) else family)
    for name in np.unique(fams):
      best = r[fams == name].max(axis=0)
      for col in range(outputs):
        if best[col] > per_family[col].get(str(name), -np.inf):
          per_family[col][str(name)] = float(best[col])
    evaluated += r.shape[0]

  def trust(x, m):
    return _force_trusted(x, m, trusted) if trusted else (x, m)

  cx, cm = canonical_witnesses(n, f, dim, trusted)
  bounds = _family_bounds(n, f, max_scale)
  for rs in range(restarts):
    k_rs = jax.random.fold_in(key, rs)
    k_gen, k_att, k_loc, k_fam = jax.random.split(k_rs, 4)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(k_fam)).ravel().tolist())
    restart_best = np.full(outputs, -1.0)  # read by `record` (the best ratio of this restart)
    if rs == 0 and cx.shape[0]:
      x, m = _pad(cx, cm, batch)
      record(cx, cm, np.asarray(evaluate(x, m))[: cx.shape[0]], 'canonical')
    # Part 1: random structured configurations and the attacks.
    share = 0.2 if line_search else 0.35
    for c in range(max(1, round(share * budget / batch))):
      x, m, hf, bf = _generate(
        jax.random.fold_in(k_gen, c), n=n, f=f, dim=dim, batch=batch, max_scale=float(max_scale)
      )
      x, m = trust(x, m)
      fams = [
        f'{_HONEST_FAMILIES[a]}/{_BYZ_FAMILIES[b]}' for a, b in zip(*map(np.asarray, (hf, bf)))
      ]
      record(x, m, np.asarray(evaluate(x, m)), fams)
    if attacks and rs == 0:
      for name, x, m in _attack_configs(k_att, n, f, dim, batch, _ATTACK_SCALES):
        x, m = trust(x, m)
        record(x, m, np.asarray(evaluate(x, m)), f'attack:{name}')
    # Part 2: the parametrised family, sampled, then line-searched from the best samples.
    samples = max(batch, round(share * budget / batch) * batch)
    theta, choice, seeds = _sample_family(rng, samples, bounds)
    x, m = _family(theta, choice, seeds, trust, batch, n=n, f=f, dim=dim)
    r = _evaluate_in_batches(evaluate, x, m, batch)
    record(x, m, r, 'family')
    if line_search:
      r = np.where(np.isnan(r), -1.0, r)
      picks = [np.argsort(-r[:, col], kind='stable')[:local_candidates] for col in range(outputs)]
      picks_cols = np.concatenate([np.full(len(p), c) for c, p in enumerate(picks)])
      picks = np.concatenate(picks)
      lx, lm, _, used = _line_search(
        evaluate,
        theta[picks],
        choice[picks],
        seeds[picks],
        picks_cols,
        n=n,
        f=f,
        dim=dim,
        bounds=bounds,
        batch=batch,
        passes=passes,
        grid=grid,
        trust=trust,
      )
      evaluated += used
      record(lx, lm, _evaluate_in_batches(evaluate, lx, lm, batch), 'family+line_search')
    # Part 3: hill climbing from the best configurations of each rule, in chunks of at most
    # batch / 4 configurations (at least 4 proposals each per step).
    if local_fraction > 0:
      starts = [(it, col) for col in range(outputs) for it in pool.best(col, local_candidates)]
      chunk = max(1, min(len(starts), batch // 4))
      chunks = [starts[i : i + chunk] for i in range(0, len(starts), chunk)]
      steps = max(1, round(local_fraction * budget / (batch * max(1, len(chunks)))))
      for i, part in enumerate(chunks):
        hm = np.stack([it[2] for it, _ in part])
        hx, _, used = _hill_climb(
          evaluate,
          np.stack([it[1] for it, _ in part]),
          hm,
          np.array([it[0] for it, _ in part]),
          np.array([col for _, col in part]),
          jax.random.fold_in(k_loc, i),
          steps=steps,
          batch=batch,
          limit=10.0 * max_scale,
        )
        evaluated += used
        fams = [f'{it[3].split("+hill_climb")[0]}+hill_climb' for it, _ in part]
        record(hx, hm, _evaluate_in_batches(evaluate, hx, hm, batch), fams)
    for col in range(outputs):
      per_restart[col].append(float(restart_best[col]) if restart_best[col] > -1.0 else math.nan)

  # Exact re-evaluation: the best configurations of each rule, and the canonical witnesses.
  results = []
  for col, pipe in enumerate(pipes):
    cands = [(x, m, fam) for _, x, m, fam in pool.best(col, top_k)]
    best_r, best = _exact_best(pipe, cands + [(x, m, 'canonical') for x, m in zip(cx, cm)])
    results.append(
      KappaEstimate(
        kappa=float(best_r),
        witness=best,
        evaluated=int(evaluated),
        seconds=time.perf_counter() - t0,
        per_family=per_family[col],
        per_restart=tuple(per_restart[col]),
        dim=dim,
      )
    )
  return results


def benchmark(rule, n: int = 20, f: int = 4, dim: int = 16, *, batch: int = 4096, repeats: int = 5):
  """Configurations per second of the batched search (generation + evaluation), compile excluded.

  Returns:
    A dict: configs_per_s (best of `repeats`), eval_only_per_s, batch, n, f, dim.
  """
  evaluate = _default_evaluator((as_rule(rule, f),))

  def once(key):
    x, m, _, _ = _generate(key, n=n, f=f, dim=dim, batch=batch, max_scale=1e3)
    return evaluate(x, m)

  key = jax.random.key(0)
  once(key).block_until_ready()
  x, m, _, _ = _generate(key, n=n, f=f, dim=dim, batch=batch, max_scale=1e3)
  evaluate(x, m).block_until_ready()
  best_all, best_eval = math.inf, math.inf
  for i in range(repeats):
    t = time.perf_counter()
    once(jax.random.fold_in(key, i)).block_until_ready()
    best_all = min(best_all, time.perf_counter() - t)
    t = time.perf_counter()
    evaluate(x, m).block_until_ready()
    best_eval = min(best_eval, time.perf_counter() - t)
  return {
    'rule': as_rule(rule, f).spec,
    'n': n,
    'f': f,
    'dim': dim,
    'batch': batch,
    'configs_per_s': batch / best_all,
    'eval_only_per_s': batch / best_eval,
  }


# --------------------------------------------------------------------------------------------------
# Coordinate-wise rules: a dense search over one-dimensional configurations.

_LEVELS_1D = (
  -1e3,
  -10.0,
  -3.0,
  -2.0,
  -1.5,
  -1.0,
  -0.5,
  -0.25,
  0.0,
  0.25,
  0.5,
  0.75,
  1.0,
  1.25,
  1.5,
)
_LEVELS_1D = _LEVELS_1D + (2.0, 3.0, 10.0, 1e3)


@functools.partial(jax.jit, static_argnames=('n', 'f'))
def _levels_batch(counts, t, byz, f1, *, n, f):
  """1-D configurations: honest a at 0, b at t, c at 1; Byzantine f₁ at p, f − f₁ at q."""

  def one(cnt, t, pq, f1):
    h = n - f
    i = jnp.arange(h)
    honest = jnp.where(i < cnt[0], 0.0, jnp.where(i < cnt[0] + cnt[1], t, 1.0))
    byz = jnp.where(jnp.arange(f) < f1, pq[0], pq[1])
    x = jnp.concatenate([honest, byz])[:, None]
    mask = jnp.arange(n) < h
    return _normalise(x, mask), mask

  return jax.vmap(one)(counts, t, byz, f1)


def search_1d(
  rule,
  n: int,
  f: int,
  key=None,
  *,
  t_grid: int = 7,
  levels: tuple = _LEVELS_1D,
  batch: int = 8192,
  refine: int = 64,
  refine_steps: int = 200,
) -> KappaEstimate:
  """κ⋆ of a coordinate-wise rule by a dense search over one-dimensional configurations.

  For a coordinate-wise rule κ⋆ in d dimensions equals κ⋆ in one (docs/robustness.md), so this
  searches the line only, densely: every honest configuration on three levels 0 ≤ t ≤ 1 (every
  split of the n − f honest inputs into counts a, b, c, and `t_grid` values of t), against every
  pair of Byzantine levels p ≤ q from `levels` (in honest-range units, from −10³ to 10³) with
  every split f₁, f − f₁ of the Byzantine inputs between them; then a hill climber (every input
  moving continuously) from the `refine` best. The result is a certified lower bound like
  `estimate_kappa`'s; it is reported as a "1-D search" value, not a proof.

  Raises:
    ValueError: if the rule is not coordinate-wise, or for an infeasible (n, f).
  """
  t0 = time.perf_counter()
  pipe = as_rule(rule, f)
  if not pipe.coordinatewise:
    raise ValueError(f'search_1d: {pipe.spec} is not coordinate-wise')
  if not (0 <= f and n - f >= 2):
    raise ValueError(f'search_1d: needs 0 <= f <= n - 2; got n={n}, f={f}')
  key = jax.random.key(0) if key is None else key
  h = n - f
  counts = np.array([(a, b, h - a - b) for a in range(h + 1) for b in range(h + 1 - a)], np.int32)
  ts = np.linspace(0.0, 1.0, t_grid + 2)[1:-1].astype(np.float32)
  lv = np.asarray(levels, np.float32)
  pairs = np.array([(p, q) for i, p in enumerate(lv) for q in lv[i:]], np.float32)
  f1s = np.arange(f + 1, dtype=np.int32)
  grid = np.stack(
    np.meshgrid(
      np.arange(len(counts)), np.arange(len(ts)), np.arange(len(pairs)), f1s, indexing='ij'
    ),
    -1,
  ).reshape(-1, 4)
  # t matters only when b > 0, and the Byzantine split only when p ≠ q: drop the repeats.
  keep = (counts[grid[:, 0], 1] > 0) | (grid[:, 1] == 0)
  keep &= (pairs[grid[:, 2], 0] != pairs[grid[:, 2], 1]) | (grid[:, 3] == 0)
  grid = grid[keep]
  evaluate = _default_evaluator((pipe,))
  pool = _Pool(1, refine)
  for i in range(0, grid.shape[0], batch):
    g = grid[i : i + batch]
    g = np.concatenate([g, np.repeat(g[:1], batch - g.shape[0], axis=0)])
    x, m = _levels_batch(
      counts[g[:, 0]], ts[g[:, 1]], pairs[g[:, 2]], g[:, 3].astype(np.int32), n=n, f=f
    )
    pool.add(x, m, np.asarray(evaluate(x, m)), '1-D levels')
  evaluated = grid.shape[0]
  starts = pool.best(0, refine)
  hx = np.stack([s[1] for s in starts])
  hm = np.stack([s[2] for s in starts])
  hr = np.array([s[0] for s in starts])
  bx, br, used = _hill_climb(
    evaluate, hx, hm, hr, np.zeros(len(starts), int), key, steps=refine_steps, batch=4 * len(starts)
  )
  evaluated += used
  pool.add(bx, hm, br[:, None], '1-D levels+hill_climb')
  best_r, best = _exact_best(pipe, [(x, m, fam) for _, x, m, fam in pool.best(0, 8)])
  return KappaEstimate(
    kappa=float(best_r),
    witness=best,
    evaluated=int(evaluated),
    seconds=time.perf_counter() - t0,
    per_family={},
    dim=1,
  )
