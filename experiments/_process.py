"""Helpers shared by the benchmarks: the machine's name, its FMA peak, and peak memory for those
that run each case in a fresh process."""

import os
import platform
import re
import shutil
import subprocess
import tempfile


def cpu_name() -> str:
  """The CPU model and the cores this process may use, e.g.
  'Intel(R) Xeon(R) Processor (family 6, model 207), 2 cores'.

  Benchmark tables print it, so that each names the machine it was measured on (the project's
  VMs have changed CPU between sessions). The model comes from /proc/cpuinfo on Linux; elsewhere
  `platform.processor()` or the architecture.
  """
  fields = _first_cpu()
  model = fields.get('model name') or platform.processor() or platform.machine()
  if 'cpu family' in fields and 'model' in fields:
    # A VM may show a generic name ("Intel(R) Xeon(R) Processor"): the family and model say more.
    model += f' (family {fields["cpu family"]}, model {fields["model"]})'
  return f'{model}, {usable_cores()} cores'


def usable_cores() -> int:
  """The cores this process may use."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def _first_cpu() -> dict:
  """The first processor's fields in /proc/cpuinfo (empty where it is missing)."""
  fields = {}
  try:
    with open('/proc/cpuinfo') as fh:
      for line in fh:
        if not line.strip():  # the first processor's block is enough
          break
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return fields


def peak_rss_gib() -> float:
  """This process's peak resident memory (VmHWM) in GiB; NaN where /proc is missing."""
  try:
    with open('/proc/self/status') as fh:
      for line in fh:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return float('nan')


def _cpu_flags() -> set:
  """The first processor's flags in /proc/cpuinfo (empty where it is missing)."""
  return set(_first_cpu().get('flags', '').split())


def fma_lanes() -> int | None:
  """The float32 lanes of the widest FMA vectors `experiments/fma_peak.c` is built for here: 16
  where the CPU has AVX-512, 8 where it has AVX2 and FMA, None elsewhere (not x86-64, or
  neither)."""
  flags = _cpu_flags()
  if platform.machine() not in ('x86_64', 'AMD64') or not {'avx2', 'fma'} <= flags:
    return None
  return 16 if 'avx512f' in flags else 8


def fma_peak_gflops(threads: int | None = None, runs: int = 3) -> float | None:
  """The cores' float32 FMA peak in GFLOP/s, measured by `experiments/fma_peak.c` (12 chains of
  FMAs per OpenMP thread on the widest vectors, `fma_lanes`), the best of `runs`; None where it
  cannot run here (no gcc, not an x86-64 CPU with AVX2 and FMA, or the build or a run fails).

  The Gram section prints it beside the matmul peak: a library's matmul is a fraction of it (on a
  Zen 3 VM, jax's reached 57-69 %; BENCHMARKS.md). On an AVX-512 CPU it is built for AVX-512:
  the AVX2 build reports half the peak of full-width 512-bit FMA units (Zen 5: 231 GFLOP/s on two
  cores, where jax's matmul reached 324). `threads`: default, the cores this process may use.
  """
  source = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fma_peak.c')
  gcc = shutil.which('gcc')
  lanes = fma_lanes()
  if gcc is None or lanes is None or not os.path.exists(source):
    return None
  threads = threads or usable_cores()
  with tempfile.TemporaryDirectory() as tmp:
    binary = os.path.join(tmp, 'fma_peak')
    vectors = ['-mavx512f'] if lanes == 16 else ['-mavx2']
    flags = ['-O2', *vectors, '-mfma', '-fopenmp']
    built = subprocess.run([gcc, *flags, source, '-o', binary], capture_output=True, timeout=120)
    if built.returncode:
      return None
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads)}
    best = None
    for _ in range(runs):
      run = subprocess.run(
        [binary, '100000000'], env=env, capture_output=True, text=True, timeout=120
      )
      found = re.search(r'([0-9.]+) GFLOP/s', run.stdout)
      if run.returncode or not found:
        return None
      best = max(best or 0.0, float(found.group(1)))
  return best
