"""Krum, MultiKrum, Bulyan, MoNNA against float64 NumPy references written from the papers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustjax import aggregators
from robustjax.aggregators import _krum

N, F, D = 11, 2, 6  # n >= 4f + 3 so that every rule here (Bulyan included) accepts it


# ----------------------------------------------------------------------------- references


def ref_sq_dists(x):
  """Exact float64 squared distances; a non-finite input (or 1e38) is at +inf."""
  x = np.asarray(x, np.float64)
  bad = ~np.all(np.isfinite(x), axis=1) | (np.abs(x).max(axis=1) > 1e30)
  with np.errstate(invalid='ignore', over='ignore'):
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
  d[bad, :] = np.inf
  d[:, bad] = np.inf
  np.fill_diagonal(d, 0.0)
  return d


def ref_scores(x, k):
  d = ref_sq_dists(x)
  n = len(d)
  return np.array([np.sort(np.delete(d[i], i))[:k].sum() for i in range(n)])


def ref_multikrum_index(x, f, m=None, k=None):
  n = len(x)
  k = n - f - 2 if k is None else k
  m = n - f if m is None else m
  return np.argsort(ref_scores(x, k), kind='stable')[:m]


def ref_multikrum(x, f, m=None, k=None):
  return np.asarray(x, np.float64)[ref_multikrum_index(x, f, m, k)].mean(0)


def ref_bulyan(x, f, k=None):
  x = np.asarray(x, np.float64)
  n = len(x)
  k0 = n - f - 2 if k is None else k
  d = ref_sq_dists(x)
  pool = list(range(n))
  chosen = []
  for t in range(n - 2 * f):
    kt = k0 - t
    scores = [np.sort([d[i, j] for j in pool if j != i])[: max(kt, 0)].sum() for i in pool]
    win = pool[int(np.argmin(scores))]
    chosen.append(win)
    pool.remove(win)
  sel = x[chosen]
  beta = len(chosen) - 2 * f
  med = np.median(sel, axis=0)
  order = np.argsort(np.abs(sel - med), axis=0, kind='stable')[:beta]
  return np.take_along_axis(sel, order, axis=0).mean(0)


def ref_monna(x, f, t=0):
  x = np.asarray(x, np.float64)
  d = ref_sq_dists(x)[t]
  return x[np.argsort(d, kind='stable')[: len(x) - f]].mean(0)


CASES = [
  ('krum', {}, lambda x: ref_multikrum(x, F, m=1)),
  ('krum', {'num_neighbors': N - F - 1}, lambda x: ref_multikrum(x, F, m=1, k=N - F - 1)),
  ('multikrum', {}, lambda x: ref_multikrum(x, F, m=N - F)),
  ('multikrum', {'m': 3}, lambda x: ref_multikrum(x, F, m=3)),
  ('multikrum', {'m': 4, 'num_neighbors': 2}, lambda x: ref_multikrum(x, F, m=4, k=2)),
  ('bulyan', {}, lambda x: ref_bulyan(x, F)),
  ('bulyan', {'num_neighbors': N - F - 1}, lambda x: ref_bulyan(x, F, k=N - F - 1)),
  ('monna', {}, lambda x: ref_monna(x, F)),
  ('monna', {'trusted_index': 3}, lambda x: ref_monna(x, F, 3)),
]
IDS = [f'{name}-{"-".join(f"{k}={v}" for k, v in p.items()) or "default"}' for name, p, _ in CASES]


def make_stack(seed, n=N, d=D, outliers=F):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  x[:outliers] += rng.normal(size=(outliers, d)) * 4.0 + 3.0
  return x[rng.permutation(n)].astype(np.float32)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize('name,params,ref', CASES, ids=IDS)
def test_matches_float64_reference(name, params, ref):
  rule = aggregators.get(name)
  for seed in range(3):
    x = make_stack(seed)
    np.testing.assert_allclose(rule(x, f=F, **params), ref(x), rtol=1e-5, atol=1e-5)


def test_neighbour_convention_and_default_m_matter():
  """The defaults are n − f − 2 neighbours and m = n − f, and the conventions give other outputs."""
  rng = np.random.default_rng(7)
  found_k = found_m = False
  for _ in range(20):
    x = rng.normal(size=(N, D)).astype(np.float32)
    paper = ref_multikrum_index(x, F, m=1)
    byzfl = ref_multikrum_index(x, F, m=1, k=N - F - 1)
    if paper[0] != byzfl[0]:
      found_k = True
      np.testing.assert_allclose(_krum.krum(x, f=F), x[paper[0]], atol=1e-6)
      np.testing.assert_allclose(
        _krum.krum(x, f=F, num_neighbors=N - F - 1), x[byzfl[0]], atol=1e-6
      )
    out = _krum.multikrum(x, f=F)
    np.testing.assert_allclose(out, ref_multikrum(x, F, m=N - F), atol=1e-5)
    if not np.allclose(out, ref_multikrum(x, F, m=N - F - 1), atol=1e-4):
      found_m = True
  assert found_k and found_m


def test_scores_match_reference():
  x = make_stack(0)
  np.testing.assert_allclose(_krum.krum_scores(x, f=F), ref_scores(x, N - F - 2), rtol=1e-5)


@pytest.mark.parametrize('name,params,ref', CASES[::2], ids=IDS[::2])
def test_permutation_invariance(name, params, ref):
  if name == 'monna':
    params = {'trusted_index': 0}
  rule = aggregators.get(name)
  x = make_stack(1)
  perm = np.random.default_rng(1).permutation(N)
  if name == 'monna':  # the trusted input must stay the trusted input
    perm = np.concatenate([[0], perm[perm != 0]])
  np.testing.assert_allclose(rule(x[perm], f=F, **params), rule(x, f=F, **params), atol=1e-5)


@pytest.mark.parametrize('name', ['krum', 'multikrum', 'bulyan', 'monna'])
def test_translation_equivariance(name):
  rule = aggregators.get(name)
  x = make_stack(2)
  c = np.random.default_rng(2).normal(size=(D,)).astype(np.float32) * 10
  np.testing.assert_allclose(rule(x + c, f=F), np.asarray(rule(x, f=F)) + c, atol=1e-4)


@pytest.mark.parametrize('k', [-80, -20, 0, 20, 80])
def test_monna_at_every_scale(k):
  # Distances from the plain pass (s = 1) or, where squares under- or overflow, the rescaled one:
  # the same neighbours either way. A second input equal to the trusted one (a true 0 distance
  # besides the trusted input's own) takes the rescaled path at every scale.
  x = make_stack(4)
  want = ref_monna(x.astype(np.float64), F)
  got = np.asarray(aggregators.monna(jnp.asarray(x * 2.0**k, jnp.float32), f=F), np.float64)
  np.testing.assert_allclose(got / 2.0**k, want, rtol=1e-5, atol=1e-5)
  x[5] = x[0]
  got = np.asarray(aggregators.monna(jnp.asarray(x * 2.0**k, jnp.float32), f=F), np.float64)
  np.testing.assert_allclose(got / 2.0**k, ref_monna(x.astype(np.float64), F), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf, 1e38])
@pytest.mark.parametrize('name', ['krum', 'multikrum', 'bulyan', 'monna'])
def test_nonfinite_byzantine_inputs(name, bad):
  rule = aggregators.get(name)
  rng = np.random.default_rng(3)
  x = make_stack(3, outliers=0)
  where = rng.choice(np.arange(1, N), size=F, replace=False)  # MoNNA's trusted input 0 is honest
  x[where[0]] = bad
  x[where[1], rng.integers(D)] = bad  # one bad coordinate is enough
  out = np.asarray(rule(x, f=F))
  assert np.all(np.isfinite(out))
  if name in ('krum', 'multikrum'):
    idx = ref_multikrum_index(x, F, m=1 if name == 'krum' else None)
    assert not set(where) & set(idx.tolist())
    np.testing.assert_allclose(out, x[idx].astype(np.float64).mean(0), atol=1e-5)
  honest = np.delete(x, where, axis=0)
  assert np.all(out <= honest.max(0) + 1e-5) and np.all(out >= honest.min(0) - 1e-5)


@pytest.mark.parametrize('name', ['krum', 'multikrum'])
def test_too_few_finite_neighbours_is_nan_even_on_a_finite_input(name):
  # F + 3 non-finite inputs at the end: every finite input has fewer finite neighbours than its
  # score needs, so all scores are +inf and the lowest index (a finite input) is "selected"
  # without the information Krum needs; the rule says so with NaN instead of returning it.
  x = make_stack(5, outliers=0)
  x[N - F - 3 :] = np.nan
  out = np.asarray(aggregators.get(name)(jnp.asarray(x), f=F))
  assert np.all(np.isnan(out))


@pytest.mark.parametrize(
  'name,n,f,match',
  [
    ('krum', 6, 2, 'n > 2f \\+ 2'),
    ('multikrum', 4, 1, 'n > 2f \\+ 2'),
    ('bulyan', 10, 2, 'n >= 4f \\+ 3'),
    ('monna', 4, 2, 'n > 2f'),
    ('krum', 5, -1, 'f must be >= 0'),
    ('bulyan', 5, -1, 'f must be >= 0'),
  ],
)
def test_invalid_counts(name, n, f, match):
  with pytest.raises(ValueError, match=f'{name}: .*{match}'):
    aggregators.get(name)(jnp.zeros((n, 3)), f=f)


@pytest.mark.parametrize('name', ['krum', 'multikrum', 'bulyan', 'monna'])
def test_invalid_stacks(name):
  rule = aggregators.get(name)
  with pytest.raises(ValueError, match=f'{name}: .*empty'):
    rule({}, f=1)
  with pytest.raises(ValueError, match=f'{name}: .*leading'):
    rule({'a': jnp.zeros((N, 3)), 'b': jnp.zeros((N - 1, 2))}, f=1)


def test_invalid_params():
  x = jnp.zeros((N, 3))
  with pytest.raises(ValueError, match='multikrum: m'):
    _krum.multikrum(x, f=F, m=N + 1)
  with pytest.raises(ValueError, match='multikrum: m'):
    _krum.multikrum(x, f=F, m=0)
  with pytest.raises(ValueError, match='krum: num_neighbors'):
    _krum.krum(x, f=F, num_neighbors=N)
  with pytest.raises(ValueError, match='monna: trusted_index'):
    _krum.monna(x, f=F, trusted_index=N)


@pytest.mark.parametrize('name', ['krum', 'multikrum', 'bulyan', 'monna'])
def test_pytree_equals_flat_and_jit_equals_eager(name):
  rule = aggregators.get(name)
  x = make_stack(4)
  tree = {'w': x[:, :4].reshape(N, 2, 2), 'b': x[:, 4:]}
  out = rule(tree, f=F)
  assert out['w'].shape == (2, 2) and out['b'].shape == (2,)
  flat = np.concatenate([np.asarray(out['b']), np.asarray(out['w']).ravel()])
  expected = np.asarray(rule(np.concatenate([x[:, 4:], x[:, :4]], axis=1), f=F))
  np.testing.assert_allclose(flat, expected, atol=1e-5)
  with jax.disable_jit():
    eager = rule(x, f=F)
  np.testing.assert_allclose(rule(x, f=F), eager, atol=1e-5)


@pytest.mark.parametrize('name,params,ref', CASES[::2], ids=IDS[::2])
def test_bfloat16_leaves(name, params, ref):
  rule = aggregators.get(name)
  x = make_stack(5).astype(jnp.bfloat16)
  out = rule({'a': jnp.asarray(x)}, f=F, **params)['a']
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref(np.asarray(x, np.float32)), atol=0.05)


def test_centred_distances_keep_the_float64_selection():
  """Inputs sharing a large common component: the selection must match float64's."""
  rng = np.random.default_rng(6)
  d = 2000
  common = rng.normal(size=(d,)) * 100.0
  x64 = common + rng.normal(size=(N, d)) * 1e-2 * rng.uniform(0.5, 2.0, size=(N, 1))
  x = x64.astype(np.float32)
  x64 = x.astype(np.float64)  # the reference sees exactly the float32 inputs
  for m in (1, 3, N - F):
    idx = ref_multikrum_index(x64, F, m=m)
    out = np.asarray(_krum.multikrum(x, f=F, m=m), np.float64)
    np.testing.assert_allclose(out - common, x64[idx].mean(0) - common, atol=2e-3)
    if m == 1:
      dist = ((x64 - out) ** 2).sum(1)
      assert int(np.argmin(dist)) == idx[0]


# ------------------------------------------------------------------------------------------------
# Many workers: the blocked exact scores and the sketched MultiKrum


def _with_bad_rows(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32) + 4.0
  x[-1] = np.nan
  x[-2] = 3e30
  return jnp.asarray(x)


@pytest.mark.parametrize('n,f,k', [(31, 4, None), (31, 4, 2), (12, 1, None)])
def test_blocked_scores_equal_the_full_matrix(n, f, k):
  """The panels of `_blocked_scores` give the scores of the n × n matrix (both top-k branches,
  non-finite and overflowing rows included), and MultiKrum with `block` equals MultiKrum."""
  from robustjax.aggregators import _krum

  x = _with_bad_rows(np.random.default_rng(n), n, 40)
  nn = n - f - 2 if k is None else k
  full = _krum._scores(x, nn, None)
  for block in (1, 5, n):
    np.testing.assert_allclose(_krum._scores(x, nn, block), full, rtol=2e-5)
    # The sketch's bisection for the k-th nearest: the same scores to 2^-24 of the range.
    np.testing.assert_allclose(_krum._scores(x, nn, block, exact=False), full, rtol=1e-4)
  np.testing.assert_allclose(
    aggregators.multikrum(x, f=f, block=4), aggregators.multikrum(x, f=f), rtol=1e-6
  )


def test_random_projection_is_chunk_free_and_preserves_distances():
  from robustjax import stack as st

  rng = np.random.default_rng(0)
  tree = {'a': jnp.asarray(rng.normal(size=(30, 50)), jnp.float32)}
  tree['b'] = jnp.asarray(rng.normal(size=(30, 7, 3)), jnp.float32)
  key = jax.random.key(5)
  y = st.random_projection(tree, 64, key)
  # The same rows of R whatever the chunking, and for the flattened stack.
  np.testing.assert_allclose(st.random_projection(tree, 64, key, chunk=8), y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    st.random_projection(st.flatten(tree), 64, key), y, rtol=1e-5, atol=1e-5
  )
  # Distances: unbiased, relative spread about sqrt(2 / k).
  x = np.asarray(st.flatten(tree), np.float64)
  yy = np.asarray(st.random_projection(tree, 512, key), np.float64)
  iu = np.triu_indices(30, 1)
  dx = ((x[:, None] - x[None]) ** 2).sum(-1)[iu]
  dy = ((yy[:, None] - yy[None]) ** 2).sum(-1)[iu]
  ratio = dy / dx
  assert abs(ratio.mean() - 1) < 0.02 and abs(ratio.std() - np.sqrt(2 / 512)) < 0.02


@pytest.mark.parametrize('k', [40, 64])
def test_random_projection_signs_are_balanced_and_uncorrelated(k):
  # The sketch of the unit vectors is R / √k itself: every entry ±1/√k, each column (a bit
  # position of the random words) and each row balanced, distinct columns and rows uncorrelated.
  from robustjax import stack as st

  d = 2000
  r = np.asarray(st.random_projection(jnp.eye(d, dtype=jnp.float32), k, jax.random.key(9)))
  r = r * np.sqrt(k)
  np.testing.assert_allclose(np.abs(r), 1.0, rtol=1e-6)
  assert np.abs(r.mean(axis=0)).max() < 5 / np.sqrt(d)
  assert np.abs(r.mean(axis=1)).max() < 5 / np.sqrt(k)
  cols = (r.T @ r / d)[np.triu_indices(k, 1)]
  assert np.abs(cols).max() < 5 / np.sqrt(d) and abs(cols.std() - 1 / np.sqrt(d)) < 0.2 / np.sqrt(d)
  rows = (r @ r.T / k)[np.triu_indices(d, 1)]
  assert abs(rows.mean()) < 0.01 and abs(rows.std() - 1 / np.sqrt(k)) < 0.1 / np.sqrt(k)


def test_multikrum_sketch_selects_as_the_exact_rule_on_separated_inputs():
  from robustjax import stack as st
  from robustjax.aggregators import _krum

  rng = np.random.default_rng(1)
  n, f, d = 60, 8, 2000
  x = rng.normal(size=(n, d)).astype(np.float32)
  x[-f:] += 3.0  # Byzantine rows clearly apart (score gap >> the sketch's error)
  x = jnp.asarray(x)
  exact = aggregators.multikrum(x, f=f)
  sketched = aggregators.multikrum_sketch(x, f=f, k=128, key=jax.random.key(2))
  np.testing.assert_allclose(sketched, exact, rtol=1e-5, atol=1e-6)
  # The sketch's scores rank like the exact ones where the gaps are large.
  y = st.random_projection(x, 128, jax.random.key(2))
  top = lambda s: set(np.argsort(np.asarray(s))[: n - f].tolist())
  assert top(_krum._scores(y, n - f - 2, None)) == top(_krum._scores(x, n - f - 2, None))
