"""Tests for robustjax.robustness: the ratio, the κ search, its witnesses, the bounds."""

import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustjax import robustness as R

N, F, DIM = 7, 2, 3  # one shape for the searches, so the generator compiles once
SMALL = dict(batch=256, attacks=False, local_fraction=0.0, top_k=4)


def np_ratio(x, y, honest_mask):
  """float64 reference: ‖y − x̄_S‖² / ((1/|S|) Σ_{i∈S} ‖x_i − x̄_S‖²)."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  xs = x[honest_mask]
  mu = xs.mean(axis=0)
  var = np.mean(np.sum((xs - mu) ** 2, axis=1))
  return np.sum((y - mu) ** 2) / var


def cw_median(x, *, f):
  del f
  return jnp.median(x, axis=0)


def cw_trimmed_mean(x, *, f):
  n = x.shape[0]
  return jnp.mean(jnp.sort(x, axis=0)[f : n - f], axis=0)


def mean(x, *, f):
  del f
  return jnp.mean(x, axis=0)


def test_ratio_matches_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(9, 5)).astype(np.float32) * 3.0 + 1.0
  idx = np.array([0, 2, 3, 5, 6, 8])  # |S| = 6, so f = 3
  mask = np.zeros(9, bool)
  mask[idx] = True
  y = np.median(x.astype(np.float64), axis=0)
  want = np_ratio(x, y, mask)
  assert R.ratio(cw_median, x, idx) == pytest.approx(want, rel=1e-6)
  assert R.ratio(cw_median, x, mask) == R.ratio(cw_median, x, idx)
  # f is n − |S|: the trimmed mean must drop exactly 3 on each side.
  y_tm = np.sort(x.astype(np.float64), axis=0)[3:6].mean(axis=0)
  assert R.ratio(cw_trimmed_mean, x, idx) == pytest.approx(np_ratio(x, y_tm, mask), rel=1e-5)
  # A registered rule by name, and a pytree stack (the ratio sums over leaves).
  assert R.ratio('median', x, idx) == pytest.approx(want, rel=1e-6)
  tree = {'a': x[:, :2], 'b': x[:, 2:].reshape(9, 3, 1)}
  assert R.ratio('median', tree, idx) == pytest.approx(want, rel=1e-6)
  # The batched float32 ratio agrees too.
  r = R.ratios(cw_median, x[None], mask[None])
  assert float(r[0]) == pytest.approx(want, rel=1e-4)


def test_ratio_validation_and_degenerate_cases():
  x = np.zeros((5, 2), np.float32)
  with pytest.raises(ValueError, match='mask'):
    R.ratio(cw_median, x, np.ones(4, bool))
  with pytest.raises(ValueError, match='distinct'):
    R.ratio(cw_median, x, [0, 0, 1])
  with pytest.raises(ValueError, match='empty'):
    R.ratio(cw_median, x, np.zeros(5, bool))
  assert R.ratio(cw_median, x, [0, 1, 2]) == 0.0  # 0/0: F returns the honest mean
  x[3:] = 1.0
  assert R.ratio(mean, x, [0, 1, 2]) == math.inf  # identical honest inputs, F moved away


def test_standard_witness_reaches_the_lower_bound():
  # f at +1, n − 2f at 0, f at −1: a symmetric rule returns 0 and the ratio is f/(n − 2f).
  n, f = 10, 3
  x = np.zeros((n, 1), np.float32)
  x[:f] = 1.0
  x[n - f :] = -1.0
  honest = np.arange(n - f)
  assert R.ratio(cw_trimmed_mean, x, honest) == pytest.approx(R.lower_bound(n, f), rel=1e-6)
  assert R.ratio(cw_median, x, honest) == pytest.approx(R.lower_bound(n, f), rel=1e-6)


def test_mean_is_not_robust_while_the_trimmed_mean_stays_at_its_bound():
  # The same search (same key, same configurations): unbounded for the mean, f/(n − 2f) for CWTM.
  k = jax.random.key(3)
  opts = dict(budget=2048, max_scale=10.0, batch=256, attacks=False, local_fraction=0.5)
  est = R.estimate_kappa(mean, N, F, DIM, k, **opts)
  assert est.kappa > 1e6
  assert R.ratio(mean, est.witness.stack, est.witness.honest) == est.kappa
  tm = R.estimate_kappa(cw_trimmed_mean, N, F, DIM, k, **opts)
  assert tm.kappa == pytest.approx(R.lower_bound(N, F), rel=1e-5)


@pytest.mark.parametrize('rule', [cw_median, cw_trimmed_mean])
def test_robust_rules_finite_above_lower_bound_below_proven_bound(rule):
  est = R.estimate_kappa(rule, N, F, DIM, jax.random.key(0), budget=1024, **SMALL)
  name = {cw_median: 'median', cw_trimmed_mean: 'trimmed_mean'}[rule]
  assert math.isfinite(est.kappa)
  assert est.kappa >= R.lower_bound(N, F) * (1 - 1e-4)  # the search finds the standard witness
  assert est.kappa <= R.upper_bound(name, N, F) * (1 + 1e-5)  # float32 arithmetic in the rule
  # The witness re-evaluates to the reported ratio, exactly, and is a valid input.
  w = est.witness
  assert w.stack.shape == (N, DIM) and w.honest.sum() == N - F
  assert R.ratio(rule, w.stack, w.honest) == est.kappa
  assert R.ratio(rule, w.stack, np.flatnonzero(w.honest)) == est.kappa


def test_registered_rule_and_witness_roundtrip(tmp_path):
  est = R.estimate_kappa('trimmed_mean', N, F, DIM, jax.random.key(1), budget=512, **SMALL)
  assert est.kappa == pytest.approx(R.upper_bound('trimmed_mean', N, F), rel=1e-5)  # exact
  path = str(tmp_path / 'w.npz')
  est.witness.save(path, kappa=est.kappa)
  w = R.Witness.load(path)
  assert R.ratio('trimmed_mean', w.stack, w.honest) == est.kappa


def test_reproducible_from_the_key():
  a = R.estimate_kappa(cw_median, N, F, DIM, jax.random.key(7), budget=512, **SMALL)
  b = R.estimate_kappa(cw_median, N, F, DIM, jax.random.key(7), budget=512, **SMALL)
  assert a.kappa == b.kappa
  np.testing.assert_array_equal(a.witness.stack, b.witness.stack)
  np.testing.assert_array_equal(a.witness.honest, b.witness.honest)


def test_trusted_positions_stay_honest():
  est = R.estimate_kappa(cw_median, N, F, DIM, jax.random.key(2), budget=512, trusted=(0,), **SMALL)
  assert est.witness.honest[0]


def test_bounds():
  assert R.lower_bound(10, 3) == pytest.approx(0.75)
  assert R.lower_bound(10, 5) == math.inf
  r = 3 / 4
  assert R.upper_bound('trimmed_mean', 10, 3) == pytest.approx(r)  # exact (docs/robustness.md)
  assert R.upper_bound('krum', 10, 3) == pytest.approx(6 * (1 + r))
  assert R.upper_bound('median', 10, 3) == pytest.approx(4 / 3)  # (⌈n/2⌉ − 1)/(⌊n/2⌋ + 1 − f)
  assert R.upper_bound('median', 11, 3) == pytest.approx(5 / 3)
  assert R.upper_bound('geometric_median', 10, 3) == pytest.approx(4 * (1 + r) ** 2)
  nnm = (8 * 3 / 7) * (r + 1)
  assert R.upper_bound('nnm+trimmed_mean', 10, 3) == pytest.approx(nnm)
  assert R.upper_bound(('multikrum', {'m': 1}), 10, 3) == R.upper_bound('krum', 10, 3)
  assert R.upper_bound(('multikrum', {'m': 4}), 10, 3) is None
  assert R.upper_bound('mean', 10, 3) is None
  assert R.upper_bound('mean', 10, 0) == 0.0
  with pytest.raises(ValueError, match='unknown aggregator'):
    R.upper_bound('no_such_rule', 10, 3)
  # Every proven bound is at least the universal lower bound.
  for n in (10, 20, 50):
    for f in range(1, (n + 1) // 2):
      for name in ('trimmed_mean', 'krum', 'median', 'geometric_median'):
        assert R.upper_bound(name, n, f) >= R.lower_bound(n, f)


def test_infeasible_f_raises():
  with pytest.raises(ValueError):
    R.estimate_kappa('krum', 6, 2, 2, jax.random.key(0), budget=256, **SMALL)


# --------------------------------------------------------------------------------------------------
# The canonical witnesses: κ̂ ≥ f/(n − 2f) for every rule, by construction.


def _canonical_max(rule, n, f, trusted=()):
  xs, ms = R.canonical_witnesses(n, f, 2, trusted)
  return max(R.ratio(rule, x, m) for x, m in zip(xs, ms))


def test_canonical_witnesses_reach_the_lower_bound_for_any_rule():
  n, f = 9, 3
  xs, ms = R.canonical_witnesses(n, f, 3, trusted=(0,))
  assert xs.shape == (6, n, 3) and ms.shape == (6, n)
  assert np.all(ms.sum(axis=1) == n - f) and np.all(ms[:, 0])  # trusted position 0 is honest
  # Whatever a rule returns (here: arbitrary fixed points), one honest set sees f/(n − 2f).
  for y in ([0.0, 0.0], [0.3, -2.0], [5.0, 1.0]):
    rule = lambda x, *, f, y=y: jnp.broadcast_to(jnp.asarray(y), x.shape[1:])  # noqa: E731
    assert _canonical_max(rule, n, f) >= R.lower_bound(n, f) * (1 - 1e-12)
  assert R.canonical_witnesses(n, 0)[0].shape[0] == 0


def test_every_registered_rule_is_at_or_above_the_lower_bound():
  from robustjax import aggregators, pipeline

  n, f = 7, 2
  checked = 0
  for name in aggregators.names():
    if aggregators.properties(name).decodes:
      continue
    for spec in (name, f'nnm+{name}'):
      pipe = pipeline.as_rule(spec, f)
      try:
        pipe(np.zeros((n, 2), np.float32))
      except ValueError:
        continue  # infeasible at this (n, f) (e.g. Bulyan needs n > 4f + 3)
      assert _canonical_max(pipe, n, f, pipe.trusted_input) >= R.lower_bound(n, f) * (1 - 1e-9)
      checked += 1
  assert checked >= 20


def test_search_is_at_or_above_the_lower_bound_and_reports_restarts():
  est = R.estimate_kappa('krum', N, F, None, jax.random.key(0), budget=512, restarts=2, **SMALL)
  assert est.kappa >= R.lower_bound(N, F) * (1 - 1e-9)
  assert len(est.per_restart) == 2 and est.dim == N - 1  # default dim: n − 1
  assert R.ratio('krum', est.witness.stack, est.witness.honest) == est.kappa


def test_estimate_kappas_shares_configurations_and_checks_each_rule_exactly():
  rules = [('multikrum', {'m': 1}), ('multikrum', {'m': 3})]
  ests = R.estimate_kappas(rules, N, F, DIM, jax.random.key(5), budget=512, **SMALL)
  for rule, est in zip(rules, ests):
    assert R.ratio(rule, est.witness.stack, est.witness.honest) == est.kappa
  krum = R.estimate_kappa('krum', N, F, DIM, jax.random.key(5), budget=512, **SMALL)
  assert ests[0].kappa == pytest.approx(krum.kappa, rel=1e-6)  # m = 1 is Krum: same search


def test_line_search_improves_on_its_samples():
  est = R.estimate_kappa('geometric_median', N, F, DIM, jax.random.key(4), budget=1024, **SMALL)
  fam = est.per_family
  assert fam['family+line_search'] >= fam['family'] - 1e-6


# --------------------------------------------------------------------------------------------------
# Exact values: CWTM's κ⋆ = f/(n − 2f), CWMed's κ⋆ = (⌈n/2⌉ − 1)/(⌊n/2⌋ + 1 − f).


def _random_inputs(rng, count, n, d):
  """Random inputs of several shapes: Gaussian, heavy-tailed, clustered, with outliers."""
  x = rng.normal(size=(count, n, d))
  x[: count // 4] = rng.standard_cauchy(size=(count // 4, n, d))
  x[count // 4 : count // 2] = np.round(x[count // 4 : count // 2])  # ties
  x[count // 2 : 3 * count // 4, : n // 3] += 50.0 * rng.normal(size=(count // 4, 1, d))
  return x.astype(np.float32)


@pytest.mark.parametrize(
  'n,f',
  [
    (10, 3),
    pytest.param(11, 4, marks=pytest.mark.slow),
    pytest.param(9, 1, marks=pytest.mark.slow),
  ],
)
def test_trimmed_mean_kappa_is_exactly_f_over_n_minus_2f(n, f):
  exact = R.lower_bound(n, f)
  assert R.upper_bound('trimmed_mean', n, f) == pytest.approx(exact)
  # The bound holds on random inputs (every honest set position drawn at random) ...
  rng = np.random.default_rng(n * 100 + f)
  x = _random_inputs(rng, 2048, n, 3)
  masks = np.stack([rng.permutation(n) < n - f for _ in range(x.shape[0])])
  r = np.asarray(R.ratios('trimmed_mean', x, masks, f=f))
  assert np.nanmax(r) <= exact * (1 + 1e-4)
  # ... and on the search's adversarial ones, which reach it exactly.
  est = R.estimate_kappa('trimmed_mean', n, f, 2, jax.random.key(n), budget=2048, **SMALL)
  assert est.kappa == pytest.approx(exact, rel=1e-5)


def median_kappa(n, f):
  return ((n + 1) // 2 - 1) / (n // 2 + 1 - f)


@pytest.mark.parametrize('n,f', [(10, 3), (11, 3), (8, 0), (9, 4)])
def test_median_kappa_is_exact(n, f):
  exact = median_kappa(n, f)
  assert R.upper_bound('median', n, f) == pytest.approx(exact)
  rng = np.random.default_rng(n * 100 + f)
  x = _random_inputs(rng, 2048, n, 3)
  masks = np.stack([rng.permutation(n) < n - f for _ in range(x.shape[0])])
  assert np.nanmax(np.asarray(R.ratios('median', x, masks, f=f))) <= exact * (1 + 1e-4)
  est = R.search_1d('median', n, f, jax.random.key(0), t_grid=3, refine=16, refine_steps=20)
  assert est.kappa == pytest.approx(exact, rel=1e-5)
  assert R.ratio('median', est.witness.stack, est.witness.honest) == est.kappa


def test_coordinatewise_ratio_is_at_most_its_worst_coordinate():
  # The reduction of κ⋆ to one dimension: a ratio of sums is at most the largest per-coordinate
  # ratio (mediant inequality), and each coordinate is a one-dimensional input.
  rng = np.random.default_rng(1)
  n, f = 9, 3
  for _ in range(20):
    x = rng.normal(size=(n, 4)).astype(np.float32) * rng.uniform(0.1, 10, size=4)
    mask = rng.permutation(n) < n - f
    full = R.ratio('meamed', x, mask)
    per = [R.ratio('meamed', x[:, j : j + 1], mask) for j in range(4)]
    assert full <= max(per) * (1 + 1e-5)


def test_search_1d_refuses_other_rules():
  with pytest.raises(ValueError, match='coordinate-wise'):
    R.search_1d('krum', 10, 2)


# --------------------------------------------------------------------------------------------------
# The committed tables.

_DOCS = pathlib.Path(__file__).resolve().parents[1] / 'docs'


def _committed(name):
  path = _DOCS / name
  if not path.exists():
    pytest.skip(f'{name} not generated')
  return json.loads(path.read_text())


@pytest.mark.parametrize('name', ['robustness_results.json', 'robustness_multikrum_results.json'])
def test_no_committed_cell_is_below_the_lower_bound(name):
  results = _committed(name)
  cells = [e for e in results.values() if 'kappa' in e]
  assert cells
  for e in cells:
    assert e['kappa'] >= R.lower_bound(e['n'], e['f']) * (1 - 1e-6), e
    assert not e.get('contradiction'), e


def test_committed_witnesses_recheck():
  sys.path.insert(0, str(_DOCS.parent))
  from robustjax.cli import kappa as study

  results = _committed('robustness_results.json')
  rng = np.random.default_rng(0)
  keys = [k for k, e in results.items() if 'kappa' in e and e['n'] <= 20]
  for key in rng.choice(keys, size=min(12, len(keys)), replace=False):
    e = results[key]
    stack, honest = study.load_witness(str(_DOCS / 'robustness_witnesses'), 'kappa', e['n'], key)
    assert R.ratio(e['rule'], stack, honest) == pytest.approx(e['kappa'], rel=1e-6), key
