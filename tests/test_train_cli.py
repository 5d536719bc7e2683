"""experiments/train.py end to end on a tiny config: outputs, resume after a kill, CLI flags."""

import importlib.util
import json
import os
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
  return _load('experiments/configs/default.py', 'default_config').get_config('smoke')


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
  recs = _records(workdir)
  assert [r['step'] for r in recs if r['kind'] == 'eval'] == [3, 6]
  assert [r['step'] for r in recs if r['kind'] == 'train'] == [2, 4, 6]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']


def test_resume_after_kill_equals_uninterrupted(smoke, full_run, tmp_path):
  _, full = full_run
  workdir = str(tmp_path)
  first = training.train_and_evaluate(smoke, workdir, max_steps=4)  # killed after step 4
  assert not first['finished'] and first['step'] == 4
  resumed = training.train_and_evaluate(smoke, workdir)  # restarts from the step-3 checkpoint
  assert resumed['finished']
  assert resumed['final'] == full['final']  # bit for bit
  assert _records(workdir) == _records(full_run[0])  # the logged step 4 was dropped and redone


def test_main_cli(tmp_path, capsys, monkeypatch):
  train = _load('experiments/train.py', 'train_main')
  from absl import flags

  argv = [
    'train.py',
    f'--workdir={tmp_path}',
    f'--config={ROOT}/experiments/configs/default.py:smoke',
    '--config.num_steps=2',
    '--config.rule=nnm+krum',
    '--config.attack=ipm(eps=0.5)',
    '--config.backend=vmap',
  ]
  monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads overrides from sys.argv
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  try:
    train.main(['train.py'])
  finally:
    flags.FLAGS.unparse_flags()
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out['step'] == 2 and out['rule'] == 'nnm+krum'
  with open(os.path.join(tmp_path, 'summary.json')) as fh:
    assert json.load(fh)['config']['attack'] == 'ipm(eps=0.5)'


def test_configs_share_the_default_fields(smoke):
  cifar = _load('experiments/configs/cifar10_resnet20.py', 'cifar_config').get_config()
  assert set(cifar.keys()) == set(smoke.keys())
  assert cifar.model == 'resnet20' and cifar.dataset == 'cifar10'
  with pytest.raises(ValueError, match='variant'):
    _load('experiments/configs/default.py', 'default_config2').get_config('huge')


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
