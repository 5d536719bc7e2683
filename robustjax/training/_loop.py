"""The training loop: progress bar, JSON-lines metrics, orbax checkpoints with exact resume.

A workdir belongs to one configuration: ``config.json`` records it at the first start, and a
later start with a config that differs in a field that changes the results is refused with one
line naming the fields (``restart=True`` discards the old run instead). A resumed run says from
which step; a finished one says so. A corrupt latest checkpoint is set aside (``corrupt/``) with a
warning and the newest readable one is used; a torn last line of ``metrics.jsonl`` (a kill or a
full disk mid-write) is dropped with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from robustjax import distributed, privacy
from robustjax.training import _engine, _outputs, _setup

__all__ = [
  'train_and_evaluate',
  'Checkpointer',
  'ConfigMismatchError',
  'make_advance',
  'chunks',
  'result_fields',
]

# Fields that change what is logged or when, never the numbers: a resumed run may change them.
PRESENTATION_FIELDS = frozenset(
  {
    'progress',
    'log_every',
    'eval_every',
    'checkpoint_every',
    'keep_checkpoints',
    'eval_chunk',
    'data_dir',
    'tensorboard',
    'plot',
  }
)


class ConfigMismatchError(ValueError):
  """The workdir holds a run of a different configuration."""


def _say(message: str) -> None:
  """A one-line status message on stderr (process 0 only)."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def result_fields(config) -> dict:
  """The config's fields that determine the run's numbers (`PRESENTATION_FIELDS` left out).

  ``num_steps`` is left out under a constant learning rate (extending a finished run is a
  resume); under a schedule that depends on it (cosine), it is kept.
  """
  cfg = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  cfg = json.loads(json.dumps(cfg, default=str))
  out = {k: v for k, v in cfg.items() if k not in PRESENTATION_FIELDS}
  if out.get('lr_schedule', 'constant') == 'constant':
    out.pop('num_steps', None)
  return out


def _check_workdir_config(workdir: str, config, restart: bool, has_state: bool) -> None:
  """Refuses a workdir that holds another config's run; records the config at a first start."""
  path = os.path.join(workdir, 'config.json')
  want = result_fields(config)
  if os.path.exists(path) and not restart:
    try:
      with open(path) as fh:
        have = json.load(fh)['result_fields']
    except (OSError, ValueError, KeyError, TypeError):
      have = None
    if have is None:
      raise ConfigMismatchError(
        f'{path} is unreadable, so the run in {workdir} cannot be matched to this config; '
        'use another --workdir, or restart=True (--restart) to discard it'
      )
    diff = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    if diff:
      shown = ', '.join(f'{k}: {have.get(k)!r} -> {want.get(k)!r}' for k in diff[:6])
      more = f' (and {len(diff) - 6} more)' if len(diff) > 6 else ''
      raise ConfigMismatchError(
        f'{workdir} holds a run of a different config ({shown}{more}); use another --workdir, '
        'or restart=True (--restart) to discard it'
      )
  elif has_state and not restart:
    raise ConfigMismatchError(
      f'{workdir} holds checkpoints but no config.json (a run of unknown config); use another '
      '--workdir, or restart=True (--restart) to discard it'
    )
  if jax.process_index() == 0:
    _atomic_write(path, json.dumps({'result_fields': want}, indent=1, sort_keys=True))


def _atomic_write(path: str, text: str) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as fh:
    fh.write(text)
  os.replace(tmp, path)


def _discard_run(workdir: str) -> None:
  """What `restart` removes: the files a run writes (nothing else in the workdir)."""
  for name in ('checkpoints', 'corrupt'):
    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
  for name in ('metrics.jsonl', 'summary.json', 'config.json'):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      os.remove(path)


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

  def restore_newest_readable(self, state_like, aside: str):
    """Restores the newest checkpoint that reads back; unreadable newer ones (truncated,
    emptied, bit-flipped) are moved to `aside` with a warning. None if there are none.

    Raises:
      ValueError: checkpoints exist but none is readable (named, with what to do).
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    failed = []
    for step in steps:
      try:
        state = self.restore(state_like, step)
      except Exception as err:  # orbax / tensorstore raise many types for corrupt files
        failed.append((step, f'{type(err).__name__}: {str(err).splitlines()[0][:200]}'))
        continue
      for bad, why in failed:
        logging.warning('checkpoint at step %d is unreadable (%s); set aside', bad, why)
        _say(f'warning: checkpoint at step {bad} is unreadable ({why}); moved to {aside}')
        self._set_aside(bad, aside)
      return state
    if failed:
      raise ValueError(
        f'no readable checkpoint in {self.directory} (steps {[s for s, _ in failed]}: '
        f'{failed[0][1]}); rerun with restart=True (--restart) to start over'
      )
    return None

  def _set_aside(self, step: int, aside: str) -> None:
    os.makedirs(aside, exist_ok=True)
    src = os.path.join(self.directory, str(step))
    if os.path.exists(src):
      shutil.move(src, os.path.join(aside, f'{step}-{int(time.time())}'))
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def make_advance(step, backend: str = 'vmap', *, data_axes=None, evaluate=None, every_step=True):
  """``advance(state, data, length) -> (state, metrics)``: the metrics of every step, stacked,
  or of the last (``every_step=False``).

  Several steps per dispatch: a jitted `lax.scan` over the step (the metrics stay on device
  until the caller reads them), so the loop makes one host round trip per chunk, not per step.
  With `data_axes` (a sweep's vmapped seeds), the step is `jax.vmap`-ed over a batch of states
  and data (``in_axes=(0, data_axes)``, and ``None`` for the report). With `evaluate`
  (``evaluate(params, model_state, data) -> dict``, e.g. `make_eval`), its values after every
  step join the metrics as ``eval_<name>``: a full-batch study (the LAD experiment) is this scan
  and nothing else. With ``every_step=False``, only the last step computes its metrics (the
  step's ``report``; the others skip them, `robustjax.training.when_reported`) and they come
  without the steps axis: what a loop that logs at the end of each chunk reads. The legacy
  ``pmap`` backend advances step by step.
  """
  if evaluate is not None:
    plain_step = step

    def evaluated(params, model_state, data, reported):
      return _engine.or_nan(reported, evaluate, params, model_state, data)

    def step(state, data, *report):  # `report`: the step's optional third argument
      state, m = plain_step(state, data, *report)
      flag = report[0] if report else None
      ev = _engine.when_reported(flag, evaluated, state.params, state.model_state, data)
      return state, {**m, **{f'eval_{k}': v for k, v in ev.items()}}

  def reporting(i, length):  # the step's extra argument: none when every step reports
    return () if every_step else (i == length - 1,)

  if backend == 'pmap':
    if data_axes is not None:
      raise ValueError('make_advance: the pmap backend does not vmap over a batch of runs')

    def advance_pmap(state, data, length):
      out = []
      for i in range(length):
        state, m = step(state, data, *reporting(i, length))
        out.append(m)
      return state, jax.tree.map(lambda *xs: jnp.stack(xs), *out) if every_step else out[-1]

    return advance_pmap
  axes = (0, data_axes) if every_step else (0, data_axes, None)
  body = step if data_axes is None else jax.vmap(step, in_axes=axes)

  def advance(state, data, length):
    state, metrics = jax.lax.scan(
      lambda s, i: body(s, data, *reporting(i, length)), state, jnp.arange(length)
    )
    return state, metrics if every_step else jax.tree.map(lambda m: m[-1], metrics)

  return jax.jit(advance, static_argnums=2)


def _compile_ahead(advance, exp, state, lengths) -> float:
  """Compiles the run's programs (`advance` for every chunk length, the evaluation) before the
  clock starts, and returns the seconds it took. The jitted functions then find them in their
  cache, so ``steps_per_second_this_run`` is the training's throughput and compile time is
  reported on its own."""
  t0 = time.perf_counter()
  if hasattr(advance, 'lower'):  # the legacy pmap backend steps from Python: nothing to compile
    for length in sorted(lengths):
      advance.lower(state, exp.data, length).compile()
  exp.eval_fn.lower(state.params, state.model_state, exp.data).compile()
  return time.perf_counter() - t0


def chunks(start: int, stop: int, every=()):
  """The chunk ends of a run from `start` to `stop`: every multiple of each nonzero entry of
  `every` (evaluation, checkpoint, logging intervals) and `stop` itself."""
  step = start
  while step < stop:
    ends = [stop] + [(step // e + 1) * e for e in every if e]
    step = min(ends)
    yield step


def _check_writable(workdir: str) -> None:
  """Fails before anything is changed if the workdir (or its parent, to create it) or an
  existing metrics file in it cannot be written: a pre-existing file is never lost."""
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(metrics):
    target = metrics
  elif os.path.isdir(workdir):
    target = workdir
  else:
    target = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(target):
      target = os.path.dirname(target)
  if not os.access(target, os.W_OK):
    raise PermissionError(
      f'cannot write {target} (nothing was changed; fix the permissions or use another --workdir)'
    )


def _truncate_jsonl(path, last_step):
  """Keeps the records up to `last_step` (the step a resumed run restarts at), atomically.

  A line that does not parse (a torn last line after a kill or a full disk) is dropped with a
  warning. The file is rewritten through a temporary file and `os.replace`, so a failure here
  never loses the records already written.
  """
  if not os.path.exists(path):
    return
  keep, torn = [], 0
  with open(path) as fh:
    for line in fh:
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except ValueError:
        torn += 1
        continue
      if isinstance(rec, dict) and rec.get('step', 0) <= last_step:
        keep.append(line if line.endswith('\n') else line + '\n')
  if torn:
    _say(f'warning: dropped {torn} unreadable line(s) of {path} (a torn write)')
  _atomic_write(path, ''.join(keep))


def _build_everywhere(config):
  """`_setup.build` in every process; one process's failure (a host without the data files,
  say) fails all of them together, each naming it, instead of leaving them in a collective."""
  try:
    exp, error = _setup.build(config), None
  except (ValueError, OSError, ImportError, RuntimeError) as err:
    exp, error = None, err
  if jax.process_count() > 1:
    distributed.agree(error is None, str(error or ''), 'to build the experiment')
  if error is not None:
    raise error
  return exp


def _progress(total, initial, enabled):
  if not enabled:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:  # the experiments extra is missing: run without a bar
    return None
  return tqdm(total=total, initial=initial, desc='train', dynamic_ncols=True, leave=True)


def train_and_evaluate(
  config, workdir: str, *, max_steps: int | None = None, restart: bool = False
) -> dict:
  """Trains and evaluates one configuration; resumes from the latest checkpoint in `workdir`.

  Writes ``metrics.jsonl`` (one JSON object per logged / evaluated step), ``summary.json`` (the
  final evaluation, the config, throughput) and orbax checkpoints under ``checkpoints/``. The
  steps run in chunks (`make_advance`) that end at every logging, evaluation and checkpoint step.

  Args:
    config: an ml_collections config (see ``experiments/configs/default.py``).
    workdir: the output directory (created).
    max_steps: stop after this many steps *of this call* (as if the job were preempted; a later
      call resumes). For tests and time-limited jobs; the config's ``num_steps`` is unchanged.
    restart: discard a previous run in `workdir` (its checkpoints, metrics, summary) instead of
      resuming it; needed when the config differs from the one the workdir was started with.

  Raises:
    ConfigMismatchError: the workdir holds a run of another config (the message names the
      fields); pass ``restart=True`` to discard it.
    ValueError: the config is invalid (`robustjax.training.build`), or no checkpoint in the
      workdir is readable.

  Returns:
    The summary dict (``final`` holds the last evaluation; ``finished`` whether ``num_steps`` was
    reached).
  """
  lead = jax.process_index() == 0
  exp = _build_everywhere(config)  # validates the config before the workdir is touched
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if lead:
    _check_writable(workdir)
  if restart and lead and os.path.isdir(workdir):
    _discard_run(workdir)
  has_state = os.path.isdir(ckpt_dir) and bool(os.listdir(ckpt_dir))
  os.makedirs(workdir, exist_ok=True)
  if config.checkpoint_every:
    distributed.check_shared_directory(workdir)  # every process writes the checkpoints
  _check_workdir_config(workdir, config, restart, has_state)
  state = exp.init_state()
  ckpt = None
  if config.checkpoint_every:
    ckpt = Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints)
    restored = ckpt.restore_newest_readable(state, os.path.join(workdir, 'corrupt'))
    if restored is not None:
      state = restored
  start = int(jax.device_get(state.step))
  total = int(config.num_steps)
  if start >= total:
    _say(f'already finished: {workdir} holds step {start} of {total}; evaluating it')
  elif start:
    _say(f'resuming from step {start} of {total} ({workdir})')
  if lead:
    _truncate_jsonl(metrics_path, start)
  stop = total if max_steps is None else min(total, start + int(max_steps))
  log_every, eval_every = config.log_every, config.eval_every
  ends = list(chunks(start, stop, (log_every, eval_every, config.checkpoint_every)))
  advance = make_advance(exp.step_fn, exp.backend, every_step=False)
  compile_s = _compile_ahead(advance, exp, state, {b - a for a, b in zip([start, *ends], ends)})
  writer = _outputs.RunWriter(workdir, start=start, tensorboard=config.get('tensorboard', True))
  bar = _progress(total, start, lead and config.progress)
  last_eval = {}
  t0, step = time.perf_counter(), start
  postfix = {}
  pending = None  # the last dispatched chunk, published once the next one is dispatched

  def publish(chunk):
    """Reads a finished chunk's metrics (and evaluation) to the host and writes them."""
    nonlocal last_eval
    end, last, evaluation = chunk
    records = []
    if last is not None:  # a chunk ends at every logged step: its last step is the only one
      records.append({'step': end, 'kind': 'train', **_setup.to_floats(last)})
    if evaluation is not None:
      last_eval = _setup.to_floats(evaluation)
      records.append({'step': end, 'kind': 'eval', **last_eval})
    if lead:
      writer.write(records)
    if bar is not None:
      bar.update(end - bar.n)
      train = [r for r in records if r['kind'] == 'train']
      if train:
        postfix['loss'] = f'{train[-1]["batch_loss"]:.3f}'
      if 'test_accuracy' in last_eval:
        postfix['acc'] = f'{last_eval["test_accuracy"]:.3f}'
      if postfix:
        bar.set_postfix(postfix, refresh=False)

  try:
    # Each chunk is dispatched (the steps, then the evaluation) before the previous chunk's
    # metrics are read and written, so the host's logging overlaps the device's next steps: no
    # host round trip stalls the device except at checkpoints and at the end.
    for end in ends:
      state, last = advance(state, exp.data, end - step)
      evaluation = None
      if (eval_every and end % eval_every == 0) or end == total:
        evaluation = exp.evaluate_async(state)
      if pending is not None:
        publish(pending)
      logged = log_every and (end % log_every == 0 or end == total)
      pending = (end, last if logged else None, evaluation)
      step = end
      if ckpt is not None and (step % config.checkpoint_every == 0 or step == stop):
        publish(pending)  # the metrics up to a checkpoint are written before it
        pending = None
        ckpt.save(step, state)
    if pending is not None:
      publish(pending)
      pending = None
  except KeyboardInterrupt:
    saved = ckpt.latest_step() if ckpt is not None else None
    where = f'checkpoint at step {saved}' if saved is not None else 'no checkpoint'
    _say(f'interrupted at step {step}; {where}; rerun the same command to resume')
    raise
  finally:
    if bar is not None:
      bar.close()
    if ckpt is not None:
      ckpt.close()
    writer.close()
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
    'declared_byzantine': exp.spec.pipeline.f,
    'privacy': privacy.run_epsilons(exp.spec.dp, step, config.get('dp_delta') or 1e-5)
    if exp.spec.dp is not None and _has_accountant()
    else None,
    'resumed_from': start,
    'steps_per_second_this_run': (step - start) / elapsed if elapsed > 0 else None,
    'compile_seconds_this_run': compile_s,
    'config': config.to_dict() if hasattr(config, 'to_dict') else dict(config),
  }
  if lead:
    with open(os.path.join(workdir, 'summary.json'), 'w') as fh:
      json.dump(summary, fh, indent=2, default=str)
    if config.get('plot', True):
      _plot(config, summary, metrics_path, os.path.join(workdir, 'curves.png'))
  return summary


def _has_accountant() -> bool:
  try:
    import dp_accounting  # noqa: F401
  except ImportError:
    logging.warning("no privacy accounting: pip install 'robustjax[privacy]' (dp-accounting)")
    return False
  return True


def _plot(config, summary, metrics_path, path) -> None:
  """``curves.png`` of the run (skipped, with a warning, without matplotlib)."""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    logging.warning("no curves.png: matplotlib is missing (pip install 'robustjax[experiments]')")
    return
  title = (
    f'{config.dataset} / {config.model}: {summary["rule"]} under {config.attack}, '
    f'n={summary["num_workers"]}, f={summary["num_byzantine"]}, step {summary["step"]}'
  )
  _outputs.plot_run(_outputs.read_metrics(metrics_path), path, title=title)
