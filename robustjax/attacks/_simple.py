"""Simple attacks: sign flipping, ALIE, IPM, mimic, Gaussian, inf / NaN."""

from __future__ import annotations

import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from robustjax._checks import check_choice, check_positive_int, num_workers
from robustjax.attacks._base import (
  _acc,
  _axpy,
  _cast_like,
  _check_attack,
  _check_float,
  _mean,
  _repeat,
  _std,
  register,
)
from robustjax.stack import tree_index


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
  check_choice('alie', 'variant', variant, _ALIE_VARIANTS)
  if variant == 'byzfl':
    _check_float('alie', 'tau', tau)
    return jnp.asarray(-float(tau))
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
  # In float64 on the host (the stdlib's inverse normal cdf): z follows the input's dtype later.
  return jnp.asarray(statistics.NormalDist().inv_cdf(p))


@register('alie')
def alie(
  honest,
  *,
  f: int,
  key=None,
  variant: str = 'paper',
  tau: float = 1.5,
  ddof: int | None = None,
  n: int | None = None,
):
  """A Little Is Enough: every Byzantine input is μ − z·σ.

  .. warning::
    Implementations differ in z, in its sign and in σ. ``variant='paper'`` (default) uses
    Baruch et al.'s z = Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − f; ``'karimireddy'`` the cdf
    (n − f − s)/(n − f) of Karimireddy et al.'s code; ``'byzfl'`` ByzFL's fixed μ + τ·σ (τ = 1.5).
    σ uses ``ddof``: by default 1 for ``'byzfl'`` (ByzFL's ``var(ddof=1)``) and 0 otherwise (the
    population standard deviation; the published PyTorch codes use ``torch.std``, i.e. 1).

  Args:
    honest: the honest stack (n_h slices).
    f: the number of Byzantine inputs (>= 1).
    key: unused.
    variant: ``'paper'``, ``'karimireddy'`` or ``'byzfl'`` (see `alie_z`).
    tau: the fixed factor of ``'byzfl'``.
    ddof: delta degrees of freedom of σ (0 or 1); default 1 for ``'byzfl'``, else 0.
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
  if ddof is None:
    ddof = 1 if variant == 'byzfl' else 0
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


@register('none', kind='none')
def none(honest, *, f: int, key=None):
  """No attack: the Byzantine workers compute and send honest messages (a baseline)."""
  raise ValueError('none: the Byzantine workers behave honestly; there is nothing to apply')
