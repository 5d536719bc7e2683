"""The training loop: progress bar, JSON-lines metrics, orbax checkpoints with exact resume."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from robustjax.training import _setup

__all__ = ['train_and_evaluate', 'Checkpointer']


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
  final evaluation, the config, throughput) and orbax checkpoints under ``checkpoints/``.

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
  bar = _progress(total, start, lead and config.progress)
  last_eval = {}
  t0, steps_run = time.perf_counter(), 0
  step = start
  postfix = {}
  try:
    while step < stop:
      state, m = exp.step(state)
      step += 1
      steps_run += 1
      records = []
      if config.log_every and (step % config.log_every == 0 or step == total):
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        records.append({'step': step, 'kind': 'train', **m})
        postfix['loss'] = f'{m["train_loss"]:.3f}'
      if (config.eval_every and step % config.eval_every == 0) or step == total:
        last_eval = exp.evaluate(state)
        records.append({'step': step, 'kind': 'eval', **last_eval})
      if last_eval:
        postfix['acc'] = f'{last_eval["test_accuracy"]:.3f}'
      if lead and records:
        _write_jsonl(metrics_path, records)
      if bar is not None:
        bar.update(1)
        if records and postfix:
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
    'num_workers': exp.spec.num_workers,
    'num_byzantine': exp.spec.num_byzantine,
    'backend': exp.backend,
    'num_devices': 1 if exp.mesh is None else int(np.prod(list(exp.mesh.shape.values()))),
    'steps_per_second_this_run': steps_run / elapsed if elapsed > 0 else None,
    'config': config.to_dict() if hasattr(config, 'to_dict') else dict(config),
  }
  if lead:
    with open(os.path.join(workdir, 'summary.json'), 'w') as fh:
      json.dump(summary, fh, indent=2, default=str)
  return summary
