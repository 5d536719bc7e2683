"""Default config: robust D-SGD with worker momentum on the embedded digits data, under ALIE.

Variants: ``--config=robustjax/configs/default.py:smoke`` (a few steps, tiny sizes, for tests).
Every field can be overridden on the command line, e.g. ``--config.rule='nnm+krum'
--config.attack='ipm(eps=0.5)' --config.num_workers=32``.

Spec strings: ``rule`` is pre-aggregators then the aggregator joined by ``+``, each optionally
with keyword parameters (``'bucketing(s=2)+multikrum(m=3)'``); ``attack`` and ``model`` likewise
(``'ipm(eps=0.5)'``, ``'mlp(hidden=(64,))'``). ``attack='none'`` makes the f Byzantine workers
behave honestly (a baseline where the rule still assumes f); ``'label_flip'`` makes them compute
honest gradients on flipped labels.
"""

from ml_collections import config_dict


def get_config(variant: str = '') -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.seed = 0
  # Data and model.
  c.dataset = 'digits'  # digits (embedded) | mnist | fashion_mnist | cifar10 | synthetic_...
  c.data_dir = ''  # mnist / fashion_mnist / cifar10: a folder of their files ('': search, download)
  c.model = 'mlp'
  c.split = 'iid'  # iid | dirichlet | gamma | extreme
  c.alpha = 1.0  # Dirichlet concentration (split='dirichlet')
  c.gamma = 0.5  # gamma-similarity fraction (split='gamma')
  # Workers and the threat model.
  c.num_workers = 16  # n, honest and Byzantine
  c.num_byzantine = 3  # f: the last f workers
  c.attack = 'alie'
  c.rule = 'nnm+trimmed_mean'
  # The f the rule is told (unset: num_byzantine). Set it to study a mis-specified f.
  c.declared_byzantine = config_dict.placeholder(int)
  # Gradient coding (a stage of the same step): identity | cyclic(d=4) (LAD) |
  # fractional_repetition(d=4) | draco (with rule='draco') | cyclic_mds(s=2).
  # Compression: none | rand_k(fraction=0.1) | qsgd(levels=2) | ef+top_k(fraction=0.1).
  c.coding = 'identity'
  c.compression = 'none'
  # Differential privacy (robustjax.privacy): clip each worker's gradient to dp_clip (unset: off),
  # local Gaussian noise dp_local_noise * dp_clip per worker, central noise on the aggregate
  # dp_central_noise * dp_clip / n_honest; the run's ε at dp_delta (unset: 1e-5) is in
  # summary.json. (Unset fields leave sweep run ids unchanged.)
  c.dp_clip = config_dict.placeholder(float)
  c.dp_local_noise = config_dict.placeholder(float)
  c.dp_central_noise = config_dict.placeholder(float)
  c.dp_delta = config_dict.placeholder(float)
  # Algorithm.
  # dsgd | local (FedAvg-style: K local SGD steps, robust aggregation of the model deltas; the
  # server applies the aggregate delta times learning_rate, so learning_rate=1.0 is FedAvg).
  c.algorithm = 'dsgd'
  c.local_steps = 1
  c.local_lr = 0.05
  c.batch_size = 32  # per worker per (local) step
  c.momentum = 0.9  # worker-side momentum beta (0 disables it)
  # Server optimiser.
  c.optimizer = 'sgd'  # sgd | adam | adamw
  c.learning_rate = 0.1
  c.lr_schedule = 'constant'  # constant | cosine
  c.server_momentum = 0.0
  c.weight_decay = 1e-4
  c.num_steps = 300
  # Devices: auto = shard_map over all devices when n divides evenly, else vmap on one.
  c.backend = 'auto'  # auto | vmap | shard_map | pmap
  c.num_devices = config_dict.placeholder(int)
  # Workers vmapped at once (lax.map over chunks); unset: all at once on GPU / TPU, and on CPU
  # when their saved activations fit in 1 GiB, else 256.
  c.worker_chunk = config_dict.placeholder(int)
  # Logging, evaluation, checkpoints.
  c.log_every = 10
  c.eval_every = 50
  c.eval_chunk = 1024
  c.checkpoint_every = 100  # 0 disables checkpoints
  c.keep_checkpoints = 2
  c.progress = True
  c.tensorboard = True  # event files in <workdir>/tensorboard (needs tensorboardX)
  c.plot = True  # <workdir>/curves.png at the end of each call (needs matplotlib)

  if variant == 'smoke':
    c.num_workers = 8
    c.num_byzantine = 1
    c.rule = 'trimmed_mean'
    c.model = 'mlp(hidden=(16,))'
    c.batch_size = 8
    c.num_steps = 6
    c.log_every = 2
    c.eval_every = 3
    c.checkpoint_every = 3
    c.progress = False
  elif variant:
    raise ValueError(f'unknown config variant {variant!r}; known variants: smoke')
  return c


def sweep_config(name: str, base, grid: dict) -> config_dict.ConfigDict:
  """A sweep config: ``name``, the ``base`` training config and the ``grid`` (axes in order).

  A ConfigDict, so ``experiments/sweep.py`` overrides fields from the command line
  (``--config.base.num_steps=10``) and a misspelled field fails with the known names.
  """
  c = config_dict.ConfigDict(sort_keys=False)
  c.name = name
  c.base = base
  c.grid = config_dict.ConfigDict(grid, sort_keys=False)
  return c
