"""Tests for the pre-aggregators (nnm, bucketing, clipping, arc) and `compose` / `as_rule`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import robustjax
from robustjax import aggregators, preaggregators
from robustjax.pipeline import Pipeline, as_rule, compose
from robustjax.preaggregators import arc, bucketing, clipping, nnm
from robustjax.stack import flatten

N, F, D = 10, 2, 5


def _data(seed=0, n=N, d=D):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=(n, 1))
  x[:F] += 10.0
  return x


# ---- float64 NumPy references --------------------------------------------------------------------


def ref_nnm(x, f):
  d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
  idx = np.argsort(d2, axis=1, kind='stable')[:, : len(x) - f]
  return x[idx].mean(1)


def ref_bucketing(x, perm, s):
  xp = x[perm]
  return np.stack([xp[i : i + s].mean(0) for i in range(0, len(x), s)])


def ref_clip(x, c):
  nrm = np.linalg.norm(x, axis=1)
  return x * np.minimum(1.0, c / nrm)[:, None]


def ref_arc(x, f):
  n = len(x)
  k = int(np.floor(2 * (f / n) * (n - f)))
  nrm = np.sort(np.linalg.norm(x, axis=1))
  return ref_clip(x, nrm[n - k - 1])


# ---- references ----------------------------------------------------------------------------------


@pytest.mark.parametrize('f', [0, 2, 4])
def test_nnm_matches_reference(f):
  x = _data(1)
  out = nnm(jnp.asarray(x, jnp.float32), f=f)
  np.testing.assert_allclose(np.asarray(out), ref_nnm(x, f), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('s', [1, 3, 5])
def test_bucketing_matches_reference(s):
  x = _data(2)
  key = jax.random.key(3)
  perm = np.asarray(jax.random.permutation(key, N))
  out = bucketing(jnp.asarray(x, jnp.float32), key=key, s=s)
  assert out.shape == (-(-N // s), D)
  np.testing.assert_allclose(np.asarray(out), ref_bucketing(x, perm, s), rtol=1e-5, atol=1e-5)


def test_bucketing_mean_of_buckets_is_the_mean_when_s_divides_n():
  x = _data(4)
  for seed in range(3):
    out = bucketing(jnp.asarray(x, jnp.float32), key=jax.random.key(seed), s=5)
    np.testing.assert_allclose(np.asarray(out).mean(0), x.mean(0), rtol=1e-5, atol=1e-5)


def test_bucketing_depends_on_the_key_only():
  x = jnp.asarray(_data(5), jnp.float32)
  a = bucketing(x, key=jax.random.key(0), s=2)
  b = bucketing(x, key=jax.random.key(0), s=2)
  c = bucketing(x, key=jax.random.key(1), s=2)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize('c', [0.5, 2.0, 100.0])
def test_clipping_matches_reference(c):
  x = _data(6)
  out = clipping(jnp.asarray(x, jnp.float32), c=c)
  np.testing.assert_allclose(np.asarray(out), ref_clip(x, c), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('k', [-80, -40, 0, 40, 80])
def test_clipping_and_arc_factors_are_the_same_at_every_scale(k):
  # The plain norms (k = 0, ±40) and the rescaled path (k = ±80: squares over- or underflow
  # float32) give the same factors as float64 NumPy, for x·2^k with radius c·2^k.
  from robustjax.preaggregators import arc_factors, clipping_factors

  x = _data(12)
  x[3] = 0.0  # a zero slice
  nrm = np.linalg.norm(x, axis=1)
  want_clip = np.minimum(1.0, 1.5 / np.where(nrm > 0, nrm, 1.0))
  xs = jnp.asarray(x * 2.0**k, jnp.float32)
  got = clipping_factors(xs, c=1.5 * 2.0**k)
  np.testing.assert_allclose(np.asarray(got), want_clip, rtol=1e-5)
  ref = np.asarray(arc_factors(jnp.asarray(x, jnp.float32), f=2))
  np.testing.assert_allclose(np.asarray(arc_factors(xs, f=2)), ref, rtol=1e-5)


@pytest.mark.parametrize('f', [0, 1, 2, 4])
def test_arc_matches_reference(f):
  x = _data(7)
  out = arc(jnp.asarray(x, jnp.float32), f=f)
  np.testing.assert_allclose(np.asarray(out), ref_arc(x, f), rtol=1e-5, atol=1e-5)
  # exactly k = floor(2 f (n - f) / n) inputs change
  changed = np.any(np.abs(np.asarray(out) - x) > 1e-4, axis=1).sum()
  assert changed == (2 * f * (N - f)) // N


# ---- invariances ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'fn,kw',
  [(nnm, dict(f=F)), (arc, dict(f=F)), (clipping, dict(c=1.5))],
  ids=['nnm', 'arc', 'clipping'],
)
def test_permutation_equivariance(fn, kw):
  x = _data(8)
  perm = np.random.default_rng(0).permutation(N)
  base = np.asarray(fn(jnp.asarray(x, jnp.float32), **kw))
  permd = np.asarray(fn(jnp.asarray(x[perm], jnp.float32), **kw))
  np.testing.assert_allclose(permd, base[perm], rtol=1e-5, atol=1e-5)


def test_nnm_translation_equivariance():
  x = _data(9)
  shift = np.linspace(-100, 100, D)
  base = np.asarray(nnm(jnp.asarray(x, jnp.float32), f=F))
  moved = np.asarray(nnm(jnp.asarray(x + shift, jnp.float32), f=F))
  np.testing.assert_allclose(moved - shift, base, atol=1e-4)


# ---- non-finite inputs ---------------------------------------------------------------------------

BAD = [np.nan, np.inf, -np.inf, 1e38]


@pytest.mark.parametrize('bad', BAD)
def test_nnm_never_mixes_a_nonfinite_slice_into_finite_ones(bad):
  x = _data(10).astype(np.float32)
  x[:F] = bad
  out = np.asarray(nnm(jnp.asarray(x), f=F))
  np.testing.assert_allclose(out[F:], ref_nnm(x[F:].astype(np.float64), 0), rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(out[F:]))


@pytest.mark.parametrize('bad', BAD)
def test_clipping_and_arc_zero_nonfinite_slices(bad):
  x = _data(11).astype(np.float32)
  x[:F] = bad
  x[0, 1] = 0.5  # partly finite
  for out in (clipping(jnp.asarray(x), c=1.0), arc(jnp.asarray(x), f=F)):
    out = np.asarray(out)
    np.testing.assert_array_equal(out[:F], 0.0)
    assert np.all(np.isfinite(out))
  np.testing.assert_allclose(
    np.asarray(clipping(jnp.asarray(x), c=1.0))[F:],
    ref_clip(x[F:].astype(np.float64), 1.0),
    rtol=1e-5,
    atol=1e-5,
  )


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_bucketing_counts_nonfinite_entries_as_zero_in_their_own_bucket(bad):
  x = _data(16).astype(np.float32)
  x[1, 2] = bad  # one entry of one slice
  x[4] = bad  # a whole slice
  key = jax.random.key(7)
  perm = np.asarray(jax.random.permutation(key, N))
  out = np.asarray(bucketing(jnp.asarray(x), key=key, s=3))
  clean = np.where(np.isfinite(x), x, 0.0).astype(np.float64)
  np.testing.assert_allclose(out, ref_bucketing(clean, perm, 3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('width', [1, 3])
def test_combine_rows_written_equals_the_slice_by_slice_form(width):
  # Repeated and padded indices (weight 0), a non-finite slice, a pytree with a 3-d leaf.
  rng = np.random.default_rng(17)
  tree = {
    'a': rng.normal(size=(N, 2, 3)).astype(np.float32),
    'b': rng.normal(size=(N, 4)).astype(np.float32),
  }
  tree['b'][2] = np.nan
  index = jnp.asarray(rng.integers(0, N, size=(6, width)), jnp.int32)
  weight = jnp.asarray(rng.uniform(-1, 1, size=(6, width)), jnp.float32).at[-1, 0].set(0.0)
  sliced = preaggregators.combine_rows(tree, index, weight)
  written = jax.jit(preaggregators.combine_rows, static_argnames='written')(
    tree, index, weight, written=True
  )
  for s_leaf, w_leaf, x in zip(jax.tree.leaves(sliced), jax.tree.leaves(written), tree.values()):
    assert w_leaf.shape == (6,) + x.shape[1:] and w_leaf.dtype == x.dtype
    ref = np.einsum('bj,bj...->b...', weight, np.where(np.isfinite(x), x, 0.0)[index])
    np.testing.assert_allclose(np.asarray(w_leaf), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(w_leaf), np.asarray(s_leaf), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('bad', BAD)
@pytest.mark.parametrize(
  'pipeline',
  [
    compose('trimmed_mean', pre=['nnm'], f=F),
    compose('geometric_median', pre=['arc'], f=F),
    compose('median', pre=[('bucketing', {'s': 1})], f=F),
    compose('trimmed_mean', pre=[('clipping', {'c': 2.0}), 'nnm'], f=F),
  ],
  ids=lambda p: p.name,
)
def test_pipelines_survive_nonfinite_slices(pipeline, bad):
  x = _data(12).astype(np.float32)
  x[:F] = bad
  out = np.asarray(pipeline(jnp.asarray(x), jax.random.key(0)))
  assert np.all(np.isfinite(out)), (pipeline.name, bad, out)
  assert np.all(np.abs(out) < 100.0)


# ---- pytrees, dtypes, jit ------------------------------------------------------------------------


@pytest.mark.parametrize(
  'fn,kw',
  [
    (nnm, dict(f=F)),
    (arc, dict(f=F)),
    (clipping, dict(c=1.5)),
    (bucketing, dict(s=3, key=jax.random.key(0))),
  ],
  ids=['nnm', 'arc', 'clipping', 'bucketing'],
)
def test_pytree_matches_flattened(fn, kw):
  rng = np.random.default_rng(13)
  tree = {
    'a': rng.normal(size=(N, 2, 2)).astype(np.float32),
    'b': rng.normal(size=(N, 3)).astype(np.float32),
  }
  out_tree = fn(tree, **kw)
  out_flat = fn(flatten(tree), **kw)
  np.testing.assert_allclose(np.asarray(flatten(out_tree)), np.asarray(out_flat), atol=1e-5)


@pytest.mark.parametrize('fn,kw', [(nnm, dict(f=F)), (arc, dict(f=F))], ids=['nnm', 'arc'])
def test_bfloat16(fn, kw):
  x = jnp.asarray(_data(14), jnp.bfloat16)
  out = fn(x, **kw)
  assert out.dtype == jnp.bfloat16
  ref = fn(x.astype(jnp.float32), **kw)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=3e-2, atol=3e-2)


def test_jit_and_no_jit_agree():
  x = jnp.asarray(_data(15), jnp.float32)
  key = jax.random.key(2)
  pre = [('clipping', {'c': 3.0}), 'nnm', ('bucketing', {'s': 2}), 'arc']
  rule = compose('mean', pre=pre, f=1)
  whole = jax.jit(rule)(x, key)  # one jit around the pipeline vs. each stage's own jit
  np.testing.assert_allclose(np.asarray(rule(x, key)), np.asarray(whole), rtol=1e-5, atol=1e-5)
  cheap = compose('mean', pre=[('clipping', {'c': 3.0}), 'arc'], f=1)
  with jax.disable_jit():
    eager = cheap(x)
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jax.jit(cheap)(x)), rtol=1e-5, atol=1e-5)


# ---- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'call,match',
  [
    (lambda x: nnm(x, f=-1), 'nnm: f must be >= 0'),
    (lambda x: nnm(x, f=5), 'nnm: needs n > 2f'),
    (lambda x: arc(x, f=5), 'arc: needs n > 2f'),
    (lambda x: bucketing(x, key=jax.random.key(0), s=0), 'bucketing: s must be'),
    (lambda x: bucketing(x, key=None, s=2), 'bucketing: needs an explicit'),
    (lambda x: clipping(x, c=0.0), 'clipping: c must be > 0'),
    (lambda x: clipping(x, c=-1.0), 'clipping: c must be > 0'),
    (lambda x: nnm({'a': x, 'b': x[:3]}, f=1), 'nnm: every leaf'),
    (lambda x: compose('nope', f=1), "unknown aggregator 'nope'"),
    (lambda x: compose('mean', pre=['nope'], f=1), "unknown pre-aggregator 'nope'"),
    (lambda x: compose('mean', f=-1), 'compose: f must be'),
    (lambda x: compose('mean', pre=[('nnm', {'f': 1})], f=1), 'pass f to compose'),
    (lambda x: compose('centered_clipping', f=1, center=np.zeros(5)), 'not hashable'),
    (lambda x: compose('mean', pre=[3], f=1), 'registered name'),
    (lambda x: compose('mean', pre=['bucketing'], f=1)(x), 'needs a jax.random key'),
  ],
)
def test_value_errors_name_the_rule(call, match):
  with pytest.raises(ValueError, match=match):
    call(jnp.ones((N, D)))


# ---- compose -------------------------------------------------------------------------------------


def test_registry():
  assert preaggregators.names() == ['arc', 'bucketing', 'clipping', 'nnm']
  assert preaggregators.get('nnm') is nnm
  assert 'preaggregators' in robustjax.__all__


def test_compose_names_params_and_hash():
  a = compose('trimmed_mean', pre=[('clipping', {'c': 1.0}), 'nnm'], f=2)
  b = compose('trimmed_mean', pre=[('clipping', {'c': 1.0}), nnm], f=2)
  assert a.name == 'clipping+nnm+trimmed_mean' and a.f == 2
  assert a == b and hash(a) == hash(b)
  assert a != compose('trimmed_mean', pre=[('clipping', {'c': 2.0}), 'nnm'], f=2)
  assert a.pre == (clipping, nnm) and a.aggregator is aggregators.get('trimmed_mean')
  assert compose('mean', pre='nnm', f=1).name == 'nnm+mean'
  assert compose(('geometric_median', {'iters': 3}), f=1) == compose(
    'geometric_median', f=1, iters=3
  )


def test_compose_matches_manual_chain():
  x = jnp.asarray(_data(16), jnp.float32)
  rule = compose('trimmed_mean', pre=[('clipping', {'c': 3.0}), 'nnm'], f=F)
  manual = aggregators.get('trimmed_mean')(nnm(clipping(x, c=3.0), f=F), f=F)
  np.testing.assert_allclose(np.asarray(rule(x)), np.asarray(manual), rtol=1e-6, atol=1e-6)


def test_compose_with_callables_and_runtime_kwargs():
  x = jnp.asarray(_data(17), jnp.float32)

  def halve(stack, *, f):
    del f
    return stack / 2

  def agg(stack, *, f, scale=1.0, center=None):
    out = stack[f:].mean(0) * scale
    return out if center is None else out + center

  rule = compose(agg, pre=[halve], f=1, scale=3.0)
  assert rule.name == 'halve+agg'
  np.testing.assert_allclose(rule(x), np.asarray(x)[1:].mean(0) * 1.5, rtol=1e-6)
  np.testing.assert_allclose(rule(x, center=jnp.ones(D)), np.asarray(x)[1:].mean(0) * 1.5 + 1)
  cc = compose('centered_clipping', pre=['nnm'], f=1, tau=0.5)
  v = jnp.ones(D)
  np.testing.assert_allclose(
    np.asarray(jax.jit(cc)(x, center=v)),
    np.asarray(aggregators.get('centered_clipping')(nnm(x, f=1), f=1, tau=0.5, center=v)),
    rtol=1e-6,
  )


def test_pipeline_as_static_jit_argument_and_key_reproducibility():
  x = jnp.asarray(_data(18), jnp.float32)
  rule = compose('median', pre=[('bucketing', {'s': 2}), 'nnm'], f=1)
  assert rule.stochastic

  @jax.jit
  def direct(stack, key):
    return rule(stack, key)

  step = jax.jit(lambda stack, key, rule: rule(stack, key), static_argnames=('rule',))
  k = jax.random.key(7)
  a, b = step(x, k, rule=rule), step(x, k, rule=rule)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(direct(x, k)), np.asarray(a), rtol=1e-6)
  assert not np.allclose(np.asarray(step(x, jax.random.key(8), rule=rule)), np.asarray(a))
  # the key is split among stochastic stages: bucketing sees a subkey, not the key itself
  sub = jax.random.split(k, 1)[0]
  manual = aggregators.get('median')(nnm(bucketing(x, key=sub, s=2), f=1), f=1)
  np.testing.assert_allclose(np.asarray(a), np.asarray(manual), rtol=1e-6)


def test_as_rule():
  p = as_rule('median', 1)
  assert isinstance(p, Pipeline) and p.name == 'median' and p.f == 1
  q = compose('mean', pre=['nnm'], f=1)
  assert as_rule(q, 1) is q
  r = as_rule(q, 3)
  assert r.f == 3 and r.stages == q.stages
  assert as_rule(('trimmed_mean', {}), 2).name == 'trimmed_mean'
  assert as_rule(aggregators.get('krum'), 1).name == 'krum'


def test_as_rule_parses_spec_strings():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(9, 4)), jnp.float32)
  pipe = as_rule('clipping(c=2.0)+nnm+multikrum(m=3)', 2)
  assert pipe.name == 'clipping+nnm+multikrum'
  ref = compose('multikrum', pre=[('clipping', {'c': 2.0}), 'nnm'], f=2, m=3)(x)
  np.testing.assert_allclose(np.asarray(pipe(x)), np.asarray(ref), rtol=1e-6)
  with pytest.raises(ValueError, match='unknown aggregator'):
    as_rule('nnm+nope', 2)
  with pytest.raises(ValueError, match='cannot parse'):
    as_rule('nnm+krum(3)', 2)


@pytest.mark.parametrize('name, kw', [('clipping', {'c': 0.5}), ('arc', {'f': 2})])
def test_donation_writes_into_the_stack_and_gives_the_same_result(name, kw):
  fn = preaggregators.get(name)
  x = jax.random.normal(jax.random.key(0), (9, 7, 3))
  want = np.asarray(fn(x, **kw))
  y = x + 0.0
  got = fn(y, donate=True, **kw)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert y.is_deleted()  # the result took its buffer
  # Inside a trace donation is the caller's business: same result, no error.
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda s: fn(s, donate=True, **kw))(x)), want)
  with pytest.raises(ValueError, match='donate must be True or False'):
    fn(x, donate='yes', **kw)
