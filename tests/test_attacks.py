"""Tests of robustjax.attacks against float64 NumPy references of the papers' formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from robustjax import attacks, pipeline
from robustjax.stack import assemble, flatten, unreadable

N_H, D, F = 9, 6, 2


def _honest(seed=0, n=N_H, d=D):
  rng = np.random.default_rng(seed)
  # A shared component plus heterogeneity, so the mean is far from 0 and σ is not constant.
  return (rng.normal(size=(1, d)) * 2.0 + rng.normal(size=(n, d)) * (1.0 + np.arange(d))).astype(
    np.float32
  )


def _np_mean_std(h, ddof=0):
  h = np.asarray(h, np.float64)
  return h.mean(0), h.std(0, ddof=ddof)


def _same_rows(out, row, f=F, rtol=1e-5, atol=1e-5):
  out = np.asarray(out, np.float64)
  assert out.shape == (f,) + np.shape(row)
  for r in out:
    np.testing.assert_allclose(r, row, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------- registry


def test_registry_names_and_unknown():
  assert set(attacks.names()) == {
    'sign_flip',
    'alie',
    'ipm',
    'mimic',
    'gaussian',
    'inf',
    'nan',
    'min_max',
    'min_sum',
    'optimal_alie',
    'optimal_ipm',
    'mimic_heuristic',
    'label_flip',
    'none',
  }
  assert attacks.names('stateful') == ['mimic_heuristic']
  assert attacks.names('data') == ['label_flip']
  assert attacks.names('none') == ['none']
  with pytest.raises(ValueError, match=r'known attacks: alie \(update\)'):
    attacks.get('nope')


def test_attack_objects_share_one_protocol():
  h = _honest()
  key = jax.random.key(0)
  alie = attacks.get('alie(variant="byzfl")')
  assert alie.params == (('variant', 'byzfl'),) and alie.kind == 'update'
  state = alie.init(key, h)
  byz, state2 = alie.apply(state, h, key, f=F)
  assert state == state2 == ()
  np.testing.assert_array_equal(byz, attacks.alie(h, f=F, variant='byzfl'))
  # The stateful mimic: the same init / apply, its state explicit; equal to the free functions.
  mimic = attacks.get('mimic_heuristic(warmup=2)')
  st = mimic.init(key, h)
  out, st = mimic.apply(st, h, None, f=F)
  ref, _ = attacks.mimic_heuristic(h, attacks.mimic_heuristic_init(h, key=key), f=F, warmup=2)
  np.testing.assert_array_equal(out, ref)
  assert int(st.step) == 1
  # Optimal attacks receive the defender through apply(rule=...), declared, not inspected.
  opt = attacks.get('optimal_ipm')
  assert opt.declared.needs_rule
  with pytest.raises(ValueError, match='needs the defender'):
    opt.apply((), h, key, f=F)
  byz, _ = opt.apply((), h, key, f=F, rule=pipeline.as_rule('median', F))
  assert byz.shape == (F, D)
  # Data-level attacks alter labels and replace nothing.
  flip = attacks.get('label_flip')
  assert flip.data_level and not flip.replaces_messages
  np.testing.assert_array_equal(flip.relabel(jnp.asarray([0, 9]), 10), [9, 0])
  with pytest.raises(ValueError, match='does not replace messages'):
    flip.apply((), h, key, f=F)
  assert not attacks.get('none').replaces_messages
  assert attacks.get(alie) is alie and hash(alie) == hash(attacks.get('alie(variant="byzfl")'))


@pytest.mark.parametrize(
  'name', [n for n in attacks.names('update') if not n.startswith('optimal')]
)
def test_every_attack_rejects_f_below_one(name):
  with pytest.raises(ValueError, match=f'{name}: f must be >= 1'):
    attacks.get(name)(_honest(), f=0, key=jax.random.key(0))


@pytest.mark.parametrize('name', ['optimal_alie', 'optimal_ipm'])
def test_optimal_rejects_bad_f(name):
  with pytest.raises(ValueError, match='f must be >= 1'):
    attacks.get(name)(_honest(), f=0, rule='median')
  with pytest.raises(ValueError, match='n > 2f'):
    attacks.get(name)(_honest(n=4), f=4, rule='median')
  # The defender's own condition (Krum needs n > 2f + 2) surfaces as its ValueError.
  with pytest.raises(ValueError, match='krum'):
    attacks.get(name)(_honest(n=5), f=3, rule='krum')


# --------------------------------------------------------------------------------- simple attacks


def test_sign_flip():
  h = _honest()
  mu, _ = _np_mean_std(h)
  _same_rows(attacks.sign_flip(h, f=F), -mu)
  np.testing.assert_allclose(attacks.sign_flip(h, f=F, variant='negate'), -h[:F])
  own = _honest(1, n=F)
  np.testing.assert_allclose(attacks.sign_flip(h, f=F, variant='negate', own=own), -own)
  with pytest.raises(ValueError, match="variant='negate' needs f=3"):
    attacks.sign_flip(h, f=3, variant='negate', own=own)
  with pytest.raises(ValueError, match='variant must be'):
    attacks.sign_flip(h, f=F, variant='bad')


@pytest.mark.parametrize('n,f', [(10, 1), (10, 3), (25, 5), (50, 10), (50, 24), (64, 16), (7, 3)])
def test_alie_z_matches_scipy(n, f):
  s = math.floor(n / 2 + 1) - f
  assert s >= 1
  np.testing.assert_allclose(float(attacks.alie_z(n, f)), norm.ppf((n - s) / n), rtol=1e-5)
  np.testing.assert_allclose(
    float(attacks.alie_z(n, f, 'karimireddy')),
    norm.ppf((n - f - s) / (n - f)),
    rtol=1e-4,
    atol=1e-6,
  )
  assert float(attacks.alie_z(n, f, 'byzfl', tau=2.5)) == -2.5


def test_alie_z_table():
  # Baruch et al.'s running example: n = 50, m = 24 Byzantine gives s = 2 and z = Φ⁻¹(48/50).
  np.testing.assert_allclose(float(attacks.alie_z(50, 24)), 1.7506860712521692, rtol=1e-5)


def test_alie_z_errors():
  with pytest.raises(ValueError, match=r's = floor\(n/2 \+ 1\) - f must be >= 1'):
    attacks.alie_z(10, 6)
  with pytest.raises(ValueError, match='variant must be one of'):
    attacks.alie_z(10, 2, 'nope')
  attacks.alie(_honest(n=4), f=4)  # n = 8: s = 5 - 4 = 1 is allowed ...
  with pytest.raises(ValueError, match='s = floor'):
    attacks.alie(_honest(n=4), f=5)  # ... n = 9: s = 5 - 5 = 0 is not


@pytest.mark.parametrize('variant', ['paper', 'karimireddy', 'byzfl'])
@pytest.mark.parametrize('ddof', [0, 1])
def test_alie_reference(variant, ddof):
  h = _honest()
  n = N_H + F
  s = math.floor(n / 2 + 1) - F
  z = {
    'paper': norm.ppf((n - s) / n),
    'karimireddy': norm.ppf((n - F - s) / (n - F)),
    'byzfl': -1.5,
  }[variant]
  mu, sd = _np_mean_std(h, ddof)
  _same_rows(attacks.alie(h, f=F, variant=variant, ddof=ddof), mu - z * sd, rtol=1e-4, atol=1e-4)


def test_alie_total_n_override():
  h = _honest()
  mu, sd = _np_mean_std(h)
  z = norm.ppf((40 - (21 - F)) / 40)
  _same_rows(attacks.alie(h, f=F, n=40), mu - z * sd, rtol=1e-4, atol=1e-4)


def test_ipm_reference_and_errors():
  h = _honest()
  mu, _ = _np_mean_std(h)
  _same_rows(attacks.ipm(h, f=F, eps=0.5), -0.5 * mu)
  _same_rows(attacks.ipm(h, f=F), -0.1 * mu)
  with pytest.raises(ValueError, match='ipm: eps must be > 0'):
    attacks.ipm(h, f=F, eps=0.0)
  # A traced ε is accepted (so the scale can be vmapped).
  out = jax.vmap(lambda e: attacks.ipm(h, f=F, eps=e))(jnp.array([1.0, 2.0]))
  np.testing.assert_allclose(out[1], 2.0 * out[0], rtol=1e-6)


def test_mimic_fixed_index():
  h = _honest()
  _same_rows(attacks.mimic(h, f=F, index=4), h[4].astype(np.float64))
  with pytest.raises(ValueError, match=r'index must be in \[0, n_h=9\)'):
    attacks.mimic(h, f=F, index=9)


def _np_mimic(rounds, z0, warmup):
  """Karimireddy et al.'s MimicVariantAttacker, float64."""
  mu, z, target, outs = None, np.asarray(z0, np.float64), 0, []
  for t, x in enumerate(rounds):
    x = np.asarray(x, np.float64)
    if t < warmup:
      avg = x.mean(0)
      mu = avg if t == 0 else t / (1 + t) * mu + avg / (1 + t)
      a = x - mu
      c = ((a @ z)[:, None] * a).sum(0)
      z = t / (1 + t) * z + c / np.linalg.norm(c) / (1 + t)
      z = z / np.linalg.norm(z)
      target = int(np.argmax(x @ z))
    outs.append((target, x[target]))
  return outs


def test_mimic_heuristic_matches_reference_and_is_jittable():
  rounds = [_honest(s) for s in range(5)]
  state = attacks.mimic_heuristic_init(rounds[0], key=jax.random.key(3))
  z0 = np.asarray(state.z)
  ref = _np_mimic(rounds, z0, warmup=3)
  step = jax.jit(attacks.mimic_heuristic, static_argnames=('f', 'warmup', 'argmax'))
  for t, x in enumerate(rounds):
    out, state = step(x, state, f=F, warmup=3)
    assert int(state.step) == t + 1
    assert int(state.target) == ref[t][0]
    _same_rows(out, ref[t][1])
  # After the warm-up the target stays fixed.
  assert ref[3][0] == ref[4][0] == ref[2][0]


def test_gaussian_reproducible_and_shaped():
  h = {'w': jnp.ones((N_H, 3, 2)), 'b': jnp.ones((N_H, 4), jnp.bfloat16)}
  a = attacks.gaussian(h, f=3, key=jax.random.key(0), mean=1.0, std=2.0)
  b = attacks.gaussian(h, f=3, key=jax.random.key(0), mean=1.0, std=2.0)
  c = attacks.gaussian(h, f=3, key=jax.random.key(1), mean=1.0, std=2.0)
  assert a['w'].shape == (3, 3, 2) and a['b'].shape == (3, 4) and a['b'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(a['w'], b['w'])
  assert not np.allclose(a['w'], c['w'])
  big = attacks.gaussian(jnp.zeros((2, 20000)), f=2, key=jax.random.key(0), mean=1.0, std=2.0)
  assert abs(float(big.mean()) - 1.0) < 0.05 and abs(float(big.std()) - 2.0) < 0.05
  with pytest.raises(ValueError, match='gaussian: needs a key'):
    attacks.gaussian(h, f=1)
  with pytest.raises(ValueError, match='std must be >= 0'):
    attacks.gaussian(h, f=1, key=jax.random.key(0), std=-1.0)


def test_inf_nan():
  h = _honest()
  assert np.all(np.isposinf(attacks.inf(h, f=F))) and attacks.inf(h, f=F).shape == (F, D)
  assert np.all(attacks.inf(h, f=F, value=-1e38) == np.float32(-1e38))
  assert np.all(np.isnan(attacks.nan(h, f=F)))


# --------------------------------------------------------------------------------- min-max / sum


def _np_direction(h, direction):
  mu, sd = _np_mean_std(h)
  return {'unit': -mu / np.linalg.norm(mu), 'std': -sd, 'sign': -np.sign(mu)}[direction]


def _np_constraint(h, m, kind):
  """(lhs, rhs) of the NDSS 2021 constraint for the malicious input m, float64."""
  h = np.asarray(h, np.float64)
  d2 = ((h[:, None] - h[None]) ** 2).sum(-1)
  dm2 = ((h - m) ** 2).sum(-1)
  if kind == 'max':
    return dm2.max(), d2.max()
  return dm2.sum(), d2.sum(1).max()


@pytest.mark.parametrize('direction', ['unit', 'std', 'sign'])
@pytest.mark.parametrize('name,kind', [('min_max', 'max'), ('min_sum', 'sum')])
def test_min_max_min_sum_constraint_and_maximality(name, kind, direction):
  h = _honest(2)
  mu, _ = _np_mean_std(h)
  p = _np_direction(h, direction)
  out, gamma = attacks.get(name)(h, f=F, direction=direction, return_gamma=True)
  gamma = float(gamma)
  assert gamma > 0
  _same_rows(out, mu + gamma * p, rtol=1e-4, atol=1e-4)
  lhs, rhs = _np_constraint(h, mu + gamma * p, kind)
  assert lhs <= rhs * (1 + 1e-5)  # feasible (float32 rounding)
  lhs2, _ = _np_constraint(h, mu + gamma * (1 + 1e-3) * p, kind)
  assert lhs2 > rhs  # and maximal up to the bisection tolerance
  if kind == 'sum':  # Σ_i ⟨x_i − μ, p⟩ = 0 gives a closed form to compare with
    hh = np.asarray(h, np.float64)
    a = ((hh - mu) ** 2).sum()
    exact = math.sqrt((rhs - a) / (N_H * (p @ p)))
    np.testing.assert_allclose(gamma, exact, rtol=1e-4)


def test_min_max_errors():
  with pytest.raises(ValueError, match='min_max: direction must be one of'):
    attacks.min_max(_honest(), f=F, direction='bad')
  with pytest.raises(ValueError, match='min_sum: tol must be > 0'):
    attacks.min_sum(_honest(), f=F, tol=0.0)


# --------------------------------------------------------------------------------- optimal


def _scan_deviation(h, byz_row, rule, f):
  """‖rule(honest ∪ {byz_row}×f) − μ‖, built in NumPy, the rule jitted on the whole stack (NNM +
  Krum called eagerly took 11 s for a scan of 61 points, jitted 0.3 s)."""
  full = np.concatenate([h, np.repeat(np.asarray(byz_row, np.float32)[None], f, 0)], 0)
  out = np.asarray(jax.jit(rule)(jnp.asarray(full)), np.float64)
  return float(np.linalg.norm(out - np.asarray(h, np.float64).mean(0)))


_DEFENDERS = [
  (agg, pre)
  for pre in ((), ('nnm',))
  for agg in ('mean', 'median', 'trimmed_mean', 'krum', 'multikrum')
]


@pytest.mark.parametrize('agg,pre', _DEFENDERS, ids=['+'.join(p + (a,)) for a, p in _DEFENDERS])
def test_optimal_attacks_beat_a_dense_sequential_scan(agg, pre):
  h = _honest(4)
  rule = pipeline.compose(agg, pre=pre, f=F)
  mu, sd = _np_mean_std(h)
  max_scale = 6.0
  scan = np.linspace(0.0, max_scale, 61)
  for name, row in (('optimal_alie', lambda t: mu - t * sd), ('optimal_ipm', lambda t: -t * mu)):
    if name == 'optimal_ipm' and pre:
      continue  # IPM against NNM is the test below (its known miss against the mean)
    byz, tau = attacks.get(name)(
      h,
      f=F,
      rule=rule,
      max_scale=max_scale,
      num_scales=12,
      num_refine=4,
      refine_rounds=6,
      return_scale=True,
    )
    tau = float(tau)
    assert tau >= 0.0
    _same_rows(byz, row(tau), rtol=1e-4, atol=1e-4)
    ours = _scan_deviation(h, np.asarray(byz)[0], rule, F)
    best_scan = max(_scan_deviation(h, row(t), rule, F) for t in scan)
    # The error is often a sawtooth in the scale (a rule stops selecting the Byzantine inputs
    # past a threshold), so a scan point can land arbitrarily close to the cliff: "at least as
    # well" holds up to our final resolution 0.55·(2/5)⁶ ≈ 0.002 times the slope (< 0.1 %).
    assert ours >= best_scan * (1 - 1e-3) - 1e-6, (name, ours, best_scan)


_SAWTOOTH_MISS = pytest.mark.xfail(
  strict=True,
  reason=(
    'known limitation: against nnm+mean the IPM objective is a sawtooth with teeth about 0.1 '
    'apart in the scale; the 12-point grid + refinement of the best point settles on a lower '
    'tooth (2.546 at tau 2.78) than the 61-point scan finds (2.561 at tau 1.8)'
  ),
)


@pytest.mark.parametrize(
  'agg',
  [pytest.param('mean', marks=_SAWTOOTH_MISS), 'median', 'trimmed_mean', 'krum', 'multikrum'],
)
def test_optimal_ipm_with_nnm_beats_dense_scan(agg):
  h = _honest(4)
  rule = pipeline.compose(agg, pre=['nnm'], f=F)
  mu, _ = _np_mean_std(h)
  byz = attacks.optimal_ipm(
    h, f=F, rule=rule, max_scale=6.0, num_scales=12, num_refine=4, refine_rounds=6
  )
  ours = _scan_deviation(h, np.asarray(byz)[0], rule, F)
  best_scan = max(_scan_deviation(h, -t * mu, rule, F) for t in np.linspace(0, 6.0, 61))
  assert ours >= best_scan * (1 - 1e-3) - 1e-6


def test_optimal_subspace_is_exact_and_auto_detected():
  h = _honest(10, d=40)
  cases = (
    ('optimal_alie', pipeline.compose('krum', f=F)),
    ('optimal_ipm', pipeline.compose('multikrum', pre=['nnm'], f=F)),
  )
  for name, rule in cases:
    assert rule.orthogonally_equivariant
    a, ta = attacks.get(name)(h, f=F, rule=rule, subspace=True, return_scale=True)
    b, tb = attacks.get(name)(h, f=F, rule=rule, subspace=False, return_scale=True)
    np.testing.assert_allclose(float(ta), float(tb), rtol=1e-5)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert not pipeline.compose('median', pre=['nnm'], f=F).orthogonally_equivariant
  assert not pipeline.as_rule(lambda s, key=None: s.mean(0), F).orthogonally_equivariant


def _sorted_evaluator(rule, honest, base, direction, f, clipped=None):
  # The evaluation the attack takes; clipped=True / False forces the trimmed mean's form.
  from robustjax.attacks import _line, _order_evaluation

  if clipped is None:
    return _order_evaluation._order_statistics_evaluation(rule, honest, base, direction, f)[0]
  form, value = _order_evaluation._sorted_form(rule, jax.tree.leaves(honest)[0].shape[0] + f)
  assert form == 'weights'
  statistic = (
    _order_evaluation._clipped_window_statistic
    if clipped
    else _order_evaluation._sorted_rows_statistic
  )
  return _line._along_line(statistic(flatten(honest), value, f), honest, base, direction)


@pytest.mark.parametrize(
  'n_h, f, defender_f, clipped',
  [(9, 2, 2, False), (12, 3, 5, False), (40, 9, 9, True), (30, 3, 12, False), (52, 12, 12, True)],
)
def test_the_clipped_form_is_taken_where_the_columns_would_be_sorted(n_h, f, defender_f, clipped):
  from robustjax.attacks import _order_evaluation

  rule = pipeline.as_rule('trimmed_mean', defender_f)
  weights = rule.order_weights(n_h + f)
  assert _order_evaluation._clips_windows(weights, n_h, f) == clipped
  assert _order_evaluation._clip_ranks(weights, n_h, f) == sorted(
    {q for q in (defender_f - f, defender_f, n_h - 1 - defender_f, n_h + f - 1 - defender_f)}
    & set(range(n_h))
  )


@pytest.mark.parametrize('spec', ['mean', 'median', 'trimmed_mean', 'meamed'])
@pytest.mark.parametrize(
  'n_h, f, defender_f',
  # (7, 6, 5): MeaMed's window has no honest rank inside every window (n_h <= 2e). MeaMed peels
  # its honest ends at (9, 2, 2), (10, 4, 4), (40, 9, 9) and (20, 4, 4), and sorts the columns
  # at (12, 3, 5), (7, 6, 5) and (30, 3, 12) (`_sorting.ends_pay`).
  [(9, 2, 2), (10, 4, 4), (12, 3, 5), (40, 9, 9), (7, 6, 0), (7, 6, 5), (30, 3, 12), (20, 4, 4)],
)
def test_order_statistic_evaluation_equals_the_rule_on_every_candidate(spec, n_h, f, defender_f):
  _check_order_statistic_evaluation(spec, n_h, f, defender_f)


@pytest.mark.parametrize('spec', ['median', 'trimmed_mean', 'meamed'])
def test_order_statistic_evaluation_beyond_the_network(monkeypatch, spec):
  # The network's limit patched to 4 rows: the honest columns come from bisection (the median
  # of 13 values reads two honest ranks) or from the layered network (more ranks), and the
  # defender runs its large-n paths.
  import robustjax._sorting as sorting

  monkeypatch.setattr(sorting, 'NETWORK_MAX_N', 4)
  monkeypatch.setattr(sorting, 'ONE_OUTPUT_NETWORK_MAX_N', 4)
  monkeypatch.setattr(sorting, 'WIDE_NETWORK_MAX_N', 4)
  for defender_f in (1, 2, 4):
    # Shapes of their own: fresh traces, so the patched limit applies.
    _check_order_statistic_evaluation(spec, 11, 2, defender_f, ints=(3, 4), cont=9)


@pytest.mark.parametrize('n_h, f, defender_f', [(9, 2, 2), (12, 3, 5), (7, 6, 0), (30, 3, 12)])
def test_clipped_window_evaluation_equals_the_rule_on_every_candidate(n_h, f, defender_f):
  # The clipped form forced where the sorted rows would be taken (and at f = 0: the mean).
  _check_order_statistic_evaluation('trimmed_mean', n_h, f, defender_f, clipped=True)


def _check_order_statistic_evaluation(spec, n_h, f, defender_f, ints=(2, 5), cont=7, clipped=None):
  from robustjax.attacks import _line

  rng = np.random.default_rng(n_h + f)
  # A pytree: a leaf of integers (candidates below land exactly on honest values: ties) and a
  # continuous one; the candidates μ + τ·v for τ from 0 to 1e8, both signs.
  honest = {
    'ints': jnp.asarray(rng.integers(-3, 4, size=(n_h, *ints)), jnp.float32),
    'cont': jnp.asarray(_honest(n_h, n=n_h, d=cont)),
  }
  base = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), honest)
  direction = {'ints': jnp.ones(ints), 'cont': jnp.asarray(rng.normal(size=cont), jnp.float32)}
  rule = pipeline.as_rule(spec, defender_f)
  fast = _sorted_evaluator(rule, honest, base, direction, f, clipped)
  slow = _line._line_evaluator(honest, base, direction, lambda s, k, r=rule: r(s, k), f, None)
  taus = jnp.asarray([0.0, 0.5, 1.0, 2.0, 3.0, -1.0, -2.5, 7.3, 1e3, -1e8], jnp.float32)
  a, b = jax.jit(jax.vmap(fast))(taus), jax.jit(jax.vmap(slow))(taus)
  np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize(
  'spec, clipped',
  [('median', None), ('trimmed_mean', None), ('trimmed_mean', True), ('meamed', None)],
)
def test_order_statistic_evaluation_with_non_finite_honest_values(spec, clipped):
  # Honest NaN / ±inf entries (sorted as the rules sort them) and candidates beyond the float
  # range: the sorted-column evaluation gives the defender's own error, +inf where it breaks.
  from robustjax.attacks import _line

  n_h, f = 11, 3
  rng = np.random.default_rng(5)
  honest = rng.normal(size=(n_h, 12)).astype(np.float32)
  honest[0, :4] = np.nan
  honest[1, 2:6] = np.inf
  honest[2, 5:9] = -np.inf
  honest[3:9, 10] = np.inf  # more than the rules tolerate in one coordinate: they break there
  honest = jnp.asarray(honest)
  base, direction = jnp.zeros(12), jnp.asarray(rng.normal(size=12), jnp.float32)
  for defender_f in (1, 3, 5):
    rule = pipeline.as_rule(spec, defender_f)
    fast = _sorted_evaluator(rule, honest, base, direction, f, clipped)
    slow = _line._line_evaluator(honest, base, direction, lambda s, k, r=rule: r(s, k), f, None)
    taus = jnp.asarray([0.0, 1.0, -2.0, 1e38, -1e38, jnp.inf], jnp.float32)
    a, b = jax.jit(jax.vmap(fast))(taus), jax.jit(jax.vmap(slow))(taus)
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-5)
    honest_ok = honest.at[3:9, 10].set(0.0)
    fast = _sorted_evaluator(rule, honest_ok, base, direction, f, clipped)
    slow = _line._line_evaluator(honest_ok, base, direction, lambda s, k, r=rule: r(s, k), f, None)
    a, b = jax.jit(jax.vmap(fast))(taus), jax.jit(jax.vmap(slow))(taus)
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize('n_h, f', [(1, 1), (3, 5), (7, 2), (8, 3)])
def test_order_statistic_evaluation_of_any_weights_against_numpy(n_h, f):
  # Any L-statistic (weights in runs, negative ones too): the window / clamp evaluation against
  # the float64 sort of the combined column, with ties and candidates beyond every honest value.
  from robustjax.attacks import _line, _order_evaluation

  rng = np.random.default_rng(10 * n_h + f)
  honest = jnp.asarray(rng.integers(-3, 4, size=(n_h, 6)), jnp.float32)
  base, direction = jnp.zeros(6), jnp.asarray([1.0, -1.0, 0.5, 2.0, 0.0, 1.0])
  taus = np.asarray([0.0, 0.5, 1.0, -2.0, 3.5, 40.0, -1e6], np.float32)
  for _ in range(6):
    weights = np.repeat(rng.integers(-2, 3, size=4) / 4.0, rng.multinomial(n_h + f, [0.25] * 4))
    sorted_rows, clipped = (
      _line._along_line(statistic(honest, weights, f), honest, base, direction)
      for statistic in (
        _order_evaluation._sorted_rows_statistic,
        _order_evaluation._clipped_window_statistic,
      )
    )
    got = np.asarray(jax.jit(jax.vmap(sorted_rows))(jnp.asarray(taus)))
    got_clipped = np.asarray(jax.jit(jax.vmap(clipped))(jnp.asarray(taus)))
    h = np.asarray(honest, np.float64)
    for tau, value, value_clipped in zip(taus, got, got_clipped):
      c = np.asarray(tau * np.asarray(direction) + np.asarray(base), np.float32)
      column = np.sort(np.concatenate([h, np.repeat(c[None].astype(np.float64), f, 0)]), axis=0)
      want = np.linalg.norm(weights @ column - h.mean(0))
      np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5, err_msg=f'{weights}, {tau}')
      np.testing.assert_allclose(value_clipped, want, rtol=1e-5, atol=1e-5, err_msg=f'{weights}')


@pytest.mark.parametrize('spec', ['mean', 'median', 'trimmed_mean'])
def test_declared_order_weights_reproduce_the_rule(spec):
  # Σ_p w_p x_(p) per coordinate, against the rule itself, in float64 NumPy.
  x = np.random.default_rng(3).normal(size=(11, 30))
  for f in (0, 2, 5):
    w = pipeline.as_rule(spec, f).order_weights(11)
    want = np.asarray(pipeline.as_rule(spec, f)(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(w @ np.sort(x, axis=0), want, rtol=1e-5, atol=1e-6)
  assert pipeline.as_rule('nnm+median', 2).order_weights(11) is None
  assert pipeline.as_rule('meamed', 2).order_weights(11) is None


def test_optimal_order_statistics_is_auto_detected_and_exact():
  h = _honest(12, d=40)
  assert attacks.evaluation_shortcut('median', N_H, F, 40) == 'order_statistics'
  assert attacks.evaluation_shortcut('krum', N_H, F, 40) == 'span'
  assert attacks.evaluation_shortcut('nnm+trimmed_mean', N_H, F, 40) == 'span_mixing'
  assert attacks.evaluation_shortcut('nnm+trimmed_mean', N_H, F, N_H + 2) is None
  assert attacks.evaluation_shortcut('meamed', N_H, F, 40) == 'order_statistics'
  for name in ('optimal_alie', 'optimal_ipm'):
    for spec in ('median', 'trimmed_mean', 'meamed'):
      a = attacks.get(name)(h, f=F, rule=spec)
      b = attacks.get(name)(h, f=F, rule=spec, order_statistics=False)
      # The same error reached (on a plateau of the error, rounding may pick another scale).
      rule = pipeline.as_rule(spec, F)
      np.testing.assert_allclose(
        _scan_deviation(h, np.asarray(a)[0], rule, F),
        _scan_deviation(h, np.asarray(b)[0], rule, F),
        rtol=1e-5,
      )
  with pytest.raises(ValueError, match='median_window'):
    attacks.optimal_alie(h, f=F, rule='krum', order_statistics=True)


@pytest.mark.parametrize('layout', ['tree', 'matrix'])
@pytest.mark.parametrize('spec', ['nnm+trimmed_mean', 'nnm+median', 'nnm+meamed'])
def test_span_mixing_evaluation_equals_the_defender_on_every_candidate(spec, layout):
  # The mixing chosen from the line's distances, the aggregator on the mixed stack: the
  # defender's own error for every candidate, small, at the switch of the neighbour sets, huge
  # and non-finite, for a defender told fewer Byzantine inputs than there are (more honest rows
  # in each mixing); 2e17 is past the largest squared distance the Gram keeps finite (the
  # candidate is unreadable). A one-leaf stack ('matrix') is mixed and aggregated block by block
  # by the defender (over several blocks: tests/test_pipeline.py).
  from robustjax.attacks import _base, _line, _span_evaluation

  h = jnp.asarray(_honest(13, d=40))
  tree = {'a': h[:, :25], 'b': h[:, 25:].reshape(N_H, 3, 5)} if layout == 'tree' else h
  mu = _base._mean(tree)
  sigma = _base._std(tree, mu, 0)
  taus = jnp.asarray([0.0, 0.3, 1.0, 1.5, 2.0, 3.0, 8.0, 1e6, 2e17, 1e38, jnp.inf], jnp.float32)
  for defender_f in (1, F):
    rule = pipeline.as_rule(spec, defender_f)
    assert attacks.evaluation_shortcut(rule, N_H, F, 40) == 'span_mixing'
    for base, direction in (
      (mu, jax.tree.map(jnp.negative, sigma)),
      (jax.tree.map(jnp.zeros_like, mu), mu),
    ):
      fast = _span_evaluation._mixing_evaluator(tree, base, direction, rule, F, None)
      slow = _line._line_evaluator(tree, base, direction, lambda s, k, r=rule: r(s, k), F, None)
      a, b = jax.jit(jax.vmap(fast))(taus), jax.jit(jax.vmap(slow))(taus)
      assert np.unique(np.asarray(b)[:7]).size > 2  # the error varies over the candidates
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('n_h, f', [(2, 1), (5, 2), (9, 4)])
def test_repeated_row_statistic_against_numpy(n_h, f):
  # n_h copies of one row and f of the candidate (the far reference after NNM when the defender
  # is told f): any L-statistic against the float64 sort of the combined column, MeaMed against
  # its general evaluation on the repeated rows; ties and candidates beyond the row included.
  from robustjax.attacks import _order_evaluation

  rng = np.random.default_rng(n_h)
  r = jnp.asarray([0.0, 1.0, -2.0, 3.0, 0.5], jnp.float32)
  cs = [jnp.asarray([c, -c, 0.0, 3.0, 1e6 * c], jnp.float32) for c in (0.0, 0.5, -4.0, 1e3)]
  n = n_h + f
  for _ in range(4):
    weights = np.repeat(rng.integers(-2, 3, size=3) / 4.0, rng.multinomial(n, [1 / 3] * 3))
    statistic = _order_evaluation._repeated_row_statistic('weights', weights, r, n_h, f)
    for c in cs:
      column = np.sort(
        np.concatenate(
          [np.repeat(np.float64(r)[None], n_h, 0), np.repeat(np.float64(c)[None], f, 0)]
        ),
        axis=0,
      )
      np.testing.assert_allclose(statistic(c), weights @ column, rtol=1e-6, atol=1e-6)
  rows = jnp.broadcast_to(r, (n_h, r.shape[0]))
  for keep in range(max(n - 2 * f, 1), n + 1):
    statistic = _order_evaluation._repeated_row_statistic('keep', keep, r, n_h, f)
    general = _order_evaluation._median_window_statistic(rows, keep, f)
    for c in cs:
      np.testing.assert_allclose(statistic(c), general(c), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('spec', ['nnm+trimmed_mean', 'nnm+median', 'nnm+meamed'])
def test_span_mixing_reads_most_candidates_from_the_reference_mixings(spec):
  # Candidates whose honest rows all mix like the near or all like the far reference (all or
  # none of the f copies of c in each neighbourhood) take the aggregator's order-statistic
  # evaluation on that reference's rows, the others the full product and the aggregator's
  # network; every branch but the mixture of references runs here, one candidate at a time (a
  # real `lax.switch`, as in the search), and every candidate's error is the defender's.
  from robustjax.attacks import _base, _line, _span_evaluation

  h = jnp.asarray(_honest(13, d=40))
  mu = _base._mean(h)
  sigma = _base._std(h, mu, 0)
  rule = pipeline.as_rule(spec, F)
  pre = rule.stages[0]
  mixing = lambda d2: pre.properties.mixing_from_dists(d2, f=rule.f)
  line = _span_evaluation._line_sq_dists(h, mu, mu, sigma, F)
  near, far = (
    m[:N_H, :N_H] for m in _span_evaluation._reference_mixings(line(0.0)[0], N_H, mixing)
  )
  taus = jnp.linspace(0.0, 3.0, 61, dtype=jnp.float32)

  def branch(tau):
    d2, finite = line(tau)
    mix = mixing(d2)
    mix_h, mix_c = mix[: N_H + 1, :N_H], jnp.sum(mix[: N_H + 1, N_H:], axis=1)
    bad = unreadable(jnp.concatenate([mix_h, mix_c[:, None]], axis=1), finite[: N_H + 1])
    return int(_span_evaluation._mixing_branch(mix_h, mix_c, bad, near, far)[0])

  taken = {branch(t) for t in taus}
  assert {
    _span_evaluation.FULL_PRODUCT,
    _span_evaluation.ALL_NEAR,
    _span_evaluation.ALL_FAR,
  } <= taken
  fast = _span_evaluation._mixing_evaluator(h, mu, sigma, rule, F, None)
  slow = _line._line_evaluator(h, mu, sigma, lambda s, k: rule(s, k), F, None)
  a = jax.jit(lambda t: jax.lax.map(fast, t))(taus)
  b = jax.jit(jax.vmap(slow))(taus)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_span_mixing_with_a_mixing_whose_far_rows_differ():
  # A mixing pre-aggregator that weights each row's n − f nearest by rank: told f, its far
  # rows differ (unlike NNM's), so no candidate reads a shared far row, and every candidate's
  # error is still the defender's.
  import dataclasses

  from robustjax.attacks import _base, _line, _span_evaluation
  from robustjax.stack import pairwise_sq_dists

  def ranked_mixing(d2, *, f):
    n = d2.shape[0]
    _, idx = jax.lax.top_k(-d2, n - f)
    w = jnp.linspace(2.0, 1.0, n - f, dtype=d2.dtype)
    return jnp.zeros((n, n), d2.dtype).at[jnp.arange(n)[:, None], idx].set(w / jnp.sum(w))

  def ranked_nnm(stack, *, f):
    return ranked_mixing(pairwise_sq_dists(stack), f=f) @ stack

  nnm_stage, agg_stage = pipeline.as_rule('nnm+trimmed_mean', F).stages
  properties = dataclasses.replace(nnm_stage.properties, mixing_from_dists=ranked_mixing)
  stage = dataclasses.replace(nnm_stage, fn=ranked_nnm, properties=properties)
  rule = dataclasses.replace(pipeline.as_rule('nnm+trimmed_mean', F), stages=(stage, agg_stage))
  h = jnp.asarray(_honest(13, d=40))
  mu = _base._mean(h)
  sigma = _base._std(h, mu, 0)
  taus = jnp.linspace(0.0, 3.0, 31, dtype=jnp.float32)
  fast = _span_evaluation._mixing_evaluator(h, mu, sigma, rule, F, None)
  slow = _line._line_evaluator(h, mu, sigma, lambda s, k: rule(s, k), F, None)
  a = jax.jit(lambda t: jax.lax.map(fast, t))(taus)
  b = jax.jit(jax.vmap(slow))(taus)
  assert np.unique(np.asarray(b)).size > 2
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_optimal_span_mixing_matches_the_full_search():
  h = _honest(14, d=40)
  rule = pipeline.as_rule('nnm+trimmed_mean', F)
  for name in ('optimal_alie', 'optimal_ipm'):
    a = attacks.get(name)(h, f=F, rule=rule)
    b = attacks.get(name)(h, f=F, rule=rule, subspace=False)
    np.testing.assert_allclose(
      _scan_deviation(h, np.asarray(a)[0], rule, F),
      _scan_deviation(h, np.asarray(b)[0], rule, F),
      rtol=1e-5,
    )


def test_optimal_expands_past_the_grid_against_the_mean():
  # The mean's error grows without bound in the scale: the search keeps expanding (×4 per point).
  h = _honest(11)
  _, tau = attacks.optimal_ipm(h, f=F, rule='mean', max_scale=1.0, num_scales=4, return_scale=True)
  assert float(tau) == 4.0**20


def test_optimal_defender_forms_pytrees_and_key():
  # A plain callable (stack, key=None), a stochastic pipeline (bucketing) driven by the key, a
  # pytree stack, and jit around the whole attack.
  h = _honest(5)
  tree = {'a': jnp.asarray(h[:, :4]), 'b': jnp.asarray(h[:, 4:]).reshape(N_H, 2, 1)}

  def coord_median(stack, key=None):
    return jax.tree.map(lambda x: jnp.median(x, axis=0), stack)

  out_tree, t_tree = attacks.optimal_alie(tree, f=F, rule=coord_median, return_scale=True)
  out_flat, t_flat = attacks.optimal_alie(h, f=F, rule='median', return_scale=True)
  np.testing.assert_allclose(float(t_tree), float(t_flat), rtol=1e-5)
  np.testing.assert_allclose(flatten(out_tree), out_flat, rtol=1e-5, atol=1e-5)

  bucket = pipeline.compose('median', pre=[('bucketing', {'s': 2})], f=F)
  run = jax.jit(
    lambda x, k: attacks.optimal_ipm(x, f=F, rule=bucket, key=k, num_scales=8, num_refine=4)
  )
  a, b = run(h, jax.random.key(7)), run(h, jax.random.key(7))
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='needs a jax.random key'):
    attacks.optimal_ipm(h, f=F, rule=bucket)


def test_optimal_explicit_scales_and_batches():
  h = _honest(6)
  scales = jnp.array([0.0, 0.5, 1.0, 2.0, 4.0])
  a, ta = attacks.optimal_alie(h, f=F, rule='trimmed_mean', scales=scales, return_scale=True)
  b, tb = attacks.optimal_alie(
    h, f=F, rule='trimmed_mean', scales=scales, batch_size=2, return_scale=True
  )
  np.testing.assert_allclose(float(ta), float(tb), rtol=1e-6)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  with pytest.raises(ValueError, match='scales must be a 1-d array'):
    attacks.optimal_alie(h, f=F, rule='median', scales=jnp.ones((2, 2)))
  with pytest.raises(ValueError, match='max_scale must be > 0'):
    attacks.optimal_ipm(h, f=F, rule='median', max_scale=-1.0)


# --------------------------------------------------------------------------------- pytrees


@pytest.mark.parametrize('name', ['sign_flip', 'alie', 'ipm', 'mimic', 'min_max', 'min_sum'])
def test_pytree_stack_equals_flat(name):
  h = _honest(7)
  tree = {'a': jnp.asarray(h[:, :4]).reshape(N_H, 2, 2), 'b': jnp.asarray(h[:, 4:])}
  out_tree = attacks.get(name)(tree, f=F)
  out_flat = attacks.get(name)(h, f=F)
  assert jax.tree.structure(out_tree) == jax.tree.structure(tree)
  assert out_tree['a'].shape == (F, 2, 2)
  np.testing.assert_allclose(flatten(out_tree), out_flat, rtol=1e-5, atol=1e-5)


def test_low_precision_leaves_keep_dtype():
  h = {'x': jnp.asarray(_honest(8), jnp.bfloat16)}
  for name in ['sign_flip', 'alie', 'ipm', 'min_max']:
    out = attacks.get(name)(h, f=F)
    assert out['x'].dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out['x'])))


# --------------------------------------------------------------------------------- labels


def test_label_maps():
  y = jnp.array([0, 1, 2, 9, 5], jnp.int32)
  np.testing.assert_array_equal(attacks.flip_labels(y, 10), [9, 8, 7, 0, 4])
  perm = np.asarray(attacks.label_permutation(10, key=jax.random.key(0)))
  assert sorted(perm.tolist()) == list(range(10))
  np.testing.assert_array_equal(
    attacks.permute_labels(y, 10, key=jax.random.key(0)), perm[np.asarray(y)]
  )
  np.testing.assert_array_equal(
    attacks.permute_labels(y, 10, key=jax.random.key(0)),
    attacks.permute_labels(y, 10, key=jax.random.key(0)),
  )
  with pytest.raises(ValueError, match='num_classes must be an int >= 2'):
    attacks.flip_labels(y, 1)


# --------------------------------------------------------------------------------- assemble


def test_assemble_positions_mask_and_content():
  h = _honest(9)
  byz = np.full((3, D), -7.0, np.float32)
  res = assemble(h, byz, positions=[4, 0, 10])
  s = np.asarray(res.stack)
  assert s.shape == (N_H + 3, D)
  np.testing.assert_array_equal(res.positions, [4, 0, 10])
  mask = np.ones(N_H + 3, bool)
  mask[[4, 0, 10]] = False
  np.testing.assert_array_equal(res.honest_mask, mask)
  np.testing.assert_array_equal(s[mask], h)  # honest slices in their order
  np.testing.assert_array_equal(s[~mask], byz)
  # Default: Byzantine last (the same stack as those positions given), cast to the honest dtype,
  # and f = 0. Random positions: reproducible from the key, f distinct.
  last = assemble(h, byz.astype(np.float64))
  np.testing.assert_array_equal(last.positions, [9, 10, 11])
  np.testing.assert_array_equal(last.honest_mask, np.arange(N_H + 3) < N_H)
  np.testing.assert_array_equal(last.stack, assemble(h, byz, positions=[9, 10, 11]).stack)
  assert last.stack.dtype == np.float32
  none = assemble(h, np.zeros((0, D), np.float32))
  np.testing.assert_array_equal(none.stack, h)
  assert none.positions.shape == (0,) and bool(np.all(none.honest_mask))
  r1 = assemble(h, byz, key=jax.random.key(1))
  r2 = assemble(h, byz, key=jax.random.key(1))
  np.testing.assert_array_equal(r1.stack, r2.stack)
  assert len(set(np.asarray(r1.positions).tolist())) == 3
  np.testing.assert_array_equal(np.asarray(r1.stack)[np.asarray(r1.honest_mask)], h)
  # Traced positions under jit, pytree stacks.
  tree_h, tree_b = {'a': jnp.asarray(h)}, {'a': jnp.asarray(byz)}
  jitted = jax.jit(lambda p: assemble(tree_h, tree_b, positions=p).stack['a'])
  np.testing.assert_array_equal(jitted(jnp.array([4, 0, 10])), s)


def test_assemble_errors():
  h, byz = _honest(), np.zeros((2, D), np.float32)
  with pytest.raises(ValueError, match='distinct ints'):
    assemble(h, byz, positions=[1, 1])
  with pytest.raises(ValueError, match='distinct ints'):
    assemble(h, byz, positions=[0, 11])
  with pytest.raises(ValueError, match=r'shape \(2,\)'):
    assemble(h, byz, positions=[0])
  with pytest.raises(ValueError, match='not both'):
    assemble(h, byz, positions=[0, 1], key=jax.random.key(0))
  with pytest.raises(ValueError, match='same pytree structure'):
    assemble({'a': h}, {'b': byz})
