"""CIFAR-10 / ResNet-20 (GroupNorm) under ALIE: an accelerator-sized run (TPU slice, multi-GPU).

Needs the ``datasets`` extra (``pip install 'robustjax[datasets]'``) and network access for the
first download. Choose ``num_workers`` as a multiple of the device count so the worker axis shards
evenly, e.g. ``--config.num_workers=256`` on a v5e-8 or a pod slice.
"""

from robustjax.configs import default


def get_config(variant: str = ''):
  c = default.get_config()
  c.dataset = 'cifar10'
  c.model = 'resnet20'
  c.num_workers = 64
  c.num_byzantine = 8
  c.split = 'dirichlet'
  c.alpha = 1.0
  c.rule = 'nnm+trimmed_mean'
  c.attack = 'alie'
  c.batch_size = 32
  c.momentum = 0.9
  c.learning_rate = 0.1
  c.lr_schedule = 'cosine'
  c.weight_decay = 5e-4
  c.num_steps = 10_000
  c.log_every = 50
  c.eval_every = 1000
  c.eval_chunk = 1000
  c.checkpoint_every = 1000
  if variant:
    raise ValueError(f'unknown config variant {variant!r}; cifar10_resnet20 has none')
  return c
