"""`robustjax train` end to end on a tiny config: outputs, resume after a kill, CLI flags."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from robustjax import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope='module')
def smoke():
  from robustjax import configs

  return configs.get('default', 'smoke')


@pytest.fixture(scope='module')
def full_run(smoke, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('full'))
  return workdir, training.train_and_evaluate(smoke, workdir)


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as fh:
    return [json.loads(line) for line in fh]


def test_end_to_end_outputs(smoke, full_run):
  workdir, summary = full_run
  assert summary['finished'] and summary['step'] == smoke.num_steps
  assert summary['backend'] == 'shard_map' and summary['num_devices'] == 8
  with open(os.path.join(workdir, 'summary.json')) as fh:
    on_disk = json.load(fh)
  assert on_disk['final'] == summary['final']
  assert 0.0 <= summary['final']['test_accuracy'] <= 1.0
  # The programs are compiled before the clock starts: throughput and compile time apart.
  assert summary['compile_seconds_this_run'] > 0 and summary['steps_per_second_this_run'] > 0
  recs = _records(workdir)
  assert [r['step'] for r in recs if r['kind'] == 'eval'] == [3, 6]
  assert [r['step'] for r in recs if r['kind'] == 'train'] == [2, 4, 6]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']


def test_resume_after_kill_equals_uninterrupted(smoke, full_run, tmp_path):
  _, full = full_run
  workdir = str(tmp_path)
  first = training.train_and_evaluate(smoke, workdir, max_steps=4)  # killed after step 4
  assert not first['finished'] and first['step'] == 4
  resumed = training.train_and_evaluate(smoke, workdir)  # restarts from its step-4 checkpoint
  assert resumed['finished']
  assert resumed['final'] == full['final']  # bit for bit
  assert _records(workdir) == _records(full_run[0])  # no record lost or doubled
  # TensorBoard too: a restart at step 4 purges the events from step 5 on.
  purges = []
  assert _tensorboard_scalars(workdir, purges) == _tensorboard_scalars(full_run[0])
  assert purges == [5]


def _tensorboard_scalars(workdir, purges=None):
  """{(tag, step): value} of the event files, read as TensorBoard reads them: files in name
  order, and a SessionLog START at step s (a resumed run) purging the events at steps >= s (the
  steps s are appended to `purges`)."""
  import struct

  from tensorboardX.proto import event_pb2

  folder = os.path.join(workdir, 'tensorboard')
  out = {}
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), 'rb') as fh:
      raw = fh.read()
    pos = 0
    while pos < len(raw):  # TFRecord frames: length, crc, payload, crc
      (length,) = struct.unpack('<Q', raw[pos : pos + 8])
      event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + length])
      pos += 16 + length
      if event.HasField('session_log') and event.session_log.status == event.session_log.START:
        out = {k: v for k, v in out.items() if k[1] < event.step}
        if purges is not None:
          purges.append(event.step)
      for v in event.summary.value:
        out[(v.tag, event.step)] = v.simple_value
  return out


def test_restart_within_the_same_second_keeps_both_event_files(tmp_path, monkeypatch):
  """tensorboardX names an event file by the second it opens it: a run resumed within that
  second must not overwrite the interrupted call's file (it did, and lost steps 2-4)."""
  import time

  from robustjax.training import _outputs

  monkeypatch.setattr(time, 'time', lambda: 1.8e9)  # both writers open in the same second
  for start, step in ((0, 2), (4, 6)):
    writer = _outputs.RunWriter(str(tmp_path), start=start)
    writer.write([{'step': step, 'kind': 'train', 'batch_loss': float(step)}])
    writer.close()
  monkeypatch.undo()
  assert len(os.listdir(tmp_path / 'tensorboard')) == 2
  purges = []
  scalars = _tensorboard_scalars(str(tmp_path), purges)
  assert scalars == {('train/batch_loss', 2): 2.0, ('train/batch_loss', 6): 6.0}
  assert purges == [5]


def test_tensorboard_events_and_curves_png(full_run):
  workdir, _ = full_run
  scalars = _tensorboard_scalars(workdir)
  expected = {}
  for r in _records(workdir):
    for k, v in r.items():
      if k not in ('step', 'kind'):
        expected[(f'{r["kind"]}/{k}', r['step'])] = v
  assert ('train/batch_loss', 2) in scalars and ('eval/test_accuracy', 6) in scalars
  assert scalars.keys() == expected.keys()
  for k, v in expected.items():
    assert scalars[k] == pytest.approx(v, rel=1e-6), k
  with open(os.path.join(workdir, 'curves.png'), 'rb') as fh:
    assert fh.read(8) == b'\x89PNG\r\n\x1a\n'


def test_plot_run_leaves_out_empty_panels(tmp_path):
  from robustjax.training import _outputs

  recs = [{'step': s, 'kind': 'eval', 'train_loss': 1.0 / s} for s in (1, 2, 3)]
  assert _outputs.plot_run(recs, str(tmp_path / 'a.png')) == str(tmp_path / 'a.png')
  assert _outputs.plot_run([{'step': 1, 'kind': 'eval'}], str(tmp_path / 'b.png')) is None
  assert not (tmp_path / 'b.png').exists()


def _cli(args, monkeypatch):
  from absl import flags

  from robustjax import cli

  flags.FLAGS.unparse_flags()
  try:
    return cli.main(['robustjax', *args])
  finally:
    flags.FLAGS.unparse_flags()
    monkeypatch.setattr(sys, 'argv', sys.argv)


def test_compare_table_figure_and_folder_names(tmp_path, capsys, monkeypatch):
  args = [
    'compare',
    '--config=default:smoke',
    '--rules=bucketing(s=2)+median',
    '--attacks=none,gaussian(std=3.0, mean=0.0)',
    f'--workdir={tmp_path}',
  ]
  assert _cli(args, monkeypatch) == 0
  out = capsys.readouterr().out
  table = [line for line in out.splitlines() if line.startswith('|')]
  assert len(table) == 3 and len({len(line) for line in table}) == 1  # the columns line up
  assert table[0].split('|')[1].strip() == 'rule' and 'bucketing(s=2)+median' in table[2]
  runs = sorted(d for d in os.listdir(tmp_path) if os.path.isdir(tmp_path / d))
  assert len(runs) == 2 and all(re.fullmatch(r'[A-Za-z0-9._+-]+', d) for d in runs), runs
  assert 'bucketing_s-2+median__gaussian_std-3.0_mean-0.0' in runs
  with open(tmp_path / 'compare.png', 'rb') as fh:
    assert fh.read(8) == b'\x89PNG\r\n\x1a\n'
  assert (tmp_path / 'compare.md').read_text().strip() == '\n'.join(table)


def test_main_cli(tmp_path, capsys, monkeypatch):
  argv = [
    'train',
    f'--workdir={tmp_path}',
    '--config=default:smoke',  # a shipped config, by name
    '--config.num_steps=2',
    '--config.rule=nnm+krum',
    '--config.attack=ipm(eps=0.5)',
    '--config.backend=vmap',
  ]
  monkeypatch.setattr(sys, 'argv', list(sys.argv))
  assert _cli(argv, monkeypatch) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out['step'] == 2 and out['rule'] == 'nnm+krum'
  with open(os.path.join(tmp_path, 'summary.json')) as fh:
    assert json.load(fh)['config']['attack'] == 'ipm(eps=0.5)'


@pytest.mark.parametrize(
  'extra, message',
  [
    (['--config.num_byzantines=2'], 'unknown config field .num_byzantines.; Did you mean'),
    (
      ['--config.rule=krumm'],
      'unknown aggregator .krumm.; known aggregators: adaptive_multikrum, bulyan',
    ),
    (['--config.attack=ipm(epsilon=10)'], "attack ipm: unknown parameter 'epsilon'; accepted: eps"),
    (['--config.num_byzantine=5'], r'trimmed_mean: needs n > 2f'),
    (['--config.learning_rate=-1.0'], r'learning_rate must be a finite number in \(0, inf\)'),
  ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, capsys, monkeypatch, extra, message):
  workdir = tmp_path / 'never'
  monkeypatch.setattr(sys, 'argv', list(sys.argv))
  rc = _cli(['train', f'--workdir={workdir}', '--config=default:smoke', *extra], monkeypatch)
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1 and 'Traceback' not in err, err
  assert re.search(message, err), err
  assert not workdir.exists()  # a run that failed validation leaves no workdir


def test_unknown_command_and_config_name(capsys, monkeypatch):
  monkeypatch.setattr(sys, 'argv', list(sys.argv))
  assert _cli(['trian'], monkeypatch) == 2
  assert "unknown command 'trian'" in capsys.readouterr().err
  assert _cli(['train', '--config=nope', '--workdir=/tmp/x'], monkeypatch) == 2
  assert 'shipped configs: cifar10_resnet20, default' in capsys.readouterr().err


def test_installed_command_runs_outside_the_repository(tmp_path):
  # `python -m robustjax` from another directory: the shipped configs travel with the package.
  env = {**os.environ, 'PYTHONPATH': ''}
  # One CPU device, as a user's shell has (the run's other XLA flags kept: conftest.py).
  flags = [f for f in env.pop('XLA_FLAGS', '').split() if 'device_count' not in f]
  if flags:
    env['XLA_FLAGS'] = ' '.join(flags)
  proc = subprocess.run(
    [sys.executable, '-m', 'robustjax', 'train', '--config=default:smoke',
     f'--workdir={tmp_path / "run"}', '--config.num_steps=2', '--config.backend=vmap'],
    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])['step'] == 2
  proc = subprocess.run(
    [sys.executable, '-m', 'robustjax', 'configs'], cwd=tmp_path, env=env, capture_output=True,
    text=True, timeout=120,
  )  # fmt: skip
  assert 'default' in proc.stdout and 'sweep_byzfl' in proc.stdout


def test_ctrl_c_says_where_the_checkpoint_is(smoke, tmp_path, capsys, monkeypatch):
  workdir = str(tmp_path / 'run')
  real = training.make_advance
  calls = []

  def interrupted(*a, **kw):
    advance = real(*a, **kw)

    def run(state, data, length):
      calls.append(length)
      if len(calls) == 3:  # after the step-3 checkpoint, during the next chunk
        raise KeyboardInterrupt
      return advance(state, data, length)

    return run

  monkeypatch.setattr(training._loop, 'make_advance', interrupted)
  with pytest.raises(KeyboardInterrupt):
    training.train_and_evaluate(smoke, workdir)
  err = capsys.readouterr().err
  assert 'interrupted at step 3; checkpoint at step 3; rerun the same command to resume' in err
  monkeypatch.setattr(training._loop, 'make_advance', real)
  assert training.train_and_evaluate(smoke, workdir)['resumed_from'] == 3


def test_configs_share_the_default_fields(smoke):
  from robustjax import configs

  cifar = configs.get('cifar10_resnet20')
  assert set(cifar.keys()) == set(smoke.keys())
  assert cifar.model == 'resnet20' and cifar.dataset == 'cifar10'
  with pytest.raises(ValueError, match='variant'):
    configs.get('default', 'huge')
  # The old paths still work for old command lines.
  assert _load('experiments/configs/default.py', 'old_default').get_config('smoke') == smoke


# Reliability: the workdir belongs to one config; corrupt files never block or lose a run.
def _copy(config, **kw):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.update(kw)
  return c


def test_a_different_config_is_refused_naming_the_fields(smoke, full_run, tmp_path):
  workdir = str(tmp_path / 'run')
  training.train_and_evaluate(smoke, workdir, max_steps=3)
  for kw, field in [({'rule': 'median'}, 'rule'), ({'num_workers': 10}, 'num_workers')]:
    with pytest.raises(training.ConfigMismatchError, match=f'{field}: .* -> '):
      training.train_and_evaluate(_copy(smoke, **kw), workdir)
  # Presentation fields may change; num_steps too under a constant learning rate.
  training.train_and_evaluate(_copy(smoke, log_every=3, progress=False), workdir, max_steps=1)
  # An explicit restart discards the old run and starts a fresh one under the new config.
  other = training.train_and_evaluate(_copy(smoke, rule='median'), workdir, restart=True)
  assert other['finished'] and other['resumed_from'] == 0 and other['rule'] == 'median'
  assert [r['step'] for r in _records(workdir) if r['kind'] == 'eval'] == [3, 6]


def test_resume_and_finished_are_announced(smoke, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  training.train_and_evaluate(smoke, workdir, max_steps=4)
  capsys.readouterr()
  training.train_and_evaluate(smoke, workdir)
  assert 'resuming from step 4 of 6' in capsys.readouterr().err  # saved at the stop
  training.train_and_evaluate(smoke, workdir)
  assert 'already finished' in capsys.readouterr().err


def _corrupt(path, how):
  if how == 'truncated':
    with open(path, 'r+b') as fh:
      fh.truncate(max(1, os.path.getsize(path) // 2))
  elif how == 'emptied':
    open(path, 'w').close()
  else:  # a flipped byte in the middle
    with open(path, 'r+b') as fh:
      data = bytearray(fh.read())
      data[len(data) // 2] ^= 0xFF
      fh.seek(0)
      fh.write(data)


@pytest.mark.parametrize('how', ['truncated', 'emptied', 'flipped'])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous(smoke, full_run, tmp_path, how):
  workdir = str(tmp_path / 'run')
  training.train_and_evaluate(smoke, workdir)  # checkpoints at 3 and 6
  latest = os.path.join(workdir, 'checkpoints', '6')
  files = sorted(
    (os.path.join(d, f) for d, _, fs in os.walk(latest) for f in fs), key=os.path.getsize
  )
  for path in files:  # damage every file, so whatever orbax reads first is corrupt
    _corrupt(path, how)
  summary = training.train_and_evaluate(smoke, workdir)
  assert summary['resumed_from'] == 3 and summary['finished']
  assert summary['final'] == full_run[1]['final']  # steps 4-6 were redone, bit for bit
  assert os.listdir(os.path.join(workdir, 'corrupt'))


def test_a_torn_metrics_line_is_dropped(smoke, full_run, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  training.train_and_evaluate(smoke, workdir, max_steps=4)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as fh:
    fh.write('{"step": 5, "kind": "tra')  # killed mid-write
  training.train_and_evaluate(smoke, workdir)
  assert 'dropped 1 unreadable line' in capsys.readouterr().err
  assert _records(workdir) == _records(full_run[0])


def test_an_unwritable_metrics_file_is_never_deleted(smoke, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  training.train_and_evaluate(_copy(smoke, checkpoint_every=0), workdir, max_steps=2)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  before = open(metrics).read()
  # As if the file were read-only to this user (root can write anything, so say it is not).
  real = os.access
  monkeypatch.setattr(os, 'access', lambda p, mode: False if p == metrics else real(p, mode))
  with pytest.raises(PermissionError, match='nothing was changed'):
    training.train_and_evaluate(_copy(smoke, checkpoint_every=0), workdir)
  assert open(metrics).read() == before


def test_a_failed_validation_leaves_no_workdir(smoke, tmp_path):
  workdir = str(tmp_path / 'never')
  with pytest.raises(ValueError, match='learning_rate'):
    training.train_and_evaluate(_copy(smoke, learning_rate=-1.0), workdir)
  assert not os.path.exists(workdir)
