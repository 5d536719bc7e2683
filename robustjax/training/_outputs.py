"""What a run writes beside its checkpoints: ``metrics.jsonl``, TensorBoard event files, and a
PNG of its curves.

Every logged record is a dict with ``step`` and ``kind``: ``'train'`` rows carry the step's
metrics (``batch_loss``, the honest workers' minibatch loss; ``agg_error``, the distance of the
aggregate to the honest workers' mean; ``load``; ``bits``), ``'eval'`` rows the evaluation
(``train_loss`` / ``train_accuracy`` over the whole training set, ``test_loss`` /
``test_accuracy``). `RunWriter` appends them to ``metrics.jsonl`` and, when tensorboardX is
installed (the ``experiments`` extra), to TensorBoard event files under ``tensorboard/`` with
tags ``train/<name>`` and ``eval/<name>`` (``tensorboard --logdir <workdir>``). A resumed run
purges the events past its restart step, so TensorBoard shows one curve. `plot_run` draws the
curves of ``metrics.jsonl`` (the run loop writes ``curves.png`` at the end of every call).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence

from absl import logging

__all__ = ['RunWriter', 'read_metrics', 'plot_run']


class RunWriter:
  """Appends metric records to ``<workdir>/metrics.jsonl`` and TensorBoard event files.

  Args:
    workdir: the run's directory (it exists).
    start: the step the run (re)starts at; TensorBoard events at later steps, left by an
      interrupted earlier call, are purged.
    tensorboard: write event files too (skipped, with one warning, without tensorboardX).
  """

  def __init__(self, workdir: str, *, start: int = 0, tensorboard: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        logging.warning(
          "no TensorBoard output: tensorboardX is missing (pip install 'robustjax[experiments]')"
        )
      else:
        # Its own thread writes the events (every 10 s and at close), not the training loop.
        # tensorboardX names the file by the second it opens it: a restart within the same
        # second would overwrite the earlier call's file. The nanosecond suffix keeps both, and
        # their names sort in the order they were opened (TensorBoard reads files by name).
        self._tb = SummaryWriter(
          os.path.join(workdir, 'tensorboard'),
          purge_step=start + 1 if start else None,
          flush_secs=10,
          filename_suffix=f'.{time.time_ns()}',
        )

  def write(self, records: Sequence[Mapping]) -> None:
    """Appends `records` (dicts with ``step`` and ``kind``) to both outputs."""
    if not records:
      return
    with open(self.path, 'a') as fh:
      for r in records:
        fh.write(json.dumps(r) + '\n')
    if self._tb is not None:
      for r in records:
        for name, value in r.items():
          if name in ('step', 'kind') or not isinstance(value, (int, float)):
            continue
          self._tb.add_scalar(f'{r["kind"]}/{name}', value, global_step=int(r['step']))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(path: str) -> list[dict]:
  """The records of a ``metrics.jsonl`` (unreadable lines, e.g. a torn last line, skipped)."""
  out = []
  if not os.path.exists(path):
    return out
  with open(path) as fh:
    for line in fh:
      try:
        rec = json.loads(line)
      except ValueError:
        continue
      if isinstance(rec, dict) and 'step' in rec:
        out.append(rec)
  return out


# (panel title, y label, log scale, [(kind, metric, label)])
_PANELS = (
  (
    'loss',
    'cross-entropy',
    True,
    [
      ('train', 'batch_loss', 'minibatch (honest workers)'),
      ('eval', 'train_loss', 'training set'),
      ('eval', 'test_loss', 'test set'),
    ],
  ),
  (
    'accuracy',
    'accuracy',
    False,
    [('eval', 'train_accuracy', 'training set'), ('eval', 'test_accuracy', 'test set')],
  ),
  (
    'aggregation error',
    '‖aggregate − honest mean‖',
    True,
    [('train', 'agg_error', 'per step')],
  ),
)


def _series(records: Iterable[Mapping], kind: str, metric: str):
  pts = {}
  for r in records:
    v = r.get(metric)
    if r.get('kind') == kind and isinstance(v, (int, float)) and math.isfinite(v):
      pts[int(r['step'])] = float(v)  # a resumed run's later record of a step wins
  steps = sorted(pts)
  return steps, [pts[s] for s in steps]


def plot_run(records: Sequence[Mapping], path: str, *, title: str = '') -> str | None:
  """Draws a run's curves (loss, accuracy, aggregation error against steps) into a PNG.

  Panels without data (e.g. accuracy for a regression) are left out; loss and aggregation error
  are on a log scale where their values are positive and span more than a factor of 20.
  Returns `path`, or None when there is nothing to draw.
  """
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

  panels = []
  for name, ylabel, log, series in _PANELS:
    lines = [(label, *_series(records, kind, m)) for kind, m, label in series]
    lines = [(label, s, v) for label, s, v in lines if s]
    if lines:
      panels.append((name, ylabel, log, lines))
  if not panels:
    return None
  fig, axes = plt.subplots(
    1, len(panels), figsize=(3.6 * len(panels), 3.1), squeeze=False, layout='constrained'
  )
  for ax, (name, ylabel, log, lines) in zip(axes[0], panels):
    for label, steps, values in lines:
      marker = 'o' if len(steps) <= 30 else None
      ax.plot(steps, values, label=label, lw=1.3, marker=marker, ms=3)
    values = [v for _, _, vs in lines for v in vs]
    if log and min(values) > 0 and max(values) >= 20 * min(values):  # log only where it helps
      ax.set_yscale('log')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    ax.set_title(name, fontsize=9)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
      ax.legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9, wrap=True)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
