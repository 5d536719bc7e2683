"""The stack primitives against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustjax import stack as stk

# Jitted once per shape: eager op-by-op dispatch is slower than compiling the whole function.
_pairwise = jax.jit(stk.pairwise_sq_dists)


def _tree(n, seed=0, scale=1.0, offset=0.0):
  rng = np.random.default_rng(seed)
  return {
    'w': (offset + scale * rng.normal(size=(n, 3, 4))).astype(np.float32),
    'b': (offset + scale * rng.normal(size=(n, 5))).astype(np.float32),
    'z': {'s': (offset + scale * rng.normal(size=(n, 1))).astype(np.float32)},
  }


def _flat64(tree):
  return np.concatenate(
    [np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)], axis=1
  )


def _ref_dists(flat):
  diff = flat[:, None, :] - flat[None, :, :]
  return np.sum(diff * diff, axis=-1)


@pytest.mark.parametrize('n', [1, 2, 7])
def test_pairwise_sq_dists_matches_float64(n):
  tree = _tree(n, seed=n)
  got = np.asarray(_pairwise(tree))
  want = _ref_dists(_flat64(tree))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.all(np.diag(got) == 0)
  np.testing.assert_allclose(got, got.T)


def test_pairwise_sq_dists_explicit_center():
  tree = _tree(5, seed=3)
  center = jax.tree.map(lambda x: x.mean(0), tree)
  got = np.asarray(_pairwise(tree, center=center))
  np.testing.assert_allclose(got, _ref_dists(_flat64(tree)), rtol=1e-5, atol=1e-5)


def test_pairwise_sq_dists_precision_with_large_common_component():
  # A common component ~3000x larger than the spread between workers (model weights look so).
  n, d = 8, 4096
  rng = np.random.default_rng(0)
  common = rng.normal(size=(1, d)) * 30.0
  x64 = common + 0.01 * rng.normal(size=(n, d))
  x = x64.astype(np.float32)
  want = _ref_dists(x.astype(np.float64))  # exact distances of the float32 inputs
  off = ~np.eye(n, dtype=bool)
  got = np.asarray(_pairwise(x))
  assert np.max(np.abs(got - want)[off] / want[off]) < 1e-3
  # The naive uncentred formula in float32 is far off (this is why the primitive centres).
  sq = np.sum(x * x, axis=1, dtype=np.float32)
  naive = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
  assert np.max(np.abs(naive - want)[off] / want[off]) > 1e-2


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf, 1e38])
def test_pairwise_sq_dists_nonfinite_worker(bad):
  x = np.random.default_rng(1).normal(size=(6, 10)).astype(np.float32)
  want = _ref_dists(x.astype(np.float64))
  x[2, 3] = bad
  got = np.asarray(_pairwise(x))
  others = [0, 1, 3, 4, 5]
  assert np.all(np.isinf(np.delete(got[2], 2))) and np.all(np.isinf(np.delete(got[:, 2], 2)))
  assert got[2, 2] == 0
  np.testing.assert_allclose(got[np.ix_(others, others)], want[np.ix_(others, others)], rtol=1e-5)


def test_weighted_sum_vector_and_matrix_weights():
  tree = _tree(6, seed=4)
  flat = _flat64(tree)
  rng = np.random.default_rng(5)
  w = rng.normal(size=6).astype(np.float32)
  out = stk.weighted_sum(w, tree)
  np.testing.assert_allclose(
    stk.flatten(jax.tree.map(lambda a: a[None], out))[0], w @ flat, rtol=1e-5
  )
  assert out['w'].shape == (3, 4)
  wk = rng.normal(size=(3, 6)).astype(np.float32)
  outk = stk.weighted_sum(wk, tree)
  assert outk['w'].shape == (3, 3, 4)
  np.testing.assert_allclose(stk.flatten(outk), wk @ flat, rtol=1e-5, atol=1e-5)


def test_weighted_sum_ignore_nonfinite():
  x = np.ones((4, 3), np.float32)
  x[1] = np.nan
  x[2, 0] = np.inf
  w = np.array([0.5, 0.0, 0.0, 0.5], np.float32)
  np.testing.assert_allclose(stk.weighted_sum(w, x), [1.0, 1.0, 1.0])
  assert not np.all(np.isfinite(np.asarray(stk.weighted_sum(w, x, ignore_nonfinite=False))))
  # The plain product first, the cleaned one only when that is not finite: the same answers
  # under jit and vmap (the cleaned one for the whole batch when any element needs it), for (n,)
  # and (k, n) weights.
  wk = np.stack([w, np.array([0.0, 0.0, 0.0, 1.0], np.float32)])
  np.testing.assert_allclose(jax.jit(stk.weighted_sum)(wk, x), [[1.0, 1.0, 1.0]] * 2)
  batched = jax.vmap(stk.weighted_sum, in_axes=(None, 0))(w, np.stack([x, np.ones_like(x)]))
  np.testing.assert_allclose(batched, [[1.0, 1.0, 1.0]] * 2)


def test_weighted_sum_with_finite_flags():
  # With `finite` the flags decide: all True, the plain product; a False one, the cleaned
  # product, and NaN exactly for the outputs that use an unreadable slice. Under vmap a batch
  # mixing both cases gives each element its own answer.
  x = np.ones((4, 3), np.float32)
  x[1] = np.nan
  finite = np.array([True, False, True, True])
  wk = np.array([[0.5, 0.0, 0.0, 0.5], [0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
  want = [[1.0] * 3, [np.nan] * 3, [np.nan] * 3]  # uses slice 1; uses no finite slice
  np.testing.assert_allclose(jax.jit(stk.weighted_sum)(wk, x, finite=finite), want)
  clean = np.ones_like(x)
  np.testing.assert_allclose(stk.weighted_sum(wk[:1], clean, finite=np.ones(4, bool)), [[1.0] * 3])
  batched = jax.vmap(lambda x, ok: stk.weighted_sum(wk, x, finite=ok))(
    np.stack([x, clean]), np.stack([finite, np.ones(4, bool)])
  )
  np.testing.assert_allclose(batched[0], want)
  np.testing.assert_allclose(batched[1], [[1.0] * 3, [1.0] * 3, [np.nan] * 3])


def test_scaled_sq_dists_to_under_vmap():
  # A batch where one stack needs the rescaled path (squares overflow) and one does not: each
  # element's distances in units of its scale are its own (the rescaled path for both).
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 6, 9)).astype(np.float32)
  x[1] *= 1e20
  p = rng.normal(size=(2, 9)).astype(np.float32)
  p[1] *= 1e20
  sq, scale = jax.vmap(stk.scaled_sq_dists_to)(jnp.asarray(x), jnp.asarray(p))
  for i in range(2):
    want = ((x[i].astype(np.float64) - p[i]) ** 2).sum(1)
    got = np.asarray(sq[i], np.float64) * float(scale[i]) ** 2
    np.testing.assert_allclose(got, want, rtol=1e-5)
  sq, scale = jax.vmap(stk.scaled_sq_dists_to)(jnp.asarray(x[:1]), jnp.asarray(p[:1]))
  assert float(scale[0]) == 1.0  # every element plain: the plain path


def test_weighted_sum_keeps_dtype():
  x = jnp.ones((4, 3), jnp.bfloat16)
  out = stk.weighted_sum(jnp.full(4, 0.25), x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), 1.0)


def test_norms_and_dists_to():
  tree = _tree(5, seed=6)
  flat = _flat64(tree)
  np.testing.assert_allclose(stk.sq_norms(tree), np.sum(flat**2, 1), rtol=1e-5)
  np.testing.assert_allclose(stk.norms(tree), np.linalg.norm(flat, axis=1), rtol=1e-5)
  point = jax.tree.map(lambda a: a[0], tree)
  np.testing.assert_allclose(
    stk.sq_dists_to(tree, point), np.sum((flat - flat[0]) ** 2, 1), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.int32])
def test_row_max_abs_matches_numpy_with_nonfinite_rows_and_a_centre(dtype):
  rng = np.random.default_rng(5)
  x = rng.normal(size=(6, 301)) * 10
  x[0, 17] = -1e3  # the largest magnitude is negative
  x[1, 3] = 2e3
  center = rng.normal(size=301)
  if jnp.issubdtype(dtype, jnp.floating):
    x[2, 5] = np.nan
    x[3, 9] = -np.inf
    x[4, 2] = np.inf
  x = np.asarray(jnp.asarray(x, dtype), np.float64)
  center = np.asarray(jnp.asarray(center, dtype), np.float64)
  stack = {'a': jnp.asarray(x[:, :200], dtype), 'b': jnp.asarray(x[:, 200:], dtype)}
  got = np.asarray(stk.row_max_abs(stack), np.float64)
  want = np.abs(x).max(1)
  want = np.where(np.isnan(want), np.inf, want)  # every non-finite slice is +inf
  np.testing.assert_allclose(got, want, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-7)
  c = {'a': jnp.asarray(center[:200], dtype), 'b': jnp.asarray(center[200:], dtype)}
  got = np.asarray(stk.row_max_abs(stack, c), np.float64)
  cast = np.asarray(jnp.asarray(x - center, dtype), np.float64)  # the difference as rounded
  want = np.abs(cast).max(1)
  want = np.where(np.isnan(want), np.inf, want)
  np.testing.assert_allclose(got, want, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6)


def test_worker_finite():
  x = np.zeros((4, 3), np.float32)
  x[2, 1] = np.nan
  np.testing.assert_array_equal(stk.worker_finite({'a': x, 'b': x[:, :1]}), [1, 1, 0, 1])


def test_flatten_unflatten_round_trip():
  tree = _tree(4, seed=7)
  flat = stk.flatten(tree)
  assert flat.shape == (4, 12 + 5 + 1)
  back = stk.unflatten(flat, tree)
  jax.tree.map(np.testing.assert_array_equal, back, tree)
  one = stk.unflatten(flat[1], tree)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b[1]), one, tree)
  with pytest.raises(ValueError, match='unflatten'):
    stk.unflatten(jnp.concatenate([flat, flat[:, :1]], axis=1), tree)
  with pytest.raises(ValueError, match='unflatten'):
    stk.unflatten(flat[:, :-1], tree)


def test_tree_index():
  tree = _tree(5, seed=8)
  sub = stk.tree_index(tree, np.array([4, 1]))
  np.testing.assert_array_equal(sub['b'], tree['b'][[4, 1]])


def test_num_workers_errors():
  assert stk.num_workers(_tree(3), 'rule') == 3
  with pytest.raises(ValueError, match='myrule.*empty'):
    stk.num_workers({}, 'myrule')
  with pytest.raises(ValueError, match='myrule.*empty'):
    stk.num_workers(np.zeros((0, 2)), 'myrule')
  with pytest.raises(ValueError, match='myrule.*same leading'):
    stk.num_workers({'a': np.zeros((3, 2)), 'b': np.zeros((4,))}, 'myrule')
  with pytest.raises(ValueError, match='myrule.*scalar'):
    stk.num_workers({'a': np.zeros((3, 2)), 'b': np.float32(1.0)}, 'myrule')
