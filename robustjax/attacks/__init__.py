"""Byzantine attacks, as objects of one shape: `attacks.get(spec)` -> `Attack`.

An attack takes the stack of the n_h honest inputs (a pytree whose leaves share a leading worker
axis, or an (n_h, d) array) and returns the f Byzantine inputs: a stack with the same pytree
structure, leaf shapes and dtypes, and a leading axis of size f. The server then sees
n = n_h + f inputs; `robustjax.stack.assemble` builds that full stack with the Byzantine slices
in given or random positions. Attacks are omniscient (they see every honest input); randomness
comes only from an explicit `jax.random` key.

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

- ``mimic_heuristic`` (stateful): the mimic variant that tracks a direction during a warm-up.
- ``label_flip`` (data level): the Byzantine workers compute honest gradients on y ↦ C − 1 − y.
- ``none``: the Byzantine workers behave honestly.

Every attack resolves into an `Attack` with one protocol: ``state = attack.init(key, example)``,
``byzantine, state = attack.apply(state, honest, key, f=f, rule=pipeline)``; update attacks can
also be called directly, ``attack(honest, f=f, key=key)``. `names()` lists them all;
``names(kind)`` those of one kind (``'update'``, ``'stateful'``, ``'data'``, ``'none'``).

Modules: `_base` (the `Attack` object, the registry, honest statistics), `_simple`, `_shejwalkar`,
`_optimal` (the optimal attacks' search; its objective in `_line`, evaluated exactly and fast by
`_order_evaluation` and `_span_evaluation`), `_stateful`, `_data`.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from robustjax import attacks
  >>> honest = jax.random.normal(jax.random.key(0), (10, 5))
  >>> byz = attacks.get('alie')(honest, f=3)            # (3, 5)
  >>> from robustjax.stack import assemble
  >>> full = assemble(honest, byz, key=jax.random.key(1))
  >>> full.stack.shape, full.honest_mask.sum()
  ((13, 5), Array(10, dtype=int32))
"""

from robustjax.attacks._base import KINDS, REGISTRY, Attack, Kind, get, names, register
from robustjax.attacks._data import flip_labels, label_permutation, permute_labels
from robustjax.attacks._optimal import evaluation_shortcut, optimal_alie, optimal_ipm
from robustjax.attacks._shejwalkar import min_max, min_sum
from robustjax.attacks._simple import alie, alie_z, gaussian, inf, ipm, mimic, nan, none, sign_flip
from robustjax.attacks._stateful import MimicState, mimic_heuristic, mimic_heuristic_init

__all__ = [
  'KINDS',
  'REGISTRY',
  'Attack',
  'Kind',
  'MimicState',
  'alie',
  'alie_z',
  'evaluation_shortcut',
  'flip_labels',
  'gaussian',
  'get',
  'inf',
  'ipm',
  'label_permutation',
  'mimic',
  'mimic_heuristic',
  'mimic_heuristic_init',
  'min_max',
  'min_sum',
  'names',
  'nan',
  'none',
  'optimal_alie',
  'optimal_ipm',
  'permute_labels',
  'register',
  'sign_flip',
]
