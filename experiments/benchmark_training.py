r"""Training-step throughput: workers as a vmapped array axis vs a Python loop over workers.

For each n, one robust D-SGD step (MLP on the embedded digits data, batch 32 per worker, worker
momentum, aggregation, optax update) is timed two ways, in the same run:

* ``vmap``: the library's step, one jitted function with `jax.vmap` over the worker axis;
* ``loop``: the structure existing simulators use: a jitted per-worker gradient (the same
  function, batch sampling and momentum included) called in a Python loop over the workers, each
  worker's momentum kept as its own arrays, the results stacked (`jnp.stack`), then the same
  jitted attack + aggregation + update.

Throughput is worker-steps per second (n / seconds per step), from the fastest of the steps timed
during at least `--min_time` seconds (and at least `--repeats` steps), after a warm-up step
(compilation excluded): on a shared machine other processes only add time. The loop runs only
up to ``--loop_max_n`` workers (its time grows linearly with n).

Every loop runs in this one process, with the host allocator of `robustjax.host` (a step's
freed memory kept for the next; `training.build` sets it on CPU): ByzFL's loop gets it too.

With ``--byzfl`` (torch and ``byzfl==0.0.11`` installed), ByzFL's own training loop runs the same
task at each n, beside `train_and_evaluate`: its `Client` / `ByzantineClient` / `Server` classes,
one `Client` per honest worker (its iid share, `robustjax.data.split`, sampled with replacement in
batches of `--batch_size`), the same MLP in torch, SGD with the config's learning rate, weight
decay and worker momentum, the rule as ByzFL's pre-aggregator list and aggregator, the attack as
ByzFL's, the test accuracy every `eval_every` steps. Both report worker-steps/s over their whole
run (evaluation included) and the time to `--target_accuracy` (first evaluation at or above it,
× seconds per step), from the fastest of `--runs` runs each. The two loops' runs alternate (ours,
ByzFL's, ours, …), so that each pair sees the machine in about the same state; the speed-up of
each pair is printed beside the ratio of the fastest runs.

  python experiments/benchmark_training.py
  python experiments/benchmark_training.py --ns=8,128 --rule=trimmed_mean --f=2 --attack=alie
  python experiments/benchmark_training.py --ns=64,256,1024 --byzfl --rule=trimmed_mean \
      --attack=sign_flip --f=2 --model="mlp(hidden=(64,))" --batch_size=25 --loop_max_n=0 \
      --train_steps=300
"""

from __future__ import annotations

import os
import time

from _process import cpu_name
from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_list('ns', ['8', '32', '128', '512', '1024'], 'Numbers of workers.')
flags.DEFINE_integer('loop_max_n', 512, 'Largest n for the Python-loop baseline.')
flags.DEFINE_string('rule', 'mean', 'Rule spec (pre+...+aggregator).')
flags.DEFINE_integer('f', 0, 'Byzantine workers.')
flags.DEFINE_string('attack', 'none', 'Attack spec.')
flags.DEFINE_string('model', 'mlp', 'Model spec (default: MLP 64-64).')
flags.DEFINE_integer('batch_size', 32, 'Examples per worker per step.')
flags.DEFINE_float('min_time', 2.0, 'Minimum seconds of timed steps per measurement.')
flags.DEFINE_integer('repeats', 5, 'Minimum number of timed steps per measurement.')
flags.DEFINE_integer(
  'train_steps', 1000, 'Steps of the train_and_evaluate runs (0: skip that column).'
)
flags.DEFINE_integer(
  'train_checkpoint_every', 100, 'checkpoint_every of the train_and_evaluate runs (0: none).'
)
flags.DEFINE_bool('byzfl', False, "also run ByzFL 0.0.11's own training loop on the same task")
flags.DEFINE_integer('byzfl_steps', None, 'steps of the ByzFL runs (default: --train_steps)')
flags.DEFINE_integer(
  'runs',
  2,
  "runs of train_and_evaluate and of ByzFL's loop per n, alternated; each side's fastest reported",
  lower_bound=1,
)
flags.DEFINE_float('target_accuracy', 0.9, 'test accuracy of the time-to-target columns')

_BYZFL_ATTACKS = {'none': 'NoAttack', 'sign_flip': 'SignFlipping'}  # ALIE / IPM scale differently


def _config(n):
  import importlib.util

  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'default.py')
  spec = importlib.util.spec_from_file_location('default_config', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.num_workers, c.num_byzantine = n, FLAGS.f
  c.rule, c.attack, c.model = FLAGS.rule, FLAGS.attack, FLAGS.model
  c.batch_size, c.backend = FLAGS.batch_size, 'vmap'
  return c


def _loop_step(exp):
  """The per-worker-loop baseline a simulator without a worker axis runs: a jitted one-worker
  gradient called n times, momentum, the attack on the stacked honest rows, the robust update
  (`optax_adapter.as_optax`) and the optax step, all through the public API."""
  import jax
  import jax.numpy as jnp
  import optax

  from robustjax.optax_adapter import as_optax
  from robustjax.stack import assemble

  spec, problem = exp.spec, exp.problem
  n, nh, f = spec.num_workers, spec.num_honest, spec.num_byzantine
  robust = as_optax(spec.pipeline, f=spec.pipeline.f)
  beta = spec.momentum

  @jax.jit
  def one(params, model_state, m, part, key, data):
    pos = jax.random.randint(key, (spec.batch_size,), 0, data['sizes'][part])
    ex = data['idx'][part, pos]
    loss, g = jax.value_and_grad(problem.loss)(
      params, model_state, data['x_train'][ex], data['y_train'][ex]
    )
    return jax.tree.map(lambda a, b: beta * a + (1.0 - beta) * b, m, g), loss

  @jax.jit
  def server(state, moms, agg_state, opt_state, key):
    honest = jax.tree.map(lambda x: x[:nh], moms)
    received = moms
    if spec.replaces_messages:
      byz, _ = spec.attack.apply((), honest, key, f=f, rule=spec.pipeline)
      byz = jax.tree.map(lambda z, h: z.astype(h.dtype), byz, honest)
      received = assemble(honest, byz).stack
    agg, agg_state = robust.update(received, agg_state)
    updates, opt_state = problem.tx.update(agg, opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates)), agg_state, opt_state

  moms, carry = [], {}

  def step(state):
    if not moms:
      moms.extend(jax.tree.map(lambda x, i=i: x[i], state.workers['momentum']) for i in range(n))
      carry['agg'], carry['opt'] = state.aggregator, state.opt_state
      carry['key'] = jax.random.key(0)
    carry['key'], k_work, k_att = jax.random.split(carry['key'], 3)
    outs = [
      one(state.params, state.model_state, moms[i], i % nh, jax.random.fold_in(k_work, i), exp.data)
      for i in range(n)
    ]
    moms[:] = [o[0] for o in outs]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *moms)
    state, carry['agg'], carry['opt'] = server(state, stacked, carry['agg'], carry['opt'], k_att)
    return state, {'train_loss': jnp.mean(jnp.stack([o[1] for o in outs[:nh]]))}

  return step


def _train_run(n):
  """(seconds per step, compile seconds, final metrics, evaluations) of one run of
  `train_and_evaluate`, the loop users run: the default config's logging (every 10 steps),
  evaluation (every 50), TensorBoard and checkpoints (`--train_checkpoint_every`)."""
  import tempfile

  from robustjax import training

  c = _config(n)
  c.num_steps, c.checkpoint_every = FLAGS.train_steps, FLAGS.train_checkpoint_every
  c.progress, c.plot = False, False
  with tempfile.TemporaryDirectory() as workdir:
    s = training.train_and_evaluate(c, workdir)
    evals = _robustjax_evals(workdir)
  return 1.0 / s['steps_per_second_this_run'], s['compile_seconds_this_run'], s['final'], evals


def _fastest(runs):
  """The fastest of a side's runs (by their first entry, seconds per step), with every run's
  seconds per step appended as its last entry."""
  return (*min(runs, key=lambda r: r[0]), [r[0] for r in runs])


def _time_to_target(evals, seconds_per_step):
  """Seconds to the first evaluation at or above `--target_accuracy` (None if never)."""
  hits = [step for step, acc in evals if acc >= FLAGS.target_accuracy]
  return min(hits) * seconds_per_step if hits else None


def _robustjax_evals(workdir):
  """(step, test accuracy) of every evaluation in a run's metrics.jsonl."""
  import json

  with open(os.path.join(workdir, 'metrics.jsonl')) as fh:
    rows = [json.loads(line) for line in fh if line.strip()]
  return [(r['step'], r['test_accuracy']) for r in rows if 'test_accuracy' in r]


def _byzfl_loop(n):
  """(seconds per step, final test accuracy, evaluations) of one run of ByzFL 0.0.11's own loop
  on the task of `_config(n)` (see the module docstring), from the same seed each time."""
  import numpy as np
  import torch
  from _byzfl import DEFAULTS_DIFFER, STAGES, import_byzfl
  from torch.utils.data import DataLoader, RandomSampler, TensorDataset

  from robustjax import data
  from robustjax._spec import parse_rule, parse_spec

  framework = import_byzfl('fed_framework')
  Client, ByzantineClient, Server = framework.Client, framework.ByzantineClient, framework.Server
  c = _config(n)
  steps = FLAGS.byzfl_steps or FLAGS.train_steps
  model_name, model_params = parse_spec(c.model)
  if model_name != 'mlp':
    raise ValueError(f'--byzfl: only the mlp model has a torch twin here; got {c.model!r}')
  hidden = tuple(model_params.get('hidden', (64, 64)))
  ds = data.load(c.dataset, seed=c.seed)
  width = int(np.prod(ds.input_shape))

  class MLP(torch.nn.Module):  # robustjax's `mlp`: flatten → dense → ReLU → ... → dense
    def __init__(self):
      super().__init__()
      sizes = [width, *hidden]
      self.hidden = torch.nn.ModuleList(
        torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])
      )
      self.out = torch.nn.Linear(sizes[-1], ds.num_classes)

    def forward(self, x):
      x = x.reshape(x.shape[0], -1)
      for layer in self.hidden:
        x = torch.relu(layer(x))
      return self.out(x)

  framework.models.robustjax_mlp = MLP  # ByzFL builds its models by name from this module
  pre, agg_name, agg_params = parse_rule(c.rule)
  stages = [*((p, {}) if isinstance(p, str) else p for p in pre), (agg_name, agg_params)]

  def info(name, params):
    if name not in STAGES or name in DEFAULTS_DIFFER or params:
      raise ValueError(f'--byzfl: no like-for-like ByzFL stage for {name!r} {params or ""}')
    cls, takes_f = STAGES[name]
    return {'name': cls, 'parameters': {'f': c.num_byzantine} if takes_f else {}}

  attack_name, attack_params = parse_spec(c.attack)
  if attack_name not in _BYZFL_ATTACKS or attack_params:
    raise ValueError(f'--byzfl: no like-for-like ByzFL attack for {c.attack!r}')
  torch.manual_seed(c.seed)
  x_train = torch.from_numpy(np.asarray(ds.x_train, np.float32))
  y_train = torch.from_numpy(np.asarray(ds.y_train, np.int64))
  n_h = n - c.num_byzantine
  shares = data.split(np.asarray(ds.y_train), n_h, c.split, seed=c.seed)
  common = {
    'model_name': 'robustjax_mlp',
    'device': 'cpu',
    'optimizer_name': 'SGD',
    'learning_rate': c.learning_rate,
    'weight_decay': c.weight_decay,
    'milestones': [],
    'learning_rate_decay': 1.0,
  }
  clients = []
  for idx in shares:
    share = TensorDataset(x_train[idx], y_train[idx])
    sampler = RandomSampler(share, replacement=True, num_samples=c.batch_size * (steps + 1))
    loader = DataLoader(share, batch_size=c.batch_size, sampler=sampler)
    clients.append(
      Client(
        {
          **common,
          'loss_name': 'CrossEntropyLoss',
          'LabelFlipping': False,
          'nb_labels': ds.num_classes,
          'momentum': float(c.momentum),
          'training_dataloader': loader,
          'store_per_client_metrics': False,
        }
      )
    )
  test = TensorDataset(
    torch.from_numpy(np.asarray(ds.x_test, np.float32)),
    torch.from_numpy(np.asarray(ds.y_test, np.int64)),
  )
  server = Server(
    {
      **common,
      'test_loader': DataLoader(test, batch_size=c.eval_chunk),
      'aggregator_info': info(*stages[-1]),
      'pre_agg_list': [info(*st) for st in stages[:-1]],
    }
  )
  byzantine = ByzantineClient(
    {'f': c.num_byzantine, 'name': _BYZFL_ATTACKS[attack_name], 'parameters': {}}
  )
  state = server.get_dict_parameters()
  for client in clients:
    client.set_model_state(state)
  evals = []
  t0 = time.perf_counter()
  for step in range(1, steps + 1):  # ByzFL's documented loop
    for client in clients:
      client.compute_gradients()
    honest = [client.get_flat_gradients_with_momentum() for client in clients]
    vectors = honest + byzantine.apply_attack(honest)
    server.update_model_with_gradients(vectors)
    state = server.get_dict_parameters()
    for client in clients:
      client.set_model_state(state)
    if step % c.eval_every == 0 or step == steps:
      evals.append((step, server.compute_test_accuracy()))
  seconds = (time.perf_counter() - t0) / steps
  return seconds, evals[-1][1], evals


def _ms(seconds) -> str:
  """Each run's milliseconds per step, e.g. '1.77 / 2.05 ms'."""
  return ' / '.join(f'{1e3 * t:.2f}' for t in seconds) + ' ms'


def _pairs(train, byz) -> str:
  """The speed-up of each pair of alternated runs (ByzFL's seconds per step over ours), e.g.
  '18.2× / 21.0×'."""
  return ' / '.join(f'{b / t:.1f}×' for t, b in zip(train[-1], byz[-1]))


def _time(step, state):
  """Fastest single step (seconds) over at least `--min_time` seconds and `--repeats` steps.

  The minimum, not the mean: on a shared machine other processes only ever add time, so the
  fastest step is the best estimate of the step's own cost.
  """
  import jax

  state, _ = step(state)  # warm-up / compile
  jax.block_until_ready(state)
  times, start = [], time.perf_counter()
  while len(times) < FLAGS.repeats or time.perf_counter() - start < FLAGS.min_time:
    t0 = time.perf_counter()
    state, m = step(state)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  return min(times), state


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  import jax

  from robustjax import host, training

  # Every loop below (the library's, the Python loop, ByzFL's) runs in this process with the
  # same host allocator: the freed memory kept, as `training.build` sets on CPU.
  retained = host.retain_freed_memory()
  dev = jax.devices()[0]
  print(
    f'jax {jax.__version__}, {dev.platform} ({dev.device_kind}), {len(jax.devices())} device(s), '
    f'{cpu_name()}; '
    f'rule={FLAGS.rule}, f={FLAGS.f}, attack={FLAGS.attack}, model={FLAGS.model}, '
    f'batch {FLAGS.batch_size}/worker; freed host memory kept: {retained}',
    flush=True,
  )
  rows = []
  for n in [int(v) for v in FLAGS.ns]:
    exp = training.build(_config(n))
    t_vmap, _ = _time(exp.step, exp.init_state())
    t_loop = None
    if n <= FLAGS.loop_max_n:
      t_loop, _ = _time(_loop_step(exp), exp.init_state())
    train_runs, byz_runs = [], []
    for _ in range(FLAGS.runs):  # ours, ByzFL's, ours, ...
      if FLAGS.train_steps:
        train_runs.append(_train_run(n))
      if FLAGS.byzfl:
        byz_runs.append(_byzfl_loop(n))
    train = _fastest(train_runs) if train_runs else None
    byz = _fastest(byz_runs) if byz_runs else None
    rows.append((n, t_vmap, t_loop, train, byz))
    loop = f'{n / t_loop:10.0f}' if t_loop else '         -'
    ratio = f'{t_loop / t_vmap:6.1f}x' if t_loop else '     -'
    tr = ''
    if train:
      tr = (
        f'   train_and_evaluate {n / train[0]:10.0f} worker-steps/s ({train[0] * 1e3:.2f} '
        f'ms/step, runs {_ms(train[-1])}, compile {train[1]:.1f} s, test accuracy '
        f'{train[2]["test_accuracy"]:.3f})'
      )
    if byz:
      tr += (
        f'   ByzFL loop {n / byz[0]:8.0f} worker-steps/s ({byz[0] * 1e3:.1f} ms/step, runs '
        f'{_ms(byz[-1])}, test accuracy {byz[1]:.3f}'
        + (f'; speed-up of each pair of runs {_pairs(train, byz)})' if train else ')')
      )
    print(
      f'n={n:5d}  vmap {n / t_vmap:10.0f} worker-steps/s ({t_vmap * 1e3:8.2f} ms/step)   '
      f'loop {loop} worker-steps/s   vmap/loop {ratio}{tr}',
      flush=True,
    )
  print(
    '\n| n | vmap step (ms) | vmap worker-steps/s | loop step (ms) | loop worker-steps/s | '
    'vmap / loop | train_and_evaluate (ms/step) | its worker-steps/s | its compile (s) |'
  )
  print('|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  for n, tv, tl, train, _ in rows:
    loop = f'{tl * 1e3:.1f} | {n / tl:,.0f} | {tl / tv:.1f}×' if tl else '- | - | -'
    tr = f'{train[0] * 1e3:.2f} | {n / train[0]:,.0f} | {train[1]:.1f}' if train else '- | - | -'
    print(f'| {n} | {tv * 1e3:.2f} | {n / tv:,.0f} | {loop} | {tr} |')
  if FLAGS.byzfl and FLAGS.train_steps:
    fmt = lambda t: '-' if t is None else f'{t:.1f}'
    print(
      f'\n| n | train_and_evaluate worker-steps/s | ByzFL loop worker-steps/s | speed-up | '
      f'speed-up per pair of runs | test '
      f'accuracy (ours / ByzFL) | time to {FLAGS.target_accuracy:.0%} s (ours / ByzFL) | '
      'speed-up to target |'
    )
    print('|---:|---:|---:|---:|---|---|---|---:|')
    for n, _, _, train, byz in rows:
      ours_t = _time_to_target(train[3], train[0])
      byz_t = _time_to_target(byz[2], byz[0])
      to_target = f'{byz_t / ours_t:.1f}×' if ours_t and byz_t else '-'
      print(
        f'| {n} | {n / train[0]:,.0f} | {n / byz[0]:,.0f} | {byz[0] / train[0]:.1f}× | '
        f'{_pairs(train, byz)} | {train[2]["test_accuracy"]:.3f} / {byz[1]:.3f} | '
        f'{fmt(ours_t)} / {fmt(byz_t)} | {to_target} |'
      )


if __name__ == '__main__':
  app.run(main)
