"""Symmetric eigen-solvers that do not deadlock when several CPU devices run at once.

jaxlib's CPU LAPACK kernels split a *batch* of matrices over the CPU thread pool and block until
it is done (`ParallelBatchMap`). When the process has several CPU devices (`jax_num_cpu_devices`,
the engine's `shard_map` backend on a CPU) their programs run on that same pool; once every pool
thread runs a device program that waits in such a batch, the wait never ends. Measured on a
2-core VM with 2 CPU devices (BENCHMARKS.md): SMEA's exact search, and SMEA / CAF vmapped over
candidates (the optimal attacks), hung every run.

`eigh` and `eigvalsh` here are `jnp.linalg`'s, except that with several CPU devices a batch
(from `vmap`) is solved one matrix at a time in a `lax.map`: each call is then a single matrix,
which the kernel solves on the calling thread.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap


def _several_cpu_devices() -> bool:
  return jax.default_backend() == 'cpu' and jax.device_count() > 1


def _one_at_a_time(fn):
  """fn with a vmap rule that maps it over the batch sequentially."""
  wrapped = custom_vmap(fn)

  @wrapped.def_vmap
  def _rule(axis_size, in_batched, m):
    del axis_size
    (batched,) = in_batched
    out = jax.lax.map(wrapped, m) if batched else wrapped(m)
    return out, jax.tree.map(lambda _: batched, out)

  return wrapped


def _eigh_pair(m):
  w, v = jnp.linalg.eigh(m)
  return w, v


def _eigvalsh(m):
  return jnp.linalg.eigvalsh(m)


_eigh_sequential = _one_at_a_time(_eigh_pair)
_eigvalsh_sequential = _one_at_a_time(_eigvalsh)


def eigh(m: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(eigenvalues ascending, eigenvectors as columns) of the symmetric matrix m."""
  return _eigh_sequential(m) if _several_cpu_devices() else _eigh_pair(m)


def eigvalsh(m: jax.Array) -> jax.Array:
  """Eigenvalues, ascending, of the symmetric matrix m."""
  return _eigvalsh_sequential(m) if _several_cpu_devices() else _eigvalsh(m)
