"""Multi-process start-up, and the checks every process of a job agrees on before training.

A multi-process job (TPU pod slice, multi-node GPU, several CPU processes) runs the same command
in every process. `initialize` joins them with `jax.distributed.initialize` from flags or
environment variables, leaving what is unset to JAX's cluster detection (TPU metadata, SLURM).
The checks then fail *every* process together, with a message naming the problem, instead of
letting one process die while the others wait in a collective:

- `check_device_count`: the devices JAX sees are the devices allocated (a SLURM job whose
  processes each see only GPU 0 is refused, not run on a quarter of its GPUs);
- `check_same_code`: every process runs the same robustjax source and the same jax / flax / optax
  versions (hosts that installed different revisions are refused);
- `check_shared_directory`: a directory that every process writes into (orbax checkpoints of
  arrays sharded over processes) is one shared directory, not a local folder per host.

`agree(ok, message)` is the primitive: an all-gather of one flag per process.

Environment variables (flags of ``robustjax train`` win):

=============================== ================================================================
``JAX_COORDINATOR_ADDRESS``     process 0's ``host:port``
``JAX_NUM_PROCESSES``           the number of processes
``JAX_PROCESS_ID``              this process's index
``ROBUSTJAX_LOCAL_DEVICE_IDS``  the local devices of this process, ``0,1,2,3`` (one process per
                                node sees all its GPUs); unset: JAX's choice (on SLURM, the
                                device ``SLURM_LOCALID``: one process per GPU)
``ROBUSTJAX_EXPECT_DEVICES``    the total device count the job was given (checked)
=============================== ================================================================
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping

import jax
import numpy as np

__all__ = [
  'ENV',
  'agree',
  'check_device_count',
  'check_same_code',
  'check_shared_directory',
  'initialize',
  'launch_params',
  'source_fingerprint',
]

ENV = {
  'coordinator_address': 'JAX_COORDINATOR_ADDRESS',
  'num_processes': 'JAX_NUM_PROCESSES',
  'process_id': 'JAX_PROCESS_ID',
  'local_device_ids': 'ROBUSTJAX_LOCAL_DEVICE_IDS',
}
EXPECT_DEVICES_ENV = 'ROBUSTJAX_EXPECT_DEVICES'


def _device_ids(value) -> list[int] | None:
  if value is None or isinstance(value, (list, tuple)):
    return None if value is None else [int(v) for v in value]
  text = str(value).strip()
  return [int(v) for v in text.split(',') if v.strip()] if text else None


def launch_params(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids=None,
  env: Mapping[str, str] | None = None,
) -> dict | None:
  """The arguments for `jax.distributed.initialize`, from the arguments and then `env`
  (``os.environ`` by default); None when nothing asks for a multi-process launch.

  Example:
    >>> launch_params(env={'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '1'})
    {'num_processes': 2, 'process_id': 1}
  """
  env = os.environ if env is None else env
  values = {
    'coordinator_address': coordinator_address,
    'num_processes': num_processes,
    'process_id': process_id,
    'local_device_ids': local_device_ids,
  }
  for name, var in ENV.items():
    if values[name] is None and env.get(var):
      values[name] = env[var]
  if all(v is None for k, v in values.items() if k != 'local_device_ids'):
    return None
  for name in ('num_processes', 'process_id'):
    if values[name] is not None:
      values[name] = int(values[name])
  values['local_device_ids'] = _device_ids(values['local_device_ids'])
  return {k: v for k, v in values.items() if v is not None}


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids=None,
) -> bool:
  """Calls `jax.distributed.initialize` when a multi-process launch is requested (see
  `launch_params`); must run before any other JAX call. Calling it twice is harmless.

  Returns:
    Whether the process is part of a multi-process job.
  """
  params = launch_params(coordinator_address, num_processes, process_id, local_device_ids)
  if params is None:
    return False
  if not jax.distributed.is_initialized():
    jax.distributed.initialize(**params)
  return True


def agree(ok: bool, message: str, what: str = 'a check') -> None:
  """Raises in every process if `ok` is False in any: this process's `message` where it failed,
  elsewhere a message naming the processes that failed `what`. One all-gather; on one process,
  a plain check.

  Raises:
    RuntimeError: some process is not `ok`.
  """
  if jax.process_count() == 1:
    if not ok:
      raise RuntimeError(message)
    return
  from jax.experimental import multihost_utils

  flags = np.asarray(multihost_utils.process_allgather(np.asarray([int(bool(ok))], np.int32)))
  failed = [i for i, v in enumerate(flags.reshape(-1)) if not v]
  if not failed:
    return
  if not ok:
    raise RuntimeError(f'process {jax.process_index()}: {message}')
  raise RuntimeError(
    f'process(es) {failed} of {jax.process_count()} failed {what}; see their logs'
    + (f': {message}' if message else '')
  )


def check_device_count(expected: int | None = None) -> None:
  """Every process checks that ``jax.device_count()`` is `expected` (default:
  ``$ROBUSTJAX_EXPECT_DEVICES``; nothing to check when neither is set).

  Raises:
    RuntimeError: in every process, naming both counts.
  """
  if expected is None:
    value = os.environ.get(EXPECT_DEVICES_ENV, '').strip()
    expected = int(value) if value else None
  if expected is None:
    return
  seen = jax.device_count()
  agree(
    seen == int(expected),
    f'the job was given {expected} devices but JAX sees {seen} ({jax.local_device_count()} in '
    f'this process, {jax.process_count()} process(es)): check ROBUSTJAX_LOCAL_DEVICE_IDS / '
    'CUDA_VISIBLE_DEVICES (one process per node must see all its GPUs)',
  )


def source_fingerprint() -> str:
  """A hash of the robustjax source files and of the jax, flax and optax versions."""
  import flax
  import optax

  root = os.path.dirname(os.path.abspath(__file__))
  h = hashlib.sha1(f'{jax.__version__} {flax.__version__} {optax.__version__}'.encode())
  for d, subdirs, files in sorted(os.walk(root)):
    subdirs.sort()
    for name in sorted(f for f in files if f.endswith('.py')):
      path = os.path.join(d, name)
      h.update(os.path.relpath(path, root).encode())
      with open(path, 'rb') as fh:
        h.update(fh.read())
  return h.hexdigest()


def check_same_code() -> None:
  """Every process checks that all run the same robustjax source and library versions.

  Raises:
    RuntimeError: in every process, when the fingerprints differ.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  mine = np.frombuffer(bytes.fromhex(source_fingerprint()), np.uint8)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
  differ = [i for i in range(every.shape[0]) if not np.array_equal(every[i], every[0])]
  agree(
    not differ,
    f'processes {differ} run other robustjax code or jax / flax / optax versions than process 0: '
    'install one build on every host (launch/tpu_vm.sh ships one wheel to all of them)',
  )


def check_shared_directory(path: str) -> None:
  """Every process checks that `path` (created by each) is one directory they all share.

  Process 0 writes a random token into `path`; every process reads it back. Orbax checkpoints of
  arrays sharded over processes need this: with a local folder per host, process 1 waits for
  process 0's files until it times out.

  Raises:
    RuntimeError: in every process, when some process does not see the token.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  token_file = os.path.join(path, '.robustjax-shared-check')
  token = secrets.randbits(31) if jax.process_index() == 0 else 0  # int32: x64 may be off
  if jax.process_index() == 0:
    with open(token_file, 'w') as fh:
      fh.write(str(token))
  multihost_utils.sync_global_devices('robustjax: shared directory token written')
  token = int(multihost_utils.broadcast_one_to_all(np.asarray(token, np.int32)))
  try:
    with open(token_file) as fh:
      ok = int(fh.read().strip() or 0) == token
  except (OSError, ValueError):
    ok = False
  try:
    agree(
      ok,
      f'{path} is not a directory shared by every process (a local folder per host?): orbax '
      'checkpoints need one directory all hosts write (NFS, a gcsfuse / Filestore mount); or '
      'pass --config.checkpoint_every=0',
    )
  finally:
    multihost_utils.sync_global_devices('robustjax: shared directory token read')
    if jax.process_index() == 0 and os.path.exists(token_file):
      os.remove(token_file)
