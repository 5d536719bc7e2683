"""Process settings for CPU hosts that make the training step faster without changing a result.

**The allocator** (`retain_freed_memory`). XLA:CPU takes every temporary and output buffer of a
step from the C allocator and frees it at the end. glibc serves blocks above its mmap threshold
(128 KiB, raised on the fly up to 32 MiB) with a fresh `mmap` and returns them at `free`, and
trims the heap's free top back to the system. A step over a stack of a few MB per leaf so touches
its buffers for the first time every step: each 4 KiB page is a page fault the kernel zeroes. The
training step at n = 1,024 workers (MLP of 4,810 parameters, trimmed mean) took 9,600-14,000
minor page faults and 35-50 ms per step, against 1-1,450 faults (8,100 in one run of eight:
glibc's placement varies) and 24-30 ms once the freed memory is kept (BENCHMARKS.md, "The host
allocator").

`retain_freed_memory` raises both thresholds to 256 MiB (`mallopt`), so freed blocks up to that
size stay in the process and the next step reuses the same, already mapped pages. glibc's own
cap, 32 MiB, was not enough (36-41 ms, 10,500 faults): some of the step's blocks are larger.
Larger blocks are still mapped afresh: at 1 GiB, a step over stacks of 400 MB (n = 1,024, 10⁵
parameters) kept 0.7 GiB more at its peak for no gain, where 256 MiB keeps 0.1 GiB more. The
cost otherwise: the process keeps the memory of its largest step, as a long training job does
anyway. Set ``ROBUSTJAX_RETAIN_HOST_MEMORY=0`` to keep glibc's defaults.

**The random bits** (`unroll_threefry`). jax lowers its Threefry-2x32 hash, behind every
`jax.random` draw, to a `while` loop of five iterations on CPU (on other platforms it is
unrolled). XLA:CPU runs each iteration as separate kernels over the whole array, so a draw costs
several passes over it. `unroll_threefry` lowers the same hash unrolled on CPU, one fused
elementwise loop: the same bits (only the loop is unrolled). On 2 Intel Xeon cores
(`experiments/benchmark_random.py`, BENCHMARKS.md) a (64, 10⁶) normal draw took 0.25-0.33 s
against 0.81-1.15, and a training step with local DP noise was 1.06-1.26x faster; a step without
such noise draws little (0.03-0.16 ms at n = 64) and did not change beyond the runs' spread,
nor did the training steps' compile times. Set ``ROBUSTJAX_UNROLL_THREEFRY=0`` to keep jax's
lowering.

`robustjax.training.build` applies both on CPU backends. Both act on the whole process, and the
second only on computations compiled afterwards.

References:
  glibc manual, "Memory Allocation Tunables" and mallopt(3) (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD).
  J. K. Salmon, M. A. Moraes, R. O. Dror, D. E. Shaw, "Parallel random numbers: as easy as
  1, 2, 3", SC 2011 (Threefry).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import numpy as np
from absl import logging

__all__ = ['retain_freed_memory', 'threefry2x32', 'unroll_threefry']

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and stay there once freed.
_THRESHOLD = 256 << 20


# The heap top last applied and whether it was: repeated calls with it do nothing.
_RETAINED: dict = {}


def retain_freed_memory(heap_top: int = _THRESHOLD) -> bool:
  """Keeps the memory freed by one step for the next (glibc only); True when applied.

  Blocks below 256 MiB come from the heap, and up to `heap_top` bytes of free memory at its top
  stay in the process (glibc's trim threshold; default 256 MiB, as the mmap threshold). A
  benchmark that times code allocating several blocks of a few hundred MB per call (ByzFL's
  stack-sized temporaries) raises it, so that the blocks freed by one call are not handed back
  and faulted in again by the next (BENCHMARKS.md).

  Idempotent (the last call's `heap_top` holds). Does nothing (False) off Linux, without glibc's
  `mallopt`, or when the environment sets ``ROBUSTJAX_RETAIN_HOST_MEMORY=0``.

  Raises:
    ValueError: `heap_top` outside (0, 2^31) bytes.
  """
  if not 0 < heap_top < 2**31:
    raise ValueError(f'retain_freed_memory: heap_top must be in (0, 2^31) bytes; got {heap_top}')
  if _RETAINED.get('heap_top') == heap_top:
    return _RETAINED['applied']
  _RETAINED.update(heap_top=heap_top, applied=_apply_thresholds(heap_top))
  return _RETAINED['applied']


def _apply_thresholds(heap_top: int) -> bool:
  """`retain_freed_memory`'s `mallopt` calls; True when applied."""
  if os.environ.get('ROBUSTJAX_RETAIN_HOST_MEMORY', '1') == '0' or not sys.platform.startswith(
    'linux'
  ):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  applied = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
    mallopt(_M_TRIM_THRESHOLD, heap_top)
  )
  if applied:
    logging.info(
      'host allocator: freed memory kept for reuse (mmap threshold 256 MiB, trim threshold %d MiB)',
      heap_top >> 20,
    )
  return applied


# Threefry-2x32's rotation distances, four rounds at a time, alternately.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def threefry2x32(key1, key2, x1, x2):
  """The Threefry-2x32 hash with 20 rounds (uint32 arrays in, broadcast; the two uint32 words
  out), as jax's `threefry2x32` primitive computes it: four rounds then a key injection, five
  times, unrolled."""
  from jax import lax

  def rotate_left(v, d):
    return lax.shift_left(v, np.uint32(d)) | lax.shift_right_logical(v, np.uint32(32 - d))

  ks = (key1, key2, key1 ^ key2 ^ np.uint32(_PARITY))
  a, b = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for d in _ROTATIONS[i % 2]:
      a = a + b
      b = a ^ rotate_left(b, d)
    a = a + ks[(i + 1) % 3]
    b = b + ks[(i + 2) % 3] + np.uint32(i + 1)
  return a, b


@functools.cache
def unroll_threefry() -> bool:
  """Lowers jax's Threefry hash unrolled on CPU (`threefry2x32`); True when applied.

  Idempotent. Does nothing (False) when the environment sets ``ROBUSTJAX_UNROLL_THREEFRY=0``,
  or when this jax does not offer the primitive and the lowering registry publicly
  (`jax.extend.random.threefry2x32_p`, `jax.interpreters.mlir.register_lowering`).
  """
  if os.environ.get('ROBUSTJAX_UNROLL_THREEFRY', '1') == '0':
    return False
  try:
    from jax.extend.random import threefry2x32_p
    from jax.interpreters import mlir

    rule = mlir.lower_fun(threefry2x32, multiple_results=True)
    mlir.register_lowering(threefry2x32_p, rule, platform='cpu')
  except (ImportError, AttributeError) as err:
    logging.info("threefry: jax's lowering kept (%s)", err)
    return False
  logging.info('threefry: lowered unrolled on CPU')
  return True
