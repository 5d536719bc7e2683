"""Tests for robustjax.data: loaders, synthetic problems, heterogeneous splits, index padding."""

import sys
import types

import numpy as np
import pytest

from robustjax import data

METHODS = ['iid', 'dirichlet', 'gamma', 'extreme']


@pytest.fixture(scope='module')
def digits():
  return data.load('digits')


def _balanced_labels(num=2000, classes=10, seed=0):
  return np.random.default_rng(seed).permutation(np.arange(num) % classes).astype(np.int32)


def _proportions(labels, idx, classes):
  return np.bincount(labels[idx], minlength=classes) / len(idx)


def _tv(p, q):
  return 0.5 * np.abs(p - q).sum()


# ------------------------------------------------------------------------------------------------
# Loaders


def test_digits_shapes_and_ranges(digits):
  assert digits.name == 'digits' and digits.num_classes == 10
  assert digits.input_shape == (8, 8, 1)
  assert digits.x_train.shape[1:] == (8, 8, 1) and digits.x_test.shape[1:] == (8, 8, 1)
  assert digits.x_train.shape[0] + digits.x_test.shape[0] == 1797
  assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int32
  assert digits.x_train.min() >= 0.0 and digits.x_train.max() == 1.0
  assert set(np.unique(digits.y_train)) == set(range(10))
  # Stratified: every class has ~20 % of its samples in the test set.
  tr = np.bincount(digits.y_train, minlength=10)
  te = np.bincount(digits.y_test, minlength=10)
  np.testing.assert_allclose(te / (tr + te), 0.2, atol=0.01)


def test_digits_split_is_deterministic_and_disjoint(digits):
  again = data.load('digits', seed=123)  # The training seed does not move the test set.
  np.testing.assert_array_equal(digits.x_test, again.x_test)
  rows = {r.tobytes() for r in digits.x_train.reshape(len(digits.x_train), -1)}
  overlap = sum(r.tobytes() in rows for r in digits.x_test.reshape(len(digits.x_test), -1))
  assert overlap < 5  # Only the few genuine duplicate images of the raw data set.


def test_unknown_dataset_lists_names():
  with pytest.raises(ValueError, match='digits.*mnist'):
    data.load('imagenet')


@pytest.fixture
def no_local_files(tmp_path, monkeypatch):
  """No data folder or Hugging Face cache of this machine is found."""
  monkeypatch.setenv('HF_HOME', str(tmp_path))
  for var in ('HF_HUB_CACHE', 'HF_DATASETS_CACHE', data.DATA_DIR_ENV):
    monkeypatch.delenv(var, raising=False)


def test_missing_datasets_extra_names_the_install_command(monkeypatch, no_local_files):
  monkeypatch.setitem(sys.modules, 'datasets', None)  # `import datasets` raises ImportError.
  with pytest.raises(ImportError, match=r"pip install 'robustjax\[datasets\]'"):
    data.load('mnist')


def test_a_failing_hub_gives_a_clear_error(monkeypatch, no_local_files):
  def load_dataset(*args, **kwargs):
    raise ConnectionError('no network')

  fake = types.ModuleType('datasets')
  fake.load_dataset = load_dataset
  monkeypatch.setitem(sys.modules, 'datasets', fake)
  monkeypatch.setattr(data, '_hub_reachable', lambda timeout=1.0: True)
  with pytest.raises(RuntimeError, match='ConnectionError.*data_dir.*digits'):
    data.load('fashion_mnist')


def test_hf_loader_converts_images(monkeypatch, no_local_files):
  rng = np.random.default_rng(0)
  split = {
    'img': [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)],
    'label': [1, 2, 3],
  }
  fake = types.ModuleType('datasets')
  fake.load_dataset = lambda *a, **k: {'train': split, 'test': split}
  monkeypatch.setitem(sys.modules, 'datasets', fake)
  monkeypatch.setattr(data, '_hub_reachable', lambda timeout=1.0: True)
  ds = data.load('cifar10')
  assert ds.x_train.shape == (3, 32, 32, 3) and ds.x_train.dtype == np.float32
  np.testing.assert_allclose(ds.x_train[0], split['img'][0] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(ds.y_test, [1, 2, 3])


def test_synthetic_classification():
  ds = data.load('synthetic_classification', seed=3, num_samples=300, num_test=50, dim=6)
  assert ds.x_train.shape == (300, 6) and ds.x_test.shape == (50, 6) and ds.input_shape == (6,)
  again = data.synthetic_classification(seed=3, num_samples=300, num_test=50, dim=6)
  np.testing.assert_array_equal(ds.x_train, again.x_train)
  # Nearest class mean classifies a well-separated mixture well.
  means = ds.info['means']
  pred = np.argmin(((ds.x_test[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert np.mean(pred == ds.y_test) > 0.7


def test_synthetic_linear_regression():
  ds = data.load('synthetic_linear_regression', seed=1, heterogeneity=0.5)
  a, b = ds.x_train.astype(np.float64), ds.y_train.astype(np.float64)
  assert a.shape == (100, 100) and b.shape == (100,) and ds.num_classes == 0
  w = data.least_squares_solution(ds)
  np.testing.assert_allclose(w, ds.info['solution'])
  np.testing.assert_allclose(a.T @ (a @ w - b), 0.0, atol=1e-6)  # Normal equations.
  lam = 0.1
  w_r = data.least_squares_solution(ds, ridge=lam)
  np.testing.assert_allclose(a.T @ (a @ w_r - b) / 100 + lam * w_r, 0.0, atol=1e-8)


def _subset_gradients(ds, w, k):
  a, b = ds.x_train.astype(np.float64), ds.y_train.astype(np.float64)
  g = a * (a @ w - b)[:, None]
  return g.reshape(k, -1, g.shape[1]).mean(1)


def test_linear_regression_heterogeneity_enters_the_covariates():
  """σ_H spreads the subset gradients around the full gradient (relative to its size)."""

  def relative_spread(sigma):
    ds = data.synthetic_linear_regression(
      num_samples=400, dim=20, num_subsets=100, heterogeneity=sigma, seed=0
    )
    g = _subset_gradients(ds, np.zeros(20), 100)
    return np.mean(np.sum((g - g.mean(0)) ** 2, 1)) / np.sum(g.mean(0) ** 2)

  spreads = [relative_spread(s) for s in (0.0, 0.5, 1.0, 2.0)]
  assert all(x < y for x, y in zip(spreads, spreads[1:])), spreads
  assert spreads[-1] > 5 * spreads[0]  # 4.8, 9.1, 18.8, 39.4 at this seed
  ds = data.synthetic_linear_regression(heterogeneity=0.0)
  np.testing.assert_allclose(ds.info['scales'], 1.0)
  ds = data.synthetic_linear_regression(heterogeneity=2.0, seed=3)
  np.testing.assert_allclose(np.mean(ds.info['scales'] ** 2), 1.0)  # the objective keeps its size


def test_linear_regression_regimes():
  # Interpolating (the paper's 100 x 100): F* = 0 and every subset gradient vanishes at w*.
  ds = data.synthetic_linear_regression(heterogeneity=1.0, noise=0.5, seed=2)
  assert ds.info['optimum'] < 1e-10
  g = _subset_gradients(ds, ds.info['solution'], 100)
  assert np.max(np.abs(g)) < 1e-4
  # Non-interpolating (more samples than dimensions, label noise): F* > 0 and G > 0.
  ds = data.synthetic_linear_regression(
    num_samples=500, dim=100, num_subsets=100, noise=1.0, seed=2
  )
  assert ds.info['optimum'] > 0.1
  g = _subset_gradients(ds, ds.info['solution'], 100)
  np.testing.assert_allclose(g.mean(0), 0.0, atol=1e-6)
  assert np.mean(np.sum(g**2, 1)) > 0.1
  with pytest.raises(ValueError, match='must divide'):
    data.synthetic_linear_regression(num_samples=100, num_subsets=30)


# ------------------------------------------------------------------------------------------------
# Splits


@pytest.mark.parametrize('method', METHODS)
def test_split_covers_every_sample_once_and_is_deterministic(method):
  labels = _balanced_labels(500)
  parts = data.split(labels, 7, method, seed=5, alpha=0.3, gamma=0.4)
  assert len(parts) == 7 and all(len(p) > 0 for p in parts)
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(500))
  again = data.split(labels, 7, method, seed=5, alpha=0.3, gamma=0.4)
  for p, q in zip(parts, again):
    np.testing.assert_array_equal(p, q)
  other = data.split(labels, 7, method, seed=6, alpha=0.3, gamma=0.4)
  assert any(not np.array_equal(p, q) for p, q in zip(parts, other))


def test_iid_proportions_match_global():
  labels = _balanced_labels(5000)
  parts = data.split(labels, 10, 'iid', seed=0)
  assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
  glob = _proportions(labels, np.arange(len(labels)), 10)
  assert max(_tv(_proportions(labels, p, 10), glob) for p in parts) < 0.1


def test_dirichlet_alpha_controls_concentration():
  labels = _balanced_labels(10000)
  glob = np.full(10, 0.1)

  def mean_tv(alpha):
    parts = data.split(labels, 10, 'dirichlet', alpha=alpha, seed=0)
    return np.mean([_tv(_proportions(labels, p, 10), glob) for p in parts])

  small, large = mean_tv(0.05), mean_tv(1000.0)
  assert small > 0.6  # Concentrated: each worker holds mostly one or two classes.
  assert large < 0.05  # Near iid.


def test_dirichlet_never_leaves_a_worker_empty():
  labels = _balanced_labels(60, classes=3)
  parts = data.split(labels, 40, 'dirichlet', alpha=0.01, seed=0)
  assert min(len(p) for p in parts) >= 1
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(60))


def test_gamma_endpoints_and_monotone_heterogeneity():
  labels = _balanced_labels(3000)
  for a, b in zip(
    data.split(labels, 6, 'gamma', gamma=0.0, seed=2), data.split(labels, 6, 'extreme', seed=2)
  ):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(
    data.split(labels, 6, 'gamma', gamma=1.0, seed=2), data.split(labels, 6, 'iid', seed=2)
  ):
    np.testing.assert_array_equal(a, b)
  glob = np.full(10, 0.1)
  tvs = [
    np.mean(
      [_tv(_proportions(labels, p, 10), glob) for p in data.split(labels, 6, 'gamma', gamma=g)]
    )
    for g in (0.0, 0.3, 0.6, 1.0)
  ]
  assert all(x > y for x, y in zip(tvs, tvs[1:]))


def test_gamma_shares_an_iid_fraction():
  # With gamma = 0.5 every worker holds about 0.5 * N / n shared samples covering every class.
  labels = _balanced_labels(4000)
  for p in data.split(labels, 8, 'gamma', gamma=0.5, seed=0):
    counts = np.bincount(labels[p], minlength=10)
    assert counts.min() >= 0.5 * 0.5 * 4000 / 8 / 10  # Half the expected iid share, at least.


@pytest.mark.parametrize('n', [3, 4, 7, 20])
def test_extreme_worker_label_count(digits, n):
  parts = data.split(digits.y_train, n, 'extreme', seed=0)
  bound = -(-10 // n) + 1
  assert max(len(np.unique(digits.y_train[p])) for p in parts) <= bound


def test_split_accepts_regression_targets():
  y = np.random.default_rng(0).normal(size=50)
  parts = data.split(y, 5, 'extreme')
  # Contiguous chunks of the sorted targets: worker ranges do not overlap.
  ranges = sorted((y[p].min(), y[p].max()) for p in parts)
  assert all(hi < lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))


def test_split_errors():
  labels = _balanced_labels(20)
  with pytest.raises(ValueError, match='dirichlet.*extreme.*gamma.*iid'):
    data.split(labels, 2, 'pathological')
  with pytest.raises(ValueError, match='21 workers'):
    data.split(labels, 21, 'iid')
  with pytest.raises(ValueError, match='alpha'):
    data.split(labels, 2, 'dirichlet', alpha=0.0)
  with pytest.raises(ValueError, match='gamma'):
    data.split(labels, 2, 'gamma', gamma=1.5)
  with pytest.raises(ValueError, match='num_workers'):
    data.split(labels, 0, 'iid')
  with pytest.raises(ValueError, match='integer'):
    data.split(labels.astype(np.float32), 2, 'dirichlet')


def test_pad_indices():
  parts = [np.array([4, 7, 9]), np.array([1]), np.array([0, 2, 3, 5, 6])]
  idx, sizes = data.pad_indices(parts)
  assert idx.dtype == np.int32 and sizes.dtype == np.int32 and idx.shape == (3, 5)
  np.testing.assert_array_equal(sizes, [3, 1, 5])
  np.testing.assert_array_equal(idx[0], [4, 7, 9, 4, 7])
  np.testing.assert_array_equal(idx[1], [1] * 5)
  for i, p in enumerate(parts):  # Any column below sizes[i] (or any column at all) is worker i's.
    assert set(idx[i, : sizes[i]]) == set(p) and set(idx[i]) <= set(p)
  with pytest.raises(ValueError, match='empty'):
    data.pad_indices([np.array([1]), np.array([], dtype=np.int64)])
