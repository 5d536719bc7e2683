"""Stateful attacks: the mimic heuristic, which tracks a direction during a warm-up."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from robustjax._checks import check_positive_int, num_workers
from robustjax.attacks._base import (
  _acc,
  _check_attack,
  _mean,
  _repeat,
  _stack_dot,
  _tree_vdot,
  _upcast,
  register,
)
from robustjax.stack import tree_index, weighted_sum


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


@register('mimic_heuristic', kind='stateful', init=mimic_heuristic_init)
def mimic_heuristic(honest, state: MimicState, *, f: int, warmup: int = 10, argmax: bool = True):
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
