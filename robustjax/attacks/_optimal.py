"""Optimal ALIE / IPM: the attack scale maximising the real defender's error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from robustjax._checks import check_choice, check_positive_int
from robustjax.aggregators._coordinatewise import CPU_COMPILER_OPTIONS, outermost
from robustjax.attacks._base import (
  _axpy,
  _check_attack,
  _check_float,
  _mean,
  _repeat,
  _std,
  register,
)
from robustjax.attacks._line import _line_evaluator
from robustjax.attacks._order_evaluation import _order_statistics_evaluation, _sorted_form
from robustjax.attacks._span_evaluation import (
  _mixing_evaluator,
  _mixing_form,
  _span_coordinates,
  _span_kind,
)
from robustjax.pipeline import Pipeline, as_rule
from robustjax.stack import acc_dtype


def evaluation_shortcut(rule, n_h: int, f: int, dim: int) -> str | None:
  """The exact shortcut the optimal attacks take against `rule` by default, from its properties.

  ``'span'``: orthogonally equivariant and distance-based (cheaper rules gain less than the QR
  costs), with dim > n_h + 2: candidates evaluated on the coordinates of the span of the honest
  inputs, μ and the direction. ``'span_mixing'``: a mixing pre-aggregator (NNM) then an
  aggregator that is not orthogonally equivariant (``'nnm+trimmed_mean'``), with dim > n_h + 2:
  the mixing weights chosen from the distances among the honest inputs and the candidate (one
  centred Gram product of the honest inputs per call), the aggregator run on the mixed stack.
  ``'order_statistics'``: an L-statistic (mean, median, trimmed mean; `Pipeline.order_weights`)
  or a mean around the median (MeaMed; `Pipeline.median_window`): candidates evaluated from
  honest order statistics found once per call. None: the defender itself is run on every
  candidate.

  Args:
    rule: anything `robustjax.pipeline.as_rule` accepts (resolved with `f`).
    n_h, f: honest and Byzantine inputs; dim: coordinates per input.
  """
  pipeline = rule if isinstance(rule, Pipeline) else as_rule(rule, f)
  if dim > n_h + 2 and pipeline.distance_based:
    if pipeline.orthogonally_equivariant:
      return 'span'
    if _mixing_form(pipeline):
      return 'span_mixing'
  if _sorted_form(pipeline, n_h + f) is not None:
    return 'order_statistics'
  return None


def _map(fn, xs, batch_size):
  if batch_size is None:
    return jax.vmap(fn)(xs)
  if batch_size == 1:
    # One at a time without `vmap` (`lax.map` vmaps each batch, even of one): a `lax.cond` in
    # fn stays a branch instead of a selection between both sides.
    return jax.lax.map(fn, xs)
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


SEARCHES = ('grid', 'byzfl')


def _byzfl_search(evaluate, evals: int, start, delta, ratio):
  """ByzFL 0.0.11's sequential line search, step for step (one evaluation per step).

  Expansion from τ = start: propose best + δ; better (strictly) → accept and δ ← 2δ; else
  δ ← ratio·δ and switch to contraction, where each step proposes best + δ, accepts it if
  strictly better, and shrinks δ ← ratio·δ. `evals` evaluations in all (the first at start).
  A `fori_loop`: the defender is traced once. Returns (best scale, its value).
  """
  best_y = evaluate(start)

  def step(_, carry):
    best_x, best_y, delta, expanding = carry
    prop_x = best_x + delta
    prop_y = evaluate(prop_x)
    better = prop_y > best_y
    best_x = jnp.where(better, prop_x, best_x)
    best_y = jnp.where(better, prop_y, best_y)
    delta = jnp.where(expanding & better, 2.0 * delta, ratio * delta)
    return best_x, best_y, delta, expanding & better

  init = (start, best_y, delta, jnp.asarray(True))
  best_x, best_y, _, _ = jax.lax.fori_loop(0, evals - 1, step, init)
  return best_x, best_y


def _optimal_search(
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
  shortcut,
  search,
  evals,
  line,
  direction,
):
  defender = lambda s, k: rule(s, k)
  acc = acc_dtype(honest)
  mu = _mean(honest)
  if kind == 'alie':
    sigma = _std(honest, mu, ddof)
    base, direction = mu, sigma if direction == 'plus' else jax.tree.map(jnp.negative, sigma)
  else:
    base, direction = jax.tree.map(jnp.zeros_like, mu), jax.tree.map(jnp.negative, mu)
  if shortcut == 'span':
    evaluate = _line_evaluator(*_span_coordinates(honest, base, direction), defender, f, key)
  elif shortcut == 'span_mixing':
    evaluate = _mixing_evaluator(honest, base, direction, rule, f, key)
    batch_size = 1  # one at a time: batching adds traffic, and the evaluator's branch stays one
  elif shortcut == 'order_statistics':
    evaluate, batched = _order_statistics_evaluation(rule, honest, base, direction, f)
    if not batched:
      batch_size = 1  # each candidate is one pass over a few rows: batching only adds traffic
  else:
    evaluate = _line_evaluator(honest, base, direction, defender, f, key)
  if search == 'byzfl':
    start, delta, ratio = (jnp.asarray(v, acc) for v in line)
    tau, _ = _byzfl_search(evaluate, evals, start, delta, ratio)
  else:
    if scales is None:
      scales = jnp.linspace(0.0, 1.0, num_scales, dtype=acc) * max_scale.astype(acc)
    tau, _ = _search(evaluate, scales.astype(acc), num_refine, refine_rounds, batch_size)
  out = _repeat(_axpy(tau, direction, base), f, honest)
  return (out, tau) if return_scale else out


_STATIC = (
  'kind',
  'f',
  'rule',
  'num_scales',
  'num_refine',
  'refine_rounds',
  'batch_size',
  'return_scale',
  'ddof',
  'shortcut',
  'search',
  'evals',
  'direction',
)
# The search as the outermost jit takes the coordinate-wise rules' CPU options (512-bit vectors:
# the trimmed mean's clipped evaluation ran in 0.75-0.85x the time; BENCHMARKS.md); inside a
# caller's jit the plain one is traced, and the options are the caller's.
_optimal_plain = jax.jit(_optimal_search, static_argnames=_STATIC)
_optimal_tuned = jax.jit(
  _optimal_search, static_argnames=_STATIC, compiler_options=CPU_COMPILER_OPTIONS
)


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
  order_statistics=None,
  ddof=0,
  search='grid',
  evals=20,
  start=0.0,
  delta=10.0,
  ratio=0.8,
  direction='minus',
):
  n_h = _check_attack(name, honest, f)
  check_choice(name, 'search', search, SEARCHES)
  check_choice(name, 'direction', direction, ('minus', 'plus'))
  if search == 'byzfl':
    check_positive_int(name, 'evals', evals)
    _check_float(name, 'start', start)
    _check_float(name, 'delta', delta)
    _check_float(name, 'ratio', ratio)
    if not 0.5 < float(ratio) < 1.0 or float(delta) == 0.0:
      raise ValueError(
        f'{name}: the byzfl search needs 0.5 < ratio < 1 and delta != 0; got ratio={ratio}, '
        f'delta={delta}'
      )
  if f >= n_h:
    raise ValueError(
      f'{name}: needs fewer Byzantine than honest inputs (n > 2f); got n_h={n_h}, f={f}'
    )
  check_positive_int(name, 'num_scales', num_scales, minimum=2)
  check_positive_int(name, 'num_refine', num_refine)
  check_positive_int(name, 'refine_rounds', refine_rounds, minimum=0)
  if batch_size is not None:
    check_positive_int(name, 'batch_size', batch_size)
  if isinstance(rule, Pipeline) and defender_f is None:
    pipeline = rule
  else:
    pipeline = as_rule(rule, f if defender_f is None else defender_f)
  dim = sum(int(np.prod(np.shape(x)[1:])) for x in jax.tree.leaves(honest))
  default = evaluation_shortcut(pipeline, n_h, f, dim)
  if subspace is None:
    subspace = default in ('span', 'span_mixing')
  elif subspace not in (True, False):
    raise ValueError(f'{name}: subspace must be None, True or False; got {subspace!r}')
  sorted_form = _sorted_form(pipeline, n_h + f)
  if order_statistics is None:
    order_statistics = default == 'order_statistics' and not subspace
  elif order_statistics not in (True, False):
    raise ValueError(
      f'{name}: order_statistics must be None, True or False; got {order_statistics!r}'
    )
  if order_statistics and sorted_form is None:
    raise ValueError(
      f'{name}: order_statistics=True needs a defender that declares `order_weights` '
      f'(an L-statistic: mean, median, trimmed_mean) or `median_window` (meamed); '
      f'{pipeline.spec!r} does not'
    )
  if order_statistics and subspace:
    raise ValueError(f'{name}: choose subspace or order_statistics, not both')
  if scales is None:
    _check_float(name, 'max_scale', max_scale, positive=True)
  else:
    scales = jnp.asarray(scales)
    if scales.ndim != 1 or scales.shape[0] < 2:
      raise ValueError(
        f'{name}: scales must be a 1-d array of >= 2 values; got shape {scales.shape}'
      )
    num_scales = int(scales.shape[0])
  search_fn = _optimal_tuned if outermost((honest, key, scales)) else _optimal_plain
  return search_fn(
    honest,
    key,
    scales,
    jnp.asarray(max_scale),
    kind=name.removeprefix('optimal_'),
    f=f,
    rule=pipeline,
    num_scales=num_scales,
    num_refine=num_refine,
    refine_rounds=refine_rounds,
    batch_size=batch_size,
    return_scale=return_scale,
    ddof=ddof,
    shortcut=_span_kind(pipeline) if subspace else 'order_statistics' if order_statistics else None,
    search=search,
    evals=evals if search == 'byzfl' else 0,
    line=(float(start), float(delta), float(ratio)),
    direction=direction,
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
    rule: the defender, anything `robustjax.pipeline.as_rule` accepts: a registered
      aggregator name, a spec string (``'nnm+krum'``), a `(name, params)` pair, a `Pipeline`, or
      a callable `rule(stack, *, f=..., key=...)` (given f and key only if it takes them).
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
      clipping, ...; *not* coordinate-wise rules such as median or trimmed mean). After a mixing
      pre-aggregator (NNM) such a rule is still sped up: only the mixing weights are chosen
      without a pass over d (from one centred Gram product of the honest inputs per call, no
      QR), and the rule runs on the mixed stack (``'nnm+trimmed_mean'``; one mixing product and
      the rule per candidate, candidates one at a time: `batch_size` is not used). None
      (default) turns it on when d > n_h + 2 for a Pipeline whose stages all declare
      `orthogonal_equivariant` and one declares `distance_based` (for cheaper defenders the QR
      costs more than it saves), or that is a mixing pre-aggregator then a deterministic
      aggregator (`evaluation_shortcut`); True forces it (your responsibility for a defender
      that is neither), False turns it off. On CPU the QR runs
      in LAPACK (OpenBLAS): on a busy machine set ``OPENBLAS_NUM_THREADS=1`` (threads contend
      in the QR; see BENCHMARKS.md).
    order_statistics: evaluate the candidates exactly from a few honest order statistics
      found once per call, for a defender that is an L-statistic (declares `order_weights`:
      mean, median, trimmed mean) or a mean around the median (declares `median_window`:
      meamed), instead of running the defender's selection network over n rows per candidate.
      Per candidate one elementwise pass: over a few sorted rows (clamps of the candidate
      between pairs of honest order statistics: four rows for the median, 2f for the trimmed
      mean at f <= 3, none for the mean, about 6e for MeaMed with e = n − keep; candidates one
      at a time, `batch_size` not used), or, for the trimmed mean at larger f, the rule's own
      clipped sum over the honest rows between two clamped cut-offs (four honest ranks per
      call instead of sorting the columns; candidates batched as `batch_size` says). None
      (default) turns it on for such a defender (see `evaluation_shortcut`); False runs the
      defender itself on every candidate.

    search: ``'grid'`` (default: the vmapped grid and refinement above) or ``'byzfl'``: ByzFL
      0.0.11's sequential expansion / contraction line search, step for step, with its
      parameters `evals` (20), `start` (0.0), `delta` (10.0) and `ratio` (0.8), for reproducing
      published ByzFL numbers (one defender evaluation per step, in a `fori_loop`).
    direction (optimal_alie): ``'minus'`` (μ − τσ, Baruch et al.; default) or ``'plus'``
      (μ + τσ, ByzFL's; use it with ``ddof=1`` to reproduce ByzFL's attack).

  Returns:
    A stack of f identical slices (and τ if `return_scale`).

  Raises:
    ValueError: f < 1, f >= n_h, bad counts; the defender's own checks (e.g. Krum's n > 2f + 2).
"""


@register('optimal_alie', needs_rule=True)
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
  order_statistics: bool | None = None,
  direction: str = 'minus',
  search: str = 'grid',
  evals: int = 20,
  start: float = 0.0,
  delta: float = 10.0,
  ratio: float = 0.8,
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
    order_statistics,
    ddof,
    search,
    evals,
    start,
    delta,
    ratio,
    direction,
  )


optimal_alie.__doc__ = (
  """Optimal ALIE: μ − τ·σ (or μ + τ·σ) with the scale τ that maximises the defender's error.
"""
  + _OPT_DOC
  + """
  References:
    Baruch et al., NeurIPS 2019 (ALIE); Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan,
    "Fixing by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity", AISTATS 2023.
"""
)


@register('optimal_ipm', needs_rule=True)
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
  order_statistics: bool | None = None,
  search: str = 'grid',
  evals: int = 20,
  start: float = 0.0,
  delta: float = 10.0,
  ratio: float = 0.8,
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
    order_statistics,
    search=search,
    evals=evals,
    start=start,
    delta=delta,
    ratio=ratio,
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
