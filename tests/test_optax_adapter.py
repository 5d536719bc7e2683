"""`as_optax` / `robust_optimizer`: robust rules inside an optax chain."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from robustjax import aggregators, pipeline
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
  pipe = pipeline.as_rule('nnm+trimmed_mean', f=1)
  agg = as_optax(pipe, f=1)
  out, _ = agg.update(g, agg.init(params))
  ref = pipe(g)
  for k in params:
    np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), rtol=1e-6)


def test_centered_clipping_carries_its_centre():
  g = _grads()
  params = jnp.zeros(5)
  agg = as_optax(('centered_clipping', {'tau': 1.0}), f=1)
  state = agg.init(params)
  first, state = agg.update(g, state)
  second, state = agg.update(g, state)
  np.testing.assert_allclose(np.asarray(state.rule['center']), np.asarray(second))
  expected = aggregators.centered_clipping(g, f=1, tau=1.0, center=first)
  np.testing.assert_allclose(np.asarray(second), np.asarray(expected), rtol=1e-6)


def test_stochastic_preaggregator_key_advances():
  g = _grads(n=8)
  agg = as_optax('bucketing(s=2)+mean', f=0, key=jax.random.key(1))
  state = agg.init(jnp.zeros(5))
  _, s1 = agg.update(g, state)
  assert not np.array_equal(s1.key, state.key)


def test_errors():
  with pytest.raises(ValueError, match='unknown aggregator'):
    as_optax('nope', f=1)
  with pytest.raises(ValueError, match='f must be a Python int'):
    as_optax('median', f=1.5)


def test_sharded_update_equals_plain_for_centered_clipping():
  if jax.device_count() < 8:
    pytest.skip('needs 8 (simulated) devices')
  from robustjax import parallel

  mesh = parallel.make_mesh(8)
  g = _grads(n=8, d=13)
  plain = as_optax('nnm+centered_clipping(tau=0.5)', f=1)
  sharded = as_optax('nnm+centered_clipping(tau=0.5)', f=1, mesh=mesh)
  s_p, s_s = plain.init(jnp.zeros(13)), sharded.init(jnp.zeros(13))
  for _ in range(2):
    out_p, s_p = plain.update(g, s_p)
    out_s, s_s = jax.jit(sharded.update)(g, s_s)
  np.testing.assert_allclose(np.asarray(out_s), np.asarray(out_p), rtol=1e-5, atol=1e-6)
  center = np.asarray(s_s.rule['center'])
  np.testing.assert_allclose(center, np.asarray(out_p), rtol=1e-5, atol=1e-6)
