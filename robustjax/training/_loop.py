"""The training loop: progress bar, JSON-lines metrics, orbax checkpoints with exact resume."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from robustjax.training import _setup

__all__ = ['train_and_evaluate', 'Checkpointer', 'make_advance', 'chunks']


class Checkpointer:
  """Orbax checkpoints of the whole `TrainState` (params, optimiser, momentums, RNG key, ...).

  The RNG key is part of the state, so a run restored from step s draws exactly the batches and
  attack noise an uninterrupted run draws after step s: the final metrics are the same.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state) -> None:
    self.manager.save(int(step), args=self._ocp.args.StandardSave(state), force=True)

  def restore(self, state_like, step: int | None = None):
    """Restores into the structure, dtypes and shardings of `state_like`."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, state_like)
    return self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def make_advance(step, backend: str = 'vmap', *, data_axes=None, evaluate=None):
  """``advance(state, data, length) -> (state, metrics stacked over the length steps)``.

  Several steps per dispatch: a jitted `lax.scan` over the step (the metrics stay on device
  until the caller reads them), so the loop makes one host round trip per chunk, not per step.
  With `data_axes` (a sweep's vmapped seeds), the step is `jax.vmap`-ed over a batch of states
  and data (``in_axes=(0, data_axes)``). With `evaluate` (``evaluate(params, model_state, data)
  -> dict``, e.g. `make_eval`), its values after every step join the metrics as ``eval_<name>``:
  a full-batch study (the LAD experiment) is this scan and nothing else. The legacy ``pmap``
  backend advances step by step.
  """
  if evaluate is not None:
    plain_step = step

    def step(state, data):
      state, m = plain_step(state, data)
      ev = evaluate(state.params, state.model_state, data)
      return state, {**m, **{f'eval_{k}': v for k, v in ev.items()}}

  if backend == 'pmap':
    if data_axes is not None:
      raise ValueError('make_advance: the pmap backend does not vmap over a batch of runs')

    def advance_pmap(state, data, length):
      out = []
      for _ in range(length):
        state, m = step(state, data)
        out.append(m)
      return state, jax.tree.map(lambda *xs: jnp.stack(xs), *out)

    return advance_pmap
  body = step if data_axes is None else jax.vmap(step, in_axes=(0, data_axes))

  def advance(state, data, length):
    return jax.lax.scan(lambda s, _: body(s, data), state, None, length=length)

  return jax.jit(advance, static_argnums=2)


def chunks(start: int, stop: int, every=()):
  """The chunk ends of a run from `start` to `stop`: every multiple of each nonzero entry of
  `every` (evaluation, checkpoint, logging intervals) and `stop` itself."""
  step = start
  while step < stop:
    ends = [stop] + [(step // e + 1) * e for e in every if e]
    step = min(ends)
    yield step


def _write_jsonl(path, records):
  with open(path, 'a') as fh:
    for r in records:
      fh.write(json.dumps(r) + '\n')


def _truncate_jsonl(path, last_step):
  """Drops the records after `last_step` (logged after the checkpoint a resumed run restarts at)."""
  if not os.path.exists(path):
    return
  with open(path) as fh:
    keep = [line for line in fh if line.strip() and json.loads(line).get('step', 0) <= last_step]
  with open(path, 'w') as fh:
    fh.writelines(keep)


def _progress(total, initial, enabled):
  if not enabled:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:  # the experiments extra is missing: run without a bar
    return None
  return tqdm(total=total, initial=initial, desc='train', dynamic_ncols=True, leave=True)


def train_and_evaluate(config, workdir: str, *, max_steps: int | None = None) -> dict:
  """Trains and evaluates one configuration; resumes from the latest checkpoint in `workdir`.

  Writes ``metrics.jsonl`` (one JSON object per logged / evaluated step), ``summary.json`` (the
  final evaluation, the config, throughput) and orbax checkpoints under ``checkpoints/``. The
  steps run in chunks (`make_advance`) that end at every logging, evaluation and checkpoint step.

  Args:
    config: an ml_collections config (see ``experiments/configs/default.py``).
    workdir: the output directory (created).
    max_steps: stop after this many steps *of this call* (as if the job were preempted; a later
      call resumes). For tests and time-limited jobs; the config's ``num_steps`` is unchanged.

  Returns:
    The summary dict (``final`` holds the last evaluation; ``finished`` whether ``num_steps`` was
    reached).
  """
  os.makedirs(workdir, exist_ok=True)
  lead = jax.process_index() == 0
  exp = _setup.build(config)
  state = exp.init_state()
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  ckpt = None
  if config.checkpoint_every:
    ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=config.keep_checkpoints)
    if ckpt.latest_step() is not None:
      state = ckpt.restore(state)
  start = int(jax.device_get(state.step))
  if lead:
    if start == 0 and os.path.exists(metrics_path):
      os.remove(metrics_path)
    _truncate_jsonl(metrics_path, start)
  total = int(config.num_steps)
  stop = total if max_steps is None else min(total, start + int(max_steps))
  advance = make_advance(exp.step_fn, exp.backend)
  bar = _progress(total, start, lead and config.progress)
  last_eval = {}
  t0, step = time.perf_counter(), start
  log_every, eval_every = config.log_every, config.eval_every
  postfix = {}
  try:
    for end in chunks(start, stop, (log_every, eval_every, config.checkpoint_every)):
      state, stacked = advance(state, exp.data, end - step)
      records = []
      if log_every:
        host = {k: np.asarray(v) for k, v in jax.device_get(stacked).items()}
        for i, s in enumerate(range(step + 1, end + 1)):
          if s % log_every == 0 or s == total:
            records.append(
              {'step': s, 'kind': 'train', **{k: float(v[i]) for k, v in host.items()}}
            )
      step = end
      if (eval_every and step % eval_every == 0) or step == total:
        last_eval = exp.evaluate(state)
        records.append({'step': step, 'kind': 'eval', **last_eval})
      if lead and records:
        _write_jsonl(metrics_path, records)
      if bar is not None:
        bar.update(end - bar.n)
        train = [r for r in records if r['kind'] == 'train']
        if train:
          postfix['loss'] = f'{train[-1]["train_loss"]:.3f}'
        if 'test_accuracy' in last_eval:
          postfix['acc'] = f'{last_eval["test_accuracy"]:.3f}'
        if postfix:
          bar.set_postfix(postfix, refresh=False)
      if ckpt is not None and (step % config.checkpoint_every == 0 or step == stop):
        ckpt.save(step, state)
  finally:
    if bar is not None:
      bar.close()
    if ckpt is not None:
      ckpt.close()
  elapsed = time.perf_counter() - t0
  if not last_eval:
    last_eval = exp.evaluate(state)
  summary = {
    'step': step,
    'finished': step >= total,
    'final': last_eval,
    'rule': exp.spec.pipeline.name,
    'attack': config.attack,
    'coding': exp.spec.code.spec,
    'num_workers': exp.spec.num_workers,
    'num_byzantine': exp.spec.num_byzantine,
    'backend': exp.backend,
    'num_devices': 1 if exp.mesh is None else int(np.prod(list(exp.mesh.shape.values()))),
    'steps_per_second_this_run': (step - start) / elapsed if elapsed > 0 else None,
    'config': config.to_dict() if hasattr(config, 'to_dict') else dict(config),
  }
  if lead:
    with open(os.path.join(workdir, 'summary.json'), 'w') as fh:
      json.dump(summary, fh, indent=2, default=str)
  return summary
