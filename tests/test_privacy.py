"""Clipping and differential privacy as stages of the step (local and central Gaussian noise,
explicit keys), the accounting, and a declared f that differs from the true one."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustjax import configs, privacy, training
from robustjax.training import _engine as eng


def test_clip_rows_against_numpy_and_leaves_non_finite_rows():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 5)) * np.array([0.1, 1, 2, 5, 10, 1])[:, None]
  x[-1, 0] = np.nan
  got = np.asarray(privacy.clip_rows(jnp.asarray(x), 2.0))
  norms = np.linalg.norm(x, axis=1)
  want = x * np.minimum(1.0, 2.0 / norms)[:, None]
  np.testing.assert_allclose(got[:-1], want[:-1], rtol=1e-6)
  assert np.isnan(got[-1, 0])
  np.testing.assert_allclose(got[-1, 1:], x[-1, 1:], rtol=1e-6)  # left as it was
  tree = {'a': jnp.asarray(x[:5, :2]), 'b': jnp.asarray(x[:5, 2:])}
  out = privacy.clip_rows(tree, 2.0)
  np.testing.assert_allclose(np.concatenate([out['a'], out['b']], 1), want[:5], rtol=1e-6)


def test_noise_per_row_is_its_own_whatever_the_split():
  key = jax.random.key(3)
  x = jnp.zeros((8, 4000))
  rows = jnp.arange(8)
  full = privacy.add_noise(x, 2.0, key, rows)
  half = privacy.add_noise(x[4:], 2.0, key, rows[4:])  # the rows another device would hold
  np.testing.assert_array_equal(full[4:], half)
  assert abs(float(jnp.std(full)) - 2.0) < 0.03
  corr = np.corrcoef(np.asarray(full[0]), np.asarray(full[1]))[0, 1]
  assert abs(corr) < 0.05


def _exp(**kw):
  c = configs.get('default', 'smoke')
  c.rule, c.attack, c.momentum, c.backend = 'mean', 'none', 0.0, 'vmap'
  for k, v in kw.items():
    setattr(c, k, v)
  return training.build(c)


def _messages(exp, spec):
  """The messages of one step (stages 1-4) and the keys, for the first state."""
  state = exp.init_state()
  data = jax.tree.map(jnp.asarray, exp.problem.data)
  _, keys, b = eng._split_keys(spec, state)
  rows = jnp.arange(spec.num_workers, dtype=jnp.int32)
  msgs, _, _ = eng._worker_stages(
    spec, exp.problem, state.params, state.model_state, state.workers, rows, keys, data, b,
    lambda t: t,
  )  # fmt: skip
  return msgs, keys


def _flat(t):
  return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(t)], 1)


def test_local_stage_clips_then_adds_noise_of_std_sigma_c():
  exp = _exp()
  raw, _ = _messages(exp, exp.spec)
  raw = _flat(raw)
  c = 0.5 * float(np.median(np.linalg.norm(raw, axis=1)))
  spec = dataclasses.replace(exp.spec, dp=privacy.DP(clip=c))
  clipped = _flat(_messages(exp, spec)[0])
  want = raw * np.minimum(1.0, c / np.linalg.norm(raw, axis=1))[:, None]
  np.testing.assert_allclose(clipped, want, rtol=1e-5, atol=1e-7)
  assert np.all(np.linalg.norm(clipped, axis=1) <= c * (1 + 1e-5))
  spec = dataclasses.replace(exp.spec, dp=privacy.DP(clip=c, local_noise=2.0))
  noisy = _flat(_messages(exp, spec)[0])
  noise = noisy - clipped
  assert abs(noise.std() / (2.0 * c) - 1) < 0.05 and abs(noise.mean()) < 0.05 * 2.0 * c


def test_central_noise_is_added_to_the_aggregate_with_std_sigma_c_over_nh():
  c, sigma, lr = 1e3, 3.0, 0.1  # a large C: clipping changes nothing, the noise is σC/n_h
  base = _exp(learning_rate=lr, weight_decay=0.0)
  noisy = _exp(learning_rate=lr, weight_decay=0.0, dp_clip=c, dp_central_noise=sigma)
  s0 = base.init_state()
  a, _ = base.step(s0)
  b, _ = noisy.step(noisy.init_state())
  diff = _flat(jax.tree.map(lambda p, q: (p - q)[None] / lr, a.params, b.params))[0]
  nh = base.spec.num_honest
  assert abs(diff.std() / (sigma * c / nh) - 1) < 0.1
  # The same key stream: without noise the two runs agree exactly.
  quiet = _exp(learning_rate=lr, weight_decay=0.0, dp_clip=c)
  q, _ = quiet.step(quiet.init_state())
  jax.tree.map(np.testing.assert_array_equal, q.params, a.params)


def test_epsilon_from_the_accountant_is_within_the_analytic_rdp_bound():
  pytest.importorskip('dp_accounting')  # in the test extra: never skipped in CI
  steps, delta = 300, 1e-5
  eps = [privacy.epsilon(s, steps, delta) for s in (0.8, 1.0, 2.0, 4.0)]
  assert all(a > b > 0 for a, b in zip(eps, eps[1:]))
  assert privacy.epsilon(1.0, 600, delta) > eps[1]
  for sigma, e in zip((0.8, 1.0, 2.0, 4.0), eps):
    # RDP of the Gaussian mechanism: T·α/(2σ²) at order α; ε ≤ min_α RDP + log(1/δ)/(α − 1).
    bound = min(
      steps * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1)
      for a in np.linspace(1.01, 200, 20000)
    )
    assert e <= bound * (1 + 1e-6)
  assert privacy.epsilon(0.0, 10, delta) == math.inf
  out = privacy.run_epsilons(privacy.DP(clip=1.0, local_noise=1.0), steps, delta)
  assert out['local'] == pytest.approx(eps[1]) and out['central'] is None


def test_dp_settings_are_validated():
  with pytest.raises(ValueError, match='noise needs clipping'):
    privacy.DP(local_noise=1.0)
  with pytest.raises(ValueError, match='clip must be a finite number >= 0'):
    privacy.DP(clip=-1.0)
  with pytest.raises(ValueError, match='dp_clip must be a finite number'):
    _exp(dp_clip=-1.0)


def test_declared_f_differs_from_the_true_one():
  exp = _exp(num_byzantine=2, declared_byzantine=1, attack='sign_flip', rule='trimmed_mean')
  assert exp.spec.num_byzantine == 2 and exp.spec.pipeline.f == 1
  state, m = exp.step(exp.init_state())
  assert np.isfinite(float(m['agg_error']))
  with pytest.raises(ValueError, match='declared_byzantine must be an int >= 0'):
    _exp(declared_byzantine=-1)
