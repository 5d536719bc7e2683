"""The CPU column-blocked kernels of `robustjax.stack` (large d) against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustjax import stack as stk


def _data(n=4, d=150_001, seed=0):
  # d > 2 * (2**18 // n) so the blocked path with a ragged tail runs.
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d)) + 50.0).astype(np.float32)


def test_blocked_pairwise_sq_dists_matches_float64():
  x = _data()
  x64 = x.astype(np.float64)
  ref = ((x64[:, None] - x64[None]) ** 2).sum(-1)
  got = np.asarray(stk.pairwise_sq_dists(jnp.asarray(x)))
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_blocked_weighted_sum_ignores_nonfinite_and_matches_float64():
  x = _data()
  w = np.array([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.0]])
  ref = w @ x.astype(np.float64)
  x[3, 7] = np.nan
  x[3, -1] = np.inf
  got = np.asarray(stk.weighted_sum(jnp.asarray(w, jnp.float32), jnp.asarray(x)))
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  got1 = np.asarray(stk.weighted_sum(jnp.asarray(w[0], jnp.float32), jnp.asarray(x)))
  np.testing.assert_allclose(got1, ref[0], rtol=1e-5)


def test_sq_norms_and_blocked_dists_match_float64():
  x = _data()
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(stk.sq_norms(jnp.asarray(x)), (x64**2).sum(1), rtol=1e-5)
  got = stk.sq_norms(jnp.asarray(x), scale=jnp.float32(4.0))
  np.testing.assert_allclose(got, ((x64 / 4.0) ** 2).sum(1), rtol=1e-5)
  p = x64[2] + 0.5
  got = stk.sq_dists_to(jnp.asarray(x), jnp.asarray(p, jnp.float32))
  np.testing.assert_allclose(got, ((x64 - p) ** 2).sum(1), rtol=1e-4)


def test_worker_finite_large():
  x = _data()
  x[1, -3] = -np.inf
  x[2, 5] = np.nan
  np.testing.assert_array_equal(
    np.asarray(stk.worker_finite(jnp.asarray(x))), [True, False, False, True]
  )


def test_symmetric_blocked_gram_matches_float64():
  # Row blocks of ⌈n / 2⌉ (n = 37: 19 + 18), one product padded with zero rows to 65 (n = 58),
  # and row blocks of 128 (n = 300: 128 + 128 + 44), in column blocks with a ragged tail; one
  # non-finite worker is flagged and zeroed.
  assert stk._gram_row_block(37) == 19 and stk._gram_padded_rows(37) == 37
  assert stk._gram_padded_rows(58) == 65
  # Column blocks: 2^19 elements per row block, per n rows for the padded product.
  assert stk._gram_column_block(37, 60_001) == 2**19 // 19
  assert stk._gram_column_block(58, 40_001) == 2**19 // 58
  for n, d in [(37, 60_001), (58, 40_001), (300, 9_001)]:
    rng = np.random.default_rng(n)
    x = (rng.normal(size=(n, d)) + 5.0).astype(np.float32)
    x[n // 3, d // 2] = np.nan
    center = x[1]
    gram, finite = stk.centred_gram(jnp.asarray(x), center=jnp.asarray(center))
    ok = np.isfinite(x).all(axis=1)
    xc = np.where(ok[:, None], x.astype(np.float64) - center.astype(np.float64), 0.0)
    np.testing.assert_array_equal(np.asarray(finite), ok)
    np.testing.assert_allclose(np.asarray(gram), xc @ xc.T, rtol=2e-5, atol=1e-3 * d)


def test_dots_and_inner_match_float64():
  # A long leaf and a small one: the inner products of each slice with a point, summed over leaves.
  rng = np.random.default_rng(3)
  n, d = 16, 150_001
  x = (rng.normal(size=(n, d)) + 5.0).astype(np.float32)
  y = rng.normal(size=(n, 3, 5)).astype(np.float32)
  p = {'x': rng.normal(size=d).astype(np.float32), 'y': rng.normal(size=(3, 5)).astype(np.float32)}
  got = stk.dots({'x': jnp.asarray(x), 'y': jnp.asarray(y)}, p)
  want = x.astype(np.float64) @ p['x'] + np.tensordot(y.astype(np.float64), p['y'], 2)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-3)
  want_inner = p['x'].astype(np.float64) @ p['x'] + (p['y'].astype(np.float64) ** 2).sum()
  np.testing.assert_allclose(float(stk.inner(p, p)), want_inner, rtol=1e-6)
  # Plain arithmetic: a non-finite entry makes its own worker's product non-finite, no other.
  x[3, d - 2] = np.nan
  got = np.asarray(stk.dots(jnp.asarray(x), p['x']))
  assert np.isnan(got[3]) and np.isfinite(np.delete(got, 3)).all()
  with pytest.raises(ValueError, match='dots: the point'):
    stk.dots({'x': jnp.asarray(x)}, {'x': p['x'], 'y': p['y']})


def _ref_dists(x):
  x64 = np.asarray(x, np.float64)
  return np.stack([((x64 - row) ** 2).sum(1) for row in x64])


def _scaled_dists(x):
  gram, finite, scale = jax.jit(stk.scaled_gram)(jnp.asarray(x))
  d = np.asarray(stk.dists_from_gram(gram, finite), np.float64) * float(scale) ** 2
  return d, np.asarray(finite)


def _blocked_layout(n, d):
  cols = stk._gram_column_block(n, d)
  assert cols is not None and d // cols >= 4  # a first block, loop blocks, a ragged tail
  return cols


def test_scaled_gram_follows_magnitudes_that_jump_between_blocks():
  # The blocks' magnitudes jump by up to 1e40 (the squares of the 1e20 block overflow float32
  # unscaled): a block whose predicted scale does not fit is computed again with its own.
  n, d = 9, 300_001
  cols = _blocked_layout(n, d)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, d)) + 3.0
  for b, mag in enumerate([1.0, 1e-20, 1e-20, 1e20, 1.0, 1e-3]):
    x[:, b * cols : (b + 1) * cols] *= mag
  x = x.astype(np.float32)
  got, finite = _scaled_dists(x)
  assert finite.all()
  np.testing.assert_allclose(got, _ref_dists(x), rtol=1e-5)


@pytest.mark.parametrize('bad', [np.nan, 1e30])
def test_scaled_gram_when_a_predicted_centre_turns_bad(bad):
  # Each worker in turn (the predicted centre among them) is finite in the first blocks and
  # non-finite (or huge) in the third: it alone is flagged, the others' distances are exact.
  n, d = 9, 300_001
  cols = _blocked_layout(n, d)
  rng = np.random.default_rng(1)
  base = (rng.normal(size=(n, d)) + 3.0).astype(np.float32)
  for i in range(n):
    x = base.copy()
    x[i, 2 * cols + 5] = bad
    got, finite = _scaled_dists(x)
    keep = np.arange(n) != i
    np.testing.assert_array_equal(finite, keep)
    np.testing.assert_allclose(got[np.ix_(keep, keep)], _ref_dists(x[keep]), rtol=1e-5)


def test_scaled_gram_under_vmap_matches_each_stack():
  # One stack keeps its predictions, the other needs its own scale in a block: under vmap the
  # whole batch takes the recomputation there, and each result is its own stack's.
  n, d = 9, 300_001
  cols = _blocked_layout(n, d)
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(2, n, d)) + 3.0).astype(np.float32)
  x[1, :, 2 * cols : 3 * cols] *= np.float32(1e18)
  gram, finite, scale = jax.jit(jax.vmap(stk.scaled_gram))(jnp.asarray(x))
  for b in range(2):
    d_b = np.asarray(stk.dists_from_gram(gram[b], finite[b]), np.float64) * float(scale[b]) ** 2
    np.testing.assert_allclose(d_b, _ref_dists(x[b]), rtol=1e-5)


def test_scaled_gram_is_differentiable_over_blocks():
  # Reverse mode through the blocks' predictions and their fallback: the gradient of Σ_ij
  # ‖x_i − x_j‖² (in the inputs' units; the power-of-two scale is piecewise constant) is
  # 4 (n x_i − Σ_j x_j).
  n, d = 9, 300_001
  _blocked_layout(n, d)
  rng = np.random.default_rng(5)
  x = (rng.normal(size=(n, d)) + 3.0).astype(np.float32)
  x[:, : d // 2] *= np.float32(1e-6)  # a block past the middle needs its own scale

  def total(x):
    gram, finite, scale = stk.scaled_gram(x)
    return jnp.sum(stk.dists_from_gram(gram, finite)) * scale**2

  got = np.asarray(jax.jit(jax.grad(total))(jnp.asarray(x)), np.float64)
  x64 = x.astype(np.float64)
  want = 4.0 * (n * x64 - x64.sum(0))
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-3 * np.abs(want).max())
