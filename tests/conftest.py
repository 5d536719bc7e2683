"""Test configuration: 8 simulated CPU devices, set once before any computation."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402

try:
  jax.config.update('jax_num_cpu_devices', 8)
except Exception:  # noqa: BLE001  (older jax: the XLA flag above does it)
  pass
