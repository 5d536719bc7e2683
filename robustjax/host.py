"""The host allocator: XLA:CPU's per-step buffers reused instead of mapped afresh each step.

XLA:CPU takes every temporary and output buffer of a step from the C allocator and frees it at
the end. glibc serves blocks above its mmap threshold (128 KiB, raised on the fly up to 32 MiB)
with a fresh `mmap` and returns them at `free`, and trims the heap's free top back to the
system. A step over a stack of a few MB per leaf so touches its buffers for the first time every
step: each 4 KiB page is a page fault the kernel zeroes. The training step at n = 1,024 workers
(MLP of 4,810 parameters, trimmed mean) took 9,600-14,000 minor page faults and 35-50 ms per
step, against 1-1,450 faults (8,100 in one run of eight: glibc's placement varies) and 24-30
ms once the freed memory is kept (BENCHMARKS.md, "The host allocator").

`retain_freed_memory` raises both thresholds to 256 MiB (`mallopt`), so freed blocks up to that
size stay in the process and the next step reuses the same, already mapped pages. glibc's own
cap, 32 MiB, was not enough (36-41 ms, 10,500 faults): some of the step's blocks are larger.
Larger blocks are still mapped afresh: at 1 GiB, a step over stacks of 400 MB (n = 1,024, 10⁵
parameters) kept 0.7 GiB more at its peak for no gain, where 256 MiB keeps 0.1 GiB more. The
cost otherwise: the process keeps the memory of its largest step, as a long training job does
anyway. `robustjax.training.build` calls it on CPU backends; set
``ROBUSTJAX_RETAIN_HOST_MEMORY=0`` to keep glibc's defaults.

References:
  glibc manual, "Memory Allocation Tunables" and mallopt(3) (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

from absl import logging

__all__ = ['retain_freed_memory']

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and stay there once freed.
_THRESHOLD = 256 << 20


@functools.cache
def retain_freed_memory() -> bool:
  """Keeps the memory freed by one step for the next (glibc only); True when applied.

  Idempotent. Does nothing (False) off Linux, without glibc's `mallopt`, or when the environment
  sets ``ROBUSTJAX_RETAIN_HOST_MEMORY=0``.
  """
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
    mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)
  )
  if applied:
    logging.info('host allocator: freed memory kept for reuse (mmap and trim thresholds 256 MiB)')
  return applied
