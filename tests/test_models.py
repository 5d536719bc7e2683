"""Tests for robustjax.models: output shapes and functional per-worker gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from robustjax import models

# (name, input_shape, num_classes, kwargs); ResNet kept shallow here to bound compile time.
CASES = [
  ('linear_regression', (6,), 0, {}),
  ('logistic', (8, 8, 1), 10, {}),
  ('mlp', (8, 8, 1), 10, {'hidden': (16,)}),
  ('cnn', (8, 8, 1), 10, {'features': (4, 8), 'hidden': 16}),
  ('cnn', (28, 28, 1), 10, {'features': (4, 8), 'hidden': 16}),
  ('resnet20', (8, 8, 3), 10, {'blocks_per_stage': 1, 'width': 4}),
]
CHEAP = ('linear_regression', 'logistic', 'mlp')


def _loss(graphdef, params, x):
  return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)))


@pytest.mark.parametrize('name,shape,classes,kwargs', CASES)
def test_output_shape_and_vmapped_worker_grads(name, shape, classes, kwargs):
  make = lambda: models.make(
    name, num_classes=classes, input_shape=shape, rngs=nnx.Rngs(0), **kwargs
  )
  graphdef, params = nnx.split(nnx.eval_shape(make), nnx.Param)
  # Random parameters drawn on the host (eager per-layer initialisation compiles a kernel per
  # layer shape: slow on a busy 2-core CPU).
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), params)
  n, b = 3, 2
  x = jnp.asarray(rng.normal(size=(n, b, *shape)), jnp.float32)
  out = jax.eval_shape(lambda p, xi: nnx.merge(graphdef, p)(xi), params, x[0])
  assert out.shape == ((b,) if classes == 0 else (b, classes))

  # One parameter copy per worker, stacked on a leading axis, perturbed so workers differ.
  stacked = jax.tree.map(
    lambda p: jnp.asarray(np.stack([np.asarray(p) + 0.1 * i for i in range(n)])), params
  )
  grad = jax.grad(lambda p, xi: _loss(graphdef, p, xi))
  grads = jax.jit(jax.vmap(grad))(stacked, x)
  leaves = jax.tree.leaves(grads)
  assert all(g.shape[0] == n and bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert any(not np.allclose(g[0], g[1]) for g in leaves)  # Workers get their own gradients.
  if name in CHEAP:  # Against one worker at a time, outside vmap (conv models: compile time).
    for i in (0, n - 1):
      expect = jax.jit(grad)(jax.tree.map(lambda p, i=i: p[i], stacked), x[i])
      for g, e in zip(leaves, jax.tree.leaves(expect)):
        np.testing.assert_allclose(g[i], e, rtol=2e-4, atol=2e-5)


def test_full_resnet20_and_cnn_sizes():
  m = nnx.eval_shape(
    lambda: models.make('resnet20', num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
  )
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  n = sum(p.size for p in jax.tree.leaves(params))
  assert 0.26e6 < n < 0.28e6  # ResNet-20 has about 0.27 M parameters.
  assert not jax.tree.leaves(rest)  # Only parameters: no batch statistics to carry through vmap.
  out = jax.eval_shape(lambda p, x: nnx.merge(graphdef, p)(x), params, jnp.zeros((1, 32, 32, 3)))
  assert out.shape == (1, 10)
  cnn = nnx.eval_shape(
    lambda: models.make('cnn', num_classes=10, input_shape=(28, 28, 1), rngs=nnx.Rngs(0))
  )
  assert cnn.dense.in_features == 7 * 7 * 64


def test_make_errors():
  with pytest.raises(ValueError, match='cnn.*logistic.*mlp.*resnet20'):
    models.make('vit', num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='num_classes'):
    models.make('mlp', num_classes=0, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='H, W, C'):
    models.make('cnn', num_classes=10, input_shape=(64,), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='norm'):
    models.make('resnet20', num_classes=10, input_shape=(8, 8, 3), rngs=nnx.Rngs(0), norm='batch')


# ------------------------------------------------------------------------ linear_dot_general


@pytest.mark.parametrize(
  'rows,shape,outer',
  [
    (25, (64, 10), True),
    (25, (64, 64), True),
    (32, (784, 10), True),
    (33, (64, 10), False),
    (25, (128, 128), False),
    (1, (64, 64), True),
  ],
)
def test_linear_dot_general_gradients_match_float64(rows, shape, outer):
  """Per-worker kernel and input gradients through `linear_dot_general`, vmapped over workers,
  against x^T g and g W^T in float64; and on CPU the outer-sum path is the one compiled (no
  batched product left) exactly when `_outer_sum_pays` says so."""
  assert models._outer_sum_pays(rows, shape) == outer
  rng = np.random.default_rng(rows)
  n = 4
  x = rng.normal(size=(n, rows, shape[0])).astype(np.float32)
  w = rng.normal(size=shape).astype(np.float32)
  g = rng.normal(size=(n, rows, shape[1])).astype(np.float32)
  dims = (((1,), (0,)), ((), ()))

  def vjp(x, w, g):
    y, back = jax.vjp(lambda x, w: models.linear_dot_general(x, w, dims), x, w)
    return (y, *back(g))

  fn = jax.jit(jax.vmap(vjp, in_axes=(0, None, 0)))
  y, dx, dw = fn(x, w, g)
  x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
  np.testing.assert_allclose(y, x64 @ w64, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dx, g64 @ w64.T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, np.einsum('nri,nrk->nik', x64, g64), rtol=1e-4, atol=1e-4)
  if jax.default_backend() == 'cpu':
    hlo = fn.lower(x, w, g).compile().as_text()
    assert ('lhs_batch_dims' in hlo) != outer


def test_linear_dot_general_falls_back_and_models_use_it():
  x, w = jnp.ones((3, 4, 5)), jnp.ones((5, 2))
  other = (((2,), (0,)), ((), ()))  # a 3-d input: 12 rows, the outer-sum path
  np.testing.assert_allclose(models.linear_dot_general(x, w, other), jnp.full((3, 4, 2), 5.0))
  x3 = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 5)), jnp.float32)
  dw = jax.grad(lambda w: jnp.sum(jnp.sin(models.linear_dot_general(x3, w, other))))(w)
  x64 = np.asarray(x3, np.float64).reshape(12, 5)
  expect = x64.T @ np.cos(x64 @ np.ones((5, 2)))
  np.testing.assert_allclose(dw, expect, rtol=1e-4, atol=1e-4)
  batched = (((2,), (2,)), ((0,), (0,)))  # batch dimensions: the plain product
  out = models.linear_dot_general(x, jnp.ones((3, 2, 5)), batched)
  np.testing.assert_allclose(out, jnp.full((3, 4, 2), 5.0))
  mlp = models.make('mlp', num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  layers = [*mlp.hidden, mlp.out]
  assert all(layer.dot_general is models.linear_dot_general for layer in layers)
  with pytest.raises(TypeError, match='custom_vjp'):  # forward mode: documented as unsupported
    jax.jvp(lambda v: models.linear_dot_general(v, w, other), (x,), (x,))
