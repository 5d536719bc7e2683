"""Tests for robustjax.coding: encoding matrices, encode, DRACO's vote, the MDS decoder."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustjax import coding


def _np_cyclic(n, d, perm=None):
  """float64 reference from the definition: worker i holds π(i), …, π(i+d−1) mod n, 1/d each."""
  perm = np.arange(n) if perm is None else np.asarray(perm)
  b = np.zeros((n, n))
  for i in range(n):
    for k in range(d):
      b[i, perm[(i + k) % n]] = 1.0 / d
  return b


@pytest.mark.parametrize('n,d', [(7, 1), (7, 3), (7, 7), (10, 4)])
def test_cyclic_matches_definition_and_covers_each_subset_d_times(n, d):
  np.testing.assert_allclose(coding.cyclic(n, d), _np_cyclic(n, d), rtol=1e-6)
  key = jax.random.key(n * 10 + d)
  b = coding.cyclic(n, d, key=key)
  perm = np.asarray(coding.random_permutation(key, n))
  np.testing.assert_allclose(b, _np_cyclic(n, d, perm), rtol=1e-6)
  np.testing.assert_array_equal(coding.coverage(b), d)
  np.testing.assert_array_equal(coding.loads(b), d)


def test_mean_of_coded_vectors_is_the_full_gradient_for_every_scheme():
  rng = np.random.default_rng(0)
  n = 12
  g = {'w': rng.normal(size=(n, 3, 2)).astype(np.float32), 'b': rng.normal(size=(n,)) > 0}
  g['b'] = jnp.asarray(g['b'], jnp.bfloat16)
  full = {k: np.asarray(v, np.float64).mean(0) for k, v in g.items()}
  for b in [
    coding.cyclic(n, 5, key=jax.random.key(1)),
    coding.cyclic(n, 1),
    coding.fractional_repetition(n, 3),
    coding.fractional_repetition(n, 4, key=jax.random.key(2)),
    coding.draco(n, 1),
  ]:
    c = coding.encode(b, g)
    # the encode itself against the float64 reference B @ G
    np.testing.assert_allclose(
      c['w'], np.einsum('ij,jkl->ikl', np.asarray(b, np.float64), g['w']), rtol=1e-5, atol=1e-6
    )
    for k in g:
      tol = 1e-2 if k == 'b' else 1e-5  # bfloat16 leaf: output cast back to bf16
      np.testing.assert_allclose(np.asarray(c[k], np.float64).mean(0), full[k], atol=tol)
  assert c['b'].dtype == jnp.bfloat16 and c['w'].dtype == jnp.float32


def test_cyclic_with_traced_key_and_d_under_jit_and_vmap():
  n = 9
  make = jax.jit(jax.vmap(lambda d, k: coding.cyclic(n, d, key=k)))
  ds = jnp.array([1, 3, 9])
  keys = jax.random.split(jax.random.key(0), 3)
  out = make(ds, keys)
  for j, d in enumerate([1, 3, 9]):
    perm = np.asarray(coding.random_permutation(keys[j], n))
    np.testing.assert_allclose(out[j], _np_cyclic(n, d, perm), rtol=1e-6)


def test_coded_vector_spread_under_redrawn_permutation():
  # E‖c_i − ḡ‖² = (n − d)/(d(n − 1)) · ζ², ζ² = (1/n) Σ_j ‖g_j − ḡ‖² (population normalisation)
  n, p, draws = 10, 3, 3000
  ds = [1, 3, 6]
  rng = np.random.default_rng(0)
  g = rng.normal(size=(n, p)) * np.array([1.0, 2.0, 0.5]) + rng.normal(size=(1, p))
  gbar = g.mean(0)
  zeta2 = np.mean(np.sum((g - gbar) ** 2, axis=1))
  g32 = jnp.asarray(g, jnp.float32)

  def spread(d, key):
    c = coding.encode(coding.cyclic(n, d, key=key), g32)
    return jnp.mean(jnp.sum((c - gbar) ** 2, axis=1))

  keys = jax.random.split(jax.random.key(7), draws)
  # one program: the redundancy d is traced (vmapped), the permutations too
  mc = jax.jit(jax.vmap(jax.vmap(spread, in_axes=(None, 0)), in_axes=(0, None)))(
    jnp.asarray(ds), keys
  )
  for j, d in enumerate(ds):
    got = float(np.mean(mc[j]))
    theory = (n - d) / (d * (n - 1)) * zeta2
    assert got == pytest.approx(theory, rel=0.04), d
    # the test can tell the normalisations apart: with ζ² normalised by n − 1 the prediction is
    # off by n/(n − 1) = 11 %
    assert abs(got - theory * n / (n - 1)) > 0.05 * theory


def test_fixed_permutation_spread_is_not_random():
  # with the identity assignment the coded vectors are deterministic: no averaging over π
  n, d = 6, 2
  b1, b2 = coding.cyclic(n, d), coding.cyclic(n, d, perm=jnp.arange(n))
  np.testing.assert_array_equal(b1, b2)


@pytest.mark.parametrize('n,f', [(12, 2), (11, 2), (16, 3)])
def test_draco_recovers_exactly_with_f_adversaries(n, f):
  rng = np.random.default_rng(n + f)
  # subsets of very different scales: a vote through a Gram expansion would drown in rounding
  g = (rng.normal(size=(n, 5)) * 10.0 ** rng.integers(-2, 3, size=(n, 1)) + 50).astype(np.float32)
  groups = coding.draco_groups(n, f)
  sizes = np.bincount(groups)
  assert sizes.min() >= 2 * f + 1
  b = coding.draco(n, f)
  np.testing.assert_array_equal(coding.coverage(b), sizes[np.asarray(groups)])
  c = np.asarray(coding.encode(b, jnp.asarray(g)))
  full = g.astype(np.float64).mean(0)
  # adversaries all in the last group (worst case for its vote), colluding on one vector, and
  # adversaries spread over groups, with NaN / huge values
  placements = [
    list(range(n - f, n)),
    [int(np.flatnonzero(np.asarray(groups) == k)[0]) for k in range(min(f, sizes.size))],
  ]
  for bad in placements:
    for payload in ('collude', 'near', 'nan', 'huge', 'random'):
      x = c.copy()
      for j, i in enumerate(bad):
        x[i] = {
          'collude': np.full(5, 7.0),
          'near': c[i] * (1 + 1e-3),  # colluding copies that almost agree with the honest one
          'nan': np.full(5, np.nan),
          'huge': np.full(5, 1e30 * (j + 1)),
          'random': rng.normal(size=5) * 10,
        }[payload]
      out = coding.draco_decode(jnp.asarray(x), groups=groups, f=f)
      np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-6)


def _np_draco_decode(x, groups):
  """float64 reference from the definition: in each group the lower median of its members' values
  per coordinate (non-finite values as +inf), the member closest to it (lowest index on ties),
  weighted n_k / n."""
  x = np.asarray(x, np.float64)
  clean = np.where(np.isfinite(x), x, np.inf)
  groups = np.asarray(groups)
  n, out = len(groups), np.zeros(x.shape[1])
  for k in np.unique(groups):
    members = np.flatnonzero(groups == k)
    med = np.sort(clean[members], axis=0)[(members.size - 1) // 2]
    with np.errstate(invalid='ignore', over='ignore'):
      dist = np.sum((clean[members] - med) ** 2, axis=1)
    dist = np.where(np.isfinite(dist), dist, np.inf)
    out += members.size / n * x[members[np.argmin(dist)]]
  return out


@pytest.mark.parametrize(
  'groups,f',
  [
    ((0, 1, 0, 1, 2, 2, 0, 1, 2, 2), 1),  # interleaved groups of 3, 3 and 4
    (coding.draco_groups(300, 2, r=150), 2),  # two groups of 150: the bisection path
  ],
)
@pytest.mark.parametrize('majority', [True, False])
def test_draco_decode_matches_a_numpy_reference(groups, f, majority):
  """Byzantine rows (NaN, -inf, huge, near copies) in every group, beside an honest majority that
  sends one vector, or beside random rows (then the rank of the median and the tie rule show)."""
  rng = np.random.default_rng(len(groups))
  n = len(groups)
  x = rng.normal(size=(n, 6)).astype(np.float32)
  for k in np.unique(groups):
    members = np.flatnonzero(np.asarray(groups) == k)
    if majority:
      x[members[f:]] = x[members[-1]]
    for j, i in enumerate(members[:f]):
      x[i] = [np.nan, -np.inf, 1e30, x[members[-1], 0] * (1 + 1e-3)][(i + j) % 4]
  out = coding.draco_decode(jnp.asarray(x), groups=groups, f=f)
  np.testing.assert_allclose(out, _np_draco_decode(x, groups), rtol=1e-6)


def test_draco_decode_selects_without_sorting():
  """The vote uses the selection networks: XLA's sort of every column costs orders of magnitude
  more (BENCHMARKS.md, 13.7 s at n = 64, d = 10⁶)."""
  groups = coding.draco_groups(64, 8)
  jaxpr = jax.make_jaxpr(lambda x: coding.draco_decode(x, groups=groups, f=8))(jnp.zeros((64, 9)))
  assert not re.search(r'\bsort\[', str(jaxpr))  # the sort primitive, e.g. sort[dimension=1 ...]


def test_draco_groups_for_non_divisible_n():
  # n = 100, f = 10: r = 21 does not divide 100 -> 4 groups of 25
  assert np.bincount(coding.draco_groups(100, 10)).tolist() == [25] * 4
  assert np.bincount(coding.draco_groups(100, 20)).tolist() == [50, 50]
  assert np.bincount(coding.draco_groups(9, 1)).tolist() == [3, 3, 3]


@pytest.mark.parametrize('n,s', [(6, 2), (7, 3)])
def test_mds_decoder_reconstructs_the_sum_for_every_straggler_set(n, s):
  b = coding.cyclic_mds(n, s)
  np.testing.assert_array_equal(coding.loads(b), s + 1)
  rng = np.random.default_rng(0)
  g = rng.normal(size=(n, 4))
  c = b @ g
  total = g.sum(0)
  for size in range(s + 1):
    for strag in itertools.combinations(range(n), size):
      a = coding.decoding_vector(b, strag)
      assert np.all(a[list(strag)] == 0)
      np.testing.assert_allclose(a @ c, total, rtol=1e-6, atol=1e-8)
  # straggler rows may hold garbage: the jax decoder ignores them
  a = coding.decoding_vector(b, tuple(range(s)))
  cc = c.copy()
  cc[:s] = np.nan
  np.testing.assert_allclose(coding.decode(a, jnp.asarray(cc, jnp.float32)), total, rtol=1e-4)
  with pytest.raises(ValueError, match='too many stragglers'):
    coding.decoding_vector(b, tuple(range(s + 1)))


def test_fractional_repetition_decodes_with_one_survivor_per_group():
  b = coding.fractional_repetition(6, 3)
  a = coding.decoding_vector(b, (0, 1, 3, 4))
  np.testing.assert_allclose(a @ np.asarray(b, np.float64), np.ones(6), atol=1e-6)
  with pytest.raises(ValueError, match='too many stragglers'):
    coding.decoding_vector(b, (0, 1, 2))


def test_validation_errors():
  with pytest.raises(ValueError, match='cyclic: needs 1 <= d <= n'):
    coding.cyclic(5, 6)
  with pytest.raises(ValueError, match='cyclic: needs 1 <= d <= n'):
    coding.cyclic(5, 0)
  with pytest.raises(ValueError, match='perm must have shape'):
    coding.cyclic(5, 2, perm=jnp.arange(4))
  with pytest.raises(ValueError, match='d to divide n'):
    coding.fractional_repetition(10, 3)
  with pytest.raises(ValueError, match='needs n >= r'):
    coding.draco_groups(8, 4)
  with pytest.raises(ValueError, match='must be >= 2f'):
    coding.draco_groups(8, 2, r=4)
  with pytest.raises(ValueError, match='2f \\+ 1'):
    coding.draco_decode(jnp.zeros((6, 2)), groups=(0, 0, 0, 1, 1, 1), f=2)
  with pytest.raises(ValueError, match='columns'):
    coding.encode(jnp.ones((3, 4)), jnp.ones((5, 2)))
  with pytest.raises(ValueError, match='2-D'):
    coding.encode(jnp.ones(3), jnp.ones((3, 2)))
  with pytest.raises(ValueError, match='0 <= s < n'):
    coding.cyclic_mds(4, 4)
  with pytest.raises(ValueError, match='distinct'):
    coding.decoding_vector(np.eye(3), (0, 0))


def test_byzantine_placement_permutes_the_rows_of_b():
  """'last': the Byzantine rows are B's last f (contiguous in the cyclic order); 'random': a fixed
  random set of rows; 'redrawn': a new set every step. Coverage is unchanged."""
  n, f, d = 12, 4, 3
  keys = [jax.random.key(s) for s in range(6)]

  def byz_rows(placement):
    code = coding.make(f'cyclic(d={d}, redraw=False, byzantine={placement!r})', n=n, f=f)
    mats = [np.asarray(code.matrix(k)) for k in keys]
    base = np.asarray(coding.cyclic(n, d))
    for m in mats:
      np.testing.assert_array_equal(np.sort(m, axis=0), np.sort(base, axis=0))  # rows permuted
      np.testing.assert_array_equal(np.asarray(coding.coverage(m)), d)
    rows = [{tuple(r) for r in m[n - f :]} for m in mats]
    positions = [sorted(int(np.flatnonzero((base == r).all(1))[0]) for r in rs) for rs in rows]
    return positions

  last = byz_rows('last')
  assert all(p == list(range(n - f, n)) for p in last)
  fixed = byz_rows('random')
  assert all(p == fixed[0] for p in fixed) and fixed[0] != list(range(n - f, n))
  redrawn = byz_rows('redrawn')
  assert len({tuple(p) for p in redrawn}) > 1
  with pytest.raises(ValueError, match='DRACO is exact'):
    coding.make("draco(byzantine='random')", n=9, f=2)
  with pytest.raises(ValueError, match="'last', 'random' or 'redrawn'"):
    coding.make("cyclic(d=2, byzantine='first')", n=9, f=2)
