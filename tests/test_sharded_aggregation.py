"""Accelerator-parallel aggregation: every rule on a stack whose coordinates are split over 8
devices (inside `jax.shard_map`, with `stack.sharded_coordinates`) equals the unsharded rule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from robustjax import aggregators, preaggregators
from robustjax import stack as stk

N, F, D = 12, 2, 8 * 6
RULES = [
  ('mean', ()),
  ('median', ()),
  ('trimmed_mean', ()),
  ('meamed', ()),
  ('krum', ()),
  ('multikrum', ()),
  ('bulyan', ()),
  ('geometric_median', ()),
  ('centered_clipping', ()),
  ('mda', ()),
  ('smea', ()),
  ('monna', ()),
  ('caf', ()),
  ('trimmed_mean', ('nnm',)),
  ('krum', (('clipping', {'c': 3.0}),)),
  ('median', ('arc',)),
  ('geometric_median', (('bucketing', {'s': 2}),)),
]


@functools.cache
def _mesh():
  if len(jax.devices()) < 8:
    pytest.skip('needs 8 (simulated) devices')
  return jax.make_mesh((8,), ('model',), axis_types=(jax.sharding.AxisType.Explicit,))


def _stack():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N, D)).astype(np.float32) + 3.0
  x[-1] = 40.0  # a far Byzantine slice
  x[-2, ::3] = -25.0
  return jnp.asarray(x)


@pytest.mark.parametrize('name,pre', RULES, ids=lambda v: str(v))
def test_sharded_coordinates_match_unsharded(name, pre):
  mesh = _mesh()
  rule = preaggregators.compose(name, pre=pre, f=F)
  x, key = _stack(), jax.random.key(3)
  expected = jax.jit(rule)(x, key)

  def body(local):
    with stk.sharded_coordinates('model'):
      return rule(local, key)

  sharded = jax.shard_map(body, mesh=mesh, in_specs=P(None, 'model'), out_specs=P('model'))
  xs = jax.device_put(x, NamedSharding(mesh, P(None, 'model')))
  got = jax.jit(sharded)(xs)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-5, atol=2e-5)


def test_sharded_gram_is_a_psum_of_partials():
  mesh = _mesh()
  x = _stack()

  def body(local):
    with stk.sharded_coordinates('model'):
      return stk.pairwise_sq_dists(local)

  fn = jax.shard_map(body, mesh=mesh, in_specs=P(None, 'model'), out_specs=P())
  got = jax.jit(fn)(jax.device_put(x, NamedSharding(mesh, P(None, 'model'))))
  x64 = np.asarray(x, np.float64)
  ref = ((x64[:, None] - x64[None]) ** 2).sum(-1)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-3)
  assert aggregators.get('krum') is aggregators.krum
