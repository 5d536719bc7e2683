"""Tests for `cond_if_all`: one branch under vmap, plain cond derivatives."""

import jax
import jax.numpy as jnp
import numpy as np

from robustjax._cond import cond_if_all


def _branches(x, y):
  # Two branches that give different values, so the test sees which one ran.
  return cond_if_all(jnp.all(x > 0), lambda x, y: jnp.sqrt(x) * y, lambda x, y: x * 0 + y, x, y)


def test_unbatched_is_lax_cond():
  x = jnp.array([1.0, 4.0])
  np.testing.assert_allclose(_branches(x, 2.0), [2.0, 4.0])
  np.testing.assert_allclose(_branches(-x, 2.0), [2.0, 2.0])
  np.testing.assert_allclose(jax.jit(_branches)(x, 3.0), [3.0, 6.0])


def test_vmap_takes_one_branch_for_the_whole_batch():
  every = jnp.array([[1.0, 4.0], [9.0, 16.0]])
  mixed = jnp.array([[1.0, 4.0], [-1.0, 2.0]])
  np.testing.assert_allclose(jax.vmap(_branches, (0, None))(every, 2.0), [[2, 4], [6, 8]])
  # lax.cond would give [[2, 4], [2, 2]]: here the first element gets the exact branch too.
  np.testing.assert_allclose(jax.vmap(_branches, (0, None))(mixed, 2.0), [[2, 2], [2, 2]])
  # Batched operands, unbatched predicate; nested vmaps; vmap under jit.
  y = jnp.array([1.0, 2.0])
  np.testing.assert_allclose(jax.vmap(_branches, (None, 0))(every[1], y), [[3, 4], [6, 8]])
  nested = jnp.stack([every, mixed])
  got = jax.vmap(jax.vmap(_branches, (0, None)), (0, None))(nested, 1.0)
  np.testing.assert_allclose(got, [[[1, 1], [1, 1]], [[1, 1], [1, 1]]])
  got = jax.jit(jax.vmap(jax.vmap(_branches, (0, None)), (0, None)))(nested[:1], 1.0)
  np.testing.assert_allclose(got, [[[1, 2], [3, 4]]])


def _smooth(x, y):
  # Branches differentiable everywhere (the derivative of each is computed wherever it is used).
  return cond_if_all(jnp.all(x > 0), lambda x, y: x * x * y, lambda x, y: x * 0 + y, x, y)


def test_derivatives_are_each_elements_branchs():
  x = jnp.array([1.0, 4.0])

  def plain(x, y):
    return jax.lax.cond(jnp.all(x > 0), lambda: x * x * y, lambda: x * 0 + y)

  for fn in (lambda x, y: _smooth(x, y).sum(), lambda x, y: plain(x, y).sum()):
    gx, gy = jax.grad(fn, (0, 1))(x, 2.0)
    np.testing.assert_allclose(gx, [4.0, 16.0])
    np.testing.assert_allclose(gy, 17.0)
  _, tangent = jax.jvp(_smooth, (x, 2.0), (x, 1.0))
  np.testing.assert_allclose(tangent, [5.0, 80.0])
  # Per-element derivatives under vmap, in either order of the two transformations (a
  # `lax.cond` over the tangents, batched, could not be transposed), and under two vmaps.
  mixed = jnp.array([[1.0, 4.0], [-1.0, 2.0]])
  want = [[4.0, 16.0], [0.0, 0.0]]
  per_row = jax.vmap(jax.grad(lambda x, y: _smooth(x, y).sum()), (0, None))(mixed, 2.0)
  np.testing.assert_allclose(per_row, want)
  whole = jax.grad(lambda m: jax.vmap(_smooth, (0, None))(m, 2.0).sum())(mixed)
  np.testing.assert_allclose(whole, want)
  twice = jax.jit(
    jax.grad(lambda m: jax.vmap(jax.vmap(_smooth, (0, None)), (0, None))(m, 2.0).sum())
  )
  np.testing.assert_allclose(twice(jnp.stack([mixed, mixed])), [want, want])
