"""The training engine: reproducibility, worker computation, attacks wiring, state, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import config_dict

from robustjax import attacks, pipeline, training
from robustjax.optax_adapter import as_optax
from robustjax.training import _engine as eng


def _config(**kw):
  c = config_dict.ConfigDict()
  c.update(
    seed=0,
    dataset='digits',
    model='logistic',
    split='iid',
    alpha=1.0,
    gamma=0.5,
    num_workers=6,
    num_byzantine=1,
    attack='sign_flip',
    rule='trimmed_mean',
    algorithm='dsgd',
    local_steps=2,
    local_lr=0.1,
    batch_size=4,
    momentum=0.5,
    optimizer='sgd',
    learning_rate=0.5,
    lr_schedule='constant',
    server_momentum=0.0,
    weight_decay=0.0,
    num_steps=3,
    backend='vmap',
    num_devices=None,
    eval_chunk=256,
  )
  c.update(kw)
  return c


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(tree))])


def _steps(exp, k, state=None):
  state = exp.init_state() if state is None else state
  for _ in range(k):
    state, m = exp.step(state)
  return state, m


def _workers(spec, exp, params, mom, key, data):
  """Stages 1-4 of the step for every worker (no coding, no compression)."""
  workers = {'momentum': mom, 'compression': ()}
  keys = {'grad': key, 'comp': key}
  rows = jnp.arange(spec.num_workers, dtype=jnp.int32)
  m, _, losses = eng._worker_stages(
    spec, exp.problem, params, exp.model_state0, workers, rows, keys, data, None, lambda t: t
  )
  return m, losses


def _last_row(stack):
  """A test "rule" that returns the last received row (a Byzantine one)."""
  return jax.tree.map(lambda x: x[-1], stack)


def _received_last_row(spec, exp, stack, attack_state=()):
  """Runs the server stages on `stack` with `_last_row` as the rule; returns (row, state)."""
  spec = dataclasses.replace(spec, pipeline=pipeline.as_rule(_last_row, spec.num_byzantine))
  state = eng.init_state(spec, exp.problem, exp.params0, exp.model_state0, seed=0)
  state = state.replace(attack_state=attack_state if attack_state != () else state.attack_state)
  aggregator = as_optax(spec.pipeline, f=spec.num_byzantine)
  keys = {'attack': jax.random.key(0)}
  losses = jnp.zeros((spec.num_workers,))
  new, _ = jax.jit(
    lambda st, x: eng._server(spec, exp.problem, aggregator, st, x, losses, None, keys)
  )(state, stack)
  lr = 0.5  # sgd, no weight decay: params' = params - lr * aggregate
  row = jax.tree.map(lambda a, b: (a - b) / lr, state.params, new.params)
  return row, new.attack_state


@pytest.fixture(scope='module')
def exp():
  return training.build(_config())


def test_bitwise_reproducible_for_a_seed(exp):
  a, _ = _steps(exp, 3)
  b, _ = _steps(training.build(_config()), 3)  # a fresh build: a fresh compilation
  np.testing.assert_array_equal(_flat(a), _flat(b))
  assert int(a.step) == 3


def test_steps_that_do_not_report_advance_the_same(exp):
  """``every_step=False`` (what `train_and_evaluate` runs): the same states as reporting every
  step, the last step's metrics and evaluation; a step told not to report gives NaN metrics."""
  state = exp.init_state()
  every = training.make_advance(exp.step_fn, exp.backend, evaluate=exp.eval_fn)
  last = training.make_advance(exp.step_fn, exp.backend, evaluate=exp.eval_fn, every_step=False)
  s_every, m_every = every(state, exp.data, 3)
  s_last, m_last = last(state, exp.data, 3)
  np.testing.assert_allclose(_flat(s_last), _flat(s_every), rtol=1e-6, atol=1e-7)
  assert set(m_last) == set(m_every) and 'eval_test_accuracy' in m_last
  for name, values in m_every.items():
    assert np.shape(values) == (3,) and np.shape(m_last[name]) == ()
    np.testing.assert_allclose(float(m_last[name]), float(values[-1]), rtol=1e-5, atol=1e-7)
  quiet_state, quiet = exp.step_fn(state, exp.data, False)
  loud_state, loud = exp.step_fn(state, exp.data, True)
  assert all(np.isnan(float(v)) for v in quiet.values())
  assert not any(np.isnan(float(v)) for v in loud.values())
  np.testing.assert_array_equal(_flat(quiet_state), _flat(loud_state))


def test_a_reporting_step_computes_its_aggregate_once(exp):
  """The bare step (``report=None``: it reports) runs the trimmed mean's selection network once,
  as a step told not to report does: XLA:CPU used to fuse it into both consumers of the aggregate
  (the update and the metrics) and run it twice."""

  def compares(*report):
    step = jax.jit(lambda s, d: exp.step_fn(s, d, *report))
    return step.lower(exp.init_state(), exp.data).compile().as_text().count(' compare(')

  reporting, quiet = compares(), compares(False)
  assert quiet > 0 and reporting < 1.3 * quiet, (reporting, quiet)


def test_steps_that_do_not_report_over_a_batch_of_runs(exp):
  """``every_step=False`` with `data_axes` (a sweep's vmapped seeds): each run of the batch
  ends where it ends alone, with its last step's metrics (those of reporting every step)."""
  seeds = [
    eng.init_state(exp.spec, exp.problem, exp.params0, exp.model_state0, seed=s) for s in (3, 4)
  ]
  batch = jax.tree.map(lambda *xs: jnp.stack(xs), *[exp.place(s) for s in seeds])
  shared = jax.tree.map(lambda _: None, exp.data)
  advance = training.make_advance(exp.step_fn, exp.backend, data_axes=shared, every_step=False)
  states, metrics = advance(batch, exp.data, 2)
  alone = training.make_advance(exp.step_fn, exp.backend)
  for i, seed_state in enumerate(seeds):
    state, m = alone(exp.place(seed_state), exp.data, 2)
    member = jax.tree.map(lambda x, i=i: x[i], states)
    np.testing.assert_allclose(_flat(member), _flat(state), rtol=1e-5, atol=1e-6)
    for name, values in m.items():
      np.testing.assert_allclose(float(metrics[name][i]), float(values[-1]), rtol=1e-5, atol=1e-6)


def test_seed_changes_the_run(exp):
  a, _ = _steps(exp, 1)
  s1 = eng.init_state(exp.spec, exp.problem, exp.params0, exp.model_state0, seed=1)
  b, _ = _steps(exp, 1, exp.place(s1))  # same compiled step, another key
  assert not np.array_equal(_flat(a.params), _flat(b.params))


def _manual_worker_grad(exp, params, key, wid, flip=False):
  """Float64 NumPy reference of one worker's gradient (logistic regression, softmax CE)."""
  spec, d = exp.spec, exp.problem.data
  nh = spec.num_honest
  k = jax.random.fold_in(key, wid)
  part = wid if wid < nh else (wid - nh) % nh
  pos = np.asarray(jax.random.randint(k, (spec.batch_size,), 0, d['sizes'][part]))
  ex = d['idx'][part, pos]
  x = d['x_train'][ex].reshape(len(ex), -1).astype(np.float64)
  y = d['y_train'][ex]
  if flip:
    y = spec.num_classes - 1 - y
  w = np.asarray(params['dense']['kernel'][...], np.float64)
  b = np.asarray(params['dense']['bias'][...], np.float64)
  z = x @ w + b
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(y)), y] -= 1.0
  p /= len(y)
  return {'kernel': x.T @ p, 'bias': p.sum(0)}


@pytest.mark.parametrize('attack', ['sign_flip', 'label_flip'])
def test_worker_gradients_and_momentum_against_numpy(exp, attack):
  # β = 0.9, not 0.5: with β = 1 − β a swap of the two weights would pass unnoticed.
  spec = dataclasses.replace(exp.spec, attack=attacks.get(attack), momentum=0.9)
  params = exp.params0
  n = spec.num_workers
  mom0 = jax.tree.map(
    lambda p: jax.random.normal(jax.random.key(1), (n,) + p.shape, p.dtype), params
  )
  key = jax.random.key(5)
  data = jax.tree.map(jnp.asarray, exp.problem.data)
  mom, _ = jax.jit(lambda p, m, d: _workers(spec, exp, p, m, key, d))(params, mom0, data)
  beta = spec.momentum
  for wid in range(n):
    flip = attack == 'label_flip' and wid >= spec.num_honest
    g = _manual_worker_grad(exp, params, key, wid, flip)
    for name in ('kernel', 'bias'):
      want = beta * np.asarray(mom0['dense'][name][...][wid]) + (1 - beta) * g[name]
      got = np.asarray(mom['dense'][name][...][wid])
      np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)


def _stack_like(exp, seed):
  n = exp.spec.num_workers
  return jax.tree.map(
    lambda p: jax.random.normal(jax.random.key(seed), (n,) + p.shape, p.dtype), exp.params0
  )


def test_byzantine_rows_come_from_the_attack_on_honest_messages(exp):
  spec = exp.spec  # sign_flip: the Byzantine row is −(mean of the honest rows)
  stack = _stack_like(exp, 2)
  nh = spec.num_honest
  row, _ = _received_last_row(spec, exp, stack)
  want = attacks.get('sign_flip')(jax.tree.map(lambda x: x[:nh], stack), f=spec.num_byzantine)
  np.testing.assert_allclose(_flat(row), _flat(jax.tree.map(lambda x: x[0], want)), rtol=1e-4)
  flip = dataclasses.replace(spec, attack=attacks.get('label_flip'))  # data level: kept as sent
  row, _ = _received_last_row(flip, exp, stack)
  np.testing.assert_allclose(_flat(row), _flat(jax.tree.map(lambda x: x[-1], stack)), rtol=1e-4)


def test_centered_clipping_centre_is_the_previous_aggregate():
  exp = training.build(_config(rule='centered_clipping(tau=0.1)', momentum=0.0))
  s0 = exp.init_state()
  assert set(s0.aggregator.rule) == {'center'}
  s1, _ = exp.step(s0)
  s2, _ = exp.step(s1)
  lr = 0.5  # sgd, no weight decay: params_{t+1} = params_t - lr * aggregate_t
  agg = jax.tree.map(lambda a, b: (a - b) / lr, s1.params, s2.params)
  np.testing.assert_allclose(_flat(s2.aggregator.rule['center']), _flat(agg), rtol=1e-3, atol=1e-6)


def test_mimic_heuristic_state_is_carried(exp):
  spec = dataclasses.replace(exp.spec, attack=attacks.get('mimic_heuristic(warmup=2)'))
  state = eng.init_state(spec, exp.problem, exp.params0, exp.model_state0, seed=0)
  stack = _stack_like(exp, 4)
  att = state.attack_state
  for _ in range(3):
    row, att = _received_last_row(spec, exp, stack, att)
  assert int(att.step) == 3
  target = int(att.target)
  np.testing.assert_allclose(_flat(row), _flat(jax.tree.map(lambda x: x[target], stack)), rtol=1e-4)


def test_local_steps_train_and_evaluate():
  exp = training.build(_config(algorithm='local', learning_rate=1.0, momentum=0.0))
  before = exp.evaluate(exp.init_state())
  s, m = _steps(exp, 3)
  after = exp.evaluate(s)
  assert after['train_loss'] < before['train_loss']
  assert np.isfinite(float(m['agg_error']))


def test_honest_objective_against_numpy(exp):
  s = exp.init_state()
  out = exp.evaluate(s)
  d = exp.problem.data
  logits = np.asarray(exp.problem.apply(s.params, s.model_state, d['x_train']), np.float64)
  lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
  loss = lse - logits[np.arange(len(logits)), d['y_train']]
  per_worker = [loss[d['idx'][i, : d['sizes'][i]]].mean() for i in range(len(d['sizes']))]
  np.testing.assert_allclose(out['train_loss'], np.mean(per_worker), rtol=1e-5)
  acc = np.mean(logits.argmax(1) == d['y_train'])
  np.testing.assert_allclose(out['train_accuracy'], acc, rtol=1e-6)


def test_optimizer_from_config():
  tx = training.make_optimizer(_config(optimizer='adamw', weight_decay=0.1))
  assert isinstance(tx, optax.GradientTransformation)
  with pytest.raises(ValueError, match='known optimizers'):
    training.make_optimizer(_config(optimizer='lion'))


@pytest.mark.parametrize(
  'kw, match',
  [
    ({'rule': 'krumm'}, 'unknown aggregator .*known aggregators: .*krum'),
    ({'rule': 'nnmm+mean'}, 'unknown pre-aggregator .*nnm'),
    ({'attack': 'alie2'}, 'unknown attack .*known attacks: .*alie.*label_flip'),
    ({'rule': 'krum', 'num_workers': 6, 'num_byzantine': 2}, "rule 'krum' cannot run.*n=6, f=2"),
    ({'rule': 'trimmed_mean', 'num_workers': 6, 'num_byzantine': 3}, 'n=6, f=3'),
    ({'attack': 'alie(z=1.5)'}, "attack alie: unknown parameter 'z'; accepted: variant, tau"),
    ({'coding': 'cyclic(d=99)'}, '1 <= d <= n'),
    ({'compression': 'zip'}, 'unknown compressor'),
    ({'num_byzantine': 6}, 'at least one honest worker'),
    ({'model': 'transformer'}, 'known'),
    ({'split': 'weird'}, 'known'),
    ({'backend': 'tpu'}, 'known backends'),
    ({'algorithm': 'admm'}, 'known algorithms'),
    ({'learning_rate': -0.1}, r'learning_rate must be a finite number in \(0, inf\); got'),
    ({'learning_rate': float('nan')}, 'learning_rate must be a finite number'),
    ({'momentum': 1.0}, r'momentum must be a finite number in \[0, 1\); got momentum=1.0'),
    ({'server_momentum': -0.5}, 'server_momentum must be'),
    ({'num_steps': -3}, r'num_steps must be an int in \[1, inf\)'),
    ({'batch_size': 0}, 'batch_size must be an int'),
    ({'weight_decay': -1e-4}, 'weight_decay must be'),
    ({'local_steps': 0}, 'local_steps must be an int'),
  ],
)
def test_clear_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    training.build(_config(**kw))


def test_distributed_initialization_only_when_asked(monkeypatch):
  from robustjax import distributed

  for var in distributed.ENV.values():
    monkeypatch.delenv(var, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  assert not distributed.initialize()
  assert calls == []
  monkeypatch.setenv('ROBUSTJAX_LOCAL_DEVICE_IDS', '0,1')  # alone, no launch
  assert not distributed.initialize()
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', '1')
  assert distributed.initialize(coordinator_address='localhost:1234')
  assert calls == [
    {
      'coordinator_address': 'localhost:1234',
      'num_processes': 2,
      'process_id': 1,
      'local_device_ids': [0, 1],
    }
  ]


def test_worker_chunk_default_from_the_saved_activations(exp, monkeypatch):
  """Unset, on CPU: every worker at once while their gradients' saved activations fit in
  `CPU_VMAP_ALL_MAX_BYTES`, else chunks of 256 (on GPU / TPU always at once); set values kept."""
  from robustjax.training import _setup

  per = _setup._saved_bytes(exp.problem, exp.params0, exp.model_state0, 4)
  assert 4 * 64 * 4 <= per < 100 * 4 * 64 * 4  # the logistic model's 4 × 64 inputs and a little
  # Per worker, twice the rows save twice the bytes: the shared parameters are not counted.
  assert _setup._saved_bytes(exp.problem, exp.params0, exp.model_state0, 8) == 2 * per
  chunk = lambda **kw: _setup._worker_chunk(
    _config(**kw), exp.problem, exp.params0, exp.model_state0
  )
  chunked = 256 if jax.devices()[0].platform == 'cpu' else 0
  assert exp.spec.worker_chunk == chunk() == 0
  monkeypatch.setattr(_setup, 'CPU_VMAP_ALL_MAX_BYTES', 6 * per)
  assert chunk() == 0
  monkeypatch.setattr(_setup, 'CPU_VMAP_ALL_MAX_BYTES', 6 * per - 1)
  assert chunk() == chunked
  assert chunk(worker_chunk=3) == 3 and chunk(worker_chunk=0) == 0
  with pytest.raises(ValueError, match='worker_chunk must be >= 0'):
    chunk(worker_chunk=-1)


def test_worker_chunks_give_the_same_updates(exp):
  n = exp.spec.num_workers
  data = jax.tree.map(jnp.asarray, exp.problem.data)
  mom = jax.tree.map(lambda p: jnp.ones((n,) + p.shape, p.dtype), exp.params0)
  out = []
  for chunk in (0, 4):  # 4: chunks of 3 workers (the largest divisor of 6 not above 4)
    spec = dataclasses.replace(exp.spec, worker_chunk=chunk)
    fn = jax.jit(lambda p, m, d, spec=spec: _workers(spec, exp, p, m, jax.random.key(3), d))
    out.append(fn(exp.params0, mom, data))
  np.testing.assert_allclose(_flat(out[1]), _flat(out[0]), rtol=1e-6, atol=1e-7)
  assert eng._chunk_size(6, 4) == 3 and eng._chunk_size(1024, 256) == 256
  assert eng._chunk_size(8, 0) == 8
