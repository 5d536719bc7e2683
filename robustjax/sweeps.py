"""Cartesian sweeps of training runs: grid expansion, stable run ids, resumable batched execution.

A *sweep* is a base training config (``experiments/configs/default.py`` fields) and a grid of
*axes*. Each axis is a name and a list of values; a value is either a plain value of the config
field of that name, or a dict of several fields set together (e.g. ``{'num_workers': 11,
'num_byzantine': 1}`` to keep the number of honest workers fixed). Two axis names are special:
``pre`` (pre-aggregators, ``''`` for none) is prepended to ``rule`` with a ``+``, so rules ×
pre-aggregators is a product of two axes. Every point of the product is one *run*.

Runs that differ only in *batchable* fields (`BATCHABLE`: the seed and the data split
parameters, which change the initial parameters, the RNG key and the workers' index arrays but
not the compiled step) form a *group*: the group runs as one compiled program, the jitted step
``jax.vmap``-ed over a batch of `TrainState`s and of per-member index arrays (padded to a common
length), inside a ``jax.lax.scan`` over the steps between two evaluations. When the backend is
sharded (``shard_map`` / ``pmap``), or a group would exceed `max_batch_bytes`, the members run one
after the other instead (the same numbers up to float reassociation; tested).

Results: one JSON file per run, ``<out>/runs/<run_id>.json``, written atomically (a temporary file
then `os.replace`), so a killed sweep leaves only whole files; rerunning the same command skips
every run whose file exists and runs the rest. The run id is a hash of the run's resolved training
config (fields that do not change the numbers, such as logging, are left out), so it is stable
across sessions and independent of the order of the grid.

Example:
  >>> from robustjax import sweeps
  >>> from ml_collections import config_dict
  >>> base = config_dict.ConfigDict({'rule': 'mean', 'attack': 'none', 'seed': 0})
  >>> runs = sweeps.expand(base, {'rule': ['mean', 'median'], 'seed': [0, 1]})
  >>> len(runs), runs[0].overrides
  (4, {'rule': 'mean', 'seed': 0})
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from robustjax.training._loop import PRESENTATION_FIELDS
from robustjax.training._setup import tree_bytes

__all__ = [
  'BATCHABLE',
  'IGNORED_FIELDS',
  'Run',
  'expand',
  'run_id',
  'group_runs',
  'atomic_write_json',
  'read_record',
  'current_run_ids',
  'load_results',
  'run_group',
  'run_sweep',
]

# Fields that only change the data partition, the initial parameters and the RNG key: runs that
# differ only in these share one compiled step (vmapped over them).
BATCHABLE = ('seed', 'split', 'alpha', 'gamma')
# Fields that do not change a run's numbers (left out of the run id): the training loop's
# presentation fields, except the evaluation interval (a sweep record holds the curve at those
# steps), and the device count (the same numbers on any mesh).
IGNORED_FIELDS = tuple(sorted((PRESENTATION_FIELDS - {'eval_every'}) | {'num_devices'}))


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of a sweep.

  Attributes:
    run_id: a stable hash of `config` (see `run_id`).
    overrides: the grid values of this run, axis name -> value (dict values flattened).
    config: the resolved training config, a plain dict.
  """

  run_id: str
  overrides: dict
  config: dict


def _plain(config) -> dict:
  if hasattr(config, 'to_dict'):
    return config.to_dict()
  return dict(config)


def run_id(config: Mapping[str, Any]) -> str:
  """A stable 12-hex-digit id of a resolved training config.

  The hash is over the sorted JSON of the config without `IGNORED_FIELDS` and without fields set
  to None, so the order of the grid, the order of the config's fields, logging options, and a
  field added to the config later with a None default (an ml_collections placeholder: "unset")
  do not change it. A new field with a non-None default does change every id (its value may
  change the numbers), and the sweep then reruns.
  """
  cfg = {k: v for k, v in _plain(config).items() if k not in IGNORED_FIELDS and v is not None}
  text = json.dumps(cfg, sort_keys=True, default=str, separators=(',', ':'))
  return hashlib.sha1(text.encode()).hexdigest()[:12]


def _apply(cfg: dict, axis: str, value) -> dict:
  if isinstance(value, Mapping):
    for k, v in value.items():
      if k not in cfg and k != 'pre':
        raise ValueError(f'sweep axis {axis!r}: unknown config field {k!r}')
      cfg[k] = v
  elif axis == 'pre' or axis in cfg:
    cfg[axis] = value
  else:
    raise ValueError(f'sweep: unknown axis {axis!r} (not a config field, not "pre")')
  return cfg


def expand(base, grid: Mapping[str, Sequence]) -> list[Run]:
  """The Cartesian product of the grid's axes applied to `base`.

  Args:
    base: the base training config (a ConfigDict or a dict).
    grid: axis name -> list of values (plain values, or dicts of fields set together). The
      ``pre`` axis (pre-aggregators, ``''`` for none) is joined to ``rule`` with ``+``.

  Returns:
    The runs, in the order of the product (the last axis varies fastest).

  Raises:
    ValueError: for an unknown axis / field, an empty axis, or two runs with the same id.
  """
  base = _plain(base)
  names = list(grid)
  for name in names:
    if len(grid[name]) == 0:
      raise ValueError(f'sweep: axis {name!r} has no values')
  runs, seen = [], {}
  for values in itertools.product(*(list(grid[n]) for n in names)):
    cfg = dict(base)
    overrides = {}
    for name, value in zip(names, values):
      _apply(cfg, name, value)
      if isinstance(value, Mapping):
        overrides.update(value)
      else:
        overrides[name] = value
    pre = cfg.pop('pre', '')
    if pre:
      cfg['rule'] = f'{pre}+{cfg["rule"]}'
    rid = run_id(cfg)
    if rid in seen:
      raise ValueError(f'sweep: runs {seen[rid]} and {overrides} are the same configuration')
    seen[rid] = overrides
    runs.append(Run(rid, overrides, cfg))
  return runs


def group_runs(runs: Sequence[Run], batchable: Sequence[str] = BATCHABLE) -> list[list[Run]]:
  """Groups runs that differ only in `batchable` fields (same compiled step), in grid order."""
  groups: dict[str, list[Run]] = {}
  for r in runs:
    key = run_id({k: v for k, v in r.config.items() if k not in batchable})
    groups.setdefault(key, []).append(r)
  return list(groups.values())


def atomic_write_json(path: str, obj) -> None:
  """Writes JSON to `path` atomically: a temporary file in the same directory, then `os.replace`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.json')
  try:
    with os.fdopen(fd, 'w') as fh:
      json.dump(obj, fh, indent=1, default=_json_default)
      fh.flush()
      os.fsync(fh.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def _result_path(out_dir: str, rid: str) -> str:
  return os.path.join(out_dir, 'runs', f'{rid}.json')


_RECORD_KEYS = ('run_id', 'config', 'final', 'curve')


def read_record(path: str) -> tuple[dict | None, str]:
  """A run record and '' if it is valid, else (None, why): unreadable or torn JSON, not an
  object, missing fields (`run_id`, `config`, `final`, `curve`), or a `run_id` that is not the
  file's name."""
  try:
    with open(path) as fh:
      rec = json.load(fh)
  except (OSError, ValueError) as err:
    return None, f'unreadable ({type(err).__name__}: {str(err)[:80]})'
  if not isinstance(rec, dict):
    return None, 'not a JSON object'
  missing = [k for k in _RECORD_KEYS if k not in rec]
  if missing:
    return None, f'missing {", ".join(missing)}'
  name = os.path.basename(path)[: -len('.json')]
  if rec['run_id'] != name:
    return None, f'its run_id {rec["run_id"]!r} is not its file name'
  if not isinstance(rec['final'], dict) or not isinstance(rec['curve'], dict):
    return None, 'final / curve are not objects'
  return rec, ''


def _warn(message: str) -> None:
  print(f'warning: {message}', file=sys.stderr, flush=True)


def current_run_ids(out_dir: str) -> list[str] | None:
  """The run ids of the sweep last launched in `out_dir` (from ``sweep.json``), or None."""
  path = os.path.join(out_dir, 'sweep.json')
  if not os.path.exists(path):
    return None
  with open(path) as fh:
    return list(json.load(fh)['run_ids'])


def load_results(out_dir: str, *, current_only: bool = True) -> list[dict]:
  """The finished run records under ``<out_dir>/runs`` (sorted by run id).

  Invalid records (`read_record`: torn or hand-edited files) are left out with a warning that
  names each file; `run_sweep` reruns them.

  Args:
    out_dir: the sweep directory.
    current_only: keep only the runs of the sweep last launched there (the ids in
      ``sweep.json``), so records left by an earlier grid or config are not mixed in.
  """
  d = os.path.join(out_dir, 'runs')
  if not os.path.isdir(d):
    return []
  keep = current_run_ids(out_dir) if current_only else None
  keep = None if keep is None else set(keep)
  out = []
  for name in sorted(os.listdir(d)):
    if name.endswith('.json') and not name.startswith('.'):
      if keep is not None and name[: -len('.json')] not in keep:
        continue
      path = os.path.join(d, name)
      rec, why = read_record(path)
      if rec is None:
        _warn(f'left out {path}: {why} (rerun the sweep to redo it)')
        continue
      out.append(rec)
  return out


# ----------------------------------------------------------------------------------------------
# Execution.


def _to_config(cfg: dict):
  from ml_collections import config_dict

  return config_dict.ConfigDict(cfg)


def _stack_trees(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _batch_data(datas: Sequence[dict]) -> tuple[dict, dict]:
  """Stacks the members' data dicts: equal arrays are shared (in_axes None), others stacked
  (index arrays padded with zeros to a common width; ``sizes`` bounds the sampling)."""
  data, axes = {}, {}
  for k in datas[0]:
    arrs = [np.asarray(d[k]) for d in datas]
    if all(a.shape == arrs[0].shape and np.array_equal(a, arrs[0]) for a in arrs[1:]):
      data[k], axes[k] = jnp.asarray(arrs[0]), None
      continue
    if any(a.ndim != arrs[0].ndim for a in arrs):
      raise ValueError(f'sweep: data field {k!r} has different ranks across the group')
    shape = tuple(max(s) for s in zip(*(a.shape for a in arrs)))
    padded = [np.pad(a, [(0, t - s) for s, t in zip(a.shape, shape)]) for a in arrs]
    data[k], axes[k] = jnp.asarray(np.stack(padded)), 0
  return data, axes


def _eval_steps(num_steps: int, eval_every: int) -> list[int]:
  if eval_every <= 0:
    return [num_steps]
  steps = list(range(eval_every, num_steps + 1, eval_every))
  if not steps or steps[-1] != num_steps:
    steps.append(num_steps)
  return steps


def run_group(
  configs: Sequence[Mapping],
  *,
  vmap: bool = True,
  max_batch_bytes: float = 2e9,
  eval_every: int | None = None,
) -> list[dict]:
  """Trains the runs of one group (configs differing only in `BATCHABLE` fields).

  Uses the engine's run loop (`robustjax.training.make_advance` and `chunks`, as
  `train_and_evaluate` does): a chunk of steps per dispatch between two evaluations, the step
  `jax.vmap`-ed over the members when they run together.

  Args:
    configs: resolved training configs (dicts), same compiled step.
    vmap: run the members together (vmap over members) when the backend is ``'vmap'`` and the
      batch fits in `max_batch_bytes`; otherwise one after the other.
    max_batch_bytes: a bound on the batched state + data + per-step worker stacks.
    eval_every: evaluate every this many steps (default: each config's ``eval_every``).

  Returns:
    One record per config: ``curve`` (``step``, the evaluated metrics (``test_accuracy``,
    ``test_loss``, ``train_loss``, the evaluated honest objective, ...) and ``batch_loss``, the
    mean honest batch loss since the previous evaluation), ``final`` (the last evaluation),
    ``vmapped``, ``group_size`` and ``backend``.
  """
  from robustjax import training

  cfgs = [_to_config(dict(c)) for c in configs]
  exps = [training.build(c) for c in cfgs]
  e0 = exps[0]
  num_steps = int(cfgs[0].num_steps)
  every = int(eval_every if eval_every is not None else cfgs[0].eval_every)
  for c, e in zip(cfgs, exps):
    if e.spec != e0.spec or int(c.num_steps) != num_steps or e.backend != e0.backend:
      raise ValueError('run_group: the configs do not share one compiled step')
  states = [e.init_state() for e in exps]
  datas = [e.problem.data for e in exps]
  n = e0.spec.num_workers
  per_member = tree_bytes(states[0]) + 4 * n * tree_bytes(states[0].params)
  batched = (
    vmap
    and len(exps) > 1
    and e0.backend == 'vmap'
    and per_member * len(exps) + sum(tree_bytes(d) for d in datas) <= max_batch_bytes
  )
  curves = [{'step': [], 'batch_loss': []} for _ in exps]

  def record(i, step, ev, bl):
    c = curves[i]
    c['step'].append(step)
    c['batch_loss'].append(float(bl))
    for k, v in ev.items():
      c.setdefault(k, []).append(float(v))

  if batched:
    data, axes = _batch_data(datas)
    members = [(list(range(len(exps))), _stack_trees(states), data, axes)]
  else:
    members = [([i], s, e.data, None) for i, (e, s) in enumerate(zip(exps, states))]
  for idx, state, data, axes in members:
    e = exps[idx[0]]
    advance = training.make_advance(e.step_fn, e.backend, data_axes=axes)
    evaluate = e.eval_fn if axes is None else jax.jit(jax.vmap(e.eval_fn, in_axes=(0, 0, axes)))
    done = 0
    for end in training.chunks(0, num_steps, (every,)):
      state, stacked = advance(state, data, end - done)
      done = end
      ev = jax.device_get(evaluate(state.params, state.model_state, data))
      bl = np.asarray(jax.device_get(jnp.mean(stacked['batch_loss'], axis=0)))
      for j, i in enumerate(idx):
        pick = (lambda v, j=j: v[j]) if axes is not None else (lambda v: v)
        record(i, end, {k: pick(v) for k, v in ev.items()}, pick(bl))
  out = []
  for curve in curves:
    final = {k: v[-1] for k, v in curve.items() if k not in ('step', 'batch_loss')}
    if 'test_accuracy' in curve:
      final['max_test_accuracy'] = max(curve['test_accuracy'])
    out.append(
      {
        'curve': curve,
        'final': final,
        'vmapped': bool(batched),
        'group_size': len(configs),
        'backend': e0.backend,
      }
    )
  return out


def _describe(run: Run, batchable: Sequence[str]) -> str:
  parts = [f'{k}={v}' for k, v in run.overrides.items() if k not in batchable]
  return ' '.join(parts) or run.run_id


def run_sweep(
  base,
  grid: Mapping[str, Sequence],
  out_dir: str,
  *,
  vmap: bool = True,
  max_batch_bytes: float = 2e9,
  max_groups: int | None = None,
  progress: bool = True,
  name: str = 'sweep',
  on_group: Callable[[int, list[dict]], None] | None = None,
) -> dict:
  """Runs every run of the sweep whose result file is missing; resumable.

  Writes ``<out_dir>/sweep.json`` (the base config, the grid and the run ids) and one
  ``<out_dir>/runs/<run_id>.json`` per finished run (the run's overrides and config, its curve,
  final metrics, the group's wall time). Finished runs are skipped, so a killed sweep, rerun with
  the same arguments, picks up where it stopped (at group granularity: a group interrupted midway
  reruns from its start).

  Args:
    base: the base training config.
    grid: the axes (see `expand`).
    out_dir: the output directory.
    vmap: batch each group's members in one program (see `run_group`).
    max_batch_bytes: memory bound for batching.
    max_groups: stop after this many groups of *this call* (time-limited jobs, tests).
    progress: print one line per group (axes, members, wall time, elapsed, ETA) to stderr.
    name: the sweep's name (recorded).
    on_group: called as ``on_group(index, records)`` after each group is written.

  Returns:
    ``{'total': runs in the sweep, 'skipped': already finished, 'ran': run now, 'remaining':
    still missing, 'wall_s': this call's wall time}``.
  """
  runs = expand(base, grid)
  atomic_write_json(
    os.path.join(out_dir, 'sweep.json'),
    {
      'name': name,
      'base': _plain(base),
      'grid': {k: list(v) for k, v in grid.items()},
      'run_ids': [r.run_id for r in runs],
    },
  )
  todo = []
  for r in runs:
    path = _result_path(out_dir, r.run_id)
    if not os.path.exists(path):
      todo.append(r)
      continue
    rec, why = read_record(path)
    if rec is None:
      _warn(f'{path} is invalid ({why}); rerunning that run')
      todo.append(r)
  skipped = len(runs) - len(todo)
  groups = group_runs(todo)
  t0 = time.perf_counter()
  ran = 0
  for gi, group in enumerate(groups):
    if max_groups is not None and gi >= max_groups:
      break
    tg = time.perf_counter()
    results = run_group([r.config for r in group], vmap=vmap, max_batch_bytes=max_batch_bytes)
    wall = time.perf_counter() - tg
    records = []
    for r, res in zip(group, results):
      rec = {
        'run_id': r.run_id,
        'sweep': name,
        'overrides': r.overrides,
        'config': r.config,
        **res,
        'group_wall_s': wall,
        'wall_s': wall / len(group),
      }
      atomic_write_json(_result_path(out_dir, r.run_id), rec)
      records.append(rec)
    ran += len(group)
    if on_group is not None:
      on_group(gi, records)
    if progress:
      elapsed = time.perf_counter() - t0
      left = sum(len(g) for g in groups[gi + 1 :])
      eta = elapsed / ran * left if ran else float('nan')
      acc = ', '.join(f'{x["final"]["test_accuracy"]:.3f}' for x in records)
      print(
        f'[{name}] group {gi + 1}/{len(groups)} ({skipped + ran}/{len(runs)} runs) '
        f'{_describe(group[0], BATCHABLE)} | {len(group)} member(s)'
        f'{" vmapped" if results[0]["vmapped"] else ""} {wall:.1f}s | acc {acc} | '
        f'elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min',
        file=sys.stderr,
        flush=True,
      )
  wall = time.perf_counter() - t0
  remaining = sum(1 for r in runs if read_record(_result_path(out_dir, r.run_id))[0] is None)
  return {
    'total': len(runs),
    'skipped': skipped,
    'ran': ran,
    'remaining': remaining,
    'wall_s': wall,
  }
