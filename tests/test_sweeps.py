"""Sweeps and analysis: grid expansion, run ids, resume, atomic writes, worst case, vmap."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from robustjax import analysis, sweeps, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_sweep(name, variant=''):
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  path = os.path.join(ROOT, 'experiments', 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'_cfg_{name}', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


@pytest.fixture(scope='module')
def smoke():
  return _load_sweep('sweep_smoke')


# ------------------------------------------------------------------------------------------------
# Grid expansion and run ids.


def test_expand_product_pre_and_tied_axes():
  base = {'rule': 'mean', 'attack': 'none', 'num_workers': 5, 'num_byzantine': 1, 'seed': 0}
  grid = {
    'rule': ['krum', 'median'],
    'pre': ['', 'bucketing(s=2)'],
    'workers': [{'num_workers': 11, 'num_byzantine': 1}, {'num_workers': 12, 'num_byzantine': 2}],
    'seed': [0, 1, 2],
  }
  runs = sweeps.expand(base, grid)
  assert len(runs) == 2 * 2 * 2 * 3
  rules = {r.config['rule'] for r in runs}
  assert rules == {'krum', 'median', 'bucketing(s=2)+krum', 'bucketing(s=2)+median'}
  assert {(r.config['num_workers'], r.config['num_byzantine']) for r in runs} == {(11, 1), (12, 2)}
  assert 'pre' not in runs[0].config
  # The last axis varies fastest; overrides flatten the tied dict.
  assert [r.config['seed'] for r in runs[:3]] == [0, 1, 2]
  assert runs[0].overrides == {
    'rule': 'krum',
    'pre': '',
    'num_workers': 11,
    'num_byzantine': 1,
    'seed': 0,
  }
  assert len({r.run_id for r in runs}) == len(runs)
  # Groups: all but the seed equal -> 8 groups of 3.
  groups = sweeps.group_runs(runs)
  assert [len(g) for g in groups] == [3] * 8


def test_expand_errors():
  base = {'rule': 'mean', 'seed': 0}
  with pytest.raises(ValueError, match='unknown axis'):
    sweeps.expand(base, {'lr': [0.1]})
  with pytest.raises(ValueError, match='unknown config field'):
    sweeps.expand(base, {'x': [{'nope': 1}]})
  with pytest.raises(ValueError, match='no values'):
    sweeps.expand(base, {'seed': []})
  with pytest.raises(ValueError, match='same configuration'):
    sweeps.expand(base, {'seed': [0, 0]})


def test_run_ids_stable():
  a = {'rule': 'krum', 'seed': 3, 'num_workers': 10, 'progress': True, 'log_every': 5}
  b = {'log_every': 50, 'num_workers': 10, 'seed': 3, 'rule': 'krum', 'progress': False}
  assert sweeps.run_id(a) == sweeps.run_id(b)  # key order and logging fields do not matter
  assert sweeps.run_id(a) != sweeps.run_id({**a, 'seed': 4})
  # A literal: the id must not change across sessions (results on disk are found by it).
  assert sweeps.run_id({'rule': 'krum', 'seed': 3}) == 'cdaef1b5289d'
  # A field added later with a None (unset placeholder) default keeps old ids valid.
  assert sweeps.run_id({'rule': 'krum', 'seed': 3, 'new_field': None}) == 'cdaef1b5289d'


def test_atomic_write_json_keeps_old_file_on_failure(tmp_path):
  path = str(tmp_path / 'r.json')
  sweeps.atomic_write_json(path, {'a': 1})

  class Boom:
    def __repr__(self):
      raise RuntimeError('boom')

  with pytest.raises(RuntimeError):
    sweeps.atomic_write_json(path, {'a': 2, 'b': [1, 2, {'c': Boom()}]})
  with open(path) as fh:
    assert json.load(fh) == {'a': 1}
  assert os.listdir(tmp_path) == ['r.json']  # no temporary file left behind


# ------------------------------------------------------------------------------------------------
# Worst case and learning-rate selection.


def test_worst_case_matches_hand_computed_table():
  # (rule, f, attack, lr, seed, acc)
  table = [
    ('gm', 1, 'sf', 0.1, 0, 0.90),
    ('gm', 1, 'sf', 0.1, 1, 0.80),  # mean 0.85
    ('gm', 1, 'ipm', 0.1, 0, 0.60),
    ('gm', 1, 'ipm', 0.1, 1, 0.70),  # mean 0.65 <- min at 0.1
    ('gm', 1, 'sf', 0.01, 0, 0.75),
    ('gm', 1, 'sf', 0.01, 1, 0.75),  # 0.75
    ('gm', 1, 'ipm', 0.01, 0, 0.72),
    ('gm', 1, 'ipm', 0.01, 1, 0.70),  # 0.71 <- min at 0.01
    ('gm', 2, 'sf', 0.1, 0, 0.50),
    ('gm', 2, 'ipm', 0.1, 0, 0.40),  # min 0.40 (one seed)
    ('gm', 2, 'sf', 0.01, 0, 0.30),
    ('gm', 2, 'ipm', 0.01, 0, 0.45),  # min 0.30
  ]
  rows = [
    {
      'rule': r,
      'num_byzantine': f,
      'heterogeneity': 'iid',
      'attack': a,
      'learning_rate': lr,
      'seed': s,
      'test_accuracy': acc,
    }
    for r, f, a, lr, s, acc in table
  ]
  cells = analysis.worst_case(rows)
  by_f = {c['num_byzantine']: c for c in cells}
  # f=1: max(min(0.85, 0.65), min(0.75, 0.71)) = 0.71 at lr 0.01, worst attack ipm.
  assert by_f[1]['worst_case'] == pytest.approx(0.71)
  assert by_f[1]['best_lr'] == 0.01 and by_f[1]['worst_attack'] == 'ipm'
  assert by_f[1]['per_attack'] == pytest.approx({'sf': 0.75, 'ipm': 0.71})
  assert by_f[1]['num_seeds'] == 2 and by_f[1]['complete']
  # f=2: max(0.40, 0.30) = 0.40 at lr 0.1, worst attack ipm.
  assert by_f[2]['worst_case'] == pytest.approx(0.40)
  assert by_f[2]['best_lr'] == 0.1 and by_f[2]['worst_attack'] == 'ipm'
  rl, cl, t = analysis.pivot(cells, 'num_byzantine', 'heterogeneity')
  assert rl == [1, 2] and cl == ['iid'] and t[:, 0] == pytest.approx([0.71, 0.40])
  # A missing attack for a cell is flagged.
  partial = analysis.worst_case(rows[:2] + rows[8:])
  assert not {c['num_byzantine']: c for c in partial}[1]['complete']


def test_heterogeneity_labels_and_order():
  assert analysis.heterogeneity({'split': 'gamma', 'gamma': 0.33}) == 'γ=0.33'
  assert analysis.heterogeneity({'split': 'dirichlet', 'alpha': 0.1}) == 'α=0.1'
  assert analysis.heterogeneity({'split': 'extreme'}) == 'extreme'
  cells = [{'f': 1, 'h': h, 'worst_case': 0.5} for h in ('γ=0', 'γ=1', 'γ=0.33')]
  assert analysis.pivot(cells, 'f', 'h')[1] == ['γ=1', 'γ=0.33', 'γ=0']


# ------------------------------------------------------------------------------------------------
# Execution: a tiny sweep end to end, resume after a kill, vmapped seeds == sequential runs.


def test_tiny_sweep_end_to_end_with_kill_and_resume(smoke, tmp_path, capsys):
  out = str(tmp_path / 'sweep')
  base, grid = smoke['base'], smoke['grid']
  # A stale temporary file from a kill during a write: ignored, and its run is still done.
  os.makedirs(os.path.join(out, 'runs'))
  open(os.path.join(out, 'runs', '.tmp-abc.json'), 'w').write('{"trunc')

  def kill(index, records):
    raise KeyboardInterrupt  # killed right after the first group's files were written

  with pytest.raises(KeyboardInterrupt):
    sweeps.run_sweep(base, grid, out, on_group=kill, progress=False)
  first = sweeps.load_results(out)
  assert len(first) == 4 and all(r['vmapped'] and r['group_size'] == 4 for r in first)
  mtimes = {f: os.path.getmtime(os.path.join(out, 'runs', f)) for f in os.listdir(out + '/runs')}

  s = sweeps.run_sweep(base, grid, out, progress=False)
  assert s == {**s, 'total': 8, 'skipped': 4, 'ran': 4, 'remaining': 0}
  for f, t in mtimes.items():  # finished runs were not rerun
    assert os.path.getmtime(os.path.join(out, 'runs', f)) == t
  s = sweeps.run_sweep(base, grid, out, progress=False)
  assert s['ran'] == 0 and s['skipped'] == 8

  # A torn record (a full disk) and a hand-edited one: left out of the analysis with a warning
  # naming them, and rerun by the next call.
  names = sorted(f for f in os.listdir(out + '/runs') if not f.startswith('.'))
  torn, edited = (os.path.join(out, 'runs', f) for f in names[:2])
  with open(torn, 'r+') as fh:
    fh.truncate(40)
  with open(edited) as fh:
    rec = json.load(fh)
  del rec['final']
  with open(edited, 'w') as fh:
    json.dump(rec, fh)
  assert len(sweeps.load_results(out)) == 6
  err = capsys.readouterr().err
  assert os.path.basename(torn) in err and 'missing final' in err
  s = sweeps.run_sweep(base, grid, out, progress=False)
  assert s['ran'] == 2 and s['remaining'] == 0
  assert 'rerunning that run' in capsys.readouterr().err

  records = sweeps.load_results(out)
  assert sorted(r['run_id'] for r in records) == sorted(r.run_id for r in sweeps.expand(base, grid))
  for r in records:
    assert r['curve']['step'] == [2, 4]
    assert 0.0 <= r['final']['test_accuracy'] <= 1.0
  paths = analysis.analyse(out, title='smoke')
  rows = analysis.read_csv(paths['runs'])
  assert len(rows) == 8 and set(analysis.RUN_COLUMNS) <= set(rows[0])
  assert len(analysis.read_csv(paths['curves_csv'])) == 16
  wc = analysis.read_csv(paths['worst_case'])
  assert len(wc) == 4  # 2 rules x 2 heterogeneities (f fixed)
  for key in ('heatmap', 'curves'):
    with open(paths[key], 'rb') as fh:
      assert fh.read(8) == b'\x89PNG\r\n\x1a\n'


def test_vmapped_members_match_sequential_runs(smoke):
  base = dict(smoke['base'].to_dict(), rule='trimmed_mean', attack='alie', num_steps=4)
  configs = [dict(base, seed=s, gamma=g) for s, g in [(0, 1.0), (1, 0.0), (2, 0.5)]]
  batched = sweeps.run_group(configs, vmap=True)
  assert all(r['vmapped'] for r in batched)
  # Reference: each member run alone through the public engine (Experiment.step / evaluate).
  for cfg, res in zip(configs, batched):
    exp = training.build(sweeps._to_config(cfg))
    state = exp.init_state()
    accs = []
    for step in range(1, 5):
      state, _ = exp.step(state)
      if step % 2 == 0:
        accs.append(exp.evaluate(state))
    np.testing.assert_allclose(
      res['curve']['test_accuracy'], [a['test_accuracy'] for a in accs], atol=2e-3
    )
    np.testing.assert_allclose(
      res['curve']['train_loss'], [a['train_loss'] for a in accs], rtol=1e-4, atol=1e-5
    )
  # Different seeds / splits really differ (the batch is not one run repeated).
  assert len({r['curve']['train_loss'][-1] for r in batched}) == 3
