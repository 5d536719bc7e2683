"""The jitted step on one device (vmap), on a mesh (`jax.shard_map`), and with `jax.pmap`.

All three backends run the same functions (`worker_updates`, `byzantine_stack`, `server_update`)
and give the same result to float tolerance (the per-worker keys are folded with the global worker
index, so every backend draws the same batches).

Sharded layout (``backend='shard_map'``):

* the worker momentums, and the worker computation, are sharded over the mesh axis ``'workers'``
  (`NamedSharding(mesh, P('workers'))`): each device vmaps `value_and_grad` over its n / k workers
  inside a `jax.shard_map`. The replicated parameters are marked varying with
  ``jax.lax.pcast(params, 'workers', to='varying')`` at the top of the body: without it, `jax.grad`
  of a replicated (unvarying) parameter transposes the implicit broadcast into a `psum`, silently
  *summing* the gradients of the workers of every device (honest and Byzantine mixed);
* the received stack is then all-gathered once (n · d floats: 40 MB for n = 1024 workers and a
  10k-parameter MLP). It has to be: the attack is omniscient (it reads the honest statistics) and
  the stack is small next to the per-worker gradient work, which is what the mesh parallelises;
* aggregation follows DESIGN.md's accelerator-parallel aggregation, for every pipeline: the
  flattened (n, D) stack is resharded to ``P(None, 'workers')`` (coordinates split over the
  devices) and the pipeline runs inside a `jax.shard_map` under
  `robustjax.stack.sharded_coordinates`, so each device works on its D / k coordinates:
  coordinate-wise rules need no communication (no sort along a sharded axis), and distance-based
  rules exchange only n × n partial Gram matrices (a `psum`), never the stack. Runtime state such
  as centered clipping's centre is flattened and sharded the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from robustjax import stack as stk
from robustjax.training import _engine as eng
from robustjax.training._parallel import AXIS

__all__ = ['BACKENDS', 'make_step', 'make_eval', 'sharded_worker_grads']

BACKENDS = ('vmap', 'shard_map', 'pmap')


def _finish(
  spec, problem, state, mom_new, losses, received, attack_state, key, k_agg, aggregate=None
):
  params, opt_state, agg_state, agg = eng.server_update(
    spec, problem, state, received, k_agg, aggregate=aggregate
  )
  metrics = eng.step_metrics(spec, losses, eng.honest_mean(spec, mom_new), agg)
  new = state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    momentum=mom_new,
    agg_state=agg_state,
    attack_state=attack_state,
    key=key,
  )
  return new, metrics


def _vmap_step(spec, problem):
  n = spec.num_workers

  @jax.jit
  def step(state, data):
    key, k_work, k_att, k_agg = eng.split_step_key(state)
    wids = jnp.arange(n, dtype=jnp.int32)
    mom_new, losses = eng.worker_updates(
      spec, problem, state.params, state.model_state, state.momentum, wids, k_work, data
    )
    received, att = eng.byzantine_stack(spec, mom_new, k_att, state.attack_state)
    return _finish(spec, problem, state, mom_new, losses, received, att, key, k_agg)

  return step


def _sharded_aggregate(spec, mesh):
  """``aggregate(received, key, runtime)`` with the coordinates sharded over the mesh."""
  k = mesh.shape[AXIS]
  by_coordinate = NamedSharding(mesh, P(None, AXIS))

  def to_columns(flat):
    pad = (-flat.shape[1]) % k
    if pad:
      flat = jnp.pad(flat, ((0, 0), (0, pad)))
    return jax.sharding.reshard(flat, by_coordinate)

  def aggregate(received, key, runtime):
    flat = stk.flatten(received)
    d = flat.shape[1]
    # Runtime trees (one slice, e.g. the centre) as (1, D) rows, sharded like the stack.
    rows = {
      name: to_columns(stk.flatten(jax.tree.map(lambda x: x[None], tree)))
      for name, tree in runtime.items()
    }

    def body(local, local_rows, key):
      with stk.sharded_coordinates(AXIS):
        return spec.pipeline(local, key=key, **{nm: r[0] for nm, r in local_rows.items()})

    out = jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(P(None, AXIS), P(None, AXIS), P()),
      out_specs=P(AXIS),
    )(to_columns(flat), rows, key)
    out = jax.sharding.reshard(out, NamedSharding(mesh, P()))[:d]
    return stk.unflatten(out, received)

  return aggregate


def sharded_worker_grads(spec, problem, mesh, *, pcast: bool = True):
  """The worker computation as a `jax.shard_map` over the mesh axis ``'workers'``.

  Returns ``fn(params, model_state, momentum, wids, key_data, data) -> (momentum, losses)`` with
  momentum / wids / outputs sharded ``P('workers')`` and the rest replicated. ``pcast=False``
  reproduces the trap described in the module docstring (for tests only).
  """

  def body(params, model_state, momentum, wids, key_data, data):
    if pcast:
      params = jax.lax.pcast(params, AXIS, to='varying')
    key = jax.random.wrap_key_data(key_data)
    return eng.worker_updates(spec, problem, params, model_state, momentum, wids, key, data)

  return jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(P(), P(), P(AXIS), P(AXIS), P(), P()),
    out_specs=(P(AXIS), P(AXIS)),
  )


def _shard_map_step(spec, problem, mesh):
  workers = sharded_worker_grads(spec, problem, mesh)
  rep = NamedSharding(mesh, P())
  aggregate = _sharded_aggregate(spec, mesh)

  @jax.jit
  def step(state, data, wids):
    key, k_work, k_att, k_agg = eng.split_step_key(state)
    mom_new, losses = workers(
      state.params, state.model_state, state.momentum, wids, jax.random.key_data(k_work), data
    )
    full = jax.sharding.reshard(mom_new, rep)
    losses = jax.sharding.reshard(losses, rep)
    received, att = eng.byzantine_stack(spec, full, k_att, state.attack_state)
    new, metrics = _finish(
      spec, problem, state, full, losses, received, att, key, k_agg, aggregate=aggregate
    )
    return new.replace(momentum=mom_new), metrics

  return step


def _pmap_step(spec, problem, num_devices):
  n, k = spec.num_workers, num_devices
  local = n // k

  def body(state, mom, wids, key, k_work, k_att, k_agg, data):
    params = jax.lax.pcast(state.params, AXIS, to='varying')
    mom_new, losses = eng.worker_updates(
      spec, problem, params, state.model_state, mom, wids, k_work, data
    )
    full = jax.lax.all_gather(mom_new, AXIS, tiled=True)
    losses = jax.lax.all_gather(losses, AXIS, tiled=True)
    received, att = eng.byzantine_stack(spec, full, k_att, state.attack_state)
    new, metrics = _finish(spec, problem, state, full, losses, received, att, key, k_agg)
    return new.replace(momentum=None), mom_new, metrics

  pbody = jax.pmap(
    body,
    axis_name=AXIS,
    in_axes=(None, 0, 0, None, None, None, None, None),
    devices=jax.local_devices()[:k],
  )

  def step(state, data):
    key, k_work, k_att, k_agg = eng.split_step_key(state)
    mom = jax.tree.map(lambda x: x.reshape((k, local) + x.shape[1:]), state.momentum)
    wids = jnp.arange(n, dtype=jnp.int32).reshape(k, local)
    new, mom_new, metrics = pbody(
      state.replace(momentum=None), mom, wids, key, k_work, k_att, k_agg, data
    )
    first = lambda t: jax.tree.map(lambda x: x[0], t)
    mom_new = jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), mom_new)
    return first(new).replace(momentum=mom_new), first(metrics)

  return step


def make_step(spec, problem, *, backend: str = 'vmap', mesh=None):
  """Builds the step for a backend.

  Args:
    spec: the `TrainSpec`.
    problem: the `Problem`.
    backend: ``'vmap'`` (one device), ``'shard_map'`` (the worker axis over `mesh`), ``'pmap'``
      (legacy, over the first ``mesh.size`` local devices of this host: single-host only; use
      ``'shard_map'`` across hosts).
    mesh: the ``('workers',)`` mesh for ``'shard_map'`` / ``'pmap'``.

  Returns:
    ``step(state, data) -> (state, metrics)`` for ``'vmap'`` and ``'pmap'``;
    ``step(state, data, wids) -> (state, metrics)`` for ``'shard_map'`` (wids: ``arange(n)``
    sharded ``P('workers')``).

  Raises:
    ValueError: for an unknown backend, or n not divisible by the number of devices.
  """
  if backend not in BACKENDS:
    raise ValueError(f'unknown backend {backend!r}; known backends: {", ".join(BACKENDS)}')
  if backend == 'vmap':
    return _vmap_step(spec, problem)
  k = mesh.shape[AXIS]
  if spec.num_workers % k:
    raise ValueError(
      f'backend {backend!r}: num_workers={spec.num_workers} must be a multiple of the number of '
      f'devices ({k}); choose n accordingly or set num_devices'
    )
  if backend == 'shard_map':
    return _shard_map_step(spec, problem, mesh)
  return _pmap_step(spec, problem, k)


def make_eval(spec, problem):
  """``evaluate(params, model_state, data) -> dict`` of scalars, jitted."""
  return jax.jit(lambda params, ms, data: eng.evaluate(spec, problem, params, ms, data))
