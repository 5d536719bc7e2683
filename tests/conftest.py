"""Test configuration: 8 simulated CPU devices, set once before any computation.

Most tests are compile-bound (XLA's backend compilation was 61 % of the tests' time), so the
default run compiles XLA:CPU's kernels for speed of compilation:
- without LLVM's optimisations (`--xla_backend_optimization_level=0`): the run went from about
  780 s to 538-581 s on a 2-core Intel VM;
- with XLA:CPU's legacy loop emitter (`--xla_cpu_use_fusion_emitters=false`), which compiles
  about twice as fast as its MLIR emitter: 355-415 s against 567 s on that VM (2026-12-07), where
  this jax knows the flag (XLA aborts on an unknown one, so a subprocess tries it first).
XLA's own HLO passes still run, and without fast-math (XLA:CPU's default) neither changes what a
float operation computes, only how operations are fused into loops; every test passed both ways.
CI's second run (`.ci/run`, the dependency floors) tests the core modules with the kernels
optimised, as users get them; so does `XLA_FLAGS=--xla_force_host_platform_device_count=8 python
-m pytest`.
"""

import os
import subprocess
import sys


def _xla_flags() -> str:
  """The default run's XLA flags (set once: pytest-xdist's workers inherit them)."""
  flags = '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0'
  legacy = f'{flags} --xla_cpu_use_fusion_emitters=false'
  probe = [sys.executable, '-c', 'import jax; jax.devices()']
  try:
    known = subprocess.run(
      probe, env={**os.environ, 'XLA_FLAGS': legacy}, capture_output=True, timeout=300
    )
  except (OSError, subprocess.TimeoutExpired):
    return flags
  return legacy if known.returncode == 0 else flags


if 'XLA_FLAGS' not in os.environ:
  os.environ['XLA_FLAGS'] = _xla_flags()

import jax  # noqa: E402

try:
  jax.config.update('jax_num_cpu_devices', 8)
except Exception:  # noqa: BLE001  (older jax: the XLA flag above does it)
  pass

# A persistent compilation cache for the session: many tests build the same small step (the
# smoke config) in new closures, whose HLO is identical; a hit skips XLA's compilation. A fresh
# folder per session, made by the process that loads this file first (pytest-xdist's workers
# inherit it through the environment and share it), and removed by that process when the session
# ends (about 25 MB a run). A folder named in `ROBUSTJAX_TEST_XLA_CACHE` beforehand is used and
# kept instead.
import shutil  # noqa: E402
import tempfile  # noqa: E402

_CACHE_VARIABLE = 'ROBUSTJAX_TEST_XLA_CACHE'
_cache = os.environ.get(_CACHE_VARIABLE)
_made_cache = _cache is None
if _made_cache:
  _cache = os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix='robustjax_xla_cache_')
jax.config.update('jax_compilation_cache_dir', _cache)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def pytest_unconfigure(config):
  """Removes the session's compilation cache, in the process that made it."""
  del config
  if _made_cache:
    shutil.rmtree(_cache, ignore_errors=True)
