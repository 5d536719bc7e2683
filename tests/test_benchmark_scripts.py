"""The benchmark scripts run end to end at a small size (slow: about 30 s each)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
