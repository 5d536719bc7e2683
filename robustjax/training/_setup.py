"""From a config to a ready-to-run experiment: data, model, rule, attack, coding, optimiser,
backend. Every spec string is parsed here, once, at build time.

Rules, attacks, codings, compressors and models are named by *spec strings*, convenient on a
command line: ``'nnm+krum'`` (pre-aggregators then the aggregator, joined by ``+``), with keyword
parameters in parentheses: ``'bucketing(s=2)+multikrum(m=3)'``, ``'ipm(eps=0.5)'``,
``'cyclic(d=4)'``, ``'rand_k(fraction=0.1)'``, ``'mlp(hidden=(64,))'``. Values are Python literals.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from robustjax import attacks, coding, compression, host, parallel, privacy
from robustjax import data as rdata
from robustjax import models as rmodels
from robustjax._spec import parse_spec
from robustjax.pipeline import as_rule
from robustjax.training import _engine as eng

__all__ = [
  'Experiment',
  'build',
  'check_hyperparameters',
  'declared_byzantine',
  'dp_of',
  'make_optimizer',
]


def make_optimizer(config) -> optax.GradientTransformation:
  """The server optimiser: ``sgd`` (with ``server_momentum``), ``adam`` or ``adamw``, a constant
  or cosine learning rate, and decoupled weight decay for sgd / adam (added to the aggregate)."""
  lr = config.learning_rate
  if config.lr_schedule == 'cosine':
    lr = optax.cosine_decay_schedule(config.learning_rate, max(1, config.num_steps))
  elif config.lr_schedule != 'constant':
    raise ValueError(f'unknown lr_schedule {config.lr_schedule!r}; known: constant, cosine')
  wd = config.weight_decay
  name = config.optimizer
  if name == 'adamw':
    return optax.adamw(lr, weight_decay=wd)
  if name == 'sgd':
    opt = optax.sgd(lr, momentum=config.server_momentum or None)
  elif name == 'adam':
    opt = optax.adam(lr)
  else:
    raise ValueError(f'unknown optimizer {name!r}; known optimizers: adam, adamw, sgd')
  return optax.chain(optax.add_decayed_weights(wd), opt) if wd else opt


def choose_backend(config) -> tuple[str, Any]:
  """The backend and mesh of a config.

  ``backend='auto'``: ``shard_map`` over every device when ``num_workers`` divides evenly, else
  ``vmap`` on one device (with a warning). With several processes every device must hold the
  same number of workers and the one-device backends would run a duplicate of the whole job in
  each process, so an uneven ``num_workers`` (or ``vmap`` / ``pmap``) is refused.

  Raises:
    ValueError: an unknown backend, or a choice a multi-process job cannot run.
  """
  backend = config.backend
  k = config.num_devices or len(jax.devices())
  n, procs = config.num_workers, jax.process_count()
  if procs > 1 and (backend in ('vmap', 'pmap') or n % k):
    fit = n + (-n % k)
    raise ValueError(
      f'a job of {procs} processes shards the workers over its {k} devices with '
      f'backend=shard_map: num_workers={n} must be a multiple of {k} (e.g. {fit}) and backend '
      f'auto or shard_map (got {backend!r}); otherwise each process would run a duplicate of '
      'the whole job'
    )
  if backend == 'auto':
    backend = 'shard_map' if k > 1 and n % k == 0 else 'vmap'
    if k > 1 and backend == 'vmap':
      logging.warning(
        'backend=auto: num_workers=%d is not a multiple of the %d devices; running on one device',
        n,
        k,
      )
  if backend not in eng.BACKENDS:
    raise ValueError(
      f'unknown backend {backend!r}; known backends: auto, {", ".join(eng.BACKENDS)}'
    )
  if backend == 'vmap':
    return backend, None
  if backend == 'pmap':
    k = min(k, jax.local_device_count())
  return backend, parallel.make_mesh(k)


# On CPU, all workers are vmapped at once when the activations their gradients save (the backward
# pass's residuals) take at most this many bytes together; else chunks of `CPU_WORKER_CHUNK`. At
# n = 1,024 with the 64-wide MLP (20 kB per worker) one vmap took 0.7-0.85× the chunked step's
# time (BENCHMARKS.md); chunks bound the memory of larger models (the CNN saves 7 MB per worker
# on MNIST batches of 32, ResNet-20 104 MB on CIFAR-10's).
CPU_VMAP_ALL_MAX_BYTES = 1 << 30
CPU_WORKER_CHUNK = 256


def _worker_chunk(config, problem, params, model_state) -> int:
  """``config.worker_chunk``; when unset, 0 (no chunking) on GPU / TPU, and on CPU 0 when the
  workers' saved activations fit in `CPU_VMAP_ALL_MAX_BYTES`, else `CPU_WORKER_CHUNK`."""
  chunk = config.get('worker_chunk')
  if chunk is None:
    if jax.devices()[0].platform != 'cpu':
      return 0
    rows = config.batch_size or problem.data['idx'].shape[1]
    saved = config.num_workers * _saved_bytes(problem, params, model_state, rows)
    return 0 if saved <= CPU_VMAP_ALL_MAX_BYTES else CPU_WORKER_CHUNK
  if chunk < 0:
    raise ValueError(f'worker_chunk must be >= 0; got {chunk}')
  return int(chunk)


def tree_bytes(tree) -> int:
  """Bytes of a pytree's arrays (or of their `jax.ShapeDtypeStruct`s)."""
  return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _saved_bytes(problem, params, model_state, rows: int) -> int:
  """Bytes each worker's gradient keeps for its backward pass on a batch of `rows`: the residuals
  of the loss's VJP vmapped over two workers less those over one, so that what the workers share
  (the parameters) cancels. Abstract evaluation: nothing is computed."""
  x, y = (problem.data[k] for k in ('x_train', 'y_train'))
  per_worker = jax.vmap(problem.loss, in_axes=(None, None, 0, 0))

  def saved(k):
    def backward(p, x, y):
      return jax.vjp(lambda p: jnp.sum(per_worker(p, model_state, x, y)), p)[1]

    batch = (
      jax.ShapeDtypeStruct((k, rows, *x.shape[1:]), x.dtype),
      jax.ShapeDtypeStruct((k, rows, *y.shape[1:]), y.dtype),
    )
    return tree_bytes(jax.eval_shape(backward, params, *batch))

  return saved(2) - saved(1)


def _check_counts(n, f):
  if not isinstance(n, int) or n < 1:
    raise ValueError(f'num_workers must be an int >= 1; got {n!r}')
  if not isinstance(f, int) or f < 0:
    raise ValueError(f'num_byzantine must be an int >= 0; got {f!r}')
  if f >= n:
    raise ValueError(f'num_byzantine={f} must be < num_workers={n} (at least one honest worker)')


def _number(config, name, *, low=None, high=None, low_open=False, high_open=False, integer=False):
  """Checks config.<name> is a finite number (an int if `integer`) within the stated range."""
  value = config.get(name)
  if value is None:
    return
  kind = 'an int' if integer else 'a finite number'
  ok = isinstance(value, int) if integer else isinstance(value, (int, float))
  ok = ok and not isinstance(value, bool) and math.isfinite(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    lo = '' if low is None else f'{"(" if low_open else "["}{low}'
    hi = '' if high is None else f'{high}{")" if high_open else "]"}'
    where = f' in {lo or "(-inf"}, {hi or "inf)"}' if (low is not None or high is not None) else ''
    raise ValueError(f'{name} must be {kind}{where}; got {name}={value!r}')


def check_hyperparameters(config) -> None:
  """Validates the training hyper-parameters, naming the field and its valid range.

  Raises:
    ValueError: e.g. ``learning_rate must be a finite number in (0, inf); got learning_rate=-1``.
  """
  _number(config, 'learning_rate', low=0, low_open=True)
  _number(config, 'momentum', low=0, high=1, high_open=True)
  _number(config, 'server_momentum', low=0, high=1, high_open=True)
  _number(config, 'weight_decay', low=0)
  _number(config, 'local_lr', low=0, low_open=True)
  _number(config, 'alpha', low=0, low_open=True)
  _number(config, 'gamma', low=0, high=1)
  _number(config, 'num_steps', low=1, integer=True)
  _number(config, 'batch_size', low=1, integer=True)
  _number(config, 'local_steps', low=1, integer=True)
  _number(config, 'eval_chunk', low=1, integer=True)
  for name in ('log_every', 'eval_every', 'checkpoint_every'):
    _number(config, name, low=0, integer=True)
  _number(config, 'keep_checkpoints', low=1, integer=True)
  for name in ('dp_clip', 'dp_local_noise', 'dp_central_noise'):
    _number(config, name, low=0)
  _number(config, 'dp_delta', low=0, high=1, low_open=True, high_open=True)


def _validate(spec, dim=3):
  """Traces the rule and the attack on abstract stacks so misuse fails before compiling."""
  n, f, nh = spec.num_workers, spec.num_byzantine, spec.num_honest
  key = jax.random.key(0)
  like = jnp.zeros((dim,))
  try:
    jax.eval_shape(
      lambda s: spec.pipeline.update(s, spec.pipeline.init(like), key),
      jax.ShapeDtypeStruct((n, dim), jnp.float32),
    )
  except (TypeError, ValueError) as e:
    raise ValueError(f'rule {spec.pipeline.spec!r} cannot run with n={n}, f={f}: {e}') from None
  if spec.replaces_messages:
    try:
      honest = jax.ShapeDtypeStruct((nh, dim), jnp.float32)
      state = spec.attack.init(key, jnp.zeros((nh, dim)))
      jax.eval_shape(lambda h: spec.attack.apply(state, h, key, f=f, rule=spec.pipeline), honest)
    except (TypeError, ValueError) as e:
      raise ValueError(f'attack {spec.attack.spec!r} cannot run with n={n}, f={f}: {e}') from None


@dataclasses.dataclass(eq=False)
class Experiment:
  """A built experiment: `init_state()`, `step(state)`, `evaluate(state)`.

  Attributes:
    spec: the static `TrainSpec`.
    problem: the model and optimiser (`Problem`).
    backend: ``'vmap'``, ``'shard_map'`` or ``'pmap'``.
    mesh: the ``('workers',)`` mesh (None for ``'vmap'``).
    data: the data dict, placed on the device(s).
    seed: the run's seed.
    step_fn: the jitted ``step(state, data, report=None) -> (state, metrics)`` (one signature,
      every backend; `robustjax.training.make_step`).
    eval_fn: the jitted ``evaluate(params, model_state, data) -> dict``.
  """

  spec: eng.TrainSpec
  problem: eng.Problem
  backend: str
  mesh: Any
  data: dict
  seed: int
  params0: Any
  model_state0: Any
  step_fn: Any = None
  eval_fn: Any = None

  def __post_init__(self):
    self.step_fn = eng.make_step(self.spec, self.problem, backend=self.backend, mesh=self.mesh)
    self.eval_fn = eng.make_eval(self.spec, self.problem)

  def state_shardings(self, state):
    """The shardings of a state: worker state over ``'workers'`` for shard_map, the rest
    replicated (None on other backends)."""
    if self.backend != 'shard_map':
      return None
    rep, wk = parallel.replicated(self.mesh), parallel.worker_sharded(self.mesh)
    shard = jax.tree.map(lambda _: rep, state)
    return shard.replace(workers=jax.tree.map(lambda _: wk, state.workers))

  def place(self, state):
    """Puts a (host or device) state where the backend wants it."""
    shardings = self.state_shardings(state)
    if shardings is None:
      return jax.tree.map(jnp.asarray, state)
    return jax.tree.map(lambda x, s: parallel.put(np.asarray(x), s), state, shardings)

  def init_state(self) -> eng.TrainState:
    state = eng.init_state(self.spec, self.problem, self.params0, self.model_state0, self.seed)
    return self.place(state)

  def step(self, state):
    return self.step_fn(state, self.data)

  def evaluate(self, state) -> dict:
    """The evaluation of `state` as Python floats (waits for it)."""
    return to_floats(self.evaluate_async(state))

  def evaluate_async(self, state) -> dict:
    """The evaluation of `state` as device scalars: dispatched, not awaited (`to_floats` reads
    them), so the loop can run the next steps meanwhile."""
    return self.eval_fn(state.params, state.model_state, self.data)


def to_floats(values: dict) -> dict:
  """A dict of device scalars as Python floats (one transfer)."""
  return {k: float(v) for k, v in jax.device_get(values).items()}


def declared_byzantine(config) -> int:
  """The f the rule is told: ``config.declared_byzantine``, or the true ``num_byzantine`` when
  unset. (The attack always controls ``num_byzantine`` workers.)"""
  declared = config.get('declared_byzantine')
  if declared is None:
    return int(config.num_byzantine)
  if not isinstance(declared, int) or isinstance(declared, bool) or declared < 0:
    raise ValueError(f'declared_byzantine must be an int >= 0; got {declared!r}')
  return declared


def dp_of(config):
  """The `robustjax.privacy.DP` of a config (``dp_clip``, ``dp_local_noise``,
  ``dp_central_noise``), or None when clipping is off."""
  dp = privacy.DP(
    clip=float(config.get('dp_clip', 0.0) or 0.0),
    local_noise=float(config.get('dp_local_noise', 0.0) or 0.0),
    central_noise=float(config.get('dp_central_noise', 0.0) or 0.0),
  )
  return dp if dp.active else None


def _data_kwargs(config) -> dict:
  """``data_dir`` for the datasets read from local files (MNIST, Fashion-MNIST, CIFAR-10)."""
  data_dir = config.get('data_dir') or None
  if data_dir is None:
    return {}
  if config.dataset not in rdata.names() or not rdata.reads_files(config.dataset):
    raise ValueError(f'data_dir is set, but dataset {config.dataset!r} reads no files')
  return {'data_dir': data_dir}


def _compressor(spec):
  comp = compression.make(spec or 'none')
  return None if isinstance(comp, compression.Identity) else comp


def build(config) -> Experiment:
  """Builds an `Experiment` from a config (see ``experiments/configs/default.py``).

  On a CPU backend it also keeps the host memory a step frees for the next step
  (`robustjax.host.retain_freed_memory`: without it every step page-faults its buffers in anew),
  and lowers jax's random bits unrolled (`robustjax.host.unroll_threefry`: the same bits, faster).

  Raises:
    ValueError: for unknown dataset / model / split / rule / attack / coding / compressor /
      optimiser / backend names (listing the known ones), impossible (n, f) choices (naming the
      rule's condition) and hyper-parameters out of range (`check_hyperparameters`).
  """
  n, f = config.num_workers, config.num_byzantine
  _check_counts(n, f)
  check_hyperparameters(config)
  if jax.default_backend() == 'cpu':
    host.retain_freed_memory()
    host.unroll_threefry()
  attack = attacks.get(config.attack)
  declared = declared_byzantine(config)
  pipeline = as_rule(config.rule, declared)
  code = coding.make(config.get('coding', 'identity'), n=n, f=f)
  compressor = _compressor(config.get('compression', 'none'))
  model_name, model_params = parse_spec(config.model)
  if config.algorithm not in ('dsgd', 'local'):
    raise ValueError(f'unknown algorithm {config.algorithm!r}; known algorithms: dsgd, local')
  ds = rdata.load(config.dataset, seed=config.seed, **_data_kwargs(config))
  if ds.num_classes < 2:
    raise ValueError(f'dataset {config.dataset!r} is not a classification dataset')
  num_parts = n - f if code.identity else n
  parts = rdata.split(
    ds.y_train, num_parts, config.split, seed=config.seed, alpha=config.alpha, gamma=config.gamma
  )
  model = rmodels.make(
    model_name,
    num_classes=ds.num_classes,
    input_shape=ds.input_shape,
    rngs=nnx.Rngs(config.seed),
    **model_params,
  )
  problem, params, model_state = eng.make_problem(model, make_optimizer(config), ds, parts)
  spec = eng.TrainSpec(
    num_workers=n,
    num_byzantine=f,
    batch_size=config.batch_size,
    momentum=float(config.momentum),
    algorithm=config.algorithm,
    local_steps=int(config.local_steps),
    local_lr=float(config.local_lr),
    pipeline=pipeline,
    attack=attack,
    code=code,
    compressor=compressor,
    num_classes=ds.num_classes,
    eval_chunk=int(config.eval_chunk),
    worker_chunk=_worker_chunk(config, problem, params, model_state),
    dp=dp_of(config),
  )
  _validate(spec)
  backend, mesh = choose_backend(config)
  if backend == 'shard_map':
    placed = parallel.put(problem.data, parallel.replicated(mesh))
  else:
    placed = jax.tree.map(jnp.asarray, problem.data)
  return Experiment(
    spec=spec,
    problem=problem,
    backend=backend,
    mesh=mesh,
    data=placed,
    seed=config.seed,
    params0=params,
    model_state0=model_state,
  )
