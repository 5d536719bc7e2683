"""Helpers shared by the benchmarks: the machine's name, and peak memory for those that run each
case in a fresh process."""

import os
import platform


def cpu_name() -> str:
  """The CPU model and the cores this process may use, e.g.
  'Intel(R) Xeon(R) Processor (family 6, model 207), 2 cores'.

  Benchmark tables print it, so that each names the machine it was measured on (the project's
  VMs have changed CPU between sessions). The model comes from /proc/cpuinfo on Linux; elsewhere
  `platform.processor()` or the architecture.
  """
  fields = {}
  try:
    with open('/proc/cpuinfo') as fh:
      for line in fh:
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
        if not line.strip():  # the first processor's block is enough
          break
  except OSError:
    pass
  model = fields.get('model name') or platform.processor() or platform.machine()
  if 'cpu family' in fields and 'model' in fields:
    # A VM may show a generic name ("Intel(R) Xeon(R) Processor"): the family and model say more.
    model += f' (family {fields["cpu family"]}, model {fields["model"]})'
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return f'{model}, {cores} cores'


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
