"""Devices, meshes, multi-host start-up, and aggregation with the coordinates sharded.

One code path serves one device, many devices and many hosts: the worker axis of every per-worker
array is laid out over a one-dimensional mesh axis named ``'workers'``; on one device that mesh has
one device and the sharded step degenerates to the plain vmapped one. Multi-host runs (TPU pod
slices, multi-node GPU) call `robustjax.distributed.initialize` first; after that `jax.devices()`
lists every host's devices and the same mesh code applies.

`sharded_update(pipeline, mesh)` is DESIGN.md's accelerator-parallel aggregation, for every rule:
the flattened (n, D) stack is resharded to ``P(None, 'workers')`` (coordinates split over the
devices) and the pipeline runs inside a `jax.shard_map` under
`robustjax.stack.sharded_coordinates`, so each device works on its D / k coordinates:
coordinate-wise rules need no communication (no sort along a sharded axis), and distance-based
rules exchange only n × n partial Gram matrices (a `psum`), never the stack. The rule's state (the
centre of centered clipping) is flattened and sharded the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from robustjax import stack as stk

__all__ = [
  'AXIS',
  'make_mesh',
  'put',
  'replicated',
  'worker_sharded',
  'sharded_update',
]

AXIS = 'workers'


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A one-axis mesh ``('workers',)`` over the first `num_devices` devices (all by default).

  The axis type is given explicitly (Explicit): per-worker arrays carry their sharding in their
  type, and the engine reshards by hand where the layout changes.
  """
  devices = jax.devices()
  k = len(devices) if num_devices is None else int(num_devices)
  if not 1 <= k <= len(devices):
    raise ValueError(f'make_mesh: asked for {k} devices; {len(devices)} available')
  return jax.make_mesh((k,), (AXIS,), axis_types=(AxisType.Explicit,), devices=devices[:k])


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def worker_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def put(tree, sharding):
  """Places host values (identical on every process) as global arrays with `sharding`.

  Uses `jax.make_array_from_callback`, which works on one process and on many (each process
  supplies its addressable shards from its own copy).
  """

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(one, tree)


def _is_slice_like(tree, stack) -> bool:
  """Whether `tree` has the structure and shapes of one slice of `stack`."""
  if jax.tree.structure(tree) != jax.tree.structure(stack):
    return False
  return all(
    jnp.shape(t) == jnp.shape(x)[1:] for t, x in zip(jax.tree.leaves(tree), jax.tree.leaves(stack))
  )


def sharded_update(pipeline, mesh):
  """``update(stack, state, key) -> (aggregate, state)`` of `pipeline` with the coordinates of the
  stack sharded over the mesh axis ``'workers'`` (see the module docstring).

  Same results as ``pipeline.update`` to float reassociation (tested for every registered rule).
  """
  k = mesh.shape[AXIS]
  by_coordinate = NamedSharding(mesh, P(None, AXIS))

  def to_columns(flat):
    pad = (-flat.shape[1]) % k
    if pad:
      flat = jnp.pad(flat, ((0, 0), (0, pad)))
    return jax.sharding.reshard(flat, by_coordinate)

  def as_row(tree):
    return stk.flatten(jax.tree.map(lambda x: x[None], tree))

  def update(stack, state, key=None):
    flat = stk.flatten(stack)
    d = flat.shape[1]
    # A centre (a tree like one slice) is sharded by coordinates as the stack; any other state
    # (adaptive MultiKrum's scalar estimate) is replicated: every device computes the same value.
    like_slice = {nm for nm, t in state.items() if _is_slice_like(t, stack)}
    rows = {nm: to_columns(as_row(state[nm])) for nm in like_slice}
    other = {nm: t for nm, t in state.items() if nm not in like_slice}

    def body(local, local_rows, other, key):
      with stk.sharded_coordinates(AXIS):
        out, new = pipeline.update(
          local, {**{nm: r[0] for nm, r in local_rows.items()}, **other}, key
        )
      return out, {nm: new[nm][None] for nm in local_rows}, {nm: new[nm] for nm in other}

    out, new_rows, new_other = jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(P(None, AXIS), P(None, AXIS), P(), P()),
      out_specs=(P(AXIS), P(None, AXIS), P()),
    )(to_columns(flat), rows, other, key)
    rep = NamedSharding(mesh, P())
    agg = stk.unflatten(jax.sharding.reshard(out, rep)[:d], stack)
    new = {
      nm: stk.unflatten(jax.sharding.reshard(v, rep)[0, :d], stack) for nm, v in new_rows.items()
    }
    return agg, {**new, **new_other}

  return update
