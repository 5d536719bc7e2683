"""MDA and SMEA against brute-force float64 NumPy references."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustjax import aggregators
from robustjax.aggregators import _subset

N, F, D = 9, 3, 5
RULES = ['mda', 'smea']


def ref_objective(x, kind):
  """Squared diameter (MDA) or top covariance eigenvalue (SMEA) of the rows of x, float64."""
  x = np.asarray(x, np.float64)
  if not np.all(np.isfinite(x)) or np.abs(x).max() > 1e30:
    return np.inf
  if kind == 'mda':
    return ((x[:, None] - x[None]) ** 2).sum(-1).max()
  c = x - x.mean(0)  # top eigenvalue of c.T @ c / |S| = (top singular value of c)² / |S|
  return np.linalg.svd(c, compute_uv=False)[0] ** 2 / len(x)


def ref_subset(x, f, kind):
  """The best (n − f)-subset by brute force (ties: the first in lexicographic order)."""
  n = len(x)
  best, best_val = None, np.inf
  for out in itertools.combinations(range(n), f):
    keep = [i for i in range(n) if i not in out]
    v = ref_objective(x[keep], kind)
    if best is None or v < best_val:
      best, best_val = keep, v
  return np.array(best), best_val


def ref_rule(x, f, kind):
  keep, _ = ref_subset(x, f, kind)
  return np.asarray(x, np.float64)[keep].mean(0)


def make_stack(seed, n=N, d=D, outliers=F):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  x[:outliers] += rng.normal(size=(outliers, d)) * 3.0 + 2.0
  return x[rng.permutation(n)].astype(np.float32)


@pytest.mark.parametrize('kind', RULES)
@pytest.mark.parametrize('f', [1, F])
def test_exact_matches_brute_force(kind, f):
  rule = aggregators.get(kind)
  for seed in range(3):
    x = make_stack(seed, outliers=f)
    np.testing.assert_allclose(rule(x, f=f), ref_rule(x, f, kind), rtol=1e-5, atol=1e-5)


def test_mda_and_smea_can_disagree():
  """The two criteria are different rules (guards against testing one twice)."""
  rng = np.random.default_rng(11)
  differ = False
  for _ in range(10):
    x = rng.normal(size=(N, D)) * rng.uniform(0.2, 3.0, size=(1, D))
    if set(ref_subset(x, F, 'mda')[0]) != set(ref_subset(x, F, 'smea')[0]):
      differ = True
      break
  assert differ


@pytest.mark.parametrize('kind', RULES)
def test_f_zero_is_the_mean(kind):
  x = make_stack(0)
  np.testing.assert_allclose(aggregators.get(kind)(x, f=0), x.mean(0), atol=1e-6)


@pytest.mark.parametrize('kind', RULES)
def test_permutation_and_translation(kind):
  rule = aggregators.get(kind)
  x = make_stack(1)
  perm = np.random.default_rng(1).permutation(N)
  base = np.asarray(rule(x, f=F))
  np.testing.assert_allclose(rule(x[perm], f=F), base, atol=1e-5)
  c = np.random.default_rng(2).normal(size=(D,)).astype(np.float32) * 10
  np.testing.assert_allclose(rule(x + c, f=F), base + c, atol=1e-4)


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf, 1e38])
@pytest.mark.parametrize('kind', RULES)
def test_nonfinite_byzantine_inputs(kind, bad):
  rule = aggregators.get(kind)
  rng = np.random.default_rng(3)
  x = make_stack(3, outliers=0)
  where = rng.choice(N, size=F, replace=False)
  x[where[0]] = bad
  x[where[1], rng.integers(D)] = bad
  x[where[2], :2] = bad
  out = np.asarray(rule(x, f=F))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, ref_rule(x, F, kind), atol=1e-5)
  with warnings.catch_warnings():  # (warns once per compilation: tested below)
    warnings.simplefilter('ignore')
    approx = np.asarray(rule(x, f=F, max_subsets=1))
    keep = np.asarray(_mask(kind)(x, f=F, max_subsets=1))
  assert np.all(np.isfinite(approx))
  assert not set(where) & set(np.nonzero(keep)[0].tolist())


@pytest.mark.parametrize(
  'n,f,match',
  [(6, 3, 'n > 2f'), (5, -1, 'f must be >= 0')],
)
@pytest.mark.parametrize('kind', RULES)
def test_invalid_counts(kind, n, f, match):
  with pytest.raises(ValueError, match=f'{kind}: .*{match}'):
    aggregators.get(kind)(jnp.zeros((n, 3)), f=f)


@pytest.mark.parametrize('kind', RULES)
def test_invalid_stacks_and_params(kind):
  rule = aggregators.get(kind)
  with pytest.raises(ValueError, match=f'{kind}: .*empty'):
    rule({}, f=1)
  with pytest.raises(ValueError, match=f'{kind}: .*leading'):
    rule({'a': jnp.zeros((N, 3)), 'b': jnp.zeros((N - 1, 2))}, f=1)
  with pytest.raises(ValueError, match=f'{kind}: max_subsets'):
    rule(jnp.zeros((N, 3)), f=1, max_subsets=0)


@pytest.mark.parametrize('kind', RULES)
def test_pytree_bf16_and_jit(kind):
  rule = aggregators.get(kind)
  x = make_stack(4)
  tree = {'w': x[:, :4].reshape(N, 2, 2), 'b': x[:, 4:]}
  out = rule(tree, f=F)
  flat = np.concatenate([np.asarray(out['b']), np.asarray(out['w']).ravel()])
  expected = np.asarray(rule(np.concatenate([x[:, 4:], x[:, :4]], axis=1), f=F))
  np.testing.assert_allclose(flat, expected, atol=1e-5)
  with jax.disable_jit():  # f = 1: 9 subsets, so that the eager loop stays short
    eager = rule(x, f=1)
  np.testing.assert_allclose(rule(x, f=1), eager, atol=1e-5)
  xb = jnp.asarray(x, jnp.bfloat16)
  outb = rule({'a': xb}, f=F)['a']
  assert outb.dtype == jnp.bfloat16
  ref = ref_rule(np.asarray(xb, np.float32), F, kind)
  np.testing.assert_allclose(np.asarray(outb, np.float32), ref, atol=0.05)


def _mask(kind):
  return _subset.mda_mask if kind == 'mda' else _subset.smea_mask


@pytest.mark.parametrize('kind', RULES)
def test_approximation_warns_and_is_close(kind):
  """Beyond `max_subsets`: a warning, a subset never better than the exact one, close to it."""
  n, f = 12, 4
  ratios = []
  for seed in range(4):
    x = make_stack(seed, n=n, outliers=f)
    _, exact_val = ref_subset(x, f, kind)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      keep = np.asarray(_mask(kind)(x, f=f, max_subsets=100))
    if seed == 0:  # the first call compiles, and the warning comes at trace time
      assert any(f'{kind}: C(n, f) = C(12, 4)' in str(w.message) for w in caught)
      assert any('approximate' in str(w.message) for w in caught)
    assert keep.sum() == n - f
    val = ref_objective(x[keep], kind)
    assert val >= exact_val * (1 - 1e-5)
    ratios.append(val / exact_val)
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      out = aggregators.get(kind)(x, f=f, max_subsets=100)
    np.testing.assert_allclose(out, x[keep].astype(np.float64).mean(0), atol=1e-5)
  assert max(ratios) < 1.25 and np.median(ratios) < 1.01


def test_default_limits():
  assert _subset.is_exact('mda', 12, 4) and _subset.is_exact('smea', 12, 4)
  assert _subset.is_exact('mda', 22, 6) and not _subset.is_exact('smea', 22, 6)
  assert not _subset.is_exact('mda', 64, 8) and not _subset.is_exact('smea', 64, 8)
  assert _subset.is_exact('smea', 64, 8, max_subsets=10**10)


@pytest.mark.parametrize('kind', RULES)
def test_centred_distances_keep_the_float64_selection(kind):
  rng = np.random.default_rng(6)
  d = 2000
  common = rng.normal(size=(d,)) * 100.0
  x = (common + rng.normal(size=(N, d)) * 1e-2 * rng.uniform(0.5, 2.0, size=(N, 1))).astype(
    np.float32
  )
  keep, _ = ref_subset(x.astype(np.float64), F, kind)
  got = np.nonzero(np.asarray(_mask(kind)(x, f=F)))[0]
  np.testing.assert_array_equal(got, keep)


@pytest.mark.parametrize('kind', RULES)
def test_blocked_enumeration_with_a_remainder(kind, monkeypatch):
  """Blocks of 5 subsets over C(9, 3) = 84 (a last partial block) give the brute-force answer."""
  monkeypatch.setattr(_subset, '_BLOCK_ELEMENTS', 5 * (N - F) ** 2)
  x = make_stack(8, d=3)  # a new shape: compiled afresh with the small blocks
  np.testing.assert_allclose(aggregators.get(kind)(x, f=F), ref_rule(x, F, kind), atol=1e-5)


def test_lapack_eigen_solvers_match_numpy_under_vmap():
  """`robustjax._lapack`: eigh / eigvalsh of a batch (vmap, nested vmap), solved one matrix at a
  time when the process has several CPU devices (the tests run with 8), equal NumPy's."""
  from robustjax import _lapack

  rng = np.random.default_rng(0)
  a = rng.normal(size=(2, 3, 5, 5))
  m = (a @ np.swapaxes(a, -1, -2)).astype(np.float32)
  ref_w, ref_v = np.linalg.eigh(m.astype(np.float64))
  w = jax.jit(jax.vmap(jax.vmap(_lapack.eigvalsh)))(m)
  np.testing.assert_allclose(np.asarray(w), ref_w, rtol=1e-4, atol=1e-4)
  w2, v2 = jax.jit(jax.vmap(_lapack.eigh))(m[0])
  np.testing.assert_allclose(np.asarray(w2), ref_w[0], rtol=1e-4, atol=1e-4)
  top = np.abs(np.sum(np.asarray(v2)[..., -1] * ref_v[0][..., -1], axis=-1))
  np.testing.assert_allclose(top, 1.0, atol=1e-4)  # the top eigenvector, up to sign
