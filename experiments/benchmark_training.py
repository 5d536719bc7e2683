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

  python experiments/benchmark_training.py
  python experiments/benchmark_training.py --ns=8,128 --rule=trimmed_mean --f=2 --attack=alie
"""

from __future__ import annotations

import os
import platform
import time

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


def _train_loop(n):
  """(seconds per step, compile seconds, final test accuracy) of `train_and_evaluate`, the loop
  users run: the default config's logging (every 10 steps), evaluation (every 50), TensorBoard
  and checkpoints (`--train_checkpoint_every`); the better of two runs."""
  import tempfile

  from robustjax import training

  c = _config(n)
  c.num_steps, c.checkpoint_every = FLAGS.train_steps, FLAGS.train_checkpoint_every
  c.progress, c.plot = False, False
  runs = []
  for _ in range(2):
    with tempfile.TemporaryDirectory() as workdir:
      s = training.train_and_evaluate(c, workdir)
    runs.append((1.0 / s['steps_per_second_this_run'], s['compile_seconds_this_run'], s['final']))
  return min(runs, key=lambda r: r[0])


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

  from robustjax import training

  dev = jax.devices()[0]
  print(
    f'jax {jax.__version__}, {dev.platform} ({dev.device_kind}), {len(jax.devices())} device(s), '
    f'{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}; '
    f'rule={FLAGS.rule}, f={FLAGS.f}, attack={FLAGS.attack}, model={FLAGS.model}, '
    f'batch {FLAGS.batch_size}/worker',
    flush=True,
  )
  rows = []
  for n in [int(v) for v in FLAGS.ns]:
    exp = training.build(_config(n))
    t_vmap, _ = _time(exp.step, exp.init_state())
    t_loop = None
    if n <= FLAGS.loop_max_n:
      t_loop, _ = _time(_loop_step(exp), exp.init_state())
    train = _train_loop(n) if FLAGS.train_steps else None
    rows.append((n, t_vmap, t_loop, train))
    loop = f'{n / t_loop:10.0f}' if t_loop else '         -'
    ratio = f'{t_loop / t_vmap:6.1f}x' if t_loop else '     -'
    tr = ''
    if train:
      tr = (
        f'   train_and_evaluate {n / train[0]:10.0f} worker-steps/s ({train[0] * 1e3:.2f} '
        f'ms/step, compile {train[1]:.1f} s, test accuracy {train[2]["test_accuracy"]:.3f})'
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
  for n, tv, tl, train in rows:
    loop = f'{tl * 1e3:.1f} | {n / tl:,.0f} | {tl / tv:.1f}×' if tl else '- | - | -'
    tr = f'{train[0] * 1e3:.2f} | {n / train[0]:,.0f} | {train[1]:.1f}' if train else '- | - | -'
    print(f'| {n} | {tv * 1e3:.2f} | {n / tv:,.0f} | {loop} | {tr} |')


if __name__ == '__main__':
  app.run(main)
