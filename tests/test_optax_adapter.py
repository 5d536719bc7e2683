"""`as_optax` / `robust_optimizer`: robust rules inside an optax chain."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from robustjax import aggregators, preaggregators
from robustjax.optax_adapter import as_optax, robust_optimizer


def _grads(n=7, d=5, seed=0):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(n, d)).astype(np.float32)
  g[-1] = 1e6  # one Byzantine worker
  return jnp.asarray(g)


def test_update_is_the_rule_then_the_optimizer():
  g = _grads()
  params = jnp.ones(5)
  opt = robust_optimizer('median', optax.sgd(0.5), f=1)
  state = opt.init(params)
  updates, state = jax.jit(opt.update)(g, state, params)
  expected = -0.5 * np.median(np.asarray(g, np.float64), axis=0)
  np.testing.assert_allclose(np.asarray(updates), expected, rtol=1e-5)


def test_pipeline_and_pytree_params():
  g = {'w': _grads(d=6).reshape(7, 2, 3), 'b': _grads(d=2, seed=1)}
  params = {'w': jnp.zeros((2, 3)), 'b': jnp.zeros(2)}
  pipe = preaggregators.compose('trimmed_mean', pre=('nnm',), f=1)
  agg = as_optax(pipe, f=1)
  out, _ = agg.update(g, agg.init(params))
  ref = pipe(g)
  for k in params:
    np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), rtol=1e-6)


def test_centered_clipping_carries_its_centre():
  g = _grads()
  params = jnp.zeros(5)
  agg = as_optax('centered_clipping', f=1, tau=1.0)
  state = agg.init(params)
  first, state = agg.update(g, state)
  second, state = agg.update(g, state)
  np.testing.assert_allclose(np.asarray(state.center), np.asarray(second))
  expected = aggregators.centered_clipping(g, f=1, tau=1.0, center=first)
  np.testing.assert_allclose(np.asarray(second), np.asarray(expected), rtol=1e-6)


def test_stochastic_preaggregator_key_advances():
  g = _grads(n=8)
  agg = as_optax('mean', f=0, pre=(('bucketing', {'s': 2}),), key=jax.random.key(1))
  state = agg.init(jnp.zeros(5))
  _, s1 = agg.update(g, state)
  assert not np.array_equal(jax.random.key_data(s1.key), jax.random.key_data(state.key))


def test_errors():
  with pytest.raises(ValueError, match='unknown aggregator'):
    as_optax('nope', f=1)
  with pytest.raises(ValueError, match='inside the Pipeline'):
    as_optax(preaggregators.compose('median', f=1), f=1, pre=('nnm',))
