"""Devices, meshes and multi-host start-up for the training engine.

One code path serves one device, many devices and many hosts: the worker axis of every per-worker
array is laid out over a one-dimensional mesh axis named ``'workers'``; on one device that mesh has
one device and the sharded step degenerates to the plain vmapped one. Multi-host runs (TPU pod
slices, multi-node GPU) call `jax.distributed.initialize` first; after that `jax.devices()` lists
every host's devices and the same mesh code applies.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
  'AXIS',
  'maybe_initialize_distributed',
  'make_mesh',
  'put',
  'replicated',
  'worker_sharded',
]

AXIS = 'workers'

_ENV = {
  'coordinator_address': 'JAX_COORDINATOR_ADDRESS',
  'num_processes': 'JAX_NUM_PROCESSES',
  'process_id': 'JAX_PROCESS_ID',
}


def maybe_initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Calls `jax.distributed.initialize` when a multi-process launch is requested.

  A launch is multi-process when any argument is given, or when one of the environment variables
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` is set (arguments win).
  Missing values are left to JAX's own cluster detection (TPU pods, SLURM). Must run before any
  other JAX call; calling it twice is harmless.

  Returns:
    Whether `jax.distributed.initialize` was called.
  """
  values = {
    'coordinator_address': coordinator_address,
    'num_processes': num_processes,
    'process_id': process_id,
  }
  for name, env in _ENV.items():
    if values[name] is None and os.environ.get(env):
      values[name] = os.environ[env]
  if all(v is None for v in values.values()):
    return False
  if values['num_processes'] is not None:
    values['num_processes'] = int(values['num_processes'])
  if values['process_id'] is not None:
    values['process_id'] = int(values['process_id'])
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(**{k: v for k, v in values.items() if v is not None})
  return True


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
