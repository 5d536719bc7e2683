"""Coding as a stage of the one training step: LAD, DRACO, Com-LAD, with every other feature.

Checked against a float64 NumPy reference of the coded messages (B · subset gradients), on the
three backends, with momentum, checkpoints, sweeps, label flipping and optimal attacks.
"""

import dataclasses
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from robustjax import attacks, coding, compression, pipeline, sweeps, training

N, K, DIM, F = 16, 2, 5, 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _problem(seed=0, n=N, lr=0.1):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n * K, DIM)).astype(np.float32)
  b = rng.normal(size=(n * K,)).astype(np.float32)
  ds = types.SimpleNamespace(x_train=a, y_train=b, x_test=a, y_test=b)
  parts = [np.arange(j * K, (j + 1) * K) for j in range(n)]
  return training.least_squares_problem(ds, parts, optax.sgd(lr)), a, b


def _subset_grads(w, a, b, n=N):
  """float64 reference: the gradient of ½ mean((a w − b)²) on each subset, (n, DIM)."""
  a64 = a.astype(np.float64).reshape(n, K, DIM)
  r = np.einsum('mkd,d->mk', a64, w.astype(np.float64)) - b.astype(np.float64).reshape(n, K)
  return np.einsum('mk,mkd->md', r, a64) / K


def _spec(code, *, rule='mean', f=0, attack='none', compressor=None, momentum=0.0, n=N):
  return training.TrainSpec(
    num_workers=n,
    num_byzantine=f,
    batch_size=0,
    momentum=momentum,
    algorithm='dsgd',
    local_steps=1,
    local_lr=0.0,
    pipeline=pipeline.as_rule(rule, f),
    attack=attacks.get(attack),
    code=coding.make(code, n=n, f=f),
    compressor=None if compressor is None else compression.make(compressor),
  )


def _run(spec, problem, steps=1, seed=0):
  w0 = jnp.linspace(-1.0, 1.0, DIM)
  state = training.init_state(spec, problem, w0, {}, seed)
  step = training.make_step(spec, problem)
  data = jax.tree.map(jnp.asarray, problem.data)
  metrics = None
  for _ in range(steps):
    state, metrics = step(state, data)
  return state, metrics


def test_coded_messages_match_float64_reference():
  problem, a, b = _problem()
  spec = _spec('cyclic(d=4)', rule=lambda x: x, momentum=0.0)  # identity "rule": see messages
  w0 = np.linspace(-1.0, 1.0, DIM)
  state = training.init_state(spec, problem, jnp.asarray(w0, jnp.float32), {}, 0)
  # The step's B for this state, re-derived from its key exactly as the step draws it.
  _, keys, bmat = training._engine._split_keys(spec, state)
  rows = jnp.arange(N, dtype=jnp.int32)
  data = jax.tree.map(jnp.asarray, problem.data)
  msgs, _, _ = training._engine._worker_stages(
    spec, problem, state.params, {}, state.workers, rows, keys, data, bmat, lambda t: t
  )
  ref = np.asarray(bmat, np.float64) @ _subset_grads(w0, a, b)
  np.testing.assert_allclose(np.asarray(msgs), ref, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(coding.loads(bmat)) == 4)


def test_lad_with_mean_and_no_attack_is_gradient_descent_and_reports_load_and_bits():
  problem, a, b = _problem(1)
  lr = 0.1
  for comp in (None, 'qsgd(levels=8)'):
    state, metrics = _run(_spec('cyclic(d=3)', compressor=comp), problem)
    assert float(metrics['load']) == 3.0
    bits = 32 * DIM if comp is None else compression.QSGD(8).bits(DIM)
    assert float(metrics['bits']) == N * bits
    if comp is None:
      w0 = np.linspace(-1.0, 1.0, DIM)
      expect = w0 - lr * _subset_grads(w0, a, b).mean(0)
      np.testing.assert_allclose(np.asarray(state.params), expect, rtol=1e-5, atol=1e-6)


def test_draco_is_a_registered_rule_and_exact_under_attack():
  problem, a, b = _problem(2)
  lr = 0.1
  w0 = np.linspace(-1.0, 1.0, DIM)
  expect = w0 - lr * _subset_grads(w0, a, b).mean(0)
  for comp in (None, 'qsgd(levels=4)'):
    spec = _spec('draco', rule='draco', f=F, attack='sign_flip', compressor=comp)
    state, _ = _run(spec, problem)
    if comp is None:
      np.testing.assert_allclose(np.asarray(state.params), expect, rtol=1e-5, atol=1e-6)
    else:  # group members share their compression keys: the vote still finds the honest copy
      assert np.all(np.isfinite(np.asarray(state.params)))
  assert 'draco' in pipeline.as_rule('draco', F).name


def test_error_feedback_state_is_carried():
  problem, *_ = _problem(5)
  spec = _spec('cyclic(d=2)', compressor='ef+top_k(k=2)')
  state, metrics = _run(spec, problem, steps=3)
  memory = np.asarray(state.workers['compression'])
  assert memory.shape == (N, DIM) and np.any(memory != 0)
  assert float(metrics['bits']) == N * compression.TopK(k=2).bits(DIM)


def test_full_batch_scan_driver_converges():
  problem, *_ = _problem(4, lr=0.3)
  spec = _spec('cyclic(d=4)', rule='trimmed_mean', f=F, attack='sign_flip')
  w0 = jnp.zeros((DIM,))
  state = training.init_state(spec, problem, w0, {}, 0)
  advance = training.make_advance(
    training.make_step(spec, problem), evaluate=training.make_eval(spec, problem)
  )
  _, hist = advance(state, jax.tree.map(jnp.asarray, problem.data), 100)
  g = np.asarray(hist['eval_grad_sq_norm'])
  assert g.shape == (100,) and g[-1] < 0.1 * g[0]  # a robust rule keeps an error floor


def _config(**over):
  from robustjax.configs import default

  c = default.get_config('smoke')
  c.num_workers, c.num_byzantine = 8, 1
  c.coding = 'cyclic(d=3)'
  c.compression = 'qsgd(levels=8)'
  c.attack = 'alie'
  c.rule = 'nnm+trimmed_mean'
  c.momentum = 0.9
  c.num_steps = 4
  for k, v in over.items():
    setattr(c, k, v)
  return c


@pytest.mark.parametrize('backend', ['shard_map', 'pmap'])
def test_sharded_backends_equal_vmap_with_coding(backend):
  if jax.device_count() < 8:
    pytest.skip('needs 8 (simulated) devices')
  out = {}
  for b in ('vmap', backend):
    exp = training.build(_config(backend=b, num_devices=8 if b != 'vmap' else None))
    state = exp.init_state()
    for _ in range(2):
      state, m = exp.step(state)
    out[b] = (jax.device_get(state.params), float(m['agg_error']))
  ref, got = out['vmap'], out[backend]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5), ref[0], got[0])
  np.testing.assert_allclose(ref[1], got[1], rtol=1e-3)


def test_optimal_alie_under_coding_needs_no_wiring():
  exp = training.build(_config(attack='optimal_alie', coding='cyclic(d=2)', compression='none'))
  state = exp.init_state()
  state, m = exp.step(state)
  assert np.isfinite(float(m['agg_error']))
  plain = training.build(_config(attack='none', coding='cyclic(d=2)', compression='none'))
  _, m0 = plain.step(plain.init_state())
  assert float(m['agg_error']) > float(m0['agg_error'])  # the attack moved the aggregate


def test_label_flip_under_coding_changes_the_byzantine_messages():
  e1 = training.build(_config(attack='label_flip', compression='none', momentum=0.0))
  e0 = training.build(_config(attack='none', compression='none', momentum=0.0))
  s1, _ = e1.step(e1.init_state())
  s0, _ = e0.step(e0.init_state())
  m1, m0 = jax.device_get((s1.workers['momentum'], s0.workers['momentum']))
  nh = 7
  # The honest messages equal up to float32 rounding (two programs, fused differently; entries
  # up to 0.2), the Byzantine ones moved by a large fraction of their scale (0.07-0.13 here).
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x[:nh], y[:nh], rtol=1e-5, atol=1e-7), m1, m0
  )
  for x, y in zip(jax.tree.leaves(m1), jax.tree.leaves(m0)):
    assert np.abs(x[nh:] - y[nh:]).max() > 0.1 * np.abs(y).max()


def test_lad_with_momentum_resumes_from_checkpoint(tmp_path):
  cfg = _config(num_steps=4, checkpoint_every=2, log_every=1, eval_every=2)
  full = training.train_and_evaluate(cfg, str(tmp_path / 'full'))
  part = training.train_and_evaluate(cfg, str(tmp_path / 'part'), max_steps=2)
  assert not part['finished'] and part['step'] == 2
  resumed = training.train_and_evaluate(cfg, str(tmp_path / 'part'))
  assert resumed['finished'] and resumed['coding'] == 'cyclic(d=3)'
  assert resumed['final'] == full['final']
  lines = [json.loads(x) for x in open(tmp_path / 'part' / 'metrics.jsonl')]
  assert [r['step'] for r in lines if r['kind'] == 'train'] == list(range(1, 5))
  assert all(r['load'] == pytest.approx(3.0) for r in lines if r['kind'] == 'train')


def test_sweep_over_two_coding_redundancies(tmp_path):
  base = _config(num_steps=2, eval_every=2, compression='none', checkpoint_every=0)
  base.backend = 'vmap'
  grid = {'coding': ['cyclic(d=2)', 'cyclic(d=4)'], 'seed': [0, 1]}
  summary = sweeps.run_sweep(base, grid, str(tmp_path), progress=False)
  assert summary['ran'] == 4 and summary['remaining'] == 0
  recs = sweeps.load_results(str(tmp_path))
  assert {r['config']['coding'] for r in recs} == {'cyclic(d=2)', 'cyclic(d=4)'}
  assert all(r['vmapped'] and r['group_size'] == 2 for r in recs)
  finals = {(r['config']['coding'], r['config']['seed']): r['final']['test_loss'] for r in recs}
  assert finals[('cyclic(d=2)', 0)] != finals[('cyclic(d=4)', 0)]


def test_bad_coding_specs_fail_at_build():
  with pytest.raises(ValueError, match='known codings'):
    coding.make('no_such_code', n=8, f=1)
  with pytest.raises(ValueError, match='needs d='):
    coding.make('cyclic', n=8, f=1)
  with pytest.raises(ValueError, match='1 <= d <= n'):
    coding.make('cyclic(d=9)', n=8, f=1)
  with pytest.raises(ValueError, match='known compressors|unknown compressor'):
    compression.make('no_such')


def test_lad_study_smoke():
  """The LAD study's pieces (`robustjax coding`) on its smoke config: every method of a scenario
  on the one step, DRACO's simulation (exact gradient descent) equal to the registered vote, and
  the summaries."""
  from robustjax import configs
  from robustjax.cli import coding as study

  cfg = configs.get('lad', 'smoke')
  cfg.num_steps = 4
  sc = study.Scenario('interpolating', 1.0, 2, 'alie', 'last')
  prob = study.make_problem(cfg, sc.regime, sc.heterogeneity)
  res = study.run_scenario(cfg, sc, prob)
  assert set(res) == {'trimmed_mean|fixed', 'trimmed_mean|lad1', 'trimmed_mean|lad4', 'DRACO'}
  assert res['trimmed_mean|lad4']['load'] == 4 and res['DRACO']['load'] == 5
  for v in res.values():
    assert v['excess_loss'].shape == (cfg.num_seeds, 4)
  exact = res['DRACO']['excess_loss']
  assert np.all(np.diff(exact, axis=1) < 0)  # exact gradient descent decreases F
  assert study.draco_vote_check(cfg, prob, sc.f, sc.attack) < 1e-4
  meta = {'scenario': dataclasses.asdict(sc)}
  rows = study.summarize(cfg, {sc.name: (res, meta)})
  lad = [r for r in rows if r['method'] == 'trimmed_mean|lad4'][0]
  assert lad['half_draco_budget'] == 4 * 5 and np.isfinite(lad['half_draco_ratio'])
  blocks = study.markdown_tables(cfg, rows, {sc.name: (res, meta)})
  assert 'LAD-CWTM, d = 4' in blocks['core_interpolating']


def test_local_steps_stateful_attack_and_error_feedback_compose_with_coding():
  exp = training.build(
    _config(
      coding='cyclic(d=2)',
      algorithm='local',
      local_steps=2,
      attack='mimic_heuristic(warmup=2)',
      compression='ef+top_k(fraction=0.1)',
      backend='vmap',
    )
  )
  state = exp.init_state()
  for _ in range(2):
    state, m = exp.step(state)
  assert int(state.attack_state.step) == 2
  assert np.isfinite(float(m['agg_error'])) and float(m['load']) == pytest.approx(2.0)
  memory = jax.tree.leaves(state.workers['compression'])
  assert any(np.any(np.asarray(x) != 0) for x in memory)
