"""One pass over the column blocks of a few (rows, d) matrices, each block used while in cache.

On XLA:CPU a kernel that reads the stack several times (a Gram product, a combination followed
by the distances to it, a sorting network layer by layer) is run over blocks of columns in a
`lax.fori_loop`, so that each block comes from memory once. The callers choose the block width
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
  if cols is None or d < cols or jax.default_backend() != 'cpu':
    return fn(*mats)
  full = d // cols

  def write(out, columns, start):
    return None if out is None else jax.lax.dynamic_update_slice_in_dim(out, columns, start, 1)

  def body(i, carry):
    out, acc = carry
    columns, part = fn(*[jax.lax.dynamic_slice_in_dim(m, i * cols, cols, 1) for m in mats])
    return write(out, columns, i * cols), jax.tree.map(jnp.add, acc, part)

  # The first block is taken outside the loop: inside `jax.shard_map` the carry must vary over
  # the devices as the blocks do, which a plain zeros array does not.
  columns, acc = fn(*[m[:, :cols] for m in mats])
  out = None if out_rows is None else write(jnp.zeros((out_rows, d), dtype), columns, 0)
  out, acc = jax.lax.fori_loop(1, full, body, (out, acc))
  if d % cols:
    columns, part = fn(*[m[:, full * cols :] for m in mats])
    out = write(out, columns, full * cols)
    acc = jax.tree.map(jnp.add, acc, part)
  return out, acc
