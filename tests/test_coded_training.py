"""Tests for robustjax.coded_training: the coded step (1 and 8 devices), DRACO, metrics, loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from robustjax import coded_training as ct
from robustjax import coding, compression

N, DIM, F = 16, 5, 2


def _problem(seed=0, m=N, k=2):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(m, k, DIM)).astype(np.float32)
  b = rng.normal(size=(m, k)).astype(np.float32)
  return a, b


def _loss(w, subset):
  a, b = subset
  return 0.5 * jnp.mean((a @ w['w'] + w['c'] - b) ** 2)


def _np_subset_grads(w, a, b):
  """float64 reference: per-subset gradients of the loss above, as an (m, DIM + 1) array."""
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  r = np.einsum('mkd,d->mk', a64, w['w']) + w['c'] - b64
  gw = np.einsum('mk,mkd->md', r, a64) / a.shape[1]
  gc = r.mean(1)
  return gw, gc


def _sign_flip(honest, *, f, key=None):
  return jax.tree.map(lambda x: jnp.broadcast_to(-x.mean(0), (f,) + x.shape[1:]), honest)


def _w0():
  return {'w': jnp.linspace(-1.0, 1.0, DIM), 'c': jnp.asarray(0.3)}


def test_coded_messages_match_reference_and_metrics():
  a, b = _problem()
  w = _w0()
  bm = coding.cyclic(N, 4, key=jax.random.key(0))
  msgs = ct.coded_messages(_loss, w, (a, b), bm)
  gw, gc = _np_subset_grads(jax.tree.map(np.asarray, w), a, b)
  b64 = np.asarray(bm, np.float64)
  np.testing.assert_allclose(msgs['w'], b64 @ gw, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(msgs['c'], b64 @ gc, rtol=1e-5, atol=1e-5)
  step = ct.make_coded_step(_loss, rule='mean', f=0, lr=0.1, compressor=compression.QSGD(8))
  *_, metrics = step(w, step.optimizer.init(w), None, bm, (a, b), jax.random.key(1))
  assert float(metrics['subsets_per_worker']) == 4.0
  assert float(metrics['subset_grads']) == N
  assert float(metrics['bits']) == N * compression.QSGD(8).bits(DIM + 1)


def test_lad_with_mean_and_no_attack_is_gradient_descent():
  a, b = _problem(1)
  w = _w0()
  lr = 0.1
  step = ct.make_coded_step(_loss, rule='mean', f=0, lr=lr)
  new, *_ = step(
    w,
    step.optimizer.init(w),
    None,
    coding.cyclic(N, 3, key=jax.random.key(2)),
    (a, b),
    jax.random.key(3),
  )
  gw, gc = _np_subset_grads(jax.tree.map(np.asarray, w), a, b)
  np.testing.assert_allclose(new['w'], np.asarray(w['w']) - lr * gw.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new['c'], float(w['c']) - lr * gc.mean(), rtol=1e-5, atol=1e-6)


def test_draco_step_is_exact_under_attack():
  a, b = _problem(2)
  w = _w0()
  lr = 0.2
  for compressor in (None, compression.QSGD(4)):
    groups = coding.draco_groups(N, F)
    step = ct.make_coded_step(
      _loss,
      rule=ct.DracoRule.make(N, F),
      f=F,
      lr=lr,
      attack=_sign_flip,
      compressor=compressor,
      key_ids=groups,
    )
    new, *_ = step(w, step.optimizer.init(w), None, coding.draco(N, F), (a, b), jax.random.key(4))
    if compressor is None:
      gw, gc = _np_subset_grads(jax.tree.map(np.asarray, w), a, b)
      np.testing.assert_allclose(
        new['w'], np.asarray(w['w']) - lr * gw.mean(0), rtol=1e-5, atol=1e-6
      )
    else:  # compressed with keys shared inside each group: the vote still finds the honest copy
      assert np.all(np.isfinite(np.asarray(new['w'])))


@pytest.mark.parametrize('sharding', ['named', 'shard_map'])
def test_coded_step_on_8_devices_equals_one_device(sharding):
  if jax.device_count() < 8:
    pytest.skip('needs 8 (simulated) devices')
  a, b = _problem(3)
  w = _w0()
  mesh = jax.make_mesh((8,), ('workers',), axis_types=(AxisType.Auto,))
  kwargs = dict(
    rule='nnm+trimmed_mean', f=F, lr=0.1, attack='alie_test', compressor=compression.QSGD(8)
  )
  kwargs['attack'] = _sign_flip
  bm = coding.cyclic(N, 3, key=jax.random.key(5))
  key = jax.random.key(6)
  one = ct.make_coded_step(_loss, **kwargs)
  ref = one(w, one.optimizer.init(w), None, bm, (a, b), key)
  many = ct.make_coded_step(_loss, mesh=mesh if sharding == 'shard_map' else None, **kwargs)
  sub = jax.device_put((a, b), NamedSharding(mesh, P('workers')))
  got = many(w, many.optimizer.init(w), None, bm, sub, key)
  for x, y in zip(jax.tree.leaves(ref[0]), jax.tree.leaves(got[0])):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # and the per-subset gradients themselves (the pcast trap would psum them across devices)
  g1 = ct.subset_gradients(_loss, w, (a, b))
  g8 = ct.subset_gradients(_loss, w, sub, mesh=mesh)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_train_loop_lad_full_redundancy_converges_under_attack():
  # d = n: every honest coded vector is the full gradient, the attack cannot bias CWTM
  a, b = _problem(4)
  w = _w0()
  a64 = np.concatenate([a.reshape(-1, DIM), np.ones((a.shape[0] * a.shape[1], 1))], 1)
  sol = np.linalg.lstsq(a64.astype(np.float64), b.reshape(-1).astype(np.float64), rcond=None)[0]

  def err(p):
    return jnp.sum((p['w'] - sol[:DIM]) ** 2) + (p['c'] - sol[DIM]) ** 2

  run = jax.jit(
    lambda key: ct.train(
      w,
      (a, b),
      key,
      num_steps=200,
      matrix_fn=lambda k: coding.cyclic(N, N, key=k),
      loss_fn=_loss,
      rule='trimmed_mean',
      f=F,
      lr=0.3,
      attack=_sign_flip,
      eval_fn=err,
    )
  )
  _, hist = run(jax.random.key(0))
  assert hist['eval'].shape == (200,)
  assert float(hist['eval'][-1]) < 1e-6 * float(hist['eval'][0])
  np.testing.assert_array_equal(hist['subsets_per_worker'], N)


def test_train_loop_error_feedback_state():
  a, b = _problem(5)
  run = jax.jit(
    lambda key: ct.train(
      _w0(),
      (a, b),
      key,
      num_steps=5,
      matrix_fn=lambda k: coding.cyclic(N, 2, key=k),
      loss_fn=_loss,
      rule='mean',
      f=0,
      lr=0.1,
      compressor=compression.ErrorFeedback(compression.TopK(k=2)),
    )
  )
  params, hist = run(jax.random.key(0))
  assert np.all(np.isfinite(np.asarray(params['w'])))
  assert float(hist['bits'][0]) == N * compression.TopK(k=2).bits(DIM + 1)


def test_validation_errors():
  a, b = _problem()
  w = _w0()
  bm = coding.cyclic(N, 2)
  with pytest.raises(ValueError, match='needs n > 2f'):
    ct.make_coded_step(_loss, rule='mean', f=8, attack=_sign_flip)(
      w, None, None, bm, (a, b), jax.random.key(0)
    )
  with pytest.raises(ValueError, match='needs an attack'):
    step = ct.make_coded_step(_loss, rule='mean', f=2)
    step(w, step.optimizer.init(w), None, bm, (a, b), jax.random.key(0))
  with pytest.raises(ValueError, match='B must be'):
    ct.coded_messages(_loss, w, (a, b), jnp.ones((N, N - 1)))
  if jax.device_count() >= 8:
    mesh = jax.make_mesh((8,), ('workers',), axis_types=(AxisType.Auto,))
    a12, b12 = _problem(m=12)
    with pytest.raises(ValueError, match='divisible'):
      ct.coded_messages(_loss, w, (a12, b12), coding.cyclic(12, 2), mesh=mesh)
  with pytest.raises(ValueError, match='unknown aggregator'):
    ct.resolve_rule('no_such_rule', 1)


def test_experiment_smoke():
  # the experiment's entry points on its smoke config, one rule, no figures
  import importlib.util
  import pathlib

  root = pathlib.Path(__file__).resolve().parents[1]
  spec = importlib.util.spec_from_file_location('gc_exp', root / 'experiments/gradient_coding.py')
  exp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(exp)
  cfg_spec = importlib.util.spec_from_file_location('lad_cfg', root / 'experiments/configs/lad.py')
  cfg_mod = importlib.util.module_from_spec(cfg_spec)
  cfg_spec.loader.exec_module(cfg_mod)
  cfg = cfg_mod.get_config('smoke')
  cfg.rules = ('trimmed_mean',)
  cfg.compressor = 'none'
  cfg.draco = False
  cfg.num_steps = 3
  results = exp.run(cfg)
  rows = exp.summarize(cfg, results)
  assert {r['d'] for r in rows} == {1, 2, 4}
  assert all(np.isfinite(r['final_error_median']) for r in rows)
  assert 'LAD-CWTM' in exp.markdown_table(cfg, rows)
