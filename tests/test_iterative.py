"""Tests for the iterative aggregators: geometric_median, centered_clipping, caf."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustjax import aggregators
from robustjax.aggregators import caf, centered_clipping, geometric_median
from robustjax.stack import flatten

N, F, D = 11, 3, 6


def _data(seed=0, n=N, d=D, outliers=F, scale=20.0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  x[:outliers] += scale * rng.normal(size=(outliers, d))
  return x


# ---- float64 NumPy references, written from the formulas ----------------------------------------


def ref_small_norm_mean(x):
  n = len(x)
  idx = np.argsort(np.linalg.norm(x, axis=1), kind='stable')[: (n + 1) // 2]
  return x[idx].mean(0)


def ref_weiszfeld(x, z, nu, iters):
  for _ in range(iters):
    dist = np.linalg.norm(x - z, axis=1)
    beta = 1.0 / np.maximum(nu, dist)
    z = (beta[:, None] * x).sum(0) / beta.sum()
  return z


def ref_cc(x, v, tau, iters):
  n = len(x)
  for _ in range(iters):
    diff = x - v
    dist = np.linalg.norm(diff, axis=1)
    clip = np.minimum(1.0, tau / dist)
    v = v + (diff * clip[:, None]).sum(0) / n
  return v


def ref_caf(x, f):
  """CAF with the covariance formed explicitly in d-space (float64, exact eigenpairs)."""
  n = len(x)
  c = np.ones(n)
  best, best_lam = x.mean(0), np.inf
  while c.sum() > n - 2 * f:
    mu = (c[:, None] * x).sum(0) / c.sum()
    y = x - mu
    cov = (c[:, None] * y).T @ y / c.sum()
    lam, vec = np.linalg.eigh(cov)
    if lam[-1] < best_lam:
      best, best_lam = mu, lam[-1]
    tau = (y @ vec[:, -1]) ** 2
    tau_max = tau[c > 0].max()
    c = np.maximum(c * (1 - np.where(c > 0, tau, 0) / tau_max), 0)
  return best


def objective(x, z):
  return np.linalg.norm(x - z, axis=1).sum()


# ---- geometric median ----------------------------------------------------------------------------


@pytest.mark.parametrize('method', ['auto', 'direct', 'gram'])
@pytest.mark.parametrize('iters', [1, 2, 7])
def test_gm_matches_weiszfeld_reference(iters, method):
  x = _data(0)
  out = geometric_median(
    jnp.asarray(x, jnp.float32), f=F, nu=1e-6, iters=iters, tol=0.0, method=method
  )
  ref = ref_weiszfeld(x, ref_small_norm_mean(x), 1e-6, iters)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)


def test_gm_auto_method_iterates_directly_only_where_it_pays():
  from robustjax.aggregators._iterative import GM_DIRECT_MAX_ITERS, gm_auto_method

  assert gm_auto_method(GM_DIRECT_MAX_ITERS, 'small_norm_mean') == 'direct'
  assert gm_auto_method(GM_DIRECT_MAX_ITERS + 1, 'small_norm_mean') == 'gram'
  assert gm_auto_method(1, 'mean') == 'gram'
  assert gm_auto_method(100, 'median') == gm_auto_method(100, 'given') == 'direct'


@pytest.mark.parametrize('bad', [np.nan, np.inf, 1e38])
def test_gm_paths_agree_with_nonfinite_byzantine_slices(bad):
  x = _data(20).astype(np.float32)
  x[:F] = bad
  outs = [
    np.asarray(geometric_median(jnp.asarray(x), f=F, iters=2, tol=0.0, method=m))
    for m in ('direct', 'gram')
  ]
  assert np.all(np.isfinite(outs[0])), outs[0]
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_gm_given_init_and_large_nu():
  x = _data(1)
  z0 = x[F:].mean(0) + 0.3
  out = geometric_median(jnp.asarray(x, jnp.float32), f=F, nu=2.0, iters=5, tol=0.0, init=z0)
  np.testing.assert_allclose(np.asarray(out), ref_weiszfeld(x, z0, 2.0, 5), rtol=1e-4, atol=1e-4)


def test_gm_objective_not_worse_than_mean_and_median():
  x = _data(2)
  out = np.asarray(geometric_median(jnp.asarray(x, jnp.float32), f=F), np.float64)
  assert objective(x, out) <= objective(x, x.mean(0)) + 1e-4
  assert objective(x, out) <= objective(x, np.median(x, 0)) + 1e-4
  # and close to the optimum (a long float64 run)
  opt = ref_weiszfeld(x, x.mean(0), 1e-9, 2000)
  assert objective(x, out) <= objective(x, opt) * (1 + 1e-5)


@pytest.mark.parametrize('init', [None, 'median', 'mean'])
def test_gm_starts_converge_to_the_same_point(init):
  x = _data(3)
  out = geometric_median(jnp.asarray(x, jnp.float32), f=F, init=init, tol=1e-7, iters=500)
  opt = ref_weiszfeld(x, x.mean(0), 1e-9, 3000)
  np.testing.assert_allclose(np.asarray(out), opt, atol=2e-3)


def test_gm_early_stop_takes_fewer_iterations():
  x = jnp.asarray(_data(4), jnp.float32)
  loose = geometric_median(x, f=F, tol=1e-2, iters=500)
  capped = geometric_median(x, f=F, tol=0.0, iters=2)
  full = geometric_median(x, f=F, tol=0.0, iters=500)
  assert not np.allclose(np.asarray(capped), np.asarray(full), atol=1e-5)
  assert (
    np.linalg.norm(np.asarray(loose) - np.asarray(full))
    < np.linalg.norm(np.asarray(capped) - np.asarray(full)) + 0.05
  )


def test_gm_permutation_and_translation():
  x = _data(5)
  perm = np.random.default_rng(0).permutation(N)
  shift = np.linspace(-50, 50, D)
  kw = dict(f=F, tol=1e-8, iters=400)
  base = np.asarray(geometric_median(jnp.asarray(x, jnp.float32), **kw))
  permd = np.asarray(geometric_median(jnp.asarray(x[perm], jnp.float32), **kw))
  moved = np.asarray(geometric_median(jnp.asarray(x + shift, jnp.float32), **kw))
  np.testing.assert_allclose(permd, base, atol=1e-4)
  np.testing.assert_allclose(moved - shift, base, atol=2e-3)


# ---- centered clipping ---------------------------------------------------------------------------


@pytest.mark.parametrize('iters', [1, 3])
def test_cc_matches_reference(iters):
  x = _data(6)
  v0 = np.full(D, 0.5)
  out = centered_clipping(jnp.asarray(x, jnp.float32), f=F, center=v0, tau=1.5, iters=iters)
  np.testing.assert_allclose(np.asarray(out), ref_cc(x, v0, 1.5, iters), rtol=1e-5, atol=1e-5)


def test_cc_default_center_is_zero():
  x = _data(7)
  out = centered_clipping(jnp.asarray(x, jnp.float32), f=F, tau=2.0)
  np.testing.assert_allclose(np.asarray(out), ref_cc(x, np.zeros(D), 2.0, 1), rtol=1e-5, atol=1e-5)


def test_cc_permutation_and_translation_with_shifted_center():
  x = _data(8)
  v0 = np.ones(D)
  perm = np.random.default_rng(1).permutation(N)
  shift = np.linspace(-10, 30, D)
  base = np.asarray(centered_clipping(jnp.asarray(x, jnp.float32), f=F, center=v0, iters=2))
  p = np.asarray(centered_clipping(jnp.asarray(x[perm], jnp.float32), f=F, center=v0, iters=2))
  t = centered_clipping(jnp.asarray(x + shift, jnp.float32), f=F, center=v0 + shift, iters=2)
  np.testing.assert_allclose(p, base, atol=1e-5)
  np.testing.assert_allclose(np.asarray(t) - shift, base, atol=1e-4)


# ---- CAF -----------------------------------------------------------------------------------------


@pytest.mark.parametrize('seed,f', [(9, 3), (10, 2), (11, 5)])
def test_caf_matches_reference(seed, f):
  x = _data(seed, outliers=f, scale=8.0)
  out = caf(jnp.asarray(x, jnp.float32), f=f)
  np.testing.assert_allclose(np.asarray(out), ref_caf(x, f), rtol=1e-4, atol=1e-4)


def test_caf_power_iteration_close_to_exact():
  x = _data(12, scale=8.0)
  exact = np.asarray(caf(jnp.asarray(x, jnp.float32), f=F))
  power = np.asarray(caf(jnp.asarray(x, jnp.float32), f=F, power_iters=200))
  np.testing.assert_allclose(power, exact, atol=1e-3)


def test_caf_f0_is_mean_and_removes_outliers():
  x = _data(13)
  np.testing.assert_allclose(
    np.asarray(caf(jnp.asarray(x, jnp.float32), f=0)), x.mean(0), atol=1e-5
  )
  out = np.asarray(caf(jnp.asarray(x, jnp.float32), f=F))
  assert np.linalg.norm(out - x[F:].mean(0)) < 0.2 * np.linalg.norm(x.mean(0) - x[F:].mean(0))


def test_caf_permutation_and_translation():
  x = _data(14, scale=8.0)
  perm = np.random.default_rng(2).permutation(N)
  shift = np.linspace(-5, 5, D)
  base = np.asarray(caf(jnp.asarray(x, jnp.float32), f=F))
  np.testing.assert_allclose(
    np.asarray(caf(jnp.asarray(x[perm], jnp.float32), f=F)), base, atol=1e-4
  )
  moved = np.asarray(caf(jnp.asarray(x + shift, jnp.float32), f=F))
  np.testing.assert_allclose(moved - shift, base, atol=1e-4)


# ---- shared properties ---------------------------------------------------------------------------

RULES = {
  'geometric_median': dict(),
  'centered_clipping': dict(tau=1.0, iters=3, center=np.full(D, 0.2, np.float32)),
  'caf': dict(),
}


@pytest.mark.parametrize('name', sorted(RULES))
@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf, 1e38])
def test_nonfinite_byzantine_slices_keep_output_finite(name, bad):
  x = _data(15).astype(np.float32)
  x[:F] = bad
  x[1, 2] = 0.0  # a partly finite slice
  out = np.asarray(aggregators.get(name)(jnp.asarray(x), f=F, **RULES[name]))
  assert np.all(np.isfinite(out)), (name, bad, out)
  assert np.all(np.abs(out) < 100.0)


@pytest.mark.parametrize('name', sorted(RULES))
def test_pytree_matches_flattened(name):
  rng = np.random.default_rng(16)
  tree = {'a': rng.normal(size=(N, 2, 2)).astype(np.float32), 'b': rng.normal(size=(N, 2))}
  tree['b'] = tree['b'].astype(np.float32)
  tree['a'][:F] += 10.0
  params = dict(RULES[name])
  flat = flatten(tree)
  out_flat = aggregators.get(name)(flat, f=F, **params)
  if 'center' in params:
    c = params['center']
    params['center'] = {'a': c[:4].reshape(2, 2), 'b': c[4:]}
  out_tree = aggregators.get(name)(tree, f=F, **params)
  got = np.concatenate([np.ravel(out_tree['a']), np.ravel(out_tree['b'])])
  np.testing.assert_allclose(got, np.asarray(out_flat), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', sorted(RULES))
def test_bfloat16_close_to_float32(name):
  x = _data(17, scale=5.0).astype(np.float32)
  xb = jnp.asarray(x, jnp.bfloat16)
  out = aggregators.get(name)(xb, f=F, **RULES[name])
  assert out.dtype == jnp.bfloat16
  ref = aggregators.get(name)(xb.astype(jnp.float32), f=F, **RULES[name])
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize('name', sorted(RULES))
def test_jit_and_no_jit_agree(name):
  x = jnp.asarray(_data(18, n=5, outliers=1), jnp.float32)  # small: eager loops are slow
  fn = aggregators.get(name)
  params = dict(RULES[name], **({'iters': 3} if name == 'geometric_median' else {}))
  jitted = jax.jit(lambda s: fn(s, f=1, **params))(x)
  if name == 'caf':  # op-by-op eigh compiles are slow: drop only the outer jit
    eager = fn.__wrapped__(x, f=1, **params)
  else:
    with jax.disable_jit():
      eager = fn(x, f=1, **params)
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-4, atol=1e-4)


def test_center_can_be_traced_and_tau_traced():
  x = jnp.asarray(_data(19), jnp.float32)
  step = jax.jit(lambda s, v, t: centered_clipping(s, f=F, center=v, tau=t))
  out = step(x, jnp.ones(D), 1.0)
  ref = ref_cc(np.asarray(x, np.float64), np.ones(D), 1.0, 1)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


# ---- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'name,kwargs,match',
  [
    ('geometric_median', dict(f=-1), 'f must be >= 0'),
    ('geometric_median', dict(f=6), 'n > 2f'),
    ('geometric_median', dict(f=1, iters=0), 'iters'),
    ('geometric_median', dict(f=1, nu=0.0), 'nu'),
    ('geometric_median', dict(f=1, tol=-1.0), 'tol'),
    ('geometric_median', dict(f=1, init='zeros'), 'init'),
    ('geometric_median', dict(f=1, method='fast'), 'method'),
    ('geometric_median', dict(f=1, init='median', method='gram'), "inputs' span"),
    ('geometric_median', dict(f=1, init='mean', method='direct'), "init='mean'"),
    ('centered_clipping', dict(f=6), 'n > 2f'),
    ('centered_clipping', dict(f=1, tau=0.0), 'tau'),
    ('centered_clipping', dict(f=1, iters=0), 'iters'),
    ('centered_clipping', dict(f=1, method='newton'), 'method'),
    ('caf', dict(f=-1), 'f must be >= 0'),
    ('caf', dict(f=6), 'n > 2f'),
    ('caf', dict(f=1, power_iters=0), 'power_iters'),
  ],
)
def test_value_errors_name_the_rule(name, kwargs, match):
  x = jnp.ones((N, D))
  with pytest.raises(ValueError, match=name) as e:
    aggregators.get(name)(x, **kwargs)
  assert match in str(e.value)


@pytest.mark.parametrize('name', sorted(RULES))
def test_empty_and_mismatched_stacks(name):
  with pytest.raises(ValueError, match=name):
    aggregators.get(name)({'a': jnp.ones((3, 2)), 'b': jnp.ones((4,))}, f=1)
  with pytest.raises(ValueError, match=name):
    aggregators.get(name)({}, f=0)


@pytest.mark.parametrize('method', ['direct', 'gram', 'auto'])
@pytest.mark.parametrize('iters', [1, 3, 8])
def test_centered_clipping_paths_against_float64(iters, method):
  """Both paths (two passes per iteration, or n-space on the Gram matrix) and the automatic
  choice give the iterates of the NumPy recursion, non-finite and huge Byzantine rows included,
  and are scale-equivariant."""
  rng = np.random.default_rng(iters)
  x = rng.normal(size=(14, 40)) + 3.0
  c = rng.normal(size=40)
  ref_x = x.copy()

  def ref(x, v, tau):
    for _ in range(iters):
      d = np.linalg.norm(x - v, axis=1)
      w = np.where(np.isfinite(d), np.minimum(1.0, tau / np.where(np.isfinite(d), d, 1.0)), 0.0)
      v = v + ((w / len(x))[:, None] * np.where(np.isfinite(x), x - v, 0.0)).sum(0)
    return v

  got = aggregators.centered_clipping(
    jnp.asarray(x), f=3, center=jnp.asarray(c), tau=2.0, iters=iters, method=method
  )
  np.testing.assert_allclose(got, ref(ref_x, c, 2.0), rtol=1e-5, atol=1e-5)
  bad = x.copy()
  bad[-1] = np.nan
  bad[-2] = 1e30
  out = aggregators.centered_clipping(
    jnp.asarray(bad, jnp.float32), f=3, tau=2.0, iters=iters, method=method
  )
  assert np.all(np.isfinite(out))
  # The two bad rows get weight 0; the others see n = 14 in their weights.
  np.testing.assert_allclose(
    out,
    ref(np.concatenate([x[:-2], np.full((2, 40), np.nan)]), np.zeros(40), 2.0),
    rtol=1e-5,
    atol=1e-5,
  )
  big = aggregators.centered_clipping(
    jnp.asarray(x * 1e20, jnp.float32), f=3, tau=2e20, iters=iters, method=method
  )
  small = aggregators.centered_clipping(
    jnp.asarray(x, jnp.float32), f=3, tau=2.0, iters=iters, method=method
  )
  np.testing.assert_allclose(np.asarray(big) / 1e20, small, rtol=1e-4)
  # Squared distances that underflow (the rescaled path), from zeros and from a centre.
  for center in (None, c):
    tiny = aggregators.centered_clipping(
      jnp.asarray(x * 1e-25, jnp.float32),
      f=3,
      center=None if center is None else jnp.asarray(center * 1e-25, jnp.float32),
      tau=2e-25,
      iters=iters,
      method=method,
    )
    want = ref(ref_x, np.zeros(40) if center is None else center, 2.0)
    np.testing.assert_allclose(np.asarray(tiny, np.float64) / 1e-25, want, rtol=1e-4, atol=1e-4)


def test_centered_clipping_direct_in_column_blocks_matches_float64():
  """At a size where the passes run over column blocks and the distances are updated from one
  iteration to the next (`_cc_distances`), the direct path gives the float64 recursion's
  iterates."""
  rng = np.random.default_rng(7)
  n, d, iters = 16, 150_001, 3
  spread = np.linspace(0.5, 1.5, n)[:, None]  # distances about 190 to 580
  x = (spread * rng.normal(size=(n, d)) + 0.01 * rng.normal(size=(1, d))).astype(np.float32)
  c = (0.1 * rng.normal(size=d)).astype(np.float32)
  tau = 300.0  # some inputs clipped, others not
  v = c.astype(np.float64)
  x64 = x.astype(np.float64)
  for _ in range(iters):
    dist = np.linalg.norm(x64 - v, axis=1)
    w = np.minimum(1.0, tau / dist) / n
    v = v + (w[:, None] * (x64 - v)).sum(0)
  got = centered_clipping(
    jnp.asarray(x), f=3, center=jnp.asarray(c), tau=tau, iters=iters, method='direct'
  )
  np.testing.assert_allclose(np.asarray(got, np.float64), v, rtol=1e-4, atol=1e-5)


def test_centered_clipping_distances_updated_where_accurate_else_recomputed():
  """`_cc_distances` updates the distances to the next point by a matrix-vector product when its
  error estimate allows (a small move), and recomputes them exactly when it does not (inputs with
  a large common component and a large move); both routes give the float64 distances."""
  from robustjax.aggregators._iterative import _cc_distances
  from robustjax.stack import dots, inner, scaled_sq_dists_to

  rng = np.random.default_rng(5)
  n, d = 12, 3000
  x = rng.normal(size=(n, d)).astype(np.float32)
  for common, move, updated in ((0.0, 0.05, True), (1e4, 5.0, False)):
    xs = jnp.asarray(x + common)
    v = jnp.asarray(np.full(d, common, np.float32))
    v_next = v + jnp.asarray(move * rng.normal(size=d).astype(np.float32) / np.sqrt(d))
    sq, scale = scaled_sq_dists_to(xs, v)
    new, new_scale, err = jax.jit(_cc_distances)(xs, v, v_next, sq, scale, sq)
    want = ((np.asarray(xs, np.float64) - np.asarray(v_next, np.float64)) ** 2).sum(1)
    np.testing.assert_allclose(np.asarray(new), want, rtol=1e-5)
    assert float(new_scale) == 1.0
    # The exact route restarts the error estimate at the distances themselves.
    assert bool(np.all(np.asarray(err) > np.asarray(new))) == updated
    if not updated:  # where the update would have been off by far more
      delta = v_next - v
      naive = sq - 2.0 * (dots(xs, delta) - inner(v, delta)) + inner(delta, delta)
      naive_err = np.max(np.abs(np.asarray(naive) - want) / want)
      assert naive_err > 100 * np.max(np.abs(np.asarray(new) - want) / want)


def test_centered_clipping_direct_vmapped_and_differentiated():
  """Vmapped over stacks where some can keep the update and one cannot, the direct path gives
  each stack's own iterates; its gradient is the n-space path's."""
  rng = np.random.default_rng(6)
  x = rng.normal(size=(3, 10, 50)).astype(np.float32)
  x[2] += 1000.0  # a large common component, from a start at zeros: exact passes
  run = jax.jit(lambda s: centered_clipping(s, f=2, tau=3.0, iters=4, method='direct'))
  batched = np.asarray(jax.vmap(run)(jnp.asarray(x)))
  for i in range(3):
    np.testing.assert_allclose(batched[i], run(jnp.asarray(x[i])), rtol=1e-5, atol=1e-5)
  alone = jax.jit(jax.grad(lambda s: run(s).sum()))
  gram = jax.jit(
    jax.grad(lambda s: centered_clipping(s, f=2, tau=3.0, iters=4, method='gram').sum())
  )
  np.testing.assert_allclose(alone(x[0]), gram(x[0]), rtol=1e-4, atol=1e-5)
  # Differentiated through the vmapped rule: each stack's own gradient.
  batched = jax.jit(jax.grad(lambda s: jax.vmap(run)(s).sum()))(jnp.asarray(x))
  for i in range(3):
    np.testing.assert_allclose(batched[i], alone(jnp.asarray(x[i])), rtol=1e-4, atol=1e-5)


def test_centered_clipping_switches_to_n_space_from_the_measured_iteration_count():
  """`method='auto'` runs in n-space (it forms an (n, n) matrix) for more iterations than
  `cc_auto_method`'s threshold, which grows with n."""
  from robustjax.aggregators._iterative import cc_auto_method

  for n in (16, 64):
    first = next(i for i in range(1, 100) if cc_auto_method(i, n) == 'gram')
    x = jnp.asarray(np.random.default_rng(0).normal(size=(n, 7)), jnp.float32)
    lowered = {
      iters: jax.jit(lambda s, i=iters: centered_clipping(s, f=2, iters=i)).lower(x).as_text()
      for iters in (first - 1, first)
    }
    assert f'tensor<{n}x{n}xf32>' not in lowered[first - 1]
    assert f'tensor<{n}x{n}xf32>' in lowered[first]
  # The measured crossovers (BENCHMARKS.md): from L = 3 at n = 8, 10-12 at n = 64, 16-20 at
  # n = 256, 33-48 at n = 1024.
  assert [cc_auto_method(2, n) for n in (8, 16)] == ['direct', 'direct']
  assert [cc_auto_method(3, 8), cc_auto_method(5, 16), cc_auto_method(4, 16)] == [
    'gram',
    'gram',
    'direct',
  ]
  assert [cc_auto_method(8, 64), cc_auto_method(9, 64)] == ['direct', 'gram']
  assert [cc_auto_method(16, 256), cc_auto_method(17, 256)] == ['direct', 'gram']
  assert [cc_auto_method(32, 1024), cc_auto_method(33, 1024)] == ['direct', 'gram']
