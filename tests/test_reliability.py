"""Hostile inputs for every rule: huge Byzantine rows, honest rows near the dtype's range,
degenerate (non-finite) stacks, integer / bool / complex dtypes, bad parameters, traced counts;
and the peer conventions (ByzFL's) the rules can express.

Each test enumerates the registered rules by their properties, so a new rule is covered without
being named here.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustjax import aggregators, pipeline, preaggregators

N, F, D = 11, 2, 100  # n >= 4f + 3: every rule (Bulyan included) runs
KEY = jax.random.key(0)


def _rules(*, robust_only=True):
  out = []
  for name in aggregators.names():
    props = aggregators.properties(name)
    if props.decodes or (robust_only and not props.robust):
      continue
    out.append(name)
  return out


def _call(name, x, f=F, **kw):
  rule = pipeline.as_rule(name if not kw else (name, kw), f)
  return np.asarray(rule(jnp.asarray(x), key=KEY), np.float64)


def _honest(seed=0, n=N - F, d=D):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


# 1. Byzantine rows of any finite magnitude never take a robust rule over.
MAGNITUDES = [1e3, 1e6, 1e9, 1e10, 1e12, 1e15, 1e20, 1e25, 1e30, 1e35, 3e38]


@pytest.mark.parametrize('name', _rules())
def test_byzantine_magnitude_sweep_stays_bounded(name):
  h = _honest()
  bound = 10 * np.abs(h).max()
  for m in MAGNITUDES:
    for sign in (1.0, -1.0):
      x = np.concatenate([h, np.full((F, D), sign * m, np.float32)])
      out = _call(name, x)
      assert np.all(np.isfinite(out)), (name, m)
      assert np.abs(out).max() <= bound, (name, m, np.abs(out).max())


@pytest.mark.parametrize('pre', ['nnm', 'arc', 'clipping(c=5.0)', 'bucketing'])
def test_byzantine_magnitude_sweep_through_preaggregators(pre):
  h = _honest(1, d=20)
  for m in MAGNITUDES:
    x = np.concatenate([h, np.full((F, 20), m, np.float32)])
    f = 1 if pre == 'bucketing' else F  # ⌈11/2⌉ = 6 buckets: at most 2 bad, 2f < 6 needs f <= 2
    out = _call(f'{pre}+median', x, f=f)
    assert np.all(np.isfinite(out)) and np.abs(out).max() <= 10 * np.abs(h).max(), (pre, m)


def test_caf_is_not_taken_over_by_large_finite_rows():
  # The reported case: 1e10 rows turned CAF into the plain mean (about 1.8e9).
  x = np.random.default_rng(0).normal(size=(11, 10)).astype(np.float32)
  x[-2:] = 1e10
  out = np.asarray(aggregators.caf(jnp.asarray(x), f=2))
  assert np.abs(out).max() < 3


def test_float64_magnitudes_up_to_1e300():
  with jax.enable_x64(True):
    h = _honest().astype(np.float64)
    for name in ['krum', 'caf', 'geometric_median', 'trimmed_mean', 'smea']:
      for m in [1e100, 1e200, 1e300]:
        x = np.concatenate([h, np.full((F, D), m)])
        out = _call(name, x)
        assert np.all(np.isfinite(out)) and np.abs(out).max() < 10 * np.abs(h).max(), (name, m)


# 2. Scale equivariance where squares overflow (1e20) or underflow (1e-20).
UNIT_PARAMS = {'tau': 2.0, 'nu': 1e-6}


def _scale_case(seed=3, d=10):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, d))
  x[-F:] = rng.normal(size=(F, d)) * 5 + 8
  return x


@pytest.mark.parametrize('name', _rules())
@pytest.mark.parametrize('scale', [1e20, 1e-20, 3e30])
def test_rules_are_scale_equivariant_near_the_float32_range(name, scale):
  x = _scale_case()
  # Parameters in the inputs' units (CC's τ, GM's smoothing ν) scale with them.
  units = {p: v for p, v in UNIT_PARAMS.items() if pipeline.accepts(aggregators.get(name), p)}
  base = _call(name, x.astype(np.float32), **units)
  scaled = {p: v * scale for p, v in units.items()}
  got = _call(name, (x * scale).astype(np.float32), **scaled) / scale
  np.testing.assert_allclose(got, base, rtol=2e-4, atol=2e-4 * np.abs(base).max())


@pytest.mark.parametrize('pre', ['nnm', 'arc', 'clipping'])
def test_preaggregators_are_scale_equivariant_at_1e20(pre):
  x = _scale_case(4)
  scale = 1e20
  params = {'c': 3.0} if pre == 'clipping' else {}
  fn = preaggregators.get(pre)
  base = np.asarray(fn(jnp.asarray(x, jnp.float32), f=F, **params))
  params = {'c': 3.0 * scale} if pre == 'clipping' else {}
  got = np.asarray(fn(jnp.asarray(x * scale, jnp.float32), f=F, **params), np.float64) / scale
  np.testing.assert_allclose(got, base, rtol=2e-4, atol=1e-4)


def test_clipping_keeps_honest_rows_at_1e20():
  x = np.full((5, 4), 1e20, np.float32)
  out = np.asarray(preaggregators.clipping(jnp.asarray(x), c=1.0), np.float64)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


# 9. Degenerate inputs: NaN when no finite information exists; an edge-case table per module.
@pytest.mark.parametrize('name', _rules(robust_only=False))
def test_all_nan_stack_gives_nan(name):
  x = np.full((N, 6), np.nan, np.float32)
  assert np.all(np.isnan(_call(name, x))), name


@pytest.mark.parametrize('name', _rules())
def test_at_most_f_nonfinite_rows_give_a_finite_output(name):
  x = _honest(5, d=6)
  bad = np.array([[np.nan] * 6, [np.inf] * 6], np.float32)
  # First, except for rules that trust an input (MoNNA trusts input 0): then last.
  rows = [x, bad] if aggregators.properties(name).trusted_input else [bad, x]
  out = _call(name, np.concatenate(rows))
  assert np.all(np.isfinite(out)), name


def test_median_with_a_nan_majority_is_nan_not_inf():
  x = np.random.default_rng(0).normal(size=(N, 3)).astype(np.float32)
  x[:7] = np.nan
  assert np.all(np.isnan(np.asarray(aggregators.median(jnp.asarray(x)))))


def test_more_than_f_nonfinite_rows_are_reported_as_nan_by_selection_rules():
  x = _honest(6, d=4)
  bad = np.full((F + 3, 4), np.nan, np.float32)
  stack = jnp.asarray(np.concatenate([bad, x[: N - F - 3]]))
  for name in ['krum', 'multikrum', 'mda', 'smea', 'bulyan']:
    assert np.all(np.isnan(_call(name, stack))), name


# 8. Dtypes: integers and bools are promoted to float; complex is refused.
@pytest.mark.parametrize('name', _rules(robust_only=False))
@pytest.mark.parametrize('dtype', [np.int32, np.bool_])
def test_integer_and_bool_stacks_are_promoted(name, dtype):
  x = np.random.default_rng(7).integers(-8, 8, size=(N, 5))
  if dtype is np.bool_:
    x = x > 0
  x = x.astype(dtype)
  out = aggregators.get(name)
  got = pipeline.as_rule(name, F)(jnp.asarray(x), key=KEY)
  assert jnp.issubdtype(got.dtype, jnp.floating), (name, got.dtype)
  want = pipeline.as_rule(name, F)(jnp.asarray(x, jnp.float32), key=KEY)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, err_msg=name)
  del out


def test_mean_of_int32_is_not_truncated():
  x = jnp.array([[0, 0, -7], [-1, -1, -8], [0, 0, -8], [-1, -1, -8], [0, 0, -8]], jnp.int32)
  np.testing.assert_allclose(aggregators.mean(x), [-0.4, -0.4, -7.8], rtol=1e-6)


@pytest.mark.parametrize('name', ['mean', 'krum', 'median', 'caf'])
def test_complex_stacks_are_refused(name):
  x = jnp.ones((N, 3), jnp.complex64)
  with pytest.raises(ValueError, match=f'{name}: leaves must be real'):
    aggregators.get(name)(x, f=F)


# 9 (continued). Parameters checked when concrete; shapes named; traced counts named.
def test_negative_radii_as_concrete_arrays_are_refused():
  x = jnp.ones((N, 3))
  with pytest.raises(ValueError, match='clipping: c must be > 0'):
    preaggregators.clipping(x, c=jnp.array(-1.0))
  with pytest.raises(ValueError, match='centered_clipping: tau must be > 0'):
    aggregators.centered_clipping(x, tau=np.array(-1.0))
  with pytest.raises(ValueError, match='geometric_median: nu must be > 0'):
    aggregators.geometric_median(x, nu=jnp.array(float('nan')))


def test_wrong_shaped_center_and_init_are_named():
  x = jnp.ones((N, 3))
  with pytest.raises(ValueError, match=r'centered_clipping: center leaf 0 .* \(3,\); got \(4,\)'):
    aggregators.centered_clipping(x, center=jnp.zeros(4))
  with pytest.raises(ValueError, match='geometric_median: init leaf 0'):
    aggregators.geometric_median(x, init=jnp.zeros(2))


@pytest.mark.parametrize('name', ['krum', 'trimmed_mean', 'caf'])
def test_traced_f_names_the_rule(name):
  rule = aggregators.get(name)
  with pytest.raises(ValueError, match=f'{name}: f must be static'):
    jax.jit(lambda x, f: rule(x, f=f))(jnp.ones((N, 3)), F)


# Peer conventions (ByzFL 0.0.11), written from its source.
def _byzfl_krum(x, f):
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  d = np.sort(d, axis=1)[:, 1 : len(x) - f]
  return x[np.argmin(d.mean(1))]


def test_krum_with_explicit_neighbours_runs_at_n3_f1_like_byzfl():
  rng = np.random.default_rng(0)
  for _ in range(5):
    x = rng.normal(size=(3, 4))
    got = aggregators.krum(jnp.asarray(x, jnp.float32), f=1, num_neighbors=1)
    np.testing.assert_allclose(got, _byzfl_krum(x, 1), rtol=1e-6)
  with pytest.raises(ValueError, match=r'n > 2f \+ 2 \(or an explicit num_neighbors\)'):
    aggregators.krum(jnp.ones((3, 4)), f=1)


def _byzfl_subset(x, f, objective):
  best, best_val = None, np.inf
  for subset in itertools.combinations(range(len(x)), len(x) - f):
    v = objective(x[list(subset)])
    if v < best_val:
      best, best_val = subset, v
  return x[list(best)].mean(0)


def _diameter(x):
  return ((x[:, None] - x[None]) ** 2).sum(-1).max()


def test_mda_tie_rules_default_and_byzfl():
  # Points on a line: every subset holding the diameter pair ties; the two rules pick different
  # subsets, and ties='kept' is ByzFL's first kept subset.
  x = np.array([[0.0], [4.0], [1.0], [2.0], [3.0], [10.0]])
  byzfl = _byzfl_subset(x, 2, _diameter)
  got = aggregators.mda(jnp.asarray(x, jnp.float32), f=2, ties='kept')
  np.testing.assert_allclose(got, byzfl, rtol=1e-6)
  default = aggregators.mda(jnp.asarray(x, jnp.float32), f=2)
  left_out_first = np.array([[1.0], [2.0], [3.0], [4.0]]).mean(0)  # leaves out (0, 5)
  np.testing.assert_allclose(default, left_out_first, rtol=1e-6)
  assert not np.allclose(default, byzfl)  # the case distinguishes the two rules
  with pytest.raises(ValueError, match='ties must be one of'):
    aggregators.mda(jnp.asarray(x), f=2, ties='first')


def test_a_static_option_must_be_one_of_its_choices():
  from robustjax._checks import check_choice

  check_choice('rule', 'mode', 'a', ('a', 'b'))
  check_choice('rule', 'count', 1, (1, 2))
  for bad in ('c', None, True, 1.0, jnp.asarray(1), ['a']):
    with pytest.raises(ValueError, match=r"rule: mode must be one of \('a', 'b', 1\); got"):
      check_choice('rule', 'mode', bad, ('a', 'b', 1))
  with pytest.raises(ValueError, match='centered_clipping: method must be one of'):
    aggregators.centered_clipping(jnp.ones((5, 2)), f=1, method='fast')


def _top_eig(x):
  c = x - x.mean(0)
  return np.linalg.eigvalsh(c.T @ c / len(x))[-1]


def _trace(x):
  c = x - x.mean(0)
  return np.sum(c * c) / len(x)


def test_smea_minimises_the_top_eigenvalue_not_the_trace():
  # Anisotropic: a spread along many small directions (large trace, small top eigenvalue) against
  # one long direction. The two criteria pick different subsets here.
  rng = np.random.default_rng(3)
  found = 0
  for _ in range(40):
    x = rng.normal(size=(8, 6)) * np.array([3.0, 0.3, 0.3, 0.3, 0.3, 0.3])
    x[:2] += rng.normal(size=(2, 6)) * 1.5
    eig, tr = _byzfl_subset(x, 2, _top_eig), _byzfl_subset(x, 2, _trace)
    if np.allclose(eig, tr):
      continue
    found += 1
    got = np.asarray(aggregators.smea(jnp.asarray(x, jnp.float32), f=2, ties='kept'))
    np.testing.assert_allclose(got, eig, rtol=1e-4, atol=1e-5)
  assert found >= 5


def _byzfl_caf(x, f):
  """ByzFL's CAF loop, with the exact top eigenvector instead of its random power step."""
  n = len(x)
  c = np.ones(n)
  best, best_lam = None, np.inf
  while c.sum() > n - 2 * f:
    mu = (c[:, None] * x).sum(0) / c.sum()
    diffs = x - mu
    cov = (c[:, None, None] * diffs[:, :, None] * diffs[:, None, :]).sum(0) / c.sum()
    lam, vec = np.linalg.eigh(cov)
    if lam[-1] < best_lam:
      best_lam, best = lam[-1], mu
    tau = (diffs @ vec[:, -1]) ** 2
    c = c * (1 - tau / tau.max())
  return best


def test_caf_tau_max_over_all_inputs_is_byzfl():
  rng = np.random.default_rng(11)
  differ = 0
  for _ in range(12):
    x = rng.normal(size=(9, 4))
    x[:2] += rng.normal(size=(2, 4)) * 4
    with jax.enable_x64(True):
      got = np.asarray(aggregators.caf(jnp.asarray(x), f=2, tau_max='all'))
      active = np.asarray(aggregators.caf(jnp.asarray(x), f=2))
    np.testing.assert_allclose(got, _byzfl_caf(x, 2), rtol=1e-8, atol=1e-10)
    differ += not np.allclose(active, got)
  assert differ >= 1  # the two conventions are different rules


def _byzfl_line_search(evaluate, evals=20, start=0.0, delta=10.0, ratio=0.8):
  """ByzFL 0.0.11's Optimal_ALittleIsEnough / Optimal_InnerProductManipulation search."""
  best_x, best_y = start, evaluate(start)
  remaining = evals - 1
  while remaining > 0:
    prop_x = best_x + delta
    prop_y = evaluate(prop_x)
    remaining -= 1
    if prop_y > best_y:
      best_x, best_y, delta = prop_x, prop_y, delta * 2
    else:
      delta *= ratio
      break
  while remaining > 0:
    prop_x = best_x + delta
    prop_y = evaluate(prop_x)
    remaining -= 1
    if prop_y > best_y:
      best_x, best_y = prop_x, prop_y
    delta *= ratio
  return best_x


def _np_trimmed_mean(x, f):
  s = np.sort(x, axis=0)
  return s[f : len(x) - f].mean(0)


@pytest.mark.parametrize('kind', ['alie', 'ipm'])
def test_optimal_attacks_reproduce_byzfl_line_search(kind):
  from robustjax import attacks

  rng = np.random.default_rng(2)
  honest = rng.normal(size=(9, 7)) + 0.5
  f = 3
  mu, sigma = honest.mean(0), honest.std(0, ddof=1)

  def evaluate(tau):
    byz = mu + tau * sigma if kind == 'alie' else -tau * mu
    full = np.concatenate([honest, np.repeat(byz[None], f, 0)])
    return np.linalg.norm(_np_trimmed_mean(full, f) - mu)

  want = _byzfl_line_search(evaluate, delta=0.3)
  kw = {'direction': 'plus', 'ddof': 1} if kind == 'alie' else {}
  kw['delta'] = 0.3
  with jax.enable_x64(True):
    fn = attacks.get(f'optimal_{kind}').fn
    _, tau = fn(
      jnp.asarray(honest), f=f, rule='trimmed_mean', search='byzfl', return_scale=True, **kw
    )
  np.testing.assert_allclose(float(tau), want, rtol=1e-12)
  assert want not in (0.0, 0.3, 0.9)  # the search ran past its first steps


def test_alie_byzfl_variant_uses_ddof_1():
  from robustjax import attacks

  honest = np.random.default_rng(0).normal(size=(6, 4))
  with jax.enable_x64(True):
    got = np.asarray(attacks.alie(jnp.asarray(honest), f=2, variant='byzfl', tau=1.5))[0]
  np.testing.assert_allclose(got, honest.mean(0) + 1.5 * honest.std(0, ddof=1), rtol=1e-12)


# 10. Float64 inputs are computed in float64 end to end.
def test_float64_end_to_end():
  from robustjax import attacks

  rng = np.random.default_rng(4)
  x = rng.normal(size=(9, 5)) * 1e-3 + 1.0
  with jax.enable_x64(True):
    xj = jnp.asarray(x)
    mean = np.asarray(aggregators.mean(xj))
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-14)
    alie = np.asarray(attacks.alie(xj, f=2))[0]
    s = int(np.floor(11 / 2 + 1)) - 2
    from statistics import NormalDist

    z = NormalDist().inv_cdf((11 - s) / 11)
    np.testing.assert_allclose(alie, x.mean(0) - z * x.std(0), rtol=1e-14)
    buckets = np.asarray(preaggregators.bucketing(xj, key=KEY, s=3))
    assert buckets.dtype == np.float64
    np.testing.assert_allclose(np.sort(buckets.sum(0)), np.sort(x.sum(0) / 3), rtol=1e-13)
    mda = np.asarray(aggregators.mda(xj, f=2))
    keep = np.asarray(aggregators.mda_mask(xj, f=2))
    np.testing.assert_allclose(mda, x[keep].mean(0), rtol=1e-14)
    clipped = np.asarray(preaggregators.clipping(xj, c=0.1))
    np.testing.assert_allclose(np.linalg.norm(clipped, axis=1), 0.1, rtol=1e-14)
    _, tau = attacks.get('optimal_alie').fn(xj, f=2, rule='median', return_scale=True)
    assert jnp.asarray(tau).dtype == jnp.float64
