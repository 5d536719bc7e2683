"""Tests for robustjax.robustness: the ratio, the κ search, its witnesses, the bounds."""

import math

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


def test_mean_is_not_robust_kappa_grows_with_the_search_scale():
  k = jax.random.key(3)
  small = R.estimate_kappa(mean, N, F, DIM, k, budget=512, max_scale=10.0, **SMALL).kappa
  large = R.estimate_kappa(mean, N, F, DIM, k, budget=512, max_scale=1e4, **SMALL).kappa
  assert large > 1e4 * small / 10  # quadratic in the scale: no finite κ bounds the mean
  assert large > 1e5
  # and with more local search (gradient ascent + hill climbing) it keeps growing
  grown = R.estimate_kappa(
    mean, N, F, DIM, k, budget=4096, max_scale=10.0, batch=256, attacks=False, local_batch=16
  )
  assert grown.kappa > 10 * small
  assert 'local_search' in grown.witness.family


@pytest.mark.parametrize('rule', [cw_median, cw_trimmed_mean])
def test_robust_rules_finite_above_lower_bound_below_proven_bound(rule):
  est = R.estimate_kappa(rule, N, F, DIM, jax.random.key(0), budget=1024, **SMALL)
  name = {cw_median: 'median', cw_trimmed_mean: 'trimmed_mean'}[rule]
  assert math.isfinite(est.kappa)
  assert est.kappa >= R.lower_bound(N, F) * (1 - 1e-4)  # the search finds the standard witness
  assert est.kappa <= R.upper_bound(name, N, F)
  # The witness re-evaluates to the reported ratio, exactly, and is a valid input.
  w = est.witness
  assert w.stack.shape == (N, DIM) and w.honest.sum() == N - F
  assert R.ratio(rule, w.stack, w.honest) == est.kappa
  assert R.ratio(rule, w.stack, np.flatnonzero(w.honest)) == est.kappa


def test_registered_rule_and_witness_roundtrip(tmp_path):
  est = R.estimate_kappa('trimmed_mean', N, F, DIM, jax.random.key(1), budget=512, **SMALL)
  assert R.lower_bound(N, F) * (1 - 1e-4) <= est.kappa <= R.upper_bound('trimmed_mean', N, F)
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
  assert R.upper_bound('trimmed_mean', 10, 3) == pytest.approx(6 * 3 / 4 * (1 + r))
  assert R.upper_bound('krum', 10, 3) == pytest.approx(6 * (1 + r))
  assert R.upper_bound('median', 10, 3) == pytest.approx(4 * (1 + r) ** 2)
  assert R.upper_bound('geometric_median', 10, 3) == pytest.approx(4 * (1 + r) ** 2)
  nnm = (8 * 3 / 7) * (6 * 3 / 4 * (1 + r) + 1)
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
