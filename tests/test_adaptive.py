"""MultiKrum with f unknown (`gap_multikrum`, `adaptive_multikrum`) against float64 NumPy
references written from their definitions, the count they recover, and the carried state."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustjax import aggregators, pipeline


def _scores64(x, k):
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  return np.sort(d, axis=1)[:, :k].sum(1)


def _drop_mean64(x, scores, b):
  keep = np.argsort(scores, kind='stable')[: len(x) - b]
  return x[keep].mean(0)


def gap_multikrum64(x, f, ratio=1.5):
  n = len(x)
  s = _scores64(x, n - f - 2)
  ss = np.sort(s)
  b = 0
  for j in range(n - f - 1, n - 1):  # the first jump above `ratio`, from the low end
    if ss[j + 1] / ss[j] > ratio:
      b = n - 1 - j
      break
  return _drop_mean64(x, s, b), b


def mad_count64(x, f, threshold=3.0):
  med = np.median(x, axis=0)
  dist = np.sqrt(((x - med) ** 2).sum(1))
  c = np.median(dist)
  mad = np.median(np.abs(dist - c)) / 0.6745
  return min(int(np.sum(dist > c + threshold * mad)), f)


def _stack(rng, n, b, d=50, far=30.0):
  x = rng.normal(size=(n, d))
  x[n - b :] += far * rng.normal(size=(b, d)) / np.sqrt(d) + far
  return x


@pytest.mark.parametrize('b', [0, 1, 2, 3])
def test_gap_multikrum_against_float64_and_recovers_the_count(b):
  rng = np.random.default_rng(b)
  n, f = 14, 4
  x = _stack(rng, n, b)
  ref, b_hat = gap_multikrum64(x, f)
  assert b_hat == b  # far outliers: the gap is where they start
  got = aggregators.gap_multikrum(jnp.asarray(x, jnp.float32), f=f)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  got64 = aggregators.gap_multikrum(jnp.asarray(x), f=f)
  if got64.dtype == jnp.float64:
    np.testing.assert_allclose(got64, ref, rtol=1e-12)


def test_gap_multikrum_on_random_inputs_matches_the_reference():
  rng = np.random.default_rng(7)
  for _ in range(20):
    n = int(rng.integers(7, 16))
    f = int(rng.integers(1, (n - 3) // 2 + 1))
    x = rng.standard_t(2, size=(n, 5))  # heavy tails: varied gaps
    ref, _ = gap_multikrum64(x, f)
    got = aggregators.gap_multikrum(jnp.asarray(x, jnp.float32), f=f)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('b', [0, 2, 3])
def test_adaptive_multikrum_one_shot_against_float64(b):
  rng = np.random.default_rng(10 + b)
  n, f = 14, 4
  x = _stack(rng, n, b)
  count = mad_count64(x, f)
  assert count == b
  ref = _drop_mean64(x, _scores64(x, n - f - 2), count)
  got = aggregators.adaptive_multikrum(jnp.asarray(x, jnp.float32), f=f)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_adaptive_multikrum_carries_its_estimate_across_steps():
  """The state protocol: f̂ starts at the bound and follows the per-step counts by an EMA; the
  rule drops ⌈f̂⌉ inputs (NumPy loop as the reference)."""
  rng = np.random.default_rng(3)
  n, f, beta = 14, 4, 0.7
  rule = pipeline.as_rule(f'adaptive_multikrum(momentum={beta})', f)
  state = rule.init(jnp.zeros(50))
  assert float(state['f_hat']) == f
  f_hat = float(f)
  for step in range(6):
    b = [1, 1, 1, 3, 3, 0][step]
    x = _stack(rng, n, b)
    out, state = rule.update(jnp.asarray(x, jnp.float32), state)
    drop = int(np.ceil(f_hat - 1e-6))
    np.testing.assert_allclose(out, _drop_mean64(x, _scores64(x, n - f - 2), drop), atol=1e-5)
    f_hat = beta * f_hat + (1 - beta) * mad_count64(x, f)
    np.testing.assert_allclose(float(state['f_hat']), f_hat, rtol=1e-6)


def test_adaptive_state_in_the_training_step_and_jit():
  rule = pipeline.as_rule('adaptive_multikrum', 2)
  x = jnp.asarray(_stack(np.random.default_rng(0), 9, 1), jnp.float32)
  state = rule.init(jnp.zeros(50))
  out_jit, s_jit = jax.jit(rule.update)(x, state)
  out, s = rule.update(x, state)
  np.testing.assert_allclose(out_jit, out, rtol=1e-6)
  np.testing.assert_allclose(s_jit['f_hat'], s['f_hat'], rtol=1e-6)


def test_gap_rule_drops_everything_beyond_the_first_jump():
  """One input moderately far, one much farther: the first jump (not the largest) decides, so
  the moderate one is dropped too."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 50))
  x[-2] += 3.0
  x[-1] += 300.0
  _, b = gap_multikrum64(x, 3)
  assert b == 2
  got = aggregators.gap_multikrum(jnp.asarray(x, jnp.float32), f=3)
  np.testing.assert_allclose(got, x[:-2].mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['gap_multikrum', 'adaptive_multikrum'])
def test_parameter_errors(name):
  x = jnp.zeros((8, 3))
  with pytest.raises(ValueError, match='n > 2f \\+ 2'):
    aggregators.get(name)(x, f=3)
  bad = {'gap_multikrum': {'ratio': 1.0}, 'adaptive_multikrum': {'momentum': 1.0}}[name]
  with pytest.raises(ValueError, match=name):
    aggregators.get(name)(x, f=1, **bad)


def test_multikrum_study_pieces_on_tiny_settings(tmp_path):
  """`robustjax multikrum`: the selection-under-noise and sketch studies and their reports, on
  tiny sizes (the training sweeps are the library's, tested in test_sweeps)."""
  from robustjax import configs
  from robustjax.cli import multikrum as study

  cfg = configs.get('multikrum', 'smoke')
  key = jax.random.key(0)
  sel = study.selection_under_noise(cfg, key)
  by = {(r['attack'], r['sigma']): r['byzantine_share'] for r in sel}
  assert by[('sign_flip', 0.0)] == 0.0  # -μ is far: never selected without noise
  assert by[('sign_flip', 8.0)] > 0.0  # under heavy noise MultiKrum cannot tell it apart
  res = study.run_sketch(cfg, key)
  assert {r['k'] for r in res['agreement']} == {8, 64}
  assert all(0.0 <= r['agreement'] <= 1.0 for r in res['agreement'])
  assert res['kappa'][0]['rule'] == 'multikrum' and res['kappa'][1]['kappa'] > 0
  witness = res['kappa'][1]['null_space']
  assert witness[str(study.WITNESS_OFFSETS[-1])] > 100 * res['kappa'][0]['kappa']
  paths, blocks = study.report_sketch(cfg, res, str(tmp_path))
  assert os.path.exists(paths[0]) and '| alie | 40 | 64 |' in blocks['sketch']
  assert 'null-space witness' in blocks['sketch_kappa']
  # The mis-specified report on synthetic records (two rules' cells).
  recs = []
  for rule in ('multikrum', 'trimmed_mean', 'gap_multikrum', 'adaptive_multikrum'):
    for b, attack in ((0, 'none'), (2, 'alie')):
      for f in (0, 2):
        acc = 0.9 - 0.3 * (b > f)
        recs.append(
          {
            'config': {'rule': rule, 'attack': attack, 'num_byzantine': b, 'declared_byzantine': f},
            'curve': {'step': [2, 4], 'test_accuracy': [acc / 2, acc]},
          }
        )
  fixed = [
    r for r in recs if 'krum' not in r['config']['rule'] or r['config']['rule'] == 'multikrum'
  ]
  adaptive = [
    r
    for r in recs
    if r['config']['rule'].endswith('multikrum') and r['config']['rule'] != 'multikrum'
  ]
  paths, blocks = study.report_misspecified(
    cfg, {'fixed': fixed, 'adaptive': adaptive}, str(tmp_path)
  )
  assert all(os.path.exists(p) for p in paths)
  assert '| multikrum | alie | 2 | 0.90 | 0.60 |' in blocks['misspecified']


def test_sketch_null_space_witness_grows_as_the_offset_squared():
  # Against a known R the sketch is not robust for k < dim; with k = dim R has no null space.
  from robustjax.cli import multikrum as study

  key = jax.random.key(3)
  small, large = (study.sketch_null_space_ratio(12, 2, 24, 8, t, key) for t in (100.0, 1000.0))
  assert small > 1.0 and large == pytest.approx(100 * small, rel=0.05)
  assert study.sketch_null_space_ratio(12, 2, 24, 24, 1000.0, key) is None
