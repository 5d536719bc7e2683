"""`robustjax.host.retain_freed_memory`: a freed buffer's pages are reused, not faulted anew."""

import os
import subprocess
import sys

import pytest

_PROBE = r"""
import resource
import jax, jax.numpy as jnp
from robustjax import host

# A step's buffers: a 1,024 x 4,810 float32 output and temporaries, about 20 MB each.
step = jax.jit(lambda x: (jnp.cumsum(x * 2.0, axis=0) + 1.0).T @ x[:, :8])
x = jnp.ones((1024, 4810))

def faults_per_call(calls=15):
  # The median over calls: a call that another process's load (the test run's other workers)
  # makes glibc map afresh does not decide the result.
  counts = []
  for _ in range(calls):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(step(x))
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  return sorted(counts)[calls // 2]

faults_per_call(2)
plain = faults_per_call()
applied = host.retain_freed_memory()
faults_per_call(2)  # the freed blocks are mapped once more, then kept
print(applied, plain, faults_per_call())
"""


def _faults_expected():
  """Faults per call that show fresh mappings: about 10,000 with 4 KiB pages; with transparent
  huge pages always on, a 20 MB block is ten 2 MiB pages."""
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as fh:
      huge = '[always]' in fh.read()
  except OSError:
    huge = False
  return 10 if huge else 5000


def _probe(env):
  # The probe's kernels optimised (no XLA_FLAGS): unoptimised, as the default run compiles them
  # (conftest.py), its cumulative sums took 15 s instead of 5.
  env = {**os.environ, 'XLA_FLAGS': '', **env}
  out = subprocess.run([sys.executable, '-c', _PROBE], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  applied, plain, kept = out.stdout.split()
  return applied == 'True', float(plain), float(kept)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt')
def test_freed_memory_is_reused_without_page_faults():
  applied, plain, kept = _probe({})
  assert applied
  # glibc maps the large blocks afresh at every call, then keeps them.
  assert plain > _faults_expected(), plain
  # Kept: the median call faults no page in (about 990, one 4 MB block, in a few processes).
  assert kept < plain / 4, (plain, kept)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt')
def test_the_environment_can_keep_glibc_defaults():
  applied, plain, kept = _probe({'ROBUSTJAX_RETAIN_HOST_MEMORY': '0'})
  assert not applied and kept > _faults_expected(), kept
