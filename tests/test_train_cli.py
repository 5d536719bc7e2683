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
