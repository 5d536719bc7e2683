"""`robustjax.host`: a freed buffer's pages are reused, not faulted anew (`retain_freed_memory`);
jax's random bits lowered unrolled are the same bits (`unroll_threefry`)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from robustjax import host

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


_BLOCKS_PROBE = r"""
import ctypes, resource, sys
from robustjax import host

libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
BLOCK = 200 << 20  # below the mmap threshold: from the heap

def faults_per_call(calls=7):
  # A call of a ByzFL rule at 64 x 10^6: several stack-sized temporaries, touched, then freed.
  counts = []
  for _ in range(calls):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(BLOCK) for _ in range(3)]
    for b in blocks:
      libc.memset(b, 1, BLOCK)
    for b in blocks:
      libc.free(b)
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  return sorted(counts)[calls // 2]

# Each argument a heap top, applied in order (none: the default).
tops = [int(a) for a in sys.argv[1:]]
applied = all([host.retain_freed_memory(t) for t in tops] or [host.retain_freed_memory()])
faults_per_call(2)
print(applied, faults_per_call())
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt')
def test_a_higher_heap_top_keeps_several_large_blocks():
  def probe(*args):
    out = subprocess.run(
      [sys.executable, '-c', _BLOCKS_PROBE, *map(str, args)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    applied, faults = out.stdout.split()
    assert applied == 'True'
    return int(faults)

  # 600 MB freed at the top of the heap: above the default 256 MiB it is handed back, and every
  # call faults its blocks in again (3 x 51,200 pages of 4 KiB); kept below 2 GiB, none.
  page_faults_per_block = (200 << 20) // 4096 // (512 if _faults_expected() == 10 else 1)
  assert probe() >= 2 * page_faults_per_block
  assert probe(2047 << 20) < page_faults_per_block / 10
  # The last call's heap top holds, back and forth.
  assert probe(2047 << 20, 256 << 20) >= 2 * page_faults_per_block
  assert probe(2047 << 20, 256 << 20, 2047 << 20) < page_faults_per_block / 10
  with pytest.raises(ValueError, match='heap_top'):
    host.retain_freed_memory(2**31)


# Random123's known-answer vectors for Threefry-2x32 with 20 rounds: (key, counter, output).
_THREEFRY_KAT = [
  ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
  ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
  ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize('key, counter, expected', _THREEFRY_KAT)
def test_unrolled_threefry_gives_the_known_answers(key, counter, expected):
  words = [np.uint32(v) for v in (*key, *counter)]
  got = jax.jit(host.threefry2x32)(*words)
  assert tuple(int(w) for w in got) == expected


def test_unrolled_threefry_takes_arrays_and_broadcasts_a_key_over_counters():
  keys, counters, expected = (np.array(v, np.uint32).T for v in zip(*_THREEFRY_KAT))
  got = jax.jit(host.threefry2x32)(*keys, *counters)  # the three vectors as one array call
  np.testing.assert_array_equal(np.stack(got), expected)
  # One key against a (2, 3) grid of counters, every one the third vector's counter.
  (k1, k2), (c1, c2), want = _THREEFRY_KAT[2]
  grid = [np.full((2, 3), c, np.uint32) for c in (c1, c2)]
  got = jax.jit(host.threefry2x32)(np.uint32(k1), np.uint32(k2), *grid)
  assert all(np.all(np.asarray(w) == e) for w, e in zip(got, want)) and got[0].shape == (2, 3)


_DRAWS = r"""
import jax, numpy as np
from robustjax import host

def draws(key):
  k1, k2 = jax.random.split(key)
  rows = jax.vmap(lambda r: jax.random.randint(jax.random.fold_in(k1, r), (25,), 0, 300))
  return rows(np.arange(64)), jax.random.normal(k2, (3, 1001)), jax.random.bits(key, (7,))

def run():
  f = jax.jit(draws)
  out = [f(jax.random.key(s)) for s in (0, 1, 2**31 - 1)]
  return out, f.lower(jax.random.key(0)).as_text().count('while')

before, loops_before = run()
applied = host.unroll_threefry()
jax.clear_caches()
after, loops_after = run()
same = all(np.array_equal(a, b) for x, y in zip(before, after) for a, b in zip(x, y))
print(applied, loops_before, loops_after, same)
"""


def _draws(env):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **env}
  out = subprocess.run([sys.executable, '-c', _DRAWS], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  applied, before, after, same = out.stdout.split()
  return applied == 'True', int(before), int(after), same == 'True'


def test_unrolled_threefry_draws_the_same_bits_without_loops():
  applied, loops_before, loops_after, same = _draws({'ROBUSTJAX_UNROLL_THREEFRY': '1'})
  assert applied and same
  assert loops_before > 0 and loops_after == 0, (loops_before, loops_after)


def test_the_environment_can_keep_jax_threefry_lowering():
  applied, loops_before, loops_after, same = _draws({'ROBUSTJAX_UNROLL_THREEFRY': '0'})
  assert not applied and same and loops_after == loops_before > 0
