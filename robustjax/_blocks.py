"""One pass over the column blocks of a few (rows, d) matrices, each block used while in cache.

On XLA:CPU a kernel that reads the stack several times (a Gram product, a combination followed
by the distances to it, a sorting network layer by layer) is run over blocks of columns in a
`lax.fori_loop`, so that each block comes from memory once: `over_column_blocks` for matrices of
one width whose blocks give columns and partial sums, `map_columns` for matrices of any widths
whose blocks give columns only (fn traced once for all), `fold_column_blocks` for a carry that
is not a sum (the scaled Gram's per-block scale). The callers choose the block width
(`stack._column_block`, `stack._gram_column_block`, `_sorting.select_layered`'s chunk,
`_sorting._bisect_block_columns`). On an accelerator the matrices are one piece whatever the
width: there each loop step is at least one kernel launch, and blocks × (the steps inside) small
launches in sequence cost more than the cache saves (on an H200 the layered sorting network over
blocks of 2,048 columns took 26-52 ms at n = 129-1,024, d = 1e5, against 0.4 ms for the unrolled
one at n = 128; BENCHMARKS.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def over_column_blocks(fn, mats, cols, *, out_rows=None, dtype=None):
  """fn(*blocks) -> `(columns, partial)` over the column blocks of `mats`, sliced alike.

  Args:
    fn: called on blocks (rows, c) of each mat; returns `(columns, partial)`: an
      (out_rows, c) array (None when `out_rows` is None) and a pytree of arrays.
    mats: matrices (rows, d) with the same d.
    cols: columns per block, or None for one piece (always one piece off CPU).
    out_rows, dtype: the rows and dtype of the concatenated columns; None: fn gives none.

  Returns:
    `(out, total)`: the (out_rows, d) columns concatenated (None without `out_rows`), and the
    partials summed.
  """
  d = mats[0].shape[1]
  if _one_piece(d, cols):
    return fn(*mats)

  def run(start, width):
    return fn(*[column_block(m, start, width) for m in mats])

  def write(out, columns, start):
    return None if out is None else jax.lax.dynamic_update_slice_in_dim(out, columns, start, 1)

  def first(start, width):
    columns, acc = run(start, width)
    out = None if out_rows is None else write(jnp.zeros((out_rows, d), dtype), columns, start)
    return out, acc

  def step(carry, start, width):
    out, acc = carry
    columns, part = run(start, width)
    return write(out, columns, start), jax.tree.map(jnp.add, acc, part)

  return fold_column_blocks(first, step, d, cols)


def _one_piece(d: int, cols: int | None) -> bool:
  """Whether width-d matrices are processed in one piece: no block width, narrower than one
  block, or off CPU."""
  return cols is None or d < cols or jax.default_backend() != 'cpu'


def column_block(m: jax.Array, start, width: int) -> jax.Array:
  """Columns start … start + width − 1 of m: a static slice for a Python int start, else a
  `dynamic_slice`."""
  if isinstance(start, int):
    return m[:, start : start + width]
  return jax.lax.dynamic_slice_in_dim(m, start, width, 1)


def fold_column_blocks(first, step, d, cols):
  """A carry folded over the column blocks of width-d matrices: `first(start, width)` gives it
  from the first block, `step(carry, start, width)` updates it with each later one.

  `start` is a Python int for the first block and the ragged last one, a traced integer for the
  full blocks in between (a `fori_loop`); `width` is always a Python int. With `cols` None or
  d < cols, or off CPU, one call `first(0, d)`. The callers slice their matrices themselves
  (`column_block`): a step may read other rows of the matrix than the block's.
  """
  if _one_piece(d, cols):
    return first(0, d)
  full = d // cols
  # The first block is taken outside the loop: inside `jax.shard_map` the carry must vary over
  # the devices as the blocks do, which a plain zeros array does not.
  carry = first(0, cols)
  carry = jax.lax.fori_loop(1, full, lambda i, c: step(c, i * cols, cols), carry)
  if d % cols:
    carry = step(carry, full * cols, d - full * cols)
  return carry


def map_columns(fn, mats, cols, dtype, *, out_rows=None):
  """fn (n, c) -> (c,) (or (out_rows, c)) over the columns of several matrices (n, d_j) of any
  widths, as one `fori_loop` over blocks of `cols` columns of all of them: the (d_j,) (or
  (out_rows, d_j)) results in `dtype`, one per matrix.

  fn is traced once: each step takes its block from the matrix it belongs to (`lax.switch`),
  where a loop per matrix would trace fn once per matrix and `over_column_blocks` traces the
  remainder apart. The matrices narrower than a block are concatenated, and padded with zero
  columns to one block, into one more matrix; a matrix's last block overlaps the one before it
  (the overlap is computed twice and written alike, so fn must act on each column alone). With
  `cols` None, or off CPU, one piece: the matrices concatenated and fn called once.
  """
  n = mats[0].shape[0]
  widths = [m.shape[1] for m in mats]
  lead = () if out_rows is None else (out_rows,)
  if cols is None or jax.default_backend() != 'cpu':
    whole = mats[0] if len(mats) == 1 else jnp.concatenate(mats, axis=1)
    return jnp.split(fn(whole).astype(dtype), np.cumsum(widths)[:-1], axis=-1)
  big = [j for j, d in enumerate(widths) if d >= cols]
  small = [j for j, d in enumerate(widths) if d < cols]
  blocked = [mats[j] for j in big]
  if small:
    pad = jnp.zeros((n, max(cols - sum(widths[j] for j in small), 0)), mats[0].dtype)
    blocked.append(jnp.concatenate([mats[j] for j in small] + [pad], axis=1))
  # The blocks in order: (matrix, its first column there, where its output goes).
  plan, offset = [], 0
  for j, m in enumerate(blocked):
    d = m.shape[1]
    firsts = [min(b * cols, d - cols) for b in range(-(-d // cols))]
    plan += [(j, c, offset + c) for c in firsts]
    offset += d
  which, first, dest = (jnp.asarray(np.asarray(v, np.int32)) for v in zip(*plan))
  branches = [lambda s, m=m: jax.lax.dynamic_slice_in_dim(m, s, cols, axis=1) for m in blocked]

  def step(i, out):
    block = jax.lax.switch(which[i], branches, first[i])
    return jax.lax.dynamic_update_slice_in_dim(out, fn(block).astype(dtype), dest[i], axis=-1)

  # The first step outside the loop (inside `jax.shard_map` the carry must vary as the blocks do).
  out = jax.lax.fori_loop(1, len(plan), step, step(0, jnp.zeros((*lead, offset), dtype)))
  parts = jnp.split(out, np.cumsum([m.shape[1] for m in blocked])[:-1], axis=-1)
  results = [None] * len(mats)
  for j, part in zip(big, parts):
    results[j] = part
  start = 0
  for j in small:
    results[j] = parts[-1][..., start : start + widths[j]]
    start += widths[j]
  return results
