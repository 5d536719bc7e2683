"""Differential privacy in the training step: clipping and Gaussian noise, and the accounting.

Two mechanisms, stages of the one step (`robustjax.training`), each with its own key:

- **local DP** (``DP.local_noise`` = σ_l): every worker clips its gradient to norm C and adds
  N(0, σ_l² C² I) before anything leaves it (coding, compression, momentum and the attack come
  after, all post-processing);
- **central DP** (``DP.central_noise`` = σ_c): the server adds N(0, (σ_c C / n_h)² I) to the robust
  aggregate, n_h the honest workers (the workers still clip to C).

Accounting (`epsilon`, `run_epsilons`; the optional extra ``robustjax[privacy]``, Google's
``dp-accounting``): the unit is one worker's whole data (add or remove one worker), each step a
Gaussian mechanism, composed over the steps with the RDP accountant (no subsampling: every worker
takes part in every step). Local DP: the sensitivity of a worker's message is C, the noise
multiplier σ_l. Central DP: the noise multiplier σ_c is calibrated to the sensitivity C / n_h of
the *mean* of n_h clipped messages; a robust aggregate can move by more when one input changes
(a trimmed mean by up to C / (n − 2f), a Krum selection by up to 2C), so for robust rules the
reported central ε is the mean's and a lower bound on the guarantee, as the docs of the study
say.

Noise also changes what distance-based rules see: N(0, σ² C² I) in dimension d puts the honest
messages √(2d) σ C apart, which soon exceeds the gap between honest and Byzantine messages
(docs/multikrum.md measures the effect on MultiKrum's selection).

References:
  Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (clipping, Gaussian noise).
  McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
  ICLR 2018 (user-level DP, central noise on the aggregate).
  Mironov, "Rényi Differential Privacy", CSF 2017 (the accountant).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from robustjax import stack as st

__all__ = ['DP', 'clip_rows', 'add_noise', 'privatize', 'epsilon', 'run_epsilons']


@dataclasses.dataclass(frozen=True)
class DP:
  """The privacy settings of a run (hashable: part of the static `TrainSpec`).

  Attributes:
    clip: C, the norm every worker's gradient is clipped to (0: no clipping, no DP).
    local_noise: σ_l, local DP noise multiplier (0: none).
    central_noise: σ_c, central DP noise multiplier (0: none).
  """

  clip: float = 0.0
  local_noise: float = 0.0
  central_noise: float = 0.0

  def __post_init__(self):
    for name in ('clip', 'local_noise', 'central_noise'):
      v = getattr(self, name)
      if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise ValueError(f'dp: {name} must be a finite number >= 0; got {v!r}')
    if (self.local_noise or self.central_noise) and not self.clip:
      raise ValueError('dp: noise needs clipping (dp_clip > 0): the noise is calibrated to C')

  @property
  def active(self) -> bool:
    return self.clip > 0


def clip_rows(stack, c: float):
  """Each worker's slice scaled to norm at most `c` (x · min(1, c / ‖x‖)); non-finite slices are
  left as they are (the robust rule deals with them)."""
  norms = st.norms(stack)
  factor = jnp.where(norms > c, c / jnp.maximum(norms, 1e-30), 1.0)
  factor = jnp.where(jnp.isfinite(norms), factor, 1.0)
  return jax.tree.map(
    lambda x: x * factor.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), stack
  )


def add_noise(tree, std, key, rows=None):
  """`tree` + N(0, std² I). With `rows` (global worker indices of a stack's rows) each row draws
  from ``fold_in(key, row)``, so the noise of a worker does not depend on how rows are split
  over devices."""
  leaves, treedef = jax.tree.flatten(tree)
  out = []
  for i, x in enumerate(leaves):
    k = jax.random.fold_in(key, i)
    if rows is None:
      noise = jax.random.normal(k, x.shape, x.dtype)
    else:
      noise = jax.vmap(
        lambda r, k=k, x=x: jax.random.normal(jax.random.fold_in(k, r), x.shape[1:], x.dtype)
      )(rows)
    out.append(x + std * noise)
  return jax.tree.unflatten(treedef, out)


def privatize(dp: DP | None, stack, rows, key):
  """The local stage: clip every row to C, then add N(0, σ_l² C²) per row (identity without DP)."""
  if dp is None or not dp.active:
    return stack
  stack = clip_rows(stack, dp.clip)
  if dp.local_noise:
    stack = add_noise(stack, dp.local_noise * dp.clip, key, rows)
  return stack


def epsilon(noise_multiplier: float, steps: int, delta: float) -> float:
  """ε of `steps` compositions of the Gaussian mechanism with this noise multiplier (sensitivity
  1, add / remove), at δ, by the RDP accountant of ``dp-accounting``; inf without noise.

  Raises:
    ImportError: ``dp-accounting`` is missing (``pip install 'robustjax[privacy]'``).
  """
  if noise_multiplier <= 0:
    return math.inf
  try:
    import dp_accounting
    from dp_accounting import rdp
  except ImportError as e:
    raise ImportError(
      "privacy accounting needs Google's dp-accounting: pip install 'robustjax[privacy]'"
    ) from e
  acc = rdp.RdpAccountant()
  acc.compose(dp_accounting.GaussianDpEvent(noise_multiplier), int(steps))
  return float(acc.get_epsilon(delta))


def run_epsilons(dp: DP | None, steps: int, delta: float) -> dict | None:
  """``{'local': ε, 'central': ε, 'delta': δ, 'steps': T}`` of a run (None without DP; an ε is
  None where that noise is off, inf where clipping alone gives no guarantee)."""
  if dp is None or not dp.active:
    return None
  return {
    'local': epsilon(dp.local_noise, steps, delta) if dp.local_noise else None,
    'central': epsilon(dp.central_noise, steps, delta) if dp.central_noise else None,
    'delta': float(delta),
    'steps': int(steps),
    'unit': 'one worker (add / remove), noise calibrated to C (central: to the mean, C / n_h)',
  }
