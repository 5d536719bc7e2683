"""Helpers shared by the benchmarks that run each case in a fresh process."""


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
