r"""Robust distributed training from the command line (flax-examples style).

Examples:
  robustjax train --workdir=/tmp/rj --config=default
  robustjax train --workdir=/tmp/rj --config=default:smoke
  robustjax train --workdir=/tmp/rj --config=default \
      --config.rule='nnm+krum' --config.attack='ipm(eps=0.5)' --config.num_workers=32

Multi-host: pass --coordinator_address / --num_processes / --process_id (or set
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); every process runs the same
command and `jax.distributed.initialize()` joins them before any other JAX call. Every process
then checks that the job sees the devices it was given (--expect_devices), that all processes
run the same code, and (with checkpoints) that --workdir is shared; a failed check, or an error
in any process, ends every process (see `robustjax.distributed`).

Outputs in --workdir: config.json, metrics.jsonl, summary.json, checkpoints/. A rerun of the same
command resumes (and says from which step); a different config in the same workdir is refused
(naming the fields that differ) unless --restart discards the old run.
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags():
  """Defines the command's absl flags (the `robustjax` command calls it)."""
  config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for metrics, summary and checkpoints.')
  flags.DEFINE_string('coordinator_address', None, 'Multi-host: address:port of process 0.')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: this process index.')
  flags.DEFINE_list(
    'local_device_ids',
    None,
    'Multi-host: the local devices of this process (0,1,2,3: one process per node sees all its '
    'GPUs); unset: $ROBUSTJAX_LOCAL_DEVICE_IDS, else JAX decides.',
  )
  flags.DEFINE_integer(
    'expect_devices',
    None,
    'The total number of devices the job was given; every process checks jax.device_count() '
    'against it and the job fails if they differ (default: $ROBUSTJAX_EXPECT_DEVICES).',
  )
  flags.DEFINE_bool(
    'restart', False, 'Discard the run already in --workdir (checkpoints, metrics) and start over.'
  )
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from robustjax import distributed, training

  several = distributed.initialize(
    FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.local_device_ids
  )
  try:
    distributed.check_device_count(FLAGS.expect_devices)
    distributed.check_same_code()
    summary = training.train_and_evaluate(FLAGS.config, FLAGS.workdir, restart=FLAGS.restart)
  except Exception as err:
    if several:
      # One process's failure ends the job: leave now, without waiting for the others at the
      # shutdown barrier; they stop at their next collective (or JAX's heartbeat timeout).
      import os
      import sys

      print(f'robustjax train: error: {err}', file=sys.stderr, flush=True)
      os._exit(1)
    raise
  print(json.dumps({'step': summary['step'], 'rule': summary['rule'], **summary['final']}))


if __name__ == '__main__':
  define_flags()
  app.run(main)
