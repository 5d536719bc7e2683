"""Accelerator-parallel aggregation: every rule on a stack whose coordinates are split over 8
devices (inside `jax.shard_map`, with `stack.sharded_coordinates`) equals the unsharded rule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from robustjax import aggregators, parallel, pipeline, preaggregators
from robustjax import stack as stk

N, F, D = 12, 2, 8 * 6
# Every registered rule, and every registered pre-aggregator in front of a coordinate-wise and a
# distance-based rule: a newly registered one is tested sharded automatically. Only required
# parameters are given here.
_PARAMS = {'clipping': {'c': 3.0}, 'bucketing': {'s': 2}}
RULES = [(name, ()) for name in aggregators.names()] + [
  (agg, ((p, _PARAMS.get(p, {})),))
  for p in preaggregators.names()
  for agg in ('trimmed_mean', 'geometric_median')  # bucketing leaves n/2 rows
]
# centered clipping's later iterations update the distances (`stack.dots`, `stack.inner`).
RULES += [(('centered_clipping', {'iters': 4, 'method': 'direct', 'tau': 2.0}), ())]


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
  """The engine's path (`parallel.sharded_update`, state included) equals `Pipeline.update`."""
  if len(jax.devices()) < 8:
    pytest.skip('needs 8 (simulated) devices')
  mesh = parallel.make_mesh(8)
  rule = pipeline.compose(name, pre=pre, f=F)
  x, key = _stack(), jax.random.key(3)
  state = rule.init(jnp.zeros(D))
  update = jax.jit(parallel.sharded_update(rule, mesh))
  for _ in range(2):  # twice: a rule's state (centered clipping's centre) is carried sharded
    expected, s_ref = jax.jit(rule.update)(x, state, key)
    got, s_got = update(x, state, key)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-5, atol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5), s_got, s_ref)
    state = s_ref


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


def test_sharded_scaled_gram_sums_the_devices_at_one_scale():
  # Each device's coordinates have their own magnitude (2^-50 to 2^55), so each device's Gram
  # has its own power-of-two scale: the sum over the devices rescales them to the largest.
  mesh = _mesh()
  rng = np.random.default_rng(4)
  x = (rng.normal(size=(N, D)) + 3.0) * np.repeat(2.0 ** (15.0 * np.arange(8) - 50.0), D // 8)
  x = x.astype(np.float32)

  def body(local):
    with stk.sharded_coordinates('model'):
      return stk.scaled_sq_dists(local)

  fn = jax.shard_map(body, mesh=mesh, in_specs=P(None, 'model'), out_specs=P())
  dists, finite, scale = jax.jit(fn)(
    jax.device_put(jnp.asarray(x), NamedSharding(mesh, P(None, 'model')))
  )
  x64 = x.astype(np.float64)
  ref = np.stack([((x64 - row) ** 2).sum(1) for row in x64])
  assert np.asarray(finite).all()
  np.testing.assert_allclose(np.asarray(dists, np.float64) * float(scale) ** 2, ref, rtol=1e-5)


@pytest.mark.filterwarnings('ignore:smea:UserWarning')
@pytest.mark.parametrize('n,d', [(11, 2 * 200_000), (130, 2 * 4_096)])
def test_sharded_update_traces_the_cpu_loops(n, d):
  """Every rule traces under `sharded_update` at sizes where the CPU kernels loop over column
  blocks (n = 11: each device's 200,000 coordinates exceed two Gram / weighted-sum / combination
  blocks) or run the layered network (n = 130): a loop carry built from zeros does not vary over
  the devices, and `jax.shard_map` rejects it. Traced only (`jax.eval_shape`); the values are
  compared above."""
  if len(jax.devices()) < 2:
    pytest.skip('needs 2 (simulated) devices')
  mesh = parallel.make_mesh(2)
  x = jax.ShapeDtypeStruct((n, d), jnp.float32)
  # centered_clipping's direct path with iters ≥ 2 loops over its move and distance updates.
  cc_direct = [(('centered_clipping', {'iters': 3, 'method': 'direct'}), ())]
  for name, pre in RULES + cc_direct:
    rule = pipeline.compose(name, pre=pre, f=F)
    state = rule.init(jnp.zeros(d))
    jax.eval_shape(parallel.sharded_update(rule, mesh), x, state, jax.random.key(0))


_LAPACK_ON_CPU_DEVICES = """
import jax, jax.numpy as jnp
jax.config.update('jax_num_cpu_devices', 2)
from jax.sharding import NamedSharding, PartitionSpec as P
from robustjax import aggregators, parallel, pipeline
mesh = parallel.make_mesh()
x = jax.device_put(jax.random.normal(jax.random.key(0), (16, 40_000)),
                   NamedSharding(mesh, P(None, 'workers')))
update = jax.jit(parallel.sharded_update(pipeline.as_rule('smea', 3), mesh))
xs = jax.random.normal(jax.random.key(1), (8, 16, 1_000))
def vmapped(xs):  # as the optimal attacks run a defender over candidates, on every device
  return (jax.vmap(lambda s: aggregators.smea(s, f=3))(xs)
          + jax.vmap(lambda s: aggregators.caf(s, f=3))(xs))
both = jax.jit(jax.shard_map(vmapped, mesh=mesh, in_specs=P(), out_specs=P()))
for _ in range(3):
  jax.block_until_ready((update(x, {}, None), both(xs)))
print('done')
"""


def test_eigen_solvers_on_two_cpu_devices_do_not_hang():
  """SMEA's exact search (560 eigvalsh at n = 16, f = 3) sharded over 2 CPU devices, and SMEA /
  CAF vmapped on each of them: jaxlib's batched LAPACK kernel waits on the CPU thread pool that
  the device programs occupy, which hung every run before `robustjax._lapack` solved a batch one
  matrix at a time there. In a subprocess (its own device count) with a timeout, so that a
  regression fails instead of hanging the suite."""
  import subprocess
  import sys

  if jax.default_backend() != 'cpu':
    pytest.skip('a CPU thread-pool deadlock')
  out = subprocess.run(
    [sys.executable, '-c', _LAPACK_ON_CPU_DEVICES], capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'done' in out.stdout
