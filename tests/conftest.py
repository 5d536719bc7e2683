"""Test configuration: 8 simulated CPU devices, set once before any computation.

The default run compiles XLA:CPU's kernels without LLVM's optimisations
(`--xla_backend_optimization_level=0`): most tests are compile-bound, and this took the run from
about 780 s to 538-581 s on a 2-core Intel VM (618-676 s there later, with more tests, on a
busier day). XLA's own HLO passes still run, and without
fast-math (XLA:CPU's default) LLVM may not change what a float operation computes; every test
passed at both levels there. CI's second run (`.ci/run`, the dependency floors) tests the core
modules with the kernels optimised, as users get them; so does
`XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest`.
"""

import os

os.environ.setdefault(
  'XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0'
)

import jax  # noqa: E402

try:
  jax.config.update('jax_num_cpu_devices', 8)
except Exception:  # noqa: BLE001  (older jax: the XLA flag above does it)
  pass

# A persistent compilation cache for the session: many tests build the same small step (the
# smoke config) in new closures, whose HLO is identical; a hit skips XLA's compilation. A fresh
# folder per session (shared by the session's xdist workers), so a test never depends on an
# earlier run.
import tempfile  # noqa: E402

_run = os.environ.get('PYTEST_XDIST_TESTRUNUID')  # pytest-xdist's workers share one folder
_cache = (
  os.path.join(tempfile.gettempdir(), f'robustjax_xla_cache_{_run}')
  if _run
  else tempfile.mkdtemp(prefix='robustjax_xla_cache_')
)
jax.config.update('jax_compilation_cache_dir', _cache)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
