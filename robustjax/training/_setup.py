"""From a config to a ready-to-run experiment: data, model, rule, attack, optimiser, backend.

Rules, attacks and models are named by *spec strings*, convenient on a command line:
``'nnm+krum'`` (pre-aggregators then the aggregator, joined by ``+``, the same spelling as
`Pipeline.name`), with keyword parameters in parentheses: ``'bucketing(s=2)+krum(m=3)'``,
``'ipm(eps=0.5)'``, ``'mlp(hidden=(64,))'``. Values are Python literals.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from robustjax._spec import parse_rule, parse_spec
from robustjax.training import _engine as eng
from robustjax.training import _parallel as par
from robustjax.training import _steps

__all__ = ['Experiment', 'build', 'make_optimizer', 'make_pipeline', 'parse_spec', 'parse_rule']


def make_pipeline(rule: str, f: int):
  """A `robustjax.preaggregators.Pipeline` from a rule spec string; unknown names list the known."""
  from robustjax import preaggregators

  return preaggregators.as_rule(rule, f)


def _attack_names() -> list[str]:
  from robustjax import attacks

  extra = {'none', eng.LABEL_FLIP_ATTACKS[0], *eng.STATEFUL_ATTACKS}
  return sorted(set(attacks.names()) | extra)


def check_attack(name: str) -> None:
  from robustjax import attacks

  if name == 'none' or name in eng.LABEL_FLIP_ATTACKS or name in eng.STATEFUL_ATTACKS:
    return
  if name not in attacks.names():
    raise ValueError(f'unknown attack {name!r}; known attacks: {", ".join(_attack_names())}')


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
  backend = config.backend
  k = config.num_devices or len(jax.devices())
  if backend == 'auto':
    backend = 'shard_map' if k > 1 and config.num_workers % k == 0 else 'vmap'
    if k > 1 and backend == 'vmap':
      logging.warning(
        'backend=auto: num_workers=%d is not a multiple of the %d devices; running on one device',
        config.num_workers,
        k,
      )
  if backend not in _steps.BACKENDS:
    raise ValueError(
      f'unknown backend {backend!r}; known backends: auto, {", ".join(_steps.BACKENDS)}'
    )
  if backend == 'vmap':
    return backend, None
  if backend == 'pmap':
    k = min(k, jax.local_device_count())
  return backend, par.make_mesh(k)


def _worker_chunk(config) -> int:
  """``config.worker_chunk``, or when unset 256 on CPU (faster there) and 0 (no chunking) else."""
  chunk = config.get('worker_chunk')
  if chunk is None:
    return 256 if jax.devices()[0].platform == 'cpu' else 0
  if chunk < 0:
    raise ValueError(f'worker_chunk must be >= 0; got {chunk}')
  return int(chunk)


def _check_counts(n, f):
  if not isinstance(n, int) or n < 1:
    raise ValueError(f'num_workers must be an int >= 1; got {n!r}')
  if not isinstance(f, int) or f < 0:
    raise ValueError(f'num_byzantine must be an int >= 0; got {f!r}')
  if f >= n:
    raise ValueError(f'num_byzantine={f} must be < num_workers={n} (at least one honest worker)')


def _validate(spec, dim=3):
  """Traces the rule and the attack on abstract stacks so misuse fails before compiling."""
  n, f, nh = spec.num_workers, spec.num_byzantine, spec.num_honest
  runtime = {'center': jnp.zeros((dim,))} if spec.stateful_center else {}
  key = jax.random.key(0)
  try:
    jax.eval_shape(
      lambda s: spec.pipeline(s, key=key, **runtime), jax.ShapeDtypeStruct((n, dim), jnp.float32)
    )
  except (TypeError, ValueError) as e:
    raise ValueError(f'rule {spec.pipeline.name!r} cannot run with n={n}, f={f}: {e}') from None
  if spec.update_attack and not spec.stateful_attack:
    try:
      jax.eval_shape(
        lambda h: eng._call_attack(spec, h, key), jax.ShapeDtypeStruct((nh, dim), jnp.float32)
      )
    except (TypeError, ValueError) as e:
      raise ValueError(f'attack {spec.attack!r} cannot run with n={n}, f={f}: {e}') from None


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
  """

  spec: eng.TrainSpec
  problem: eng.Problem
  backend: str
  mesh: Any
  data: dict
  seed: int
  params0: Any
  model_state0: Any
  _step: Any = None
  _eval: Any = None
  _wids: Any = None

  def __post_init__(self):
    self._step = _steps.make_step(self.spec, self.problem, backend=self.backend, mesh=self.mesh)
    self._eval = _steps.make_eval(self.spec, self.problem)
    if self.backend == 'shard_map':
      self._wids = par.put(
        np.arange(self.spec.num_workers, dtype=np.int32), par.worker_sharded(self.mesh)
      )

  def state_shardings(self, state):
    """The shardings of a state: momentum over ``'workers'`` for shard_map, the rest replicated."""
    if self.backend != 'shard_map':
      return None
    rep, wk = par.replicated(self.mesh), par.worker_sharded(self.mesh)
    shard = jax.tree.map(lambda _: rep, state)
    return shard.replace(momentum=jax.tree.map(lambda _: wk, state.momentum))

  def place(self, state):
    """Puts a (host or device) state where the backend wants it."""
    shardings = self.state_shardings(state)
    if shardings is None:
      return jax.tree.map(jnp.asarray, state)
    return jax.tree.map(lambda x, s: par.put(np.asarray(x), s), state, shardings)

  def init_state(self) -> eng.TrainState:
    state = eng.init_state(self.spec, self.problem, self.params0, self.model_state0, self.seed)
    return self.place(state)

  def step(self, state):
    if self.backend == 'shard_map':
      return self._step(state, self.data, self._wids)
    return self._step(state, self.data)

  def evaluate(self, state) -> dict:
    out = self._eval(state.params, state.model_state, self.data)
    return {k: float(v) for k, v in jax.device_get(out).items()}


def build(config) -> Experiment:
  """Builds an `Experiment` from a config (see ``experiments/configs/default.py``).

  Raises:
    ValueError: for unknown dataset / model / split / rule / attack / optimiser / backend names
      (listing the known ones) and impossible (n, f) choices (naming the rule's condition).
  """
  from robustjax import data as rdata
  from robustjax import models as rmodels

  n, f = config.num_workers, config.num_byzantine
  _check_counts(n, f)
  attack, attack_params = parse_spec(config.attack)
  check_attack(attack)
  pipeline = make_pipeline(config.rule, f)
  model_name, model_params = parse_spec(config.model)
  ds = rdata.load(config.dataset, seed=config.seed)
  if ds.num_classes < 2:
    raise ValueError(f'dataset {config.dataset!r} is not a classification dataset')
  nh = n - f
  parts = rdata.split(
    ds.y_train, nh, config.split, seed=config.seed, alpha=config.alpha, gamma=config.gamma
  )
  model = rmodels.make(
    model_name,
    num_classes=ds.num_classes,
    input_shape=ds.input_shape,
    rngs=nnx.Rngs(config.seed),
    **model_params,
  )
  tx = make_optimizer(config)
  problem, params, model_state = eng.make_problem(model, tx, ds, parts)
  if config.algorithm not in ('dsgd', 'local'):
    raise ValueError(f'unknown algorithm {config.algorithm!r}; known algorithms: dsgd, local')
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
    attack_params=tuple(sorted(attack_params.items())),
    num_classes=ds.num_classes,
    eval_chunk=int(config.eval_chunk),
    worker_chunk=_worker_chunk(config),
  )
  _validate(spec)
  backend, mesh = choose_backend(config)
  if mesh is not None and n % mesh.shape[par.AXIS]:
    raise ValueError(
      f'backend {backend!r}: num_workers={n} must be a multiple of the number of devices '
      f'({mesh.shape[par.AXIS]}); change num_workers or set num_devices'
    )
  if backend == 'shard_map':
    placed = par.put(problem.data, par.replicated(mesh))
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
