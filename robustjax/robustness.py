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
import optax

from robustjax import stack as _stack
from robustjax.pipeline import as_rule

__all__ = [
  'Witness',
  'KappaEstimate',
  'ratio',
  'ratios',
  'estimate_kappa',
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
  """The ratio of a batch of inputs xs (B, n, d) with honest masks (B, n), vmapped (float32)."""
  masks = jnp.asarray(masks)
  if f is None:
    f = int(masks.shape[1] - int(np.asarray(masks[0]).sum()))
  fn = _bind(rule, f)
  return jax.jit(jax.vmap(functools.partial(_ratio_core, fn)))(jnp.asarray(xs), masks)


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
  """

  kappa: float
  witness: Witness
  evaluated: int
  seconds: float
  per_family: dict


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


def _make_local_search(fn, steps: int, lr: float, sigma0: float, use_grad: bool):
  """Gradient ascent (optax adam, on all inputs) plus a hill climber around the best, in a scan."""
  core = functools.partial(_ratio_core, fn)
  batched = jax.vmap(core)
  opt = optax.adam(lr)

  def objective(x, m):
    return jnp.log(core(x, m) + 1e-30)

  grad = jax.vmap(jax.grad(objective))
  decay = (1e-3) ** (1.0 / max(steps, 1))

  def clean(r):
    return jnp.where(jnp.isnan(r), -1.0, r)

  @jax.jit
  def run(x0, mask, key):
    r0 = clean(batched(x0, mask))
    state = (x0, opt.init(x0), x0, r0, key, jnp.float32(sigma0))

    def step(state, _):
      x, opt_state, best_x, best_r, key, sigma = state
      key, k1 = jax.random.split(key)
      if use_grad:
        gr = grad(x, mask)
        gr = jnp.where(jnp.isfinite(gr), gr, 0.0)
        upd, opt_state = opt.update(-gr, opt_state, x)
        x_new = jax.vmap(_normalise)(x + upd, mask)
        r_new = clean(batched(x_new, mask))
        better = r_new > best_r
        best_x = jnp.where(better[:, None, None], x_new, best_x)
        best_r = jnp.where(better, r_new, best_r)
        x = jnp.where(jnp.isfinite(r_new)[:, None, None], x_new, best_x)
      scale = (1.0 + jnp.linalg.norm(best_x, axis=2, keepdims=True)) / math.sqrt(best_x.shape[-1])
      prop = best_x + sigma * scale * jax.random.normal(k1, best_x.shape)
      prop = jax.vmap(_normalise)(prop, mask)
      r_prop = clean(batched(prop, mask))
      better = r_prop > best_r
      best_x = jnp.where(better[:, None, None], prop, best_x)
      best_r = jnp.where(better, r_prop, best_r)
      return (x, opt_state, best_x, best_r, key, sigma * decay), None

    state, _ = jax.lax.scan(step, state, None, length=steps)
    return state[2], state[3]

  return run


def _differentiable(fn, x, mask) -> bool:
  try:
    g = jax.jit(jax.vmap(jax.grad(lambda a, m: jnp.log(_ratio_core(fn, a, m) + 1e-30))))(x, mask)
  except Exception:  # noqa: BLE001  (not differentiable with jax.grad: hill climbing only)
    return False
  g = np.asarray(g)
  return bool(np.all(np.isfinite(g)) and np.any(g != 0))


_ATTACK_SCALES = tuple(
  [float(s) for s in -np.geomspace(1e-2, 1e2, 8)] + [float(s) for s in np.geomspace(1e-2, 1e2, 8)]
)


def estimate_kappa(
  rule,
  n: int,
  f: int,
  dim: int,
  key,
  budget: int = 20_000,
  *,
  batch: int = 1024,
  local_batch: int = 128,
  local_fraction: float = 0.3,
  attacks: bool = True,
  max_scale: float = 1e3,
  lr: float = 0.05,
  differentiable: bool | str = True,
  top_k: int = 8,
  trusted: tuple[int, ...] | None = None,
) -> KappaEstimate:
  """Searches for inputs maximising the (f, κ) ratio: a certified lower bound on κ⋆.

  The adversary picks everything: the honest inputs S, the Byzantine inputs and which positions S
  occupies (so tie-breaking by index is exercised). The search, all of it vmapped (`batch`
  configurations per compiled call), in three parts:

  1. structured random restarts: honest sets from Gaussian, anisotropic (nearly collinear),
     collinear (Gaussian, two-point, one-outlier), two-cluster, and the three-group witness of the
     lower bound (n − 2f at 0, f at u); Byzantine inputs as one point at a log-uniform distance (up
     to `max_scale` honest spreads), a spread cloud, near-copies of honest inputs, the mirror image
     of the farthest honest input, or points on the line through it;
  2. the attacks of `robustjax.attacks` (those that take a plain (n − f, d) array), each at a
     vmapped grid of 16 scales of its deviation from the honest mean;
  3. local search from the best configurations found: gradient ascent (optax adam on log ratio,
     `jax.grad` through the rule, all n inputs moving) where the rule is differentiable, and a
     hill climber with a shrinking step otherwise (both when differentiable).

  Every configuration is normalised (honest mean 0, honest mean squared deviation 1). The best
  `top_k` candidates are re-evaluated one by one with `ratio` (float64 arithmetic around the rule's
  output) and the best re-evaluated one is returned, so `ratio(rule, w.stack, w.honest)` gives
  `kappa` exactly.

  Args:
    rule: anything `robustjax.pipeline.as_rule` accepts (a name, `'nnm+name'`, `(name, params)`,
      a Pipeline or a callable).
    n: number of inputs.
    f: number of Byzantine inputs (|S| = n − f).
    dim: dimension of each input.
    key: a `jax.random` key; the result is a deterministic function of it.
    budget: approximate number of configurations to evaluate.
    batch: configurations per compiled call in parts 1 and 2.
    local_batch: configurations refined in parallel in part 3.
    local_fraction: share of the budget spent in part 3.
    attacks: whether to include part 2.
    max_scale: the largest Byzantine distance tried in part 1, in honest spreads.
    lr: adam's learning rate in part 3 (in normalised units).
    differentiable: True (gradient steps; non-finite gradients count as 0), False (hill climbing
      only) or 'auto' (test `jax.grad` on a few inputs first: one more compilation).
    top_k: candidates re-evaluated exactly at the end.
    trusted: positions that must be honest; default: what the rule declares
      (`Pipeline.trusted_input`, `(0,)` for MoNNA, whose guarantee assumes its trusted input is
      honest). The adversary chooses every other position.

  Returns:
    A `KappaEstimate` (kappa, witness, evaluated, seconds, per_family).

  Raises:
    ValueError: for an infeasible (n, f) (raised by the rule itself, at trace time).

  Cost: about `budget` rule evaluations, plus one compilation of the batched rule and one of the
  local search (a few seconds each on CPU).
  """
  t0 = time.perf_counter()
  if not (isinstance(n, int) and isinstance(f, int) and 0 <= f and n - f >= 1):
    raise ValueError(f'estimate_kappa: needs ints 0 <= f < n; got n={n}, f={f}')
  fn = _bind(rule, f)
  fn(jnp.zeros((n, dim), jnp.float32))  # trace-time validation (infeasible f raises here)
  if trusted is None:
    trusted = as_rule(rule, f).trusted_input
  evaluate = jax.jit(jax.vmap(functools.partial(_ratio_core, fn)))
  k_gen, k_att, k_loc = jax.random.split(key, 3)

  per_family: dict[str, float] = {}
  pool_x, pool_m, pool_r, pool_fam = [], [], [], []
  evaluated = 0

  def keep(x, m, r, fams):
    r = np.asarray(r, np.float64)
    r = np.where(np.isnan(r), -1.0, r)
    order = np.argsort(-r, kind='stable')[: max(top_k, local_batch)]
    pool_x.append(np.asarray(x)[order])
    pool_m.append(np.asarray(m)[order])
    pool_r.append(r[order])
    pool_fam.extend(fams[i] for i in order)
    for i, name in enumerate(fams):
      if r[i] > per_family.get(name, -np.inf):
        per_family[name] = float(r[i])

  # Part 1: structured random restarts.
  budget_local = int(budget * local_fraction)
  budget_rand = max(batch, budget - budget_local)
  chunks = max(1, -(-budget_rand // batch))
  for c in range(chunks):
    x, m, hf, bf = _generate(
      jax.random.fold_in(k_gen, c), n=n, f=f, dim=dim, batch=batch, max_scale=float(max_scale)
    )
    if trusted:
      x, m = _force_trusted(x, m, tuple(trusted))
    r = evaluate(x, m)
    hf, bf = np.asarray(hf), np.asarray(bf)
    fams = [f'{_HONEST_FAMILIES[a]}/{_BYZ_FAMILIES[b]}' for a, b in zip(hf, bf)]
    keep(x, m, r, fams)
    evaluated += batch

  # Part 2: the attacks of robustjax.attacks at a grid of scales.
  if attacks:
    for name, x, m in _attack_configs(k_att, n, f, dim, batch, _ATTACK_SCALES):
      if trusted:
        x, m = _force_trusted(x, m, tuple(trusted))
      r = evaluate(x, m)
      keep(x, m, r, [f'attack:{name}'] * x.shape[0])
      evaluated += batch

  xs = np.concatenate(pool_x)
  ms = np.concatenate(pool_m)
  rs = np.concatenate(pool_r)
  order = np.argsort(-rs, kind='stable')

  # Part 3: local search from the best configurations.
  if budget_local > 0 and f > 0:
    lb = local_batch
    start = order[:lb]
    if start.size < lb:
      start = np.resize(start, lb)
    x0, m0 = jnp.asarray(xs[start]), jnp.asarray(ms[start])
    use_grad = differentiable
    if use_grad == 'auto':
      use_grad = _differentiable(fn, x0[:4], m0[:4])
    per_step = lb * (3 if use_grad else 1)
    steps = max(1, budget_local // per_step)
    run = _make_local_search(fn, steps, lr, 0.5, bool(use_grad))
    bx, br = run(x0, m0, k_loc)
    evaluated += steps * lb * (2 if use_grad else 1)
    br = np.asarray(br, np.float64)
    name = 'local_search' + ('(grad+hill)' if use_grad else '(hill)')
    per_family[name] = float(np.nanmax(br))
    xs = np.concatenate([xs, np.asarray(bx)])
    ms = np.concatenate([ms, np.asarray(m0)])
    rs = np.concatenate([rs, np.where(np.isnan(br), -1.0, br)])
    pool_fam.extend([name] * lb)
    order = np.argsort(-rs, kind='stable')

  # Exact re-evaluation of the best candidates.
  best, best_r = None, -math.inf
  for i in order[:top_k]:
    wx = np.asarray(xs[i], np.float32)
    wm = np.asarray(ms[i], bool)
    r_exact = ratio(rule, wx, wm)
    if r_exact > best_r or best is None:
      best, best_r = Witness(stack=wx, honest=wm, family=pool_fam[i]), r_exact
  return KappaEstimate(
    kappa=float(best_r),
    witness=best,
    evaluated=int(evaluated),
    seconds=time.perf_counter() - t0,
    per_family=per_family,
  )


def benchmark(rule, n: int = 20, f: int = 4, dim: int = 16, *, batch: int = 4096, repeats: int = 5):
  """Configurations per second of the batched search (generation + evaluation), compile excluded.

  Returns:
    A dict: configs_per_s (best of `repeats`), eval_only_per_s, batch, n, f, dim.
  """
  fn = _bind(rule, f)
  evaluate = jax.jit(jax.vmap(functools.partial(_ratio_core, fn)))

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
