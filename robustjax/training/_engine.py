"""The one staged training step: workers as an array axis, one jitted function, explicit state.

Every step runs the same stages in order, each held by one module:

1. **gradients** (here): every row of the worker axis samples a batch of its partition on
   device and computes ``jax.value_and_grad(loss)`` (``algorithm='local'``: K local SGD steps and
   the model delta). Without coding, row i is worker i (Byzantine rows borrow an honest
   partition, so the axis stays uniform and shards evenly); with coding, row j is data subset j;
2. **encoding** (`robustjax.coding.Code`): worker i sends c_i = Σ_j B_ij g_j, B drawn for the
   step (LAD re-draws its permutation); the identity code skips it;
3. **compression** (`robustjax.compression`, with error-feedback memory as state);
4. **worker momentum** m_i ← β m_i + (1 − β) c_i;
5. **attack** (`robustjax.attacks.Attack`): the last f rows are Byzantine; an update attack
   replaces their messages from the honest ones (the defender passed as ``rule``, here and only
   here); a data-level attack (label flipping) alters their labels in stage 1 instead;
6. **pre-aggregation + aggregation** (`robustjax.pipeline.Pipeline`) through
   `robustjax.optax_adapter.as_optax`, which carries the rule's state (centered clipping's centre);
7. the server's **optax update**.

Randomness comes from the key in the state, split once per step and folded with the *global*
row index, so every backend (``vmap``, ``shard_map``, ``pmap``) draws the same batches and gives
the same result to float tolerance. The step has one signature, ``step(state, data, report=None)
-> (state, metrics)``, whatever the backend; a run loop that logs every k steps passes ``report``
(a traced bool) so that the other steps skip the metrics (`when_reported`).

Sharded layout (``shard_map`` / ``pmap``): stages 1–4 run per device on its n / k rows (the
replicated parameters are marked varying with ``jax.lax.pcast(params, 'workers',
to='varying')``: without it `jax.grad` of a replicated parameter transposes the implicit
broadcast into a `psum`, silently *summing* the gradients of every device's workers). With
coding the subset gradients are all-gathered once and each device encodes its own workers' rows
of B. The messages are then all-gathered (the attack is omniscient), and with ``shard_map`` the
aggregation runs with the coordinates sharded (`robustjax.parallel.sharded_update`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from robustjax import coding, compression, privacy
from robustjax import stack as stk
from robustjax.optax_adapter import as_optax
from robustjax.parallel import AXIS

__all__ = [
  'BACKENDS',
  'TrainSpec',
  'TrainState',
  'Problem',
  'make_problem',
  'least_squares_problem',
  'init_state',
  'make_step',
  'make_eval',
  'sharded_worker_stage',
  'when_reported',
  'or_nan',
]

BACKENDS = ('vmap', 'shard_map', 'pmap')


@struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree (checkpointed as a whole).

  Attributes:
    step: int32 scalar, the number of steps taken.
    params: the model parameters.
    model_state: the model's other variables (constant during training).
    opt_state: the server optimiser's optax state.
    workers: per-worker state, a dict of stacks with leading axis n: ``momentum`` and
      ``compression`` (error-feedback memories, or ``()``).
    aggregator: the `as_optax` state (its key and the rule's state, e.g. the centre).
    attack_state: the attack's state (``()`` for stateless attacks).
    key: uint32 raw key data (`jax.random.key_data`), split once per step.
  """

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  workers: Any
  aggregator: Any
  attack_state: Any
  key: jax.Array


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """Static settings of a training step (hashable: a static argument of the jitted step).

  Attributes:
    num_workers: n, all workers (honest and Byzantine).
    num_byzantine: f, the last f rows of the worker axis.
    batch_size: examples per row per (local) step, sampled with replacement from its partition;
      0 means the whole partition (full-batch gradient descent; partitions of equal size).
    momentum: β of the worker-side momentum (0 disables it).
    algorithm: ``'dsgd'`` (one gradient per step) or ``'local'`` (K local SGD steps; the workers
      send the model delta ``params − local_params``, treated as a gradient).
    local_steps: K for ``algorithm='local'``.
    local_lr: the workers' SGD step size for ``algorithm='local'``.
    pipeline: the `robustjax.pipeline.Pipeline` (its f is the declared f).
    attack: the `robustjax.attacks.Attack`.
    code: the `robustjax.coding.Code` (identity: no encoding).
    compressor: a `robustjax.compression` compressor or `ErrorFeedback`, or None.
    num_classes: number of labels (label flipping maps y to ``num_classes − 1 − y``).
    eval_chunk: examples per chunk in the evaluation.
    worker_chunk: vmap at most this many rows at once (a `lax.map` over chunks of them; the
      largest divisor of the local row count not above it); 0 vmaps them all at once.
    dp: a `robustjax.privacy.DP` (clipping, local and central Gaussian noise), or None.
  """

  num_workers: int
  num_byzantine: int
  batch_size: int
  momentum: float
  algorithm: str
  local_steps: int
  local_lr: float
  pipeline: Any
  attack: Any
  code: Any
  compressor: Any = None
  num_classes: int = 0
  eval_chunk: int = 1024
  worker_chunk: int = 0
  dp: Any = None

  @property
  def num_honest(self) -> int:
    return self.num_workers - self.num_byzantine

  @property
  def num_partitions(self) -> int:
    """Data partitions: n subsets with coding, else one per honest worker."""
    return self.num_workers if not self.code.identity else self.num_honest

  @property
  def replaces_messages(self) -> bool:
    """Whether an attack replaces the Byzantine rows after the worker stages."""
    return self.num_byzantine > 0 and self.attack.replaces_messages

  @property
  def flips_labels(self) -> bool:
    return self.num_byzantine > 0 and self.attack.data_level


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
  """The model and the data, as arrays and pure functions.

  Attributes:
    loss: ``loss(params, model_state, x, y) -> scalar`` (the mean loss of a batch).
    evaluate: ``evaluate(params, model_state, data, chunk) -> dict`` of scalars.
    tx: the server's optax optimiser.
    data: a dict of arrays: ``x_train``, ``y_train``, ``x_test``, ``y_test``, ``idx`` ((P, L)
      int32 indices of each partition's examples, padded) and ``sizes`` ((P,) int32).
    apply: the model's forward pass ``apply(params, model_state, x)`` (classification), or None.
  """

  loss: Callable
  evaluate: Callable
  tx: optax.GradientTransformation
  data: dict
  apply: Callable | None = None

  # Identity hashing: a Problem is a static argument of the jitted steps.
  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other


def _pack(dataset, parts, y_dtype) -> dict:
  from robustjax import data as rdata

  idx, sizes = rdata.pad_indices(parts)
  data = {
    'x_train': np.asarray(dataset.x_train, np.float32),
    'y_train': np.asarray(dataset.y_train, y_dtype),
    'x_test': np.asarray(dataset.x_test, np.float32),
    'y_test': np.asarray(dataset.y_test, y_dtype),
    'idx': np.asarray(idx, np.int32),
    'sizes': np.asarray(sizes, np.int32),
  }
  if np.any(data['sizes'] <= 0):
    raise ValueError('every data partition needs at least one example; got an empty partition')
  return data


def _chunked(fn, x, y, chunk):
  """``fn(x_chunk, y_chunk) -> per-example arrays`` over chunks of `chunk` examples (lax.map)."""
  n = x.shape[0]
  pad = (-n) % chunk
  xp = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
  yp = jnp.concatenate([y, jnp.zeros((pad,) + y.shape[1:], y.dtype)]) if pad else y
  out = jax.lax.map(
    lambda a: fn(*a), (xp.reshape((-1, chunk) + x.shape[1:]), yp.reshape((-1, chunk) + y.shape[1:]))
  )
  return jax.tree.map(lambda o: o.reshape((-1,) + o.shape[2:])[:n], out)


def _per_partition_mean(per_example, data):
  idx, sizes = data['idx'], data['sizes']
  mask = jnp.arange(idx.shape[1])[None, :] < sizes[:, None]
  return jnp.mean(jnp.sum(jnp.where(mask, per_example[idx], 0.0), 1) / sizes)


def make_problem(model: nnx.Module, tx, dataset, parts) -> tuple[Problem, Any, Any]:
  """A classification problem: softmax cross-entropy of an `nnx.Module`, split functionally.

  Evaluation: ``train_loss`` is (1/P) Σ_p L_p with L_p the mean loss over partition p (the
  objective robust training minimises), ``train_accuracy`` is pooled over the training set,
  ``test_loss`` / ``test_accuracy`` over the test set.

  Returns:
    ``(problem, params, model_state)``; the data stay host NumPy arrays until placed.
  """
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)

  def apply(params, model_state, x):
    return nnx.merge(graphdef, params, model_state)(x)

  def loss(params, model_state, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, model_state, x), y).mean()

  def evaluate(params, model_state, data, chunk):
    def per_example(x, y):
      logits = apply(params, model_state, x)
      l = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return l, (jnp.argmax(logits, -1) == y).astype(jnp.float32)

    c_tr = min(chunk, data['x_train'].shape[0])
    c_te = min(chunk, data['x_test'].shape[0])
    loss_tr, corr_tr = _chunked(per_example, data['x_train'], data['y_train'], c_tr)
    loss_te, corr_te = _chunked(per_example, data['x_test'], data['y_test'], c_te)
    return {
      'train_loss': _per_partition_mean(loss_tr, data),
      'train_accuracy': jnp.mean(corr_tr),
      'test_loss': jnp.mean(loss_te),
      'test_accuracy': jnp.mean(corr_te),
    }

  data = _pack(dataset, parts, np.int32)
  problem = Problem(loss=loss, evaluate=evaluate, tx=tx, data=data, apply=apply)
  return problem, params, model_state


def least_squares_problem(dataset, parts, tx, *, ridge: float = 0.0, solution=None) -> Problem:
  """Linear least squares F(w) = (1/N) Σ_j ½(⟨a_j, w⟩ − b_j)² + (λ/2)‖w‖² (the LAD study).

  Parameters are a vector w (start it at zeros). Evaluation: ``train_loss`` F(w) over the
  training set, ``grad_sq_norm`` ‖∇F(w)‖², and with `solution` w⋆ (the minimiser; kept in the
  data as ``w_star``, so a batch of seeds vmaps) ``rel_dist`` ‖w − w⋆‖²/‖w⋆‖² and
  ``excess_loss`` F(w) − F(w⋆) = ½ eᵀ(AᵀA/N + λI)e with e = w − w⋆ (exact for the quadratic,
  since ∇F(w⋆) = 0), computed from e so that float32 resolves it far below F⋆ (no cancellation
  of F(w) − F⋆).
  """

  def loss(w, model_state, x, y):
    del model_state
    return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * ridge * jnp.sum(w * w)

  def evaluate(w, model_state, data, chunk):
    del chunk
    full = lambda v: loss(v, model_state, data['x_train'], data['y_train'])
    value, g = jax.value_and_grad(full)(w)
    out = {'train_loss': value, 'grad_sq_norm': jnp.sum(g * g)}
    if 'w_star' in data:
      w_star = data['w_star']
      e = w - w_star
      out['rel_dist'] = jnp.sum(e**2) / jnp.sum(w_star**2)
      out['excess_loss'] = 0.5 * jnp.mean((data['x_train'] @ e) ** 2) + 0.5 * ridge * jnp.sum(e**2)
    return out

  data = _pack(dataset, parts, np.float32)
  if solution is not None:
    data['w_star'] = np.asarray(solution, np.float32)
  return Problem(loss=loss, evaluate=evaluate, tx=tx, data=data)


def init_state(spec: TrainSpec, problem: Problem, params, model_state, seed: int) -> TrainState:
  """The initial state: zero momentums and memories, the optimiser's, the rule's and the
  attack's initial states, the key from `seed`."""
  n, nh = spec.num_workers, spec.num_honest
  stack_of = lambda k: jax.tree.map(lambda p: jnp.zeros((k,) + p.shape, p.dtype), params)
  momentum = stack_of(n)
  comp = spec.compressor.init(momentum) if spec.compressor is not None else ()
  root = jax.random.key(seed)
  aggregator = as_optax(spec.pipeline, f=spec.pipeline.f, key=jax.random.fold_in(root, 2))
  attack_state = spec.attack.init(jax.random.fold_in(root, 1), stack_of(nh))
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=model_state,
    opt_state=problem.tx.init(params),
    workers={'momentum': momentum, 'compression': comp},
    aggregator=aggregator.init(params),
    attack_state=attack_state,
    key=jax.random.key_data(root),
  )


# ----------------------------------------------------------------------------------------------
# Stages 1-4: per row, on the device that holds the row.


def _chunk_size(k: int, chunk: int) -> int:
  """The largest divisor of k that is at most `chunk` (k when chunk is 0 or >= k)."""
  if not chunk or chunk >= k:
    return k
  return max(d for d in range(1, chunk + 1) if k % d == 0)


def _sample(key, data, part, batch_size):
  if batch_size == 0:  # the whole partition (equal sizes, checked at build)
    ex = data['idx'][part]
  else:
    pos = jax.random.randint(key, (batch_size,), 0, data['sizes'][part])
    ex = data['idx'][part, pos]
  return data['x_train'][ex], data['y_train'][ex]


def _gradients(spec, problem, params, model_state, rows, key, data, flip):
  """Stage 1: per-row gradients (or local-step deltas) and batch losses.

  `flip`: ``'none'``, ``'byzantine'`` (rows ≥ n − f relabel: worker rows without coding) or
  ``'all'`` (the Byzantine workers' view of every subset, with coding).
  """
  nh, parts = spec.num_honest, spec.num_partitions
  vg = jax.value_and_grad(problem.loss)

  def one(row):
    k = jax.random.fold_in(key, row)
    part = jnp.where(row < parts, row, (row - parts) % parts)
    relabel = (row >= nh) if flip == 'byzantine' else (flip == 'all')

    def batch(k):
      x, y = _sample(k, data, part, spec.batch_size)
      if flip == 'none':
        return x, y
      return x, jnp.where(relabel, spec.attack.relabel(y, spec.num_classes), y)

    if spec.algorithm == 'dsgd':
      return vg(params, model_state, *batch(k))[::-1]

    def local(p, k):
      loss, g = vg(p, model_state, *batch(k))
      return jax.tree.map(lambda a, b: a - spec.local_lr * b, p, g), loss

    p_end, losses = jax.lax.scan(local, params, jax.random.split(k, spec.local_steps))
    return jax.tree.map(lambda a, b: a - b, params, p_end), losses[0]

  k = rows.shape[0]
  c = _chunk_size(k, spec.worker_chunk)
  if c >= k:
    return jax.vmap(one)(rows)
  g, losses = jax.lax.map(jax.vmap(one), rows.reshape(k // c, c))
  return jax.tree.map(lambda x: x.reshape((k,) + x.shape[2:]), g), losses.reshape(k)


def _worker_stages(spec, problem, params, model_state, workers, rows, keys, data, b, gather):
  """Stages 1-4 for the workers `rows` (global indices); `gather` all-gathers a row stack.

  Label flipping under coding computes the subset gradients twice (with honest and with flipped
  labels: a Byzantine worker encodes the flipped ones); every other combination computes them once.

  Returns ``(messages after momentum, new worker state, per-row losses)``.
  """
  if spec.code.identity:
    flip = 'byzantine' if spec.flips_labels else 'none'
    msgs, losses = _gradients(spec, problem, params, model_state, rows, keys['grad'], data, flip)
    msgs = privacy.privatize(spec.dp, msgs, rows, keys.get('dp'))
  else:
    g, losses = _gradients(spec, problem, params, model_state, rows, keys['grad'], data, 'none')
    g = privacy.privatize(spec.dp, g, rows, keys.get('dp'))  # each subset's gradient, before coding
    b_rows = b[rows]
    msgs = coding.encode(b_rows, gather(g))
    if spec.flips_labels:
      gf, _ = _gradients(spec, problem, params, model_state, rows, keys['grad'], data, 'all')
      byz = coding.encode(b_rows, gather(gf))
      is_byz = rows >= spec.num_honest
      msgs = jax.tree.map(
        lambda h, z: jnp.where(is_byz.reshape((-1,) + (1,) * (h.ndim - 1)), z, h), msgs, byz
      )
  comp = workers['compression']
  if spec.compressor is not None:
    ids = rows if spec.code.key_ids is None else jnp.asarray(spec.code.key_ids)[rows]
    msgs, comp = compression.compress_stack(spec.compressor, msgs, comp, keys['comp'], key_ids=ids)
  if spec.momentum:
    beta = spec.momentum
    msgs = jax.tree.map(lambda m, c: beta * m + (1.0 - beta) * c, workers['momentum'], msgs)
  return msgs, {'momentum': msgs, 'compression': comp}, losses


# ----------------------------------------------------------------------------------------------
# Stages 5-7: on the full stack of messages.


def when_reported(report, fn: Callable, *args):
  """``fn(*args, reported)``, with ``reported`` the Python bool that `report` stands for.

  `report` is None (the step reports: ``fn(*args, True)`` runs inline) or a boolean scalar,
  possibly traced (inside a `lax.scan` over steps): then ``fn(*args, True)`` and
  ``fn(*args, False)`` are the two branches of a `jax.lax.cond`, and only the taken one runs.
  ``fn`` computes its metrics only when ``reported`` (`or_nan`), so the steps nobody logs skip
  them.
  """
  if report is None:
    return fn(*args, True)
  branches = (lambda *a: fn(*a, False), lambda *a: fn(*a, True))
  return jax.lax.cond(jnp.asarray(report, bool), branches[1], branches[0], *args)


def or_nan(reported: bool, fn: Callable, *args):
  """``fn(*args)`` where `reported`; else NaN arrays of its outputs' shapes and dtypes, with
  nothing of ``fn`` computed (`jax.eval_shape`)."""
  if reported:
    return fn(*args)
  return jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), jax.eval_shape(fn, *args))


def _metrics(spec, state, b, agg, messages, losses):
  """The step's scalars (`make_step`)."""
  nh = spec.num_honest
  w = jnp.zeros((spec.num_workers,), jnp.float32).at[:nh].set(1.0 / nh)
  honest_mean = stk.weighted_sum(w, messages, ignore_nonfinite=False)
  err = stk.sq_dists_to(jax.tree.map(lambda x: x[None], agg), honest_mean)[0]
  dim = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  bits = spec.compressor.bits(dim) if spec.compressor is not None else 32 * dim
  load = 1.0 if spec.code.identity else jnp.sum(coding.loads(b)[:nh]) / nh
  row_losses = losses if not spec.code.identity else losses[:nh]
  return {
    'batch_loss': jnp.mean(row_losses),
    'agg_error': jnp.sqrt(err),
    'load': jnp.asarray(load, jnp.float32),
    'bits': jnp.asarray(float(bits * spec.num_workers), jnp.float32),
  }


def _server(spec, problem, aggregator, state, messages, losses, b, keys, report=None):
  """Attack, robust aggregation (`as_optax`), optax update and the step's metrics (where
  `report`: `when_reported`)."""
  nh, f = spec.num_honest, spec.num_byzantine
  honest = jax.tree.map(lambda x: x[:nh], messages)
  attack_state = state.attack_state
  received = messages
  if spec.replaces_messages:
    byz, attack_state = spec.attack.apply(
      attack_state, honest, keys['attack'], f=f, rule=spec.pipeline
    )
    byz = jax.tree.map(lambda z, h: z.astype(h.dtype), byz, honest)
    received = stk.assemble(honest, byz).stack  # the Byzantine rows last, where they were
  agg, agg_state = aggregator.update(received, state.aggregator)
  if spec.dp is not None and spec.dp.central_noise:  # central DP: noise on the robust aggregate
    std = spec.dp.central_noise * spec.dp.clip / nh
    agg = privacy.add_noise(agg, std, jax.random.fold_in(keys['dp'], spec.num_workers))
  agg = jax.tree.map(lambda a, p: a.astype(p.dtype), agg, state.params)
  # The update and the metrics both consume the aggregate. Inline (or with only the metrics in a
  # branch), XLA:CPU fuses the trimmed mean's network into both, per leaf, and runs it twice (an
  # optimization barrier is gone before fusion); as the operand of `when_reported`'s branches it
  # is computed once. So a step that always reports (``report=None``) branches too, on
  # `state.step >= 0`: always true but, unlike a constant, not folded away.
  if report is None:
    report = state.step >= 0

  def update(agg, messages, losses, reported):
    updates, opt_state = problem.tx.update(agg, state.opt_state, state.params)
    metrics = or_nan(reported, lambda *a: _metrics(spec, state, b, *a), agg, messages, losses)
    return optax.apply_updates(state.params, updates), opt_state, metrics

  params, opt_state, metrics = when_reported(report, update, agg, messages, losses)
  new = state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    aggregator=agg_state,
    attack_state=attack_state,
  )
  return new, metrics


def _split_keys(spec, state):
  key = jax.random.wrap_key_data(state.key)
  key, k_grad, k_comp, k_att, k_code = jax.random.split(key, 5)
  b = jnp.zeros((0,), jnp.float32) if spec.code.identity else spec.code.matrix(k_code)
  # The privacy noise's key is folded from the gradients' (the other streams are unchanged).
  k_dp = jax.random.fold_in(k_grad, 0x70726976)
  keys = {'grad': k_grad, 'comp': k_comp, 'attack': k_att, 'dp': k_dp}
  return jax.random.key_data(key), keys, b


def _as_data(keys):
  return {k: jax.random.key_data(v) for k, v in keys.items()}


def _as_keys(keys):
  return {k: jax.random.wrap_key_data(v) for k, v in keys.items()}


def _gather(t):
  return jax.tree.map(lambda x: jax.lax.all_gather(x, AXIS, tiled=True), t)


def _local_rows(local: int) -> jax.Array:
  return jax.lax.axis_index(AXIS) * local + jnp.arange(local, dtype=jnp.int32)


def sharded_worker_stage(spec, problem, mesh, *, pcast: bool = True):
  """Stages 1-4 as a `jax.shard_map` over the mesh axis ``'workers'``.

  Returns ``fn(params, model_state, workers, key_data, data, b) -> (messages, workers, losses)``
  with the worker state and the outputs sharded ``P('workers')`` and the rest replicated.
  ``pcast=False`` reproduces the trap described in the module docstring (for tests only).
  """
  local = spec.num_workers // mesh.shape[AXIS]

  def body(params, model_state, workers, key_data, data, b):
    if pcast:
      params = jax.lax.pcast(params, AXIS, to='varying')
    return _worker_stages(
      spec, problem, params, model_state, workers, _local_rows(local), _as_keys(key_data), data,
      b, _gather,
    )  # fmt: skip

  return jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(P(), P(), P(AXIS), P(), P(), P()),
    out_specs=(P(AXIS), P(AXIS), P(AXIS)),
  )


def make_step(spec: TrainSpec, problem: Problem, *, backend: str = 'vmap', mesh=None):
  """The jitted ``step(state, data, report=None) -> (state, metrics)`` for a backend.

  The metrics are scalars: ``batch_loss`` (the honest workers' mean minibatch loss),
  ``agg_error`` (‖aggregate − mean of the honest messages‖), ``load`` (data subsets per honest
  worker) and ``bits`` (sent by all workers). With ``report`` a boolean (traced or not), they are
  computed only where it is true and are NaN elsewhere (`when_reported`); the new state is the
  same either way.

  Args:
    spec: the `TrainSpec`.
    problem: the `Problem`.
    backend: ``'vmap'`` (one device), ``'shard_map'`` (the worker axis over `mesh`), ``'pmap'``
      (legacy, over the first ``mesh.size`` local devices of this host: single-host only).
    mesh: the ``('workers',)`` mesh for ``'shard_map'`` / ``'pmap'``.

  Raises:
    ValueError: for an unknown backend, or n not divisible by the number of devices.
  """
  if backend not in BACKENDS:
    raise ValueError(f'unknown backend {backend!r}; known backends: {", ".join(BACKENDS)}')
  n = spec.num_workers
  if backend == 'vmap':
    aggregator = as_optax(spec.pipeline, f=spec.pipeline.f)

    @jax.jit
    def step(state, data, report=None):
      key, keys, b = _split_keys(spec, state)
      rows = jnp.arange(n, dtype=jnp.int32)
      msgs, workers, losses = _worker_stages(
        spec, problem, state.params, state.model_state, state.workers, rows, keys, data, b,
        lambda t: t,
      )  # fmt: skip
      new, metrics = _server(spec, problem, aggregator, state, msgs, losses, b, keys, report)
      return new.replace(workers=workers, key=key), metrics

    return step
  k = mesh.shape[AXIS]
  if n % k:
    raise ValueError(
      f'backend {backend!r}: num_workers={n} must be a multiple of the number of devices '
      f'({k}); change num_workers or set num_devices'
    )
  if backend == 'shard_map':
    return _shard_map_step(spec, problem, mesh)
  return _pmap_step(spec, problem, k)


def _shard_map_step(spec, problem, mesh):
  workers_fn = sharded_worker_stage(spec, problem, mesh)
  aggregator = as_optax(spec.pipeline, f=spec.pipeline.f, mesh=mesh)
  rep = NamedSharding(mesh, P())

  @jax.jit
  def step(state, data, report=None):
    key, keys, b = _split_keys(spec, state)
    msgs, workers, losses = workers_fn(
      state.params, state.model_state, state.workers, _as_data(keys), data, b
    )
    full, losses = jax.sharding.reshard((msgs, losses), rep)
    new, metrics = _server(spec, problem, aggregator, state, full, losses, b, keys, report)
    return new.replace(workers=workers, key=key), metrics

  return step


def _pmap_step(spec, problem, k):
  n = spec.num_workers
  local = n // k
  aggregator = as_optax(spec.pipeline, f=spec.pipeline.f)

  def body(state, workers, key_data, data, b, report):
    keys = _as_keys(key_data)
    params = jax.lax.pcast(state.params, AXIS, to='varying')
    rows = _local_rows(local)
    msgs, workers, losses = _worker_stages(
      spec, problem, params, state.model_state, workers, rows, keys, data, b, _gather
    )
    full, losses = _gather((msgs, losses))
    new, metrics = _server(spec, problem, aggregator, state, full, losses, b, keys, report)
    return new, workers, metrics

  pbody = jax.pmap(
    body,
    axis_name=AXIS,
    in_axes=(None, 0, None, None, None, None),
    devices=jax.local_devices()[:k],
  )
  split = lambda t: jax.tree.map(lambda x: x.reshape((k, local) + x.shape[1:]), t)
  merge = lambda t: jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), t)
  first = lambda t: jax.tree.map(lambda x: x[0], t)

  def step(state, data, report=None):
    key, keys, b = _split_keys(spec, state)
    new, workers, metrics = pbody(
      state.replace(workers=None), split(state.workers), _as_data(keys), data, b, report
    )
    return first(new).replace(workers=merge(workers), key=key), first(metrics)

  return step


def make_eval(spec: TrainSpec, problem: Problem):
  """``evaluate(params, model_state, data) -> dict`` of scalars, jitted."""
  return jax.jit(lambda p, ms, data: problem.evaluate(p, ms, data, spec.eval_chunk))
