"""The aggregator registry and the properties every rule declares next to its registration.

Consumers (the engine, the attacks, the κ search, the optax adapter) ask a rule's properties
through `robustjax.pipeline.Pipeline`; no module outside `aggregators/` lists rule names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from robustjax._checks import named_static_errors
from robustjax._registry import Registry

__all__ = ['Properties', 'REGISTRY', 'register', 'lower_bound_ratio']


def lower_bound_ratio(n: int, f: int) -> float:
  """f / (n − 2f), the universal lower bound on κ (Allouah et al. 2023)."""
  return f / (n - 2 * f)


@dataclasses.dataclass(frozen=True)
class Properties:
  """What a consumer needs to know about a rule or a pre-aggregator.

  Attributes:
    kappa: for an aggregator, ``kappa(n, f, **params) -> float | None``, a proven upper bound on
      its (f, κ)-robustness coefficient (None: no proof known to robustjax); for a
      pre-aggregator, ``kappa(n, f, inner) -> float | None``, the bound of the composition given
      the bound ``inner`` of what follows it.
    kappa_reference: where the bound is proven.
    orthogonal_equivariant: F(Qx) = Q F(x) for every orthogonal Q (the rule uses only distances,
      norms and weighted means of its inputs), so it can be evaluated exactly on the span of the
      inputs (the optimal attacks do).
    distance_based: computes pairwise distances (a Gram product): reducing to the span pays.
    coordinatewise: acts coordinate by coordinate (κ⋆ in d dimensions equals κ⋆ in one).
    order_weights: for a coordinate-wise rule that is, in every coordinate, a fixed linear
      combination of the sorted values (an L-statistic: mean, median, trimmed mean),
      ``order_weights(n, f, **params) -> (n,) array``, the weight of the p-th smallest value. The
      optimal attacks then evaluate a candidate exactly from the honest columns sorted once.
    median_window: for a coordinate-wise rule that is, in every coordinate, the mean of the
      `keep` values closest to the coordinate median (ties at the cut-off: lower values first;
      MeaMed), ``median_window(n, f, **params) -> keep``. The optimal attacks then evaluate a
      candidate exactly from the honest columns sorted once, as for `order_weights`.
    row_combination: for a pre-aggregator whose every output is a weighted sum of a few inputs
      (clipping, ARC: one each, rescaled; bucketing: a bucket's mean),
      ``row_combination(stack, f=f, [key=key,] **params) -> (index, weight)``, each (k, s):
      output b = Σ_j weight[b, j] · x_{index[b, j]}, non-finite entries counted as 0. A
      pipeline then fuses it into the coordinate-wise aggregator that follows
      (`robustjax.pipeline`).
    mixing_from_dists: for a pre-aggregator whose outputs are weighted sums of the inputs chosen
      from their pairwise distances (NNM), ``mixing_from_dists(d2, f=f, **params) -> W``, the
      (n, n) weights (output i = Σ_j W_ij x_j) from the (n, n) squared distances (+inf to and
      from non-finite inputs).
    weights_from_dists: for an aggregator whose output is a weighted sum of its inputs chosen
      from their pairwise distances (Krum, MultiKrum), ``weights_from_dists(d2, f=f, **params)
      -> (a, readable)``: the (n,) weights, and which inputs the choice could read (a selected
      unreadable one makes the aggregate NaN). With the pre-aggregator above, a pipeline runs
      both in distance space: one Gram product, then W G Wᵀ, then one weighted sum
      (`robustjax.pipeline`).
    center_state: takes ``center=`` (the previous aggregate) as a state carried across steps.
    state_init: for a rule with another state, ``state_init(like, **params) -> dict`` (the initial
      state; its entries are passed to the rule as keyword arguments); params holds ``f`` and
      the rule's parameters.
    state_next: ``state_next(stack, out, state, **params) -> dict``, the state after a call.
    exponential: its exact form enumerates subsets (cost exponential in n).
    trusted_input: positions of inputs the rule assumes honest (MoNNA's trusted input).
    stochastic: takes an explicit ``key`` (bucketing's permutation).
    decodes: meaningful only on messages encoded by the matching gradient code (DRACO's vote);
      rule-agnostic analyses (the κ search) leave such rules out.
    robust: bounded whatever f inputs are (False for the mean, the non-robust baseline).
  """

  kappa: Callable | None = None
  kappa_reference: str = ''
  orthogonal_equivariant: bool = False
  distance_based: bool = False
  coordinatewise: bool = False
  order_weights: Callable | None = None
  median_window: Callable | None = None
  row_combination: Callable | None = None
  mixing_from_dists: Callable | None = None
  weights_from_dists: Callable | None = None
  center_state: bool = False
  state_init: Callable | None = None
  state_next: Callable | None = None
  exponential: bool = False
  trusted_input: tuple = ()
  stochastic: bool = False
  decodes: bool = False
  robust: bool = True


REGISTRY = Registry('aggregator', default_properties=Properties())


def register(name: str, *, properties: Properties | None = None):
  """Registers a rule (a decorator); a traced static argument then gets a message naming it."""

  def add(fn):
    return REGISTRY.register(name, named_static_errors(name, fn), properties=properties)

  return add
