"""Coordinate-wise aggregators against float64 NumPy references written from the formulas."""

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustjax import aggregators
from robustjax import stack as stk
from robustjax._sorting import batcher_network, pruned_network, select
from robustjax.aggregators import _coordinatewise as cw

# --- float64 references, written from ALGORITHMS.md §2 ---------------------------------------


def ref_mean(x, f):
  return x.mean(0)


def ref_median(x, f):
  s = np.sort(x, axis=0)
  n = len(x)
  return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def ref_trimmed_mean(x, f):
  s = np.sort(x, axis=0)
  return s[f : len(x) - f].mean(0)


def ref_mean_closest(x, keep):
  med = ref_median(x, 0)
  out = np.empty(x.shape[1:])
  for j in np.ndindex(*x.shape[1:]):
    col = x[(slice(None),) + j]
    order = np.lexsort((col, np.abs(col - med[j])))  # by distance, ties: lower value first
    out[j] = col[order[:keep]].mean()
  return out


def ref_meamed(x, f):
  return ref_mean_closest(x, len(x) - f)


RULES = {
  'mean': ref_mean,
  'median': ref_median,
  'trimmed_mean': ref_trimmed_mean,
  'meamed': ref_meamed,
}
ROBUST = ['median', 'trimmed_mean', 'meamed']
CASES = [(1, 0), (2, 0), (5, 2), (6, 1), (8, 3), (11, 4), (16, 3)]


def _data(n, d=7, seed=0, dtype=np.float32):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(dtype)


# --- the network itself -----------------------------------------------------------------------


@pytest.mark.parametrize('n', [1, 2, 3, 5, 8, 13, 16, 17, 31])
def test_batcher_network_sorts(n):
  """0-1 principle: a comparator network sorts everything iff it sorts every 0-1 input."""
  rng = np.random.default_rng(n)
  vals = rng.integers(0, 2, size=(400, n)) if n > 12 else None
  if vals is None:
    vals = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
  w = vals.T.copy()
  for i, j in batcher_network(n):
    lo, hi = np.minimum(w[i], w[j]), np.maximum(w[i], w[j])
    w[i], w[j] = lo, hi
  np.testing.assert_array_equal(w.T, np.sort(vals, axis=1))


def test_pruned_network_is_smaller_and_exact():
  n = 20
  labels = tuple('s' if 4 <= i < 16 else None for i in range(n))
  assert len(pruned_network(n, labels)) < len(batcher_network(n))
  x = _data(n, 50).astype(np.float64)
  got = select([jnp.asarray(r) for r in x], [3, 10, 19])
  s = np.sort(x, axis=0)
  for g, p in zip(got, [3, 10, 19]):
    np.testing.assert_allclose(np.asarray(g), s[p], rtol=1e-6)


def test_select_each_matches_sort_with_ties_and_infinities():
  import robustjax._sorting as sorting

  rng = np.random.default_rng(4)
  x = rng.integers(-3, 4, size=(52, 301)).astype(np.float32)  # many ties
  x[5, :7] = np.inf
  x[9, 3:9] = -np.inf
  ranks = [0, 19, 20, 31, 32, 51]
  got = jax.jit(lambda x: sorting.select_each(x, ranks))(jnp.asarray(x))
  np.testing.assert_array_equal(np.stack(got), np.sort(x, 0)[ranks])
  x[7, 2:5] = np.nan  # sorted as +inf with nan_last (NumPy sorts NaN last too)
  got = sorting.select_each(jnp.asarray(x), ranks, nan_last=True)
  want = np.sort(np.where(np.isnan(x), np.inf, x), 0)[ranks]
  np.testing.assert_array_equal(np.stack(got), want)
  # A group of ranks gives their sum.
  low, middle = sorting.select_each(jnp.asarray(x), [2, range(12, 40)], nan_last=True)
  clean = np.sort(np.where(np.isnan(x), np.inf, x), 0)
  np.testing.assert_array_equal(np.asarray(low), clean[2])
  np.testing.assert_allclose(np.asarray(middle), clean[12:40].sum(0), rtol=1e-6)
  with pytest.raises(ValueError, match='select_each'):
    sorting.select_each(jnp.asarray(x), [52])


def test_select_layered_fallback(monkeypatch):
  import robustjax._sorting as sorting

  monkeypatch.setattr(sorting, 'NETWORK_MAX_N', 4)
  x = _data(9, 5)
  got = sorting.select([jnp.asarray(r) for r in x], [0, 4, 8])
  np.testing.assert_allclose(np.stack(got), np.sort(x, 0)[[0, 4, 8]])
  # Several column blocks plus a remainder.
  x = _data(11, 37, seed=2)
  got = sorting.select_layered(jnp.asarray(x), [0, 3, 10], chunk=8)
  np.testing.assert_allclose(np.stack(got), np.sort(x, 0)[[0, 3, 10]])


@pytest.mark.parametrize('n', [1, 2, 3, 8, 13, 52, 131])
def test_select_layered_sorts_every_rank(n):
  # The bitonic network run layer by layer, rows padded with +inf to a power of two (n = 1, 2
  # and 8 need none): every rank against a sort, with ties, ±inf, NaN (as +inf) and -0, in
  # blocks of 8 columns with a remainder.
  import robustjax._sorting as sorting

  rng = np.random.default_rng(n)
  x = rng.integers(-3, 4, size=(n, 21)).astype(np.float32)
  for value in (np.inf, -np.inf, np.nan, -0.0):
    x[rng.random(x.shape) < 0.1] = value
  got = sorting.select_layered(jnp.asarray(x), list(range(n)), chunk=8)
  np.testing.assert_array_equal(np.stack(got), np.sort(np.where(np.isnan(x), np.inf, x), 0))
  # -0 and +0 keep their signs (the network permutes its inputs): as many of each come out.
  got = np.stack(got)
  assert np.sum(np.signbit(got) & (got == 0)) == np.sum(np.signbit(x) & (x == 0))


def test_compare_exchange_swaps_or_keeps():
  # The networks' compare-exchange (one comparison, two selections): the elementwise minimum and
  # maximum of NaN-free inputs, and bit for bit the inputs swapped or not (a -0 and a +0 keep
  # their signs), over every pair of values with ties, ±inf and ±0. (XLA:CPU flushes subnormals
  # to zero in comparisons: those compare equal to 0 and to each other.)
  import robustjax._sorting as sorting

  values = np.array([-np.inf, -2.5, -1.0, -0.0, 0.0, 1e-30, 1.0, 3.0, np.inf], np.float32)
  a, b = (v.ravel() for v in np.meshgrid(values, values))
  lo, hi = (np.asarray(v) for v in sorting.compare_exchange(jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_array_equal(lo, np.minimum(a, b))
  np.testing.assert_array_equal(hi, np.maximum(a, b))
  bits = [v.view(np.uint32) for v in (a, b, lo, hi)]
  kept = (bits[2] == bits[0]) & (bits[3] == bits[1])
  swapped = (bits[2] == bits[1]) & (bits[3] == bits[0])
  assert np.all(kept | swapped)


def test_networks_with_selections_up_to_an_op_budget():
  # `select` emits a network with `compare_exchange` while its live comparisons and selections
  # fit `SELECTION_NETWORK_MAX_OPS` (or inside `wide_networks()`), else with minimum / maximum:
  # both forms sort alike.
  import robustjax._sorting as sorting

  assert sorting.selection_ops(2, ((0, 1),), [0]) == 2
  assert sorting.selection_ops(2, ((0, 1),), [0, 1]) == 3
  assert sorting.selection_ops(3, ((0, 1), (1, 2)), [0]) == 2  # (1, 2) is never read
  assert sorting.selection_ops(3, ((0, 1), (1, 2)), [2]) == 2 + 2

  def ops(n, positions, symmetric=False):
    fn = lambda x: sorting.select(list(x), positions, symmetric=symmetric)
    jaxpr = str(jax.make_jaxpr(fn)(jnp.zeros((n, 3))))
    return len(re.findall(r'= lt ', jaxpr)), len(re.findall(r'= min ', jaxpr))

  assert ops(64, [8, 55])[1] == 0 and ops(64, [8, 55])[0] > 64
  assert ops(128, [16, 111])[0] == 0 and ops(128, [16, 111])[1] > 128
  # Ranks read one by one get the smaller budget (the trimmed mean at n = 116, f = 2: 2,781 ops,
  # not vectorised with selections); the median's summed pair at n = 112 (2,986 ops) the larger.
  assert ops(112, [2, 109])[1] == 0 and ops(116, [2, 113])[0] == 0
  assert ops(112, [55, 56], symmetric=True)[1] == 0 and ops(112, [55, 56], symmetric=True)[0] > 112
  with sorting.wide_networks():
    assert ops(128, [16, 111])[1] == 0
  for n, positions in ((64, [8, 55]), (128, [16, 111])):
    x = _data(n, 7, seed=n)
    x[0, 0] = np.inf
    x[: n // 2, 1] = -0.0
    got = sorting.select(list(jnp.asarray(x)), positions)
    np.testing.assert_array_equal(np.stack(got), np.sort(x, 0)[positions])


@pytest.mark.parametrize('name', ROBUST)
def test_networks_slice_each_row_once(name):
  """The rules' unrolled networks read each row through one slice (and the trimmed mean's and
  MeaMed's clipped sums through one more). A second slice per row in the network (a row mapped as
  `where(isnan(x[i]), inf, x[i])`) compiled MeaMed at 96 rows to a loop XLA:CPU did not vectorise
  on an Intel Xeon: 21-30 ns per entry against 1.1-1.5, and 19-21 s to compile against 2."""
  n = 96
  jaxpr = str(jax.make_jaxpr(lambda x: getattr(aggregators, name)(x, f=12))(jnp.zeros((n, 3))))
  assert len(re.findall(r'= slice\[', jaxpr)) == (n if name == 'median' else 2 * n)


def test_column_blocks_are_one_piece_on_accelerators(monkeypatch):
  # On an accelerator the column blocks (`_blocks.over_column_blocks`, here under the layered
  # network) would be a sequence of small kernel launches: one loop over the layers on all
  # columns at once, not a loop of loops.
  import robustjax._sorting as sorting

  x = jnp.asarray(_data(11, 37, seed=3))

  def loops(jaxpr):  # a fori_loop with static bounds traces to a scan
    return str(jaxpr).count('scan[') + str(jaxpr).count('while[')

  def traced():
    return jax.make_jaxpr(lambda x: sorting.select_layered(x, [0, 3, 10], chunk=8))(x)

  assert loops(traced()) == 1  # CPU: the blocks' loop (the layers are unrolled)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  one_piece = traced()
  monkeypatch.undo()
  assert loops(one_piece) == 0
  got = jax.core.eval_jaxpr(one_piece.jaxpr, one_piece.consts, x)
  np.testing.assert_allclose(np.stack(got), np.sort(np.asarray(x), 0)[[0, 3, 10]])


@pytest.mark.parametrize('n', [1, 2, 5, 16, 17, 37, 131, 300])
def test_select_bisect(n, monkeypatch):
  # Bisection of the values' bits against a sort, bit for bit: ties (small integers), ±inf, −0,
  # values from 1e-38 to 1e38 (subnormals, both signs); n = 17, 37, 131, 300 pad the last
  # group of rows; 300 columns in blocks of 256 make a block loop with a remainder, and
  # n = 300 sums the counts of more groups than uint8 holds; the median's ranks and both
  # ends, with runs of consecutive ranks (found from the one before, a run of five starts a new
  # bisection at its fourth); NaN counts as +inf;
  # half precision has 16-bit keys.
  import robustjax._sorting as sorting

  monkeypatch.setattr(sorting, '_BISECT_BLOCK_ENTRIES', 1)
  assert sorting._bisect_block_columns(n) == 256
  rng = np.random.default_rng(n)
  ties = rng.integers(-3, 4, size=(n, 300)).astype(np.float32)
  for value, share in ((np.inf, 0.05), (-np.inf, 0.05), (-0.0, 0.1), (np.nan, 0.05)):
    ties[rng.random(ties.shape) < share] = value
  spread = (rng.normal(size=(n, 300)) * 10.0 ** rng.integers(-45, 38, size=(n, 300))).astype(
    np.float32
  )
  ranks = sorted({r for r in (0, 1, 2, 3, 4, (n - 1) // 2, n // 2, n - 2, n - 1) if 0 <= r < n})
  for x in (ties, spread, spread.astype(jnp.bfloat16)):
    got = jax.jit(lambda x: jnp.stack(sorting.select_bisect(x, ranks)))(jnp.asarray(x))
    # The reference sorts in the floats' total order (−0 below +0), then compares the bits.
    bits = np.where(np.isnan(x), np.inf, np.asarray(x, np.float32)).view(np.int32)
    keys = np.sort(bits ^ ((bits >> 31) & 0x7FFFFFFF), axis=0)[ranks]
    want = (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(np.float32)
    np.testing.assert_array_equal(np.asarray(got, np.float32).view(np.int32), want.view(np.int32))
  with pytest.raises(ValueError, match='select_bisect'):
    sorting.select_bisect(jnp.asarray(ties), [n])


@pytest.mark.parametrize('n', [1, 16, 37, 300])
def test_count_below(n):
  # Counts against NumPy's comparisons: ties (small integers), −0 against +0, ±inf, NaN never
  # counted; n = 37 pads the last group of rows with NaN, n = 300 sums more groups than uint8
  # holds.
  import robustjax._sorting as sorting

  rng = np.random.default_rng(n)
  x = rng.integers(-2, 3, size=(n, 40)).astype(np.float32)
  for value, share in ((np.inf, 0.05), (-np.inf, 0.05), (-0.0, 0.1), (np.nan, 0.1)):
    x[rng.random(x.shape) < share] = value
  values = rng.integers(-2, 3, size=(4, 40)).astype(np.float32)
  values[0, :5] = -0.0
  values[1, 5:8] = np.inf
  strict = (False, True, False, True)
  got = sorting.count_below(jnp.asarray(x), jnp.asarray(values), strict)
  want = [((x < v) if s else (x <= v)).sum(0) for v, s in zip(values, strict)]
  np.testing.assert_array_equal(np.asarray(got), np.stack(want))


@pytest.mark.parametrize('n', [1, 5, 16, 17, 37, 131])
def test_select_extremes(n):
  # The insertion chains against a sort: ties (small integers), ±inf and NaN (as +inf), ranks
  # 0 … 8; n = 17, 37 and 131 end with a step that overlaps the previous one (its repeated rows
  # must be skipped).
  import robustjax._sorting as sorting

  rng = np.random.default_rng(n)
  x = rng.integers(-3, 4, size=(n, 23)).astype(np.float32)
  x[rng.random(x.shape) < 0.05] = np.inf
  x[rng.random(x.shape) < 0.05] = -np.inf
  x[rng.random(x.shape) < 0.05] = np.nan
  s = np.sort(np.where(np.isnan(x), np.inf, x), axis=0)
  for k in sorted({0, min(1, n - 1), min(3, n - 1), min(8, n - 1)}):
    low, high = sorting.select_extremes(jnp.asarray(x), k)
    np.testing.assert_array_equal(low, s[k])
    np.testing.assert_array_equal(high, s[n - 1 - k])
  with pytest.raises(ValueError, match='select_extremes'):
    sorting.select_extremes(jnp.asarray(x), n)


@pytest.mark.parametrize('n', [17, 131])
def test_select_extremes_over_column_blocks(monkeypatch, n):
  # Blocks of 8 columns: 21 columns are two blocks and a remainder of 5, and `then` gets each
  # block as given (NaN kept) with its own statistics. Values from a wide range, so that the
  # cut-offs differ from column to column and statistics given to the wrong columns show.
  import robustjax._sorting as sorting

  monkeypatch.setattr(sorting, '_EXTREMES_BLOCK_COLUMNS', 8)
  rng = np.random.default_rng(n)
  x = rng.integers(-1000, 1000, size=(n, 21)).astype(np.float32)
  x[rng.random(x.shape) < 0.05] = np.inf
  x[rng.random(x.shape) < 0.05] = np.nan
  s = np.sort(np.where(np.isnan(x), np.inf, x), axis=0)
  low, high = sorting.select_extremes(jnp.asarray(x), 2)
  np.testing.assert_array_equal(low, s[2])
  np.testing.assert_array_equal(high, s[n - 3])
  row = sorting.select_extremes(
    jnp.asarray(x), 2, then=lambda b, st: st[0] + jnp.sum(jnp.isnan(b), axis=0)
  )
  np.testing.assert_array_equal(row, s[2] + np.isnan(x).sum(0))


@pytest.mark.parametrize('n', [1, 2, 7, 20])
def test_select_ends(monkeypatch, n):
  # The peeled ends against a sort: ties (small integers, one column all equal), ±inf, NaN (as
  # +inf) and −0 against 0, k up to n, over blocks of 8 columns (two blocks and a remainder of 5).
  import robustjax._sorting as sorting

  monkeypatch.setattr(sorting, '_ENDS_BLOCK_COLUMNS', 8)
  rng = np.random.default_rng(n)
  x = rng.integers(-3, 4, size=(n, 21)).astype(np.float32)
  for value in (np.inf, -np.inf, np.nan, -0.0):
    x[rng.random(x.shape) < 0.05] = value
  x[:, 3] = 2.0
  s = np.sort(np.where(np.isnan(x), np.inf, x), axis=0)
  for k in sorted({1, min(2, n), min(13, n), n}):
    low, high = jax.jit(sorting.select_ends, static_argnums=1)(jnp.asarray(x), k)
    np.testing.assert_array_equal(np.stack(low), s[:k])
    np.testing.assert_array_equal(np.stack(high), s[n - k :])
  with pytest.raises(ValueError, match='select_ends'):
    sorting.select_ends(jnp.asarray(x), n + 1)


def test_ends_pay_where_the_sort_pads_many_rows():
  # MeaMed's evaluation peels the ends (and its four middle ranks) where the sort would pad many
  # rows and k is small, and sorts the columns otherwise, as measured end to end (BENCHMARKS.md);
  # never beyond the networks.
  import robustjax._sorting as sorting

  assert sorting.ends_pay(20, 5, 4) and sorting.ends_pay(40, 5, 4)
  assert not sorting.ends_pay(60, 5, 4) and not sorting.ends_pay(52, 13, 4)
  assert not sorting.ends_pay(128, 17, 4) and not sorting.ends_pay(129, 1)


@pytest.mark.parametrize(
  'extremes_max_rank,bisect_max_ranks',
  # the layered network (MeaMed bisects in every mode), bisection, chains (the trimmed mean)
  [(0, 0), (0, 3), (8, 3)],
)
@pytest.mark.parametrize('name', ROBUST)
def test_rules_beyond_network_max_n(monkeypatch, name, extremes_max_rank, bisect_max_ranks):
  import robustjax._sorting as sorting

  monkeypatch.setattr(sorting, 'NETWORK_MAX_N', 4)
  monkeypatch.setattr(sorting, 'ONE_OUTPUT_NETWORK_MAX_N', 4)
  monkeypatch.setattr(sorting, 'WIDE_NETWORK_MAX_N', 4)
  monkeypatch.setattr(sorting, 'EXTREMES_MAX_RANK', extremes_max_rank)
  monkeypatch.setattr(sorting, 'BISECT_MAX_RANKS', bisect_max_ranks)
  # A shape no other test (and no other parameter) uses: a fresh trace, so the patched limits apply.
  d = 13 + extremes_max_rank + 20 * bisect_max_ranks
  x = _data(19, d, seed=21)
  x[0, :2] = np.nan
  x[0, 3] = -np.inf
  out = np.asarray(aggregators.get(name)(jnp.asarray(x), f=2))
  assert np.all(np.isfinite(out))
  want = RULES[name](np.where(np.isnan(x), np.inf, x).astype(np.float64), 2)
  np.testing.assert_allclose(out[4:], want[4:], rtol=2e-5, atol=2e-6)
  # Many ties (small integers), so that ties at the cut-off decide: the same as the network.
  ties = np.random.default_rng(4).integers(-2, 3, size=(21, d)).astype(np.float32)
  got = np.asarray(aggregators.get(name)(jnp.asarray(ties), f=3))
  np.testing.assert_allclose(got, RULES[name](ties.astype(np.float64), 3), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('n', [129, 144, 161])
def test_median_network_beyond_network_max_n(n):
  # A network read through one value (the median's rank, or its two middle ranks summed) stays
  # unrolled up to `ONE_OUTPUT_NETWORK_MAX_N` rows, past `NETWORK_MAX_N`; beyond, bisection (a
  # handful of passes). NaN as +inf, infinities and ties, against the float64 reference.
  import robustjax._sorting as sorting

  assert sorting.network_max_n(1) == sorting.network_max_n(2, symmetric=True) >= 160
  assert sorting.network_max_n(2) == sorting.NETWORK_MAX_N == 128
  x = _data(n, 9, seed=n)
  x[0, :2] = np.nan
  x[1, 3] = -np.inf
  x[: n // 2 + 3, 4] = x[0, 4]  # the middle ranks tie
  rule = aggregators.get('median')
  jaxpr = str(jax.make_jaxpr(lambda x: rule(x))(jnp.asarray(x)))
  comparators = len(re.findall(r'= (?:lt|min) ', jaxpr))  # one per compare-exchange
  assert (comparators > n) == (n <= sorting.ONE_OUTPUT_NETWORK_MAX_N)
  got = np.asarray(rule(jnp.asarray(x)))
  want = RULES['median'](np.where(np.isnan(x), np.inf, x).astype(np.float64), 0)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize('name', ROBUST)
def test_wide_networks_standalone(name):
  # Called outside any trace on CPU, a stack of 129 … `WIDE_NETWORK_MAX_N` workers is compiled
  # with XLA:CPU's legacy emitter and traced inside `wide_networks()`: one unrolled network, the
  # same result as the float64 reference (NaN as +inf, -inf, ties). Inside a caller's jit the same
  # shape still bisects (but the median): the wide trace is not reused there (jax caches traces by
  # function).
  import robustjax._sorting as sorting

  n, f = 136, 17
  assert sorting.NETWORK_MAX_N < n <= sorting.WIDE_NETWORK_MAX_N
  x = _data(n, 9, seed=n + len(name))
  x[0, :2] = np.nan
  x[1, 3] = -np.inf
  x[: n // 2 + 3, 4] = x[0, 4]  # ties at the middle and at the cut-offs
  rule = aggregators.get(name)
  assert cw._wide_network([jnp.asarray(x)])
  assert not cw._wide_network([jnp.zeros((sorting.WIDE_NETWORK_MAX_N + 1, 3))])
  assert not cw._wide_network([jnp.zeros((sorting.NETWORK_MAX_N, 3))])

  def comparators(fn, x):
    return len(re.findall(r'= (?:lt|min) ', str(jax.make_jaxpr(lambda x: fn(x, f=f))(x))))

  with sorting.wide_networks():
    assert sorting.network_max_n(2) == sorting.WIDE_NETWORK_MAX_N
    # The rule's own function, not its jit: a trace in here must not be cached for later ones.
    assert comparators(inspect.unwrap(rule), jnp.asarray(x)) > n  # unrolled
  assert sorting.network_max_n(2) == sorting.NETWORK_MAX_N
  got = np.asarray(rule(jnp.asarray(x), f=f))  # standalone: the wide variant
  want = RULES[name](np.where(np.isnan(x), np.inf, x).astype(np.float64), f)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
  inside = jax.jit(lambda x: rule(x, f=f))
  np.testing.assert_allclose(np.asarray(inside(jnp.asarray(x))), want, rtol=2e-6, atol=1e-6)
  # Traced: bisection (the median's one-output network reaches `ONE_OUTPUT_NETWORK_MAX_N`).
  traced_limit = sorting.network_max_n(1) if name == 'median' else sorting.network_max_n(2)
  assert (comparators(rule, jnp.asarray(x)) > n) == (n <= traced_limit)


def test_wide_networks_fall_back_without_the_option(monkeypatch):
  # An XLA that refuses the legacy emitter's option: the standalone call falls back to the default
  # compilation (bisection beyond 128 rows), with the same result, and stops trying the option.
  import robustjax._sorting as sorting

  monkeypatch.setattr(sorting, 'WIDE_NETWORK_COMPILER_OPTIONS', {'xla_cpu_no_such_option': True})
  monkeypatch.setattr(cw._WIDE, 'available', True)
  rule = cw._jit_f(inspect.unwrap(aggregators.get('trimmed_mean')))  # built with the bad option
  x = _data(140, 5, seed=3)
  got = np.asarray(rule(jnp.asarray(x), f=10))
  assert not cw._WIDE.available
  np.testing.assert_allclose(
    got, RULES['trimmed_mean'](x.astype(np.float64), 10), rtol=2e-6, atol=1e-6
  )


@pytest.mark.parametrize('name', ROBUST)
def test_gradients_beyond_network_max_n(monkeypatch, name):
  # Bisection's order statistics differentiate as the networks' do (the selected entry's
  # derivative): beyond the (patched) network limit, the same gradient as the unrolled network
  # gives for the same 19 rows; the median's is the one-hot of the middle row.
  import robustjax._sorting as sorting

  monkeypatch.setattr(sorting, 'EXTREMES_MAX_RANK', 0)  # the trimmed mean bisects too
  x = jnp.asarray(_data(19, 11, seed=8))
  weights = jnp.arange(1.0, 12.0)
  grads = {}
  for limit in (sorting.NETWORK_MAX_N, 4):  # the unrolled network, then bisection
    monkeypatch.setattr(sorting, 'NETWORK_MAX_N', limit)
    monkeypatch.setattr(sorting, 'ONE_OUTPUT_NETWORK_MAX_N', limit)
    monkeypatch.setattr(sorting, 'WIDE_NETWORK_MAX_N', limit)
    jax.clear_caches()
    grads[limit] = np.asarray(
      jax.grad(lambda x: (aggregators.get(name)(x, f=3) * weights).sum())(x)
    )
  bisected, unrolled = grads[4], grads[max(grads)]
  np.testing.assert_allclose(bisected, unrolled, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bisected.sum(0), weights, rtol=1e-5)  # a shift moves the output
  if name == 'median':
    middle = np.argsort(np.asarray(x), axis=0)[9]
    np.testing.assert_array_equal(np.argmax(bisected, axis=0), middle)


# --- the rules --------------------------------------------------------------------------------


@pytest.mark.parametrize('name', list(RULES))
@pytest.mark.parametrize('n,f', CASES)
def test_against_reference(name, n, f):
  x = _data(n, seed=n + f)
  # A few duplicated values exercise ties at the cut-off.
  if n >= 5:
    x[1] = x[0]
    x[2, :3] = x[0, :3]
  got = np.asarray(aggregators.get(name)(jnp.asarray(x), f=f))
  want = RULES[name](x.astype(np.float64), f)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('keep', [1, 3, 7, 9])
def test_mean_closest_to_median(keep):
  x = _data(9, seed=keep)
  got = np.asarray(cw.mean_closest_to_median(jnp.asarray(x), keep=keep))
  np.testing.assert_allclose(
    got, ref_mean_closest(x.astype(np.float64), keep), rtol=2e-5, atol=2e-6
  )


def test_meamed_ties_on_both_sides():
  # median 0; values -1 and +1 at the same distance: lower ones are taken first.
  x = np.array([[-1.0], [0.0], [1.0], [0.0], [5.0]], np.float32)
  got = np.asarray(cw.meamed(jnp.asarray(x), f=2))  # keep 3: 0, 0, -1
  np.testing.assert_allclose(got, [-1.0 / 3])
  np.testing.assert_allclose(got, ref_meamed(x.astype(np.float64), 2))


@pytest.mark.parametrize('name', list(RULES))
def test_permutation_invariance(name):
  x = _data(9, seed=3)
  perm = np.random.default_rng(1).permutation(9)
  rule = aggregators.get(name)
  np.testing.assert_allclose(rule(x, f=2), rule(x[perm], f=2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', list(RULES))
def test_translation_equivariance(name):
  x = _data(9, seed=4)
  shift = np.random.default_rng(5).normal(size=(1, 7)).astype(np.float32) * 10
  rule = aggregators.get(name)
  np.testing.assert_allclose(rule(x + shift, f=2), rule(x, f=2) + shift[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ROBUST)
def test_output_within_honest_range(name):
  n, f = 10, 3
  x = _data(n, seed=6)
  x[:f] = 1e6 * np.sign(np.random.default_rng(7).normal(size=(f, 7)))  # Byzantine extremes
  out = np.asarray(aggregators.get(name)(x, f=f))
  honest = x[f:]
  assert np.all(out >= honest.min(0) - 1e-6) and np.all(out <= honest.max(0) + 1e-6)


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf, 1e38])
@pytest.mark.parametrize('name', list(RULES))
def test_nonfinite_byzantine(name, bad):
  n, f = 9, 3
  x = _data(n, seed=8)
  x[[0, 4, 8]] = bad
  out = np.asarray(aggregators.get(name)(x, f=f))
  if name == 'mean':
    assert not np.all(np.abs(out) < 1e3)  # the mean breaks: that is the point
  else:
    assert np.all(np.isfinite(out))
    honest = np.delete(x, [0, 4, 8], axis=0)
    assert np.all(out >= honest.min(0) - 1e-6) and np.all(out <= honest.max(0) + 1e-6)


def test_mixed_nonfinite_per_coordinate():
  n, f = 9, 3
  x = _data(n, seed=9)
  x[0, 0], x[1, 0], x[2, 0] = np.nan, -np.inf, np.inf
  x[3, 1], x[4, 1], x[5, 1] = -np.inf, -np.inf, np.nan
  for name in ROBUST:
    assert np.all(np.isfinite(np.asarray(aggregators.get(name)(x, f=f)))), name


@pytest.mark.parametrize('name', list(RULES))
def test_pytree_equals_flat(name):
  rng = np.random.default_rng(10)
  n = 7
  tree = {
    'w': rng.normal(size=(n, 3, 2)).astype(np.float32),
    'b': rng.normal(size=(n, 4)).astype(np.float32),
    'c': {'s': rng.normal(size=(n, 1)).astype(np.float32)},
  }
  rule = aggregators.get(name)
  out = rule(tree, f=2)
  flat = rule(stk.flatten(tree), f=2)
  np.testing.assert_allclose(stk.flatten(jax.tree.map(lambda a: a[None], out))[0], flat, rtol=1e-6)
  assert jax.tree.structure(out) == jax.tree.structure(jax.tree.map(lambda a: a[0], tree))
  assert out['w'].shape == (3, 2)


@pytest.mark.parametrize('name', list(RULES))
def test_bfloat16(name):
  x = _data(7, seed=11)
  xb = jnp.asarray(x, jnp.bfloat16)
  out = aggregators.get(name)(xb, f=2)
  assert out.dtype == jnp.bfloat16
  want = RULES[name](np.asarray(xb.astype(jnp.float32), np.float64), 2)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize('name', list(RULES))
def test_without_jit_matches(name):
  x = _data(6, seed=12)
  rule = aggregators.get(name)
  with jax.disable_jit():
    eager = rule(x, f=1)
  np.testing.assert_allclose(eager, rule(x, f=1), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda s: rule(s, f=1))(x), eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', list(RULES))
def test_value_errors(name):
  rule = aggregators.get(name)
  x = _data(5)
  with pytest.raises(ValueError, match=f'{name}.*f must be >= 0'):
    rule(x, f=-1)
  with pytest.raises(ValueError, match=f'{name}.*n > 2f'):
    rule(x, f=3)
  with pytest.raises(ValueError, match=f'{name}.*leading'):
    rule({'a': x, 'b': x[:4]}, f=1)
  with pytest.raises(ValueError, match=f'{name}.*empty'):
    rule({}, f=0)
  with pytest.raises(ValueError, match=f'{name}.*empty'):
    rule(np.zeros((0, 3), np.float32), f=0)


def test_registered():
  for name in RULES:
    assert name in aggregators.names()
