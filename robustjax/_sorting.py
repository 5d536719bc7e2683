"""Exact order statistics along the worker axis with compare-exchange networks.

On XLA:CPU, `jnp.sort(x, axis=0)` / `jnp.median(x, axis=0)` over an (n, d) stack is a sort of d
short columns with a generic comparator, and costs orders of magnitude more than a streaming
pass (timings in BENCHMARKS.md). A *sorting network* is a fixed, data-independent list of
compare-exchange operations (i, j): `w_i, w_j = min(w_i, w_j), max(w_i, w_j)`. Built at trace time
over the n row slices of the stack, it is a graph of elementwise comparisons and selections
(`compare_exchange`) that XLA fuses into one loop over the coordinates: exact, branch-free,
vectorised.

The network is Batcher's odd–even merge sort (n log² n / 4 comparators), generated for the next
power of two and restricted to the first n wires (the missing wires act as +inf, so every
comparator touching them is a no-op). It is then *pruned* for the statistic actually needed:
walking the network backwards, a comparator whose two output wires are interchangeable for the
rest of the computation (both unused, or both summed with the same weight) is dropped; XLA's
dead-code elimination then removes the `min` or `max` halves whose outputs are never read.

Beyond `NETWORK_MAX_N` workers XLA:CPU's default emitter no longer vectorises the unrolled
network (it splits a fusion of more than 2,000 ops into functions it does not inline); a network
read through one value (a median) stays one fused pass a little further
(`ONE_OUTPUT_NETWORK_MAX_N`), and any of the rules' networks up to `WIDE_NETWORK_MAX_N` rows when
compiled with XLA:CPU's legacy loop emitter (`wide_networks`). Beyond, a few ranks (a median, a
trimmed mean's two cut-offs) are found by bisecting the bits of the value (`select_bisect`: 8
counting passes per byte of the value, over a block of columns in cache, whatever the data), more
ranks by sorting the columns with Batcher's bitonic network run layer by layer, each layer static
slices of the block, in a loop over column blocks (`select_layered`); `jnp.sort` along the worker
axis is slower still. Ranks a few places from either end (a trimmed mean with a small f) are
cheaper by insertion chains (`select_extremes`), and the k lowest and highest values in order for
a small k (an attack's evaluation of MeaMed) by peeling a rank per pass from each end
(`select_ends`).

References:
  K. E. Batcher, "Sorting networks and their applications", AFIPS 1968.
  D. E. Knuth, The Art of Computer Programming, vol. 3, §5.3.4 (networks for sorting).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from robustjax._blocks import over_column_blocks

# Largest n sorted by a network with XLA:CPU's default emitter: beyond, the rules' networks are no
# longer vectorised (see `WIDE_NETWORK_MAX_N`; BENCHMARKS.md).
NETWORK_MAX_N = 128

# Largest n for a network read through one value: one rank, or two ranks used only through a
# symmetric function (the two middle values of a median). Such a network is smaller (more of it
# pruned), so it stays a vectorised loop further than one with several outputs (the trimmed mean's
# two cut-offs: 8 ns per worker · coordinate from 129 rows on). The median's network took
# 0.53-0.74 ns at 129-160 rows (bisection 0.95-1.13); at 176 rows 0.6 ns at d = 4,810 but 1.3 at
# d = 10^5, and 9-15 ns from 184 rows. On CPU; BENCHMARKS.md.
ONE_OUTPUT_NETWORK_MAX_N = 160


# Largest n for any of the rules' networks when the computation is compiled with XLA:CPU's legacy
# loop emitter (`WIDE_NETWORK_COMPILER_OPTIONS`, inside `wide_networks()`). The limits above are
# those of XLA:CPU's default (MLIR) fusion emitter, which splits a fusion of more than 2,000 HLO
# ops into functions (`kMaxHloOpsPerSubgraph` in XLA's computation partitioner); LLVM does not
# inline the large ones, and a loop that calls a function is not vectorised (16x slower: the
# trimmed mean took 8 ns per worker · coordinate at 129 rows). The legacy emitter keeps the
# network one vectorised loop up to 224 rows (0.59-0.71 ns for the trimmed mean at 129-224 rows
# against 1.38-1.98 by bisection); at 256 LLVM no longer vectorises it either ("too many memory
# checks needed"). It makes the bisection's counting passes about 2x slower, so it is only used
# where the network runs. On CPU; BENCHMARKS.md.
WIDE_NETWORK_MAX_N = 224
WIDE_NETWORK_COMPILER_OPTIONS = {'xla_cpu_use_fusion_emitters': False}

_wide = threading.local()


@contextlib.contextmanager
def wide_networks():
  """Within it, traces unroll the networks up to `WIDE_NETWORK_MAX_N` rows.

  Only for a computation compiled with `WIDE_NETWORK_COMPILER_OPTIONS` (which jax.jit accepts
  only on the outermost jit): with XLA:CPU's default emitter such a network is not vectorised.
  Use a jitted function traced inside it for nothing else (jax caches the trace).
  """
  before = _in_wide_networks()
  _wide.on = True
  try:
    yield
  finally:
    _wide.on = before


def _in_wide_networks() -> bool:
  """Whether this trace is inside `wide_networks()`."""
  return getattr(_wide, 'on', False)


def network_max_n(count: int, symmetric: bool = False) -> int:
  """The most rows `select` unrolls its network over, for `count` ranks (used only through a
  symmetric function when `symmetric`); `WIDE_NETWORK_MAX_N` inside `wide_networks()`."""
  if _in_wide_networks():
    return max(WIDE_NETWORK_MAX_N, NETWORK_MAX_N)
  if count == 1 or (symmetric and count == 2):
    return max(ONE_OUTPUT_NETWORK_MAX_N, NETWORK_MAX_N)
  return NETWORK_MAX_N


def _power_of_two_above(n: int) -> int:
  """The smallest power of two >= n (1 for n <= 1): the wires of Batcher's networks for n rows."""
  return 1 << max(n - 1, 0).bit_length()


@functools.cache
def batcher_network(n: int) -> tuple[tuple[int, int], ...]:
  """Comparators (i, j), i < j, of Batcher's odd–even merge sort on n wires (ascending)."""
  size = _power_of_two_above(n)
  comps = []
  p = 1
  while p < size:
    k = p
    while k >= 1:
      for j in range(k % p, size - k, 2 * k):
        for i in range(min(k, size - j - k)):
          a, b = i + j, i + j + k
          if a // (2 * p) == b // (2 * p) and b < n:
            comps.append((a, b))
      k //= 2
    p *= 2
  return tuple(comps)


@functools.cache
def pruned_network(n: int, labels: tuple) -> tuple[tuple[int, int], ...]:
  """The comparators of `batcher_network(n)` that matter for a symmetric use of the outputs.

  Args:
    n: the number of wires.
    labels: one hashable label per output wire; the final computation must be symmetric under any
      permutation of the wires sharing a label (e.g. 'sum' for the wires summed together, None for
      the wires never read).

  Returns:
    The pruned comparator list, in network order.
  """
  lab = list(labels)
  fresh = 0
  kept = []
  for i, j in reversed(batcher_network(n)):
    if lab[i] == lab[j]:
      continue  # the rest of the computation cannot tell the two outputs apart
    kept.append((i, j))
    # A comparator's outputs are a symmetric function of its inputs: upstream, i and j are
    # interchangeable with each other (and, conservatively, with nothing else).
    fresh += 1
    lab[i] = lab[j] = ('cmp', fresh)
  return tuple(reversed(kept))


# `select_layered`'s blocks on CPU: about this many entries (4 MiB of float32), at least 64
# columns. At d = 10⁵ on a 2-core Zen 4 VM, 64 rows (52 padded) took 13.0-13.8 ms in blocks of
# 8,192-32,768 columns (each layer on both cores), 14.4-15.4 in blocks of 64 (one core, in L1),
# 18.7-33.2 in blocks of 128-4,096, 29.8 in one piece; at 256 and 1,024 rows blocks of 4,096 and
# 1,024 columns were the fastest tried (BENCHMARKS.md).
_LAYERED_BLOCK_ENTRIES = 1 << 20


def _bitonic_sort(b: jax.Array) -> jax.Array:
  """The columns of b (m, c), m a power of two, sorted ascending by Batcher's bitonic network.

  Merges of sorted groups of rows, doubling from 1: the first layer of a merge into groups of s
  rows compare-exchanges row i of each group with its mirror s − 1 − i (two ascending halves
  become two halves, each bitonic, the lower one below the upper); then each half is cleaned by
  comparing rows j apart, j = s/4, …, 1. Every layer is `compare_exchange` on static slices of a
  reshape (no gather): log₂ m (log₂ m + 1) / 2 layers, each one fused loop over the block that
  XLA:CPU writes out (one layer's outputs are each read twice by the next).
  """
  m, c = b.shape
  size = 2
  while size <= m:
    groups = b.reshape(m // size, size, c)
    low, high = compare_exchange(groups[:, : size // 2], groups[:, size // 2 :][:, ::-1])
    b = jnp.concatenate([low, high[:, ::-1]], axis=1).reshape(m, c)
    gap = size // 4
    while gap:
      pairs = b.reshape(m // (2 * gap), 2, gap, c)
      low, high = compare_exchange(pairs[:, 0], pairs[:, 1])
      b = jnp.stack([low, high], axis=1).reshape(m, c)
      gap //= 2
    size *= 2
  return b


def select_layered(
  x: jax.Array, positions: Sequence[int], *, chunk: int | None = None
) -> list[jax.Array]:
  """Order statistics along axis 0 of an (n, D) matrix for any n, NaN counted as +inf: the
  columns sorted by a bitonic network run layer by layer (`_bitonic_sort`).

  The rows are padded with +inf to m, the next power of two. On CPU a `lax.fori_loop` over
  blocks of `chunk` columns (by default about `_LAYERED_BLOCK_ENTRIES` entries, at least 64
  columns), each block sorted while in cache; on an accelerator the columns are one piece
  (`_blocks.over_column_blocks`). The compiled program stays small whatever n, and the run costs
  a few passes over a cached block per layer, where `jnp.sort` along the worker axis is one to
  two orders of magnitude slower on XLA:CPU. At d = 10⁵ on a 2-core Zen 4 VM (ns per worker ·
  coordinate): 2.5-2.6 at n = 52, 4.5-6.2 at n = 200 … 1,024, 6.1 at n = 131 (padded to 256);
  Batcher's odd–even merge network run by row gathers, which it replaced, took 4.5, 7.7-8.1 and
  5.3 (BENCHMARKS.md).
  """
  n = x.shape[0]
  m = _power_of_two_above(n)
  pos = jnp.asarray(np.asarray(positions, dtype=np.int32))

  def sort_block(b):
    b = nan_as_inf(b)
    if m > n:
      b = jnp.concatenate([b, jnp.full((m - n, b.shape[1]), jnp.inf, b.dtype)])
    return jnp.take(_bitonic_sort(b), pos, axis=0), ()

  cols = chunk if chunk is not None else max(64, _LAYERED_BLOCK_ENTRIES // m)
  out, _ = over_column_blocks(sort_block, [x], cols, out_rows=len(positions), dtype=x.dtype)
  return [out[k] for k in range(len(positions))]


# Above `NETWORK_MAX_N`, up to this many ranks are found by bisection (`select_bisect`), more by
# sorting the columns (`select_layered`). Measured on CPU at n = 129 … 2,048 (BENCHMARKS.md):
# bisection costs about 1.0-2.2 ns per worker · coordinate and rank, the layered network 4.5-6.2 ns
# at n = 200 … 1,024 (6.1 at 131, padded to 256) for any number of ranks.
BISECT_MAX_RANKS = 3

# `select_bisect`'s blocks: about `_BISECT_BLOCK_ENTRIES` keys (rounded to a power of two of
# columns, from 256 to 2,048), and rows per group whose counts are summed in uint8 before the
# groups are added. Chosen from sweeps (n = 129 … 2,048, 256-4,096 columns, 8-32 rows;
# BENCHMARKS.md): a pass over a block has a fixed cost of about a microsecond, which narrower
# blocks of few rows did not amortise (n = 129: 2.7 ns per worker · coordinate with 256 columns,
# 1.0 with 2,048); other group layouts let XLA:CPU fuse the two levels of the count into one
# unvectorised loop (10-30x slower).
_BISECT_BLOCK_ENTRIES = 1 << 19
_BISECT_GROUP_ROWS = 16


def _bisect_block_columns(n: int) -> int:
  """Columns per block of `select_bisect` for n rows: about `_BISECT_BLOCK_ENTRIES` keys."""
  rows = -(-n // _BISECT_GROUP_ROWS) * _BISECT_GROUP_ROWS
  return int(np.clip(2 ** round(np.log2(_BISECT_BLOCK_ENTRIES / rows)), 256, 2048))


# A rank right after another wanted one is read from it in one pass (`_next_rank`), up to this
# many in a row: longer chains of such passes were fused into recomputing each other (22 in a
# row took 1 s at n = 52, d = 10⁵, against 15 ms for one bisected rank; BENCHMARKS.md).
_MAX_DERIVED = 2


def select_large(
  x: jax.Array, positions: Sequence[int], *, then=None
) -> list[jax.Array] | jax.Array:
  """Order statistics along axis 0 of an (n, D) matrix for any n, NaN counted as +inf: by
  bisection for up to `BISECT_MAX_RANKS` ranks, else by the layered network (`select_layered`).
  With `then`, ``then(x, stats)``'s row instead (see `select_bisect`)."""
  if len(positions) <= BISECT_MAX_RANKS:
    return select_bisect(x, positions, then=then)
  stats = select_layered(x, positions)
  return stats if then is None else then(x, jnp.stack(stats))


def nan_as_inf(x: jax.Array) -> jax.Array:
  """x with NaN replaced by +inf: the order in which every selection here counts NaN."""
  return jnp.where(jnp.isnan(x), jnp.inf, x)


def order_statistics(x: jax.Array, positions: Sequence[int], *, symmetric: bool = False):
  """Order statistics along axis 0 of an (n, D) matrix, NaN counted as +inf, by the fastest path.

  Up to `network_max_n` rows one unrolled selection network (`select`) over the rows, each row's
  NaN mapping fused into the network's loop; beyond, `select_large`. `symmetric` as in `select`.
  Returns a list with the (D,) order statistic of each position, in the order of `positions`.
  """
  if x.shape[0] <= network_max_n(len(positions), symmetric):
    # Each row sliced once: a second slice per row (x[i] in both arguments of `where`) pushed
    # MeaMed's fused network at 96-128 rows past what XLA:CPU vectorised on an Intel Xeon (20-53 ns
    # per entry against 1-1.7; BENCHMARKS.md).
    rows = [nan_as_inf(x[i]) for i in range(x.shape[0])]
    return select(rows, positions, symmetric=symmetric)
  return select_large(x, positions)


def _flip_negatives(k: jax.Array) -> jax.Array:
  """Reverses the order of the negative integers' low bits: the map between a float's bits and
  an integer key in the floats' order (−0 just below +0); its own inverse."""
  return k ^ ((k >> (8 * k.dtype.itemsize - 1)) & jnp.iinfo(k.dtype).max)


def _key_dtype(dtype) -> jnp.dtype:
  """The signed integer type of a float type's width: its order keys' type."""
  return jnp.dtype(f'int{8 * jnp.dtype(dtype).itemsize}')


def _order_keys(x: jax.Array) -> jax.Array:
  """Signed integers of the floats' width, in the floats' order."""
  return _flip_negatives(jax.lax.bitcast_convert_type(x, _key_dtype(x.dtype)))


def _from_order_keys(k: jax.Array, dtype) -> jax.Array:
  return jax.lax.bitcast_convert_type(_flip_negatives(k), dtype)


def _halving_reduce(p: jax.Array, axis: int, op=jnp.add, *, levels: int | None = None) -> jax.Array:
  """The reduction by `op` (a sum by default) over `axis` as a tree of slice operations (XLA:CPU
  keeps each level vectorised; a `jnp.sum` or `jnp.min` there was fused with the level before
  into a strided loop). With `levels`, only that many levels: `axis` is kept, ⌈size / 2^levels⌉
  long."""
  done = 0
  while p.shape[axis] > 1 and (levels is None or done < levels):
    half = p.shape[axis] // 2
    pairs = op(
      jax.lax.slice_in_dim(p, 0, half, axis=axis),
      jax.lax.slice_in_dim(p, half, 2 * half, axis=axis),
    )
    rest = jax.lax.slice_in_dim(p, 2 * half, p.shape[axis], axis=axis)
    p = jnp.concatenate([pairs, rest], axis) if rest.shape[axis] else pairs
    done += 1
  return p if levels is not None else jax.lax.index_in_dim(p, 0, axis, keepdims=False)


def select_bisect(x: jax.Array, positions: Sequence[int], *, then=None) -> list[jax.Array]:
  """Order statistics along axis 0 of an (n, D) float matrix, for a few ranks and any n: the
  value's bits bisected.

  Each float maps to an integer key of its width in the same order (`_order_keys`). The q-th
  smallest value of a column is the smallest key t with #{i : key_i <= t} >= q + 1; a bisection
  over the keys' whole range finds it in exactly as many counting passes as the key has bits
  (32 for float32), whatever the data, so an input cannot make it slower. Exact (the selected
  value is an input bit for bit), with ties and ±inf; NaN counts as +inf (mapped block by
  block, so that no cleaned copy of the stack is written).

  The bits are found a byte at a time, from the top. For each byte, one pass maps every key to
  a byte: its place in the interval of keys that share the bytes found so far (0 below the
  interval, 255 above it), and 8 counting passes bisect that byte over the bytes, which a CPU
  compares and counts four times as many per instruction as the keys. On CPU the passes run over
  blocks of about 2^19 keys kept in cache (`_blocks.over_column_blocks`); a pass compares every
  entry with each rank's midpoint and counts in uint8 over groups of `_BISECT_GROUP_ROWS` rows
  (rows padded with the largest key) and pairs of groups, then adds the groups' counts. All
  ranks share the passes; a rank right after another wanted one (the median's two middle ranks)
  is not bisected but read from the one before it in one more pass.

  Cost: about 0.8-1.0 ns per worker · coordinate for one rank on a Zen 5 core (n = 256 … 2,048;
  1.0-1.3 at n = 129), against 4-13 ns for the layered network whatever the ranks
  (BENCHMARKS.md).

  Args:
    x: (n, D), floating point.
    positions: the 0-based ranks wanted (0 is the smallest).
    then: optional ``then(block, stats) -> row``: a further computation on each column block
      while it is in cache, from the block (n, c) and its order statistics (one row per
      position), giving one value per column (the trimmed mean's clipped sum, without a second
      pass over x).

  Returns:
    A list with the order statistic of each position, or with `then`, its (D,) row.
  """
  n = x.shape[0]
  positions = [int(p) for p in positions]
  if not all(0 <= p < n for p in positions):
    raise ValueError(f'select_bisect: positions {positions} out of range for n={n}')

  return _stats_by_block(
    lambda xb: bisect_columns(xb, positions), x, len(positions), _bisect_block_columns(n), then
  )


def _stats_by_block(stats_of, x: jax.Array, count: int, cols: int, then):
  """`stats_of(block)`'s (count, c) order statistics over the column blocks of x (n, D) of `cols`
  columns (`over_column_blocks`): a list of the count (D,) rows, or with `then`, the (D,) row of
  ``then(block, stats)``, computed while the block is in cache."""

  def block(xb):
    stats = stats_of(xb)
    return (stats if then is None else then(xb, stats)[None]), ()

  out_rows = count if then is None else 1
  out, _ = over_column_blocks(block, [x], cols, out_rows=out_rows, dtype=x.dtype)
  return [out[k] for k in range(out_rows)] if then is None else out[0]


def bisect_columns(x: jax.Array, positions: Sequence[int]) -> jax.Array:
  """`select_bisect`'s kernel on one block: the (len(positions), c) order statistics of the
  columns of x (n, c), NaN as +inf, all columns at once (the caller keeps x in cache).

  Differentiable as the networks are: an order statistic's derivative is the selected entry's
  (the first row holding the value, for ties), so gradients through the rules beyond
  `NETWORK_MAX_N` are those of the unrolled networks."""
  return _bisect_columns(x, tuple(int(p) for p in positions))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _bisect_columns(x: jax.Array, positions: tuple) -> jax.Array:
  keys_dtype = _key_dtype(x.dtype)
  # The ranks bisected: all but those read from the rank before (`_MAX_DERIVED`).
  heads, run = [], 0
  for p in sorted(set(positions)):
    run = run + 1 if p - 1 in positions and run < _MAX_DERIVED else 0
    if not run:
      heads.append(p)
  heads = tuple(heads)
  need = jnp.asarray(np.asarray(heads) + 1, jnp.int32)[:, None]
  keys = _grouped_keys(x)

  # The key's bytes from the top: each stage narrows the keys to one byte, their place in the
  # interval of keys that share the bytes found so far (0 below it, 255 above it), and bisects
  # that byte in 8 counting passes over the bytes (4x the lanes of a pass over the keys).
  prefix = None  # (heads, c): the bytes found so far, the lower ones zero
  for shift in range(8 * keys_dtype.itemsize - 8, -1, -8):
    if prefix is None:  # the top byte, shared by all ranks
      digits = ((keys >> shift) + 128).astype(jnp.uint8)[None]
    else:
      low = prefix[:, None, None, :]
      span = (1 << (shift + 8)) - 1
      digits = ((jnp.clip(keys[None], low, low + span) - low) >> shift).astype(jnp.uint8)
    digit = _bisect_byte(digits, need).astype(keys_dtype)
    prefix = (digit - 128) << shift if prefix is None else prefix + (digit << shift)
  found = dict(zip(heads, prefix))
  for p in sorted(set(positions)):
    if p not in found:
      found[p] = _next_rank(keys, found[p - 1], p)
  return _from_order_keys(jnp.stack([found[p] for p in positions]), x.dtype)


def _grouped(x: jax.Array, fill) -> jax.Array:
  """x (n, c) as (groups, `_BISECT_GROUP_ROWS`, c), the last group padded with `fill`."""
  n, c = x.shape
  rows = _BISECT_GROUP_ROWS
  groups = -(-n // rows)
  if groups * rows > n:
    x = jnp.concatenate([x, jnp.full((groups * rows - n, c), fill, x.dtype)])
  return x.reshape(groups, rows, c)


def _grouped_keys(x: jax.Array) -> jax.Array:
  """The order keys of x (n, c), NaN as +inf, grouped (`_grouped`), padded with the largest
  key."""
  keys = _order_keys(nan_as_inf(x))
  return _grouped(keys, jnp.iinfo(keys.dtype).max)


def count_below(x: jax.Array, values: jax.Array, strict: Sequence[bool]) -> jax.Array:
  """(r, c) int32 counts per column of x (n, c): #{i : x_i < v} where `strict`, else
  #{i : x_i <= v}, for each row v of the (r, c) `values`: one pass over x, counted in uint8 per
  group of rows as `select_bisect`'s passes are. NaN in x is never counted."""
  x = _grouped(x, jnp.nan)
  hits = [x < v if s else x <= v for v, s in zip(values, strict)]
  return _count_rows(jnp.stack(hits))


def _bisect_byte(digits: jax.Array, need: jax.Array) -> jax.Array:
  """The smallest byte t per column and rank with #{i : digit_i <= t} >= need: 8 halvings of
  [0, 255] over the (1 or r, groups, rows, c) uint8 digits, for the (r, 1) counts `need`."""

  def halve(_, bounds):  # the byte lies in [low, high]
    low, high = bounds
    mid = (low >> 1) + (high >> 1) + (low & high & 1)  # ⌊(low + high) / 2⌋, no overflow
    enough = _count_at_or_below(digits, mid) >= need
    return jnp.where(enough, low, mid + 1), jnp.where(enough, mid, high)

  # The carry starts from the digits (inside `jax.shard_map` a carry of constants would not vary
  # over the devices), and every halving runs in the loop: a first one outside it, fused with the
  # keys' computation, took as long as the other 31 at n = 129 (int32 keys; BENCHMARKS.md).
  zero = jnp.zeros_like(digits[0, 0, :1])
  shape = (need.shape[0], digits.shape[-1])
  start = (jnp.broadcast_to(zero, shape), jnp.broadcast_to(zero + 255, shape))
  return jax.lax.fori_loop(0, 8, halve, start)[1]


def _count_at_or_below(keys: jax.Array, thresholds: jax.Array) -> jax.Array:
  """(r, c) int32 counts #{i : key_i <= t} per column of the (1 or r, groups, rows, c) keys, for
  r thresholds (r, c)."""
  return _count_rows(keys <= thresholds[:, None, None, :])


def _count_rows(hits: jax.Array) -> jax.Array:
  """(r, c) int32 counts of the True entries of (r, groups, rows, c) `hits` over its groups and
  rows: uint8 sums over each group's rows, and over pairs of groups while they fit (XLA:CPU then
  keeps the sums in uint8 lanes), then int32 sums."""
  part = jnp.sum(hits.astype(jnp.uint8), axis=2, dtype=jnp.uint8)
  part = _halving_reduce(part, 1, levels=int(np.log2(255 // hits.shape[2])))
  return _halving_reduce(part.astype(jnp.int32), 1)


def _next_rank(keys: jax.Array, key: jax.Array, position: int) -> jax.Array:
  """From the key of rank `position` − 1, that of rank `position`: the same key where at least
  position + 1 keys lie at or below it (ties), else the smallest key above it. One pass over the
  (groups, rows, c) keys."""
  count = _count_at_or_below(keys[None], key[None])[0]
  flat = keys.reshape(-1, keys.shape[-1])
  above = _halving_reduce(jnp.where(flat > key, flat, jnp.iinfo(keys.dtype).max), 0, jnp.minimum)
  return jnp.where(count >= position + 1, key, above)


@_bisect_columns.defjvp
def _bisect_columns_jvp(positions, primals, tangents):
  (x,), (dx,) = primals, tangents
  out = _bisect_columns(x, positions)
  held = nan_as_inf(x)[None] == out[:, None, :]
  return out, jnp.take_along_axis(dx, jnp.argmax(held, axis=1), axis=0)


# `select_extremes` serves ranks up to this many places from either end above `NETWORK_MAX_N`:
# its cost grows with the rank (4 (k + 1) min / max per entry), bisection's (`select_bisect`,
# two ranks) does not. Measured in the trimmed mean at n = 129 … 2,048, d = 4,810 and 9,620
# (BENCHMARKS.md): since bisection takes a byte at a time, the chains were faster at k = 1 and 2
# (by up to 2x at n <= 520), slower from k = 3 or 4 on. Over column blocks in cache they are
# faster at k = 3 too (1.1-1.9x at n = 129 … 2,048, d = 4,810 and 10⁵), 0.9-1.35x at k = 4.
EXTREMES_MAX_RANK = 3

# Rows inserted per loop step. An unrolled chain over all rows ran at the speed of the fused
# networks up to about 224 rows, then XLA:CPU split it into fusions that recompute each other;
# steps of 16 or 32 rows were fastest, steps of 8 rows about 11x slower (BENCHMARKS.md).
_EXTREMES_ROWS_PER_STEP = 16

# Columns per block of `select_extremes` on CPU: the chains' 2 (k + 1) carried rows (184 KB at
# k = 2) stay in cache while the block's rows stream past, and `then` reads the block from cache.
# Over whole columns of 10⁵ the carry went to memory at every step and the clipped sum was a second
# pass: the trimmed mean at f = 2 took 1.8-2.0 ns per worker · coordinate in a jit at n = 256 and
# 1,024, against 0.75-1.0 with blocks of 7,680. Of the widths swept (1,024 to 32,768 columns, n =
# 256 to 2,048, d = 3e4 to 5e5), 7,680 was the fastest (8,064 as fast at n = 256 only); the
# others took up to 1.6x as long (BENCHMARKS.md).
_EXTREMES_BLOCK_COLUMNS = 7680


def select_extremes(x: jax.Array, k: int, *, then=None) -> tuple[jax.Array, jax.Array] | jax.Array:
  """The k-th smallest and the k-th largest value (0-based) of each column of x (n, D), for a
  small k and any n, NaN counted as +inf: what a trimmed mean needs beyond `NETWORK_MAX_N`
  workers.

  Two insertion chains stream over the rows: the k + 1 smallest values seen so far, kept sorted
  (a new value moves down the list with one `compare_exchange` per place), and the
  k + 1 largest. Exact, with ties, branch-free and vectorised over the columns; 2 (k + 1)
  compare-exchanges per entry, against the layered network's depth / 2 × (four gathers and three
  comparisons).
  A `fori_loop` inserts `_EXTREMES_ROWS_PER_STEP` rows per step, unrolled (one fused loop over
  the columns per step); the last step starts at n − 16 and skips the rows it repeats (as ±inf).
  On CPU the chains run over blocks of `_EXTREMES_BLOCK_COLUMNS` columns (`over_column_blocks`),
  NaN mapped block by block.

  Args:
    x: (n, D), floating point.
    k: the rank from either end.
    then: optional ``then(block, stats) -> row``, as in `select_bisect`: a further computation
      on each column block while it is in cache, from the block (n, c) and its two order
      statistics (2, c), giving one value per column.

  Returns:
    `(low, high)`, or with `then`, its (D,) row.
  """
  n = x.shape[0]
  if not 0 <= k < n:
    raise ValueError(f'select_extremes: rank {k} out of range for n={n}')

  def chains(xb):
    return jnp.stack(_insertion_chains(nan_as_inf(xb), k))

  out = _stats_by_block(chains, x, 2, _EXTREMES_BLOCK_COLUMNS, then)
  return tuple(out) if then is None else out


def _insertion_chains(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`select_extremes`' chains over the whole of a NaN-free x (n, c)."""
  n, d = x.shape
  m = k + 1
  rows = min(_EXTREMES_ROWS_PER_STEP, n)
  steps = -(-n // rows)
  inf = jnp.asarray(jnp.inf, x.dtype)

  def step(i, carry):
    low, high = list(carry[0]), list(carry[1])
    start = jnp.minimum(i * rows, n - rows)
    block = jax.lax.dynamic_slice_in_dim(x, start, rows, 0)
    for r in range(rows):
      fresh = start + r >= i * rows  # not inserted by an earlier step
      a = jnp.where(fresh, block[r], inf)
      b = jnp.where(fresh, block[r], -inf)
      for j in range(m):
        low[j], a = compare_exchange(low[j], a)
        b, high[j] = compare_exchange(high[j], b)
    return low, high

  # The first step outside the loop gives the carry the stack's type (also when the stack is a
  # per-device slice inside `jax.shard_map`, where a carry of constants would not vary).
  carry = step(0, ([jnp.full((d,), inf)] * m, [jnp.full((d,), -inf)] * m))
  low, high = jax.lax.fori_loop(1, steps, step, carry)
  return low[k], high[k]


# Columns per block of `select_ends` on CPU (52 rows: 1.7 MB of the block kept in cache while the
# passes run over it). At n = 52, d = 10⁵, k = 13 blocks of 1,024 / 2,048 / 4,096 / 8,192 columns
# took 27.5 / 20.1 / 20.2 / 18.7 ms (medians of 9, 512-bit vectors; BENCHMARKS.md).
_ENDS_BLOCK_COLUMNS = 8192


# `select_ends`, with a pruned network for each of a few more ranks, against sorting the columns
# (`select_layered`), in MeaMed's attack evaluation (the optimal attacks' search, n = n_h + f,
# d = 10⁵, a 2-core Zen 4 VM; alternated, ALIE / IPM ms, sorted against peeled): n_h = 20, k = 5:
# 9.3-23.3 / 8.8-9.7 against 7.6-9.0 / 7.1-7.6; 40, 5: 17.8-21.2 / 16.5 against 13.9-15.5 /
# 12.9-22.1; 60, 5: 19.9-20.8 / 17.6-18.0 against 24.2-34.5 / 20.8-22.2; 52, 13: 24.8-26.4 /
# 23.2-24.6 against 33.6-35.3 / 29.2-29.9; 16, 9: 7.8-8.5 / 7.6-7.7 against 9.9-12.3 /
# 8.9-18.5; 32, 5 alike (BENCHMARKS.md). A pass peeling both ends (or one pruned network) over n
# rows costs about this many of the sort's layers over as many rows: the sort's rows are padded to
# a power of two, which is what the ends save at 20 and 40 rows.
_ENDS_PASS_IN_LAYERS = 2.5


def ends_pay(n: int, k: int, others: int = 0) -> bool:
  """Whether `select_ends(x, k)` on n rows, with a pruned network for each of `others` more
  ranks, costs less than sorting the columns (`select_layered`: log₂ m (log₂ m + 1) / 2 layers
  over the rows padded to m, a power of two)."""
  m = _power_of_two_above(n)
  log_m = m.bit_length() - 1
  layers = log_m * (log_m + 1) // 2
  return n <= NETWORK_MAX_N and _ENDS_PASS_IN_LAYERS * n * (k + others) < m * layers


def _pairwise(op, rows: list) -> jax.Array:
  """op over the rows as a balanced tree of elementwise ops (one fused loop over the columns; a
  `_halving_reduce` of the block, with its concatenations, took 6x as long in `select_ends`)."""
  while len(rows) > 1:
    rows = [op(*rows[i : i + 2]) if i + 1 < len(rows) else rows[i] for i in range(0, len(rows), 2)]
  return rows[0]


def select_ends(x: jax.Array, k: int) -> tuple[list[jax.Array], list[jax.Array]]:
  """The k smallest and the k largest values of each column of x (n, D) in order, NaN counted as
  +inf: ranks 0 … k − 1 and n − k … n − 1, for a small k (`ends_pay`).

  Peeled one rank per pass from each end. From the value v of rank p − 1, that of rank p is v
  again if #{x_i <= v} >= p + 1 (ties), else min{x_i : x_i > v}; the high end likewise, both
  ends in the same pass. The passes are the steps of a `fori_loop` (unrolled, XLA:CPU fuses a
  chain of them into loops that recompute each other; BENCHMARKS.md), on CPU over blocks of
  `_ENDS_BLOCK_COLUMNS` columns in cache: k passes of, per entry and end, one comparison (its
  mask both counts and selects), a selection, a minimum or maximum and an addition, against a
  sort of the columns (`select_layered`) for all n ranks. Exact, with ties and ±inf.

  At n = 52, d = 10⁵, k = 13 it took 15-19 ms with 512-bit vectors (as in the attacks' jit), the
  columns sorted 13.6-20.3 ms (BENCHMARKS.md). Insertion chains that find two to
  seven ranks per pass took 39-450 ms: XLA:CPU computes each output of a chain from its own cone.

  Returns:
    `(low, high)`: lists of k (D,) rows, low[j] the j-th smallest, high[j] the (k − j)-th largest
    (both ascending, as in the sorted column).
  """
  n = x.shape[0]
  if not 1 <= k <= n:
    raise ValueError(f'select_ends: k={k} out of range for n={n}')

  def ends(xb):
    xb = nan_as_inf(xb)
    inf = jnp.asarray(jnp.inf, xb.dtype)

    def peel(p, carry):
      out, low, high, b = carry
      rows = [b[i] for i in range(n)]
      # One comparison per entry and end: its mask both counts and selects.
      over, under = [r > low for r in rows], [r < high for r in rows]
      beyond_low = _pairwise(jnp.add, [m.astype(jnp.int32) for m in over])
      beyond_high = _pairwise(jnp.add, [m.astype(jnp.int32) for m in under])
      above = _pairwise(jnp.minimum, [jnp.where(m, r, inf) for m, r in zip(over, rows)])
      below = _pairwise(jnp.maximum, [jnp.where(m, r, -inf) for m, r in zip(under, rows)])
      low = jnp.where(n - beyond_low >= p + 1, low, above)
      high = jnp.where(n - beyond_high >= p + 1, high, below)
      out = jax.lax.dynamic_update_index_in_dim(out, low, p, 0)
      out = jax.lax.dynamic_update_index_in_dim(out, high, 2 * k - 1 - p, 0)
      return out, low, high, b

    # The block rides in the carry so that each pass reads it where the loop keeps it.
    low = _pairwise(jnp.minimum, list(xb))
    high = _pairwise(jnp.maximum, list(xb))
    out = jnp.zeros((2 * k, xb.shape[1]), xb.dtype).at[0].set(low).at[2 * k - 1].set(high)
    return jax.lax.fori_loop(1, k, peel, (out, low, high, xb))[0]

  out = _stats_by_block(ends, x, 2 * k, _ENDS_BLOCK_COLUMNS, None)
  return out[:k], out[k:]


def select_each(x: jax.Array, positions: Sequence, *, nan_last: bool = False) -> list[jax.Array]:
  """Order statistics along axis 0 of an (n, D) matrix (n <= `NETWORK_MAX_N`), each from its own
  network pruned for that one rank: for a few ranks wanted as separate arrays. An entry of
  `positions` that is itself a sequence of ranks gives the sum of those order statistics (one
  network pruned for their sum).

  XLA:CPU fuses networks over the same rows whose outputs are written separately into one
  multi-output loop that recomputes each output's cone: two ranks of 52 rows × 100,000 took 3.5 s
  that way, against 2 ms for one. Here each network is its own computation (a branch of a
  `lax.switch` inside a `lax.scan` over the positions): 4 / 8 / 12 / 16 ranks took 3.1 / 6.2 /
  8.5 / 13.5 ms on both cores (another day 3.8 / 8.8 / 12.0 / 16.7, against 12.6 ms to sort the
  columns with `select_layered`; BENCHMARKS.md). With `nan_last`,
  NaN sorts as +∞ (mapped inside each network: a separate mapped copy of x was fused with the
  caller's other passes over x, into a loop that cost more than the four networks).
  """
  n = x.shape[0]
  positions = [tuple(int(q) for q in p) if isinstance(p, Sequence) else int(p) for p in positions]
  flat = [q for p in positions for q in (p if isinstance(p, tuple) else (p,))]
  if n > NETWORK_MAX_N or not all(0 <= q < n for q in flat):
    raise ValueError(f'select_each: positions {positions} for n={n} (at most {NETWORK_MAX_N})')

  def rows(x):
    return [jnp.where(jnp.isnan(r), jnp.inf, r) if nan_last else r for r in x]

  def branch(p):
    if isinstance(p, tuple):
      return lambda x: functools.reduce(jnp.add, select(rows(x), p, symmetric=True))
    return lambda x: select(rows(x), [p])[0]

  branches = [branch(p) for p in positions]
  _, out = jax.lax.scan(
    lambda carry, i: (carry, jax.lax.switch(i, branches, x)), None, jnp.arange(len(positions))
  )
  return [out[k] for k in range(len(positions))]


def compare_exchange(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(min, max) of two NaN-free arrays, elementwise: one comparison and two selections.

  `jnp.minimum` / `jnp.maximum` are IEEE 754-2019 minimum / maximum (NaN propagated, −0 below
  +0), which LLVM lowers on x86 to a compare-and-blend sequence per op; a selection on `b < a` is
  one `vminps` / `vmaxps`. The networks over NaN-free rows (the rules map NaN to +inf first) ran
  0.73-0.77x the time with 512-bit vectors and 0.50-0.57x with XLA:CPU's default 256 (one fused
  network, 52 and 128 rows × 100,000, one core; BENCHMARKS.md). The pair is the inputs swapped
  or not, so a −0 and a +0 keep their signs, and ties keep their places (a's derivative goes to
  the minimum). XLA:CPU flushes subnormal numbers to zero: they compare equal to 0 and to each
  other here, so may keep places a sort would swap (`jnp.minimum` returned them as 0); either
  way an output is off by less than the smallest normal number.
  """
  swap = b < a
  return jnp.where(swap, b, a), jnp.where(swap, a, b)


def clamp(x: jax.Array, lo: jax.Array | None = None, hi: jax.Array | None = None) -> jax.Array:
  """min(max(x, lo), hi) of NaN-free arrays (`jnp.clip`'s value), None for an open side: by
  comparisons and selections, as `compare_exchange` (one `vmaxps` / `vminps` each on x86)."""
  x = x if lo is None else jnp.where(x < lo, lo, x)
  return x if hi is None else jnp.where(hi < x, hi, x)


def clamp_nan_last(x: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """min(max(x, lo), hi) with NaN in x counted as +inf (lo <= hi, both NaN-free): one
  expression in lo and hi, with no NaN-mapped copy of x apart. Inside a loop over lo and hi (the
  optimal attacks' candidates) XLA hoisted such a copy out of the loop and wrote it out, row by
  row: 6.5 ms of a 23 ms search at 52 × 100,000 on a Zen 4 VM."""
  return jnp.where(x < lo, lo, jnp.where(x <= hi, x, hi))


# The most HLO ops of a network emitted with `compare_exchange` (one comparison and a selection
# per output read later) in XLA:CPU's default fusion emitter; a larger one is emitted with
# `jnp.minimum` / `jnp.maximum` (one op per output read later), which keeps networks of up to
# `NETWORK_MAX_N` rows under the emitter's limit on a vectorised loop. Measured in the rules at
# 100,000 coordinates, ns per worker · coordinate in a jit (BENCHMARKS.md): networks for ranks
# (the trimmed mean, MeaMed) ran vectorised with selections up to 2,656-2,779 ops (0.42-0.65 ns)
# and not from 2,759-2,799 on (2.0-4.3 ns: the trimmed mean at f = 1, 2 from 114 rows, MeaMed
# from 98-104 rows); the median's network for the sum of its two middle ranks stayed vectorised
# up to 2,986 ops (0.47 ns at 112 rows). With min / max the same networks took 0.7-1.3 ns in a
# jit and 0.4-0.5 called alone. Under the legacy emitter (`wide_networks`) selections are used at
# any size.
SELECTION_NETWORK_MAX_OPS = 2700
SYMMETRIC_SELECTION_NETWORK_MAX_OPS = 3000


def selection_ops(n: int, comps, outputs: Sequence[int]) -> int:
  """The HLO ops of `comps` over n wires emitted with `compare_exchange`, counting only the
  comparators and selections that the `outputs` wires depend on (XLA removes the others)."""
  live, ops = set(outputs), 0
  for i, j in reversed(comps):
    used = (i in live) + (j in live)
    live -= {i, j}
    if used:
      live |= {i, j}
      ops += 1 + used
  return ops


def apply_network(rows: Sequence[jax.Array], comps, *, selections: bool = True) -> list[jax.Array]:
  """Runs compare-exchanges over a list of equally shaped NaN-free arrays (one per wire): by
  `compare_exchange`, or with `selections=False` by `jnp.minimum` / `jnp.maximum` (fewer ops,
  slower on x86; see `SELECTION_NETWORK_MAX_OPS`)."""
  w = list(rows)
  for i, j in comps:
    if selections:
      w[i], w[j] = compare_exchange(w[i], w[j])
    else:
      w[i], w[j] = jnp.minimum(w[i], w[j]), jnp.maximum(w[i], w[j])
  return w


def select(rows: Sequence[jax.Array], positions: Sequence[int], *, symmetric: bool = False):
  """Order statistics of a list of n equally shaped arrays, elementwise.

  Args:
    rows: n arrays (the worker slices); must not contain NaN (map it to +inf first).
    positions: the 0-based ranks wanted (0 is the smallest).
    symmetric: the caller only uses the returned values through a symmetric function (e.g. their
      sum), which allows a smaller network.

  Returns:
    A list with the order statistic of each position, in the order of `positions`.
  """
  n = len(rows)
  positions = [int(p) for p in positions]
  if not all(0 <= p < n for p in positions):
    raise ValueError(f'select: positions {positions} out of range for n={n}')
  if n > network_max_n(len(positions), symmetric):
    return select_large(jnp.stack(rows), positions)
  labels = [None] * n
  for p in positions:
    labels[p] = 'wanted' if symmetric else ('rank', p)
  comps = pruned_network(n, tuple(labels))
  selections = _in_wide_networks() or (
    selection_ops(n, comps, positions)
    <= (SYMMETRIC_SELECTION_NETWORK_MAX_OPS if symmetric else SELECTION_NETWORK_MAX_OPS)
  )
  w = apply_network(rows, comps, selections=selections)
  return [w[p] for p in positions]
