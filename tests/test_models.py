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
  if name in CHEAP:  # Against one worker at a time, outside vmap (conv models: too slow eagerly).
    for i in (0, n - 1):
      expect = grad(jax.tree.map(lambda p, i=i: p[i], stacked), x[i])
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
