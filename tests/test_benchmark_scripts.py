"""The benchmark scripts run end to end at a small size (slow: about 30 s each), and name the
machine they ran on."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_name_gives_the_model_and_the_cores(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(ROOT, 'experiments'))
  from _process import cpu_name

  name = cpu_name()
  model, _, cores = name.rpartition(', ')
  assert model and cores.endswith(' cores') and int(cores.split()[0]) >= 1, name


def test_fma_peak_is_measured_where_gcc_and_avx2_are(monkeypatch):
  """The FMA-peak witness builds for the widest vectors and runs where it can, and says None (not
  a guess) elsewhere."""
  monkeypatch.syspath_prepend(os.path.join(ROOT, 'experiments'))
  import _process

  flags = _process._cpu_flags()
  peak = _process.fma_peak_gflops(threads=1, runs=1)
  if _process.fma_lanes() is None:
    assert peak is None
  else:
    assert _process.fma_lanes() == (16 if 'avx512f' in flags else 8)
    if _process.shutil.which('gcc'):
      assert peak is not None and 1.0 < peak < 10_000.0, peak
  if 'avx512f' in flags and _process.shutil.which('gcc'):  # the AVX2 build runs here too
    monkeypatch.setattr(_process, '_cpu_flags', lambda: flags - {'avx512f'})
    assert _process.fma_lanes() == 8
    assert 1.0 < _process.fma_peak_gflops(threads=1, runs=1) < 10_000.0
  monkeypatch.setattr(_process, '_cpu_flags', lambda: {'sse2'})
  assert _process.fma_lanes() is None and _process.fma_peak_gflops(threads=1, runs=1) is None
  monkeypatch.setattr(_process, '_cpu_flags', lambda: flags)
  monkeypatch.setattr(_process.shutil, 'which', lambda name: None)
  assert _process.fma_peak_gflops(threads=1, runs=1) is None


@pytest.mark.slow
def test_gpu_benchmark_script_small(tmp_path):
  env = {**os.environ, 'SMALL': '1', 'OUT': str(tmp_path), 'JAX_PLATFORMS': 'cpu'}
  env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env['PATH']
  proc = subprocess.run(
    ['bash', os.path.join(ROOT, 'experiments', 'benchmark_gpu.sh')],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(tmp_path / 'aggregators.json') as fh:
    result = json.load(fh)
  rules = {r['rule']: r for r in result['rows']}
  for name in ('trimmed_mean', 'krum', 'nnm+krum', 'clipping(c=1.0)+mean', 'bucketing+median'):
    assert rules[name].get('time_s', 0) > 0, rules[name]
  assert result['info']['gram']['peak_gflops'] > 0
  assert 'worker-steps/s' in (tmp_path / 'training.txt').read_text()
  with open(tmp_path / 'scaling.json') as fh:
    scaling = json.load(fh)['scaling']
  assert {r['rule'] for r in scaling} == {'median', 'trimmed_mean', 'meamed'}
  assert all(r['time_s'] > 0 for r in scaling)


@pytest.mark.slow
def test_aggregator_benchmark_on_two_cpu_devices(tmp_path):
  """`--cpu_devices=2`: the rules through `parallel.sharded_update`, the Gram through shard_map."""
  out = tmp_path / 'agg.json'
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'experiments', 'benchmark_aggregators.py')]
    + ['--n=16', '--d=3001', '--f=3', '--repeats=1', '--peak_size=64', '--cpu_devices=2']
    + ['--rules=krum,median,nnm+krum', f'--json_out={out}'],
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result['info']['cpu_devices'] == 2
  assert result['info']['cpu'] in proc.stdout  # the printed header names the machine
  assert all(r.get('time_s', 0) > 0 for r in result['rows']), result['rows']
  assert 'robustjax scaled_gram, 2 devices' in result['info']['gram']
  assert 'robustjax centred product, 2 devices' in result['info']['gram']
  gram = result['info']['gram']
  if 'fma_peak_gflops' in gram:  # where gcc and AVX2 are: each product against the FMA peak too
    assert gram['fma_peak_gflops'] > 0 and 'FMA peak' in proc.stdout
    assert gram['fma_lanes'] in (8, 16)
    assert all('of_fma_peak' in v for v in gram.values() if isinstance(v, dict))


@pytest.mark.slow
def test_random_benchmark_runs_both_lowerings_and_finds_the_same_bits():
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'experiments', 'benchmark_random.py')]
    + ['--rounds=1', '--calls=2', '--cases=draws'],
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [line for line in proc.stdout.splitlines() if line.startswith('| step draws')]
  assert len(rows) == 2, proc.stdout
  assert all(row.rstrip(' |').endswith('yes') for row in rows), rows
