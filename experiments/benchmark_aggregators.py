r"""Times every registered aggregator (and pre-aggregator) on one (n, d) stack.

Prints one table: rule, n, d, f, compile time, median run time, the ratio to the floor (one
streaming pass over the stack: the jitted matvec `ones(n) @ x`, re-timed next to each rule since
the load of a shared machine drifts), for distance-based rules the ratio to one n × n Gram product
(`x @ x.T` in full float32, `Precision.HIGHEST` as the rules' own, also re-timed), and with
`--byzfl` the speed-up over ByzFL 0.0.11 (torch, CPU) on the same input: ByzFL's median call
against ours, and its fastest call against our median (`--byzfl_repeats` calls after one
untimed call, as ours; its range is printed too).

The process keeps the host memory a call frees for the next (`robustjax.host`, as
`training.build` sets on CPU; ByzFL, in the same process, gets it too), and up to
`--heap_top_mib` of it at the top of the heap (2 GiB; the engine keeps 256 MiB): at 64 × 10⁶
ByzFL allocates stack-sized temporaries, which a smaller heap top hands back and the next call
faults in again (its centered clipping 109–180 ms instead of 39–46; BENCHMARKS.md). Without it a
rule that returns a fresh stack maps and page-faults its output anew at every call.
`--noretain_host_memory` keeps glibc's defaults (ByzFL then faults at every call).

Iterative rules (geometric_median, centered_clipping) run a fixed number of iterations (`--iters`,
no early stop); their ratio to the floor is per iteration, measured as
(t(iters) − t(1)) / (iters − 1).

Examples:
  python experiments/benchmark_aggregators.py --n=16 --d=100000 --f=3
  python experiments/benchmark_aggregators.py --n=64 --d=1000000 --f=8 --byzfl \
      --json_out=/tmp/agg.json
  python experiments/benchmark_aggregators.py --compile_only --n=256 --d=1000 --f=8 \
      --rules=median,trimmed_mean,meamed
  python experiments/benchmark_aggregators.py --cc_switch=16,64,256 --repeats=3
  python experiments/benchmark_aggregators.py --scaling=128,129,256,1024 --repeats=5
  python experiments/benchmark_aggregators.py --scaling=128,129,224,256 \
      --scaling_calls=jit,standalone
  python experiments/benchmark_aggregators.py --scaling=128,129,256,1024 --scaling_f=2 \
      --scaling_d=100000 --scaling_rules=trimmed_mean
  python experiments/benchmark_aggregators.py --n=64 --d=1000000 --f=8 --cpu_devices=2 \
      --rules=krum,multikrum,caf

With `--cpu_devices=K` (CPU only) the process sees K CPU devices (`jax_num_cpu_devices`) and every
aggregator runs as the engine's sharded path runs it, `parallel.sharded_update` with the stack's
coordinates split over the K devices: each device reduces its D / K coordinates on its own thread
and the distance rules exchange only n × n partial Gram matrices. On XLA:CPU a Gram product with
a small output (n ≤ 64) runs on one thread, so this is how such a Gram uses every core.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from _byzfl import DEFAULTS_DIFFER, STAGES, import_byzfl
from _process import cpu_name, fma_lanes, fma_peak_gflops
from absl import app, flags

from robustjax import aggregators, host, parallel, pipeline, stack
from robustjax._spec import parse_rule

try:  # pre-aggregators may not exist yet
  from robustjax import preaggregators
except ImportError:  # pragma: no cover
  preaggregators = None

FLAGS = flags.FLAGS
HIGHEST = jax.lax.Precision.HIGHEST
flags.DEFINE_integer('n', 16, 'number of workers')
flags.DEFINE_integer('d', 100_000, 'dimension of each worker slice')
flags.DEFINE_integer('f', 3, 'declared number of Byzantine workers')
flags.DEFINE_list(
  'rules', [], 'rules to time (default: every registered aggregator and pre-aggregator)'
)
flags.DEFINE_bool('preaggregators', True, 'also time the pre-aggregators (when --rules is empty)')
flags.DEFINE_integer('repeats', 5, 'timed runs per rule (the median is reported)')
flags.DEFINE_integer('warmup', 1, 'untimed runs after compilation')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16', 'float64'], 'stack dtype')
flags.DEFINE_integer('iters', 5, 'iterations for geometric_median / centered_clipping')
flags.DEFINE_integer('seed', 0, 'seed of the random stack')
flags.DEFINE_integer(
  'xla_cpu_vector_width',
  512,
  'on CPU, compiler option xla_cpu_prefer_vector_width for every timed function (0: XLA default '
  '256); the coordinate-wise rules set 512 themselves when called outside a jit',
)
flags.DEFINE_bool('compile_only', False, 'only measure compile times')
flags.DEFINE_integer(
  'peak_size', 4096, 'side m of the square matmul measuring the peak (0: skip the Gram section)'
)
flags.DEFINE_bool(
  'fma_peak',
  True,
  "also measure the cores' FMA peak (experiments/fma_peak.c, where gcc and AVX2 are available) "
  "and print the Gram's fraction of it",
)
flags.DEFINE_bool(
  'donation',
  True,
  'time the stack -> stack pre-aggregators that accept donate= with a fresh output and donated',
)
flags.DEFINE_list(
  'cc_switch',
  [],
  'only run the centered_clipping switch section: these numbers of workers n (d = '
  '--cc_switch_elements / n), each path at each of --cc_switch_iters',
)
flags.DEFINE_list(
  'cc_switch_iters', ['1', '2', '3', '4', '6', '8', '12', '16', '24'], 'iterations L'
)
flags.DEFINE_integer('cc_switch_elements', 64_000_000, 'n · d of each stack in --cc_switch')
flags.DEFINE_list(
  'scaling',
  [],
  'only run the worker-scaling section: these numbers of workers n (each rule at f = '
  '--scaling_f, d = --scaling_d), per-worker cost against the first n',
)
flags.DEFINE_integer(
  'scaling_f',
  None,
  '--scaling: Byzantine workers in every cell (the trimmed mean above 128 workers takes insertion '
  'chains for f <= robustjax._sorting.EXTREMES_MAX_RANK); default n/8',
)
flags.DEFINE_list('scaling_rules', ['median', 'trimmed_mean', 'meamed'], 'rules of --scaling')
flags.DEFINE_integer('scaling_d', 4810, 'coordinates per worker in --scaling')
flags.DEFINE_list(
  'scaling_calls',
  ['jit'],
  "--scaling: how each rule is called: 'jit' (inside the benchmark's own jax.jit, as in a training "
  "step) and/or 'standalone' (the rule called directly: on CPU its own compilation, the legacy "
  'emitter and networks up to robustjax._sorting.WIDE_NETWORK_MAX_N workers)',
)
flags.DEFINE_integer(
  'scaling_rounds', 3, "--scaling: rounds over all the cells, each cell's best round kept"
)
flags.DEFINE_integer(
  'cpu_devices',
  1,
  'CPU only: split the coordinates over this many CPU devices (jax_num_cpu_devices) and run each '
  'aggregator through parallel.sharded_update, as the engine does on a multi-device mesh',
)
flags.DEFINE_string('json_out', None, 'write the rows as JSON here')
flags.DEFINE_integer(
  'calls_per_time',
  1,
  'calls dispatched back to back per timed run (the time is per call): on an accelerator, '
  'several take the host dispatch out of sub-millisecond times',
  lower_bound=1,
)
flags.DEFINE_integer(
  'heap_top_mib',
  2047,
  'with --retain_host_memory, the free memory at the top of the heap kept in the process '
  "(glibc's trim threshold; the engine keeps 256 MiB): ByzFL's stack-sized temporaries are "
  'otherwise handed back and faulted in again at the next call',
  lower_bound=1,
  upper_bound=2047,
)
flags.DEFINE_bool(
  'retain_host_memory',
  True,
  'keep the host memory a call frees for the next (robustjax.host, as training.build does on '
  'CPU); ByzFL, in this process, gets it too',
)
flags.DEFINE_bool('byzfl', False, 'compare with ByzFL 0.0.11 (needs torch and byzfl installed)')
flags.DEFINE_integer('byzfl_repeats', 5, 'timed calls per ByzFL rule (median, fastest, slowest)')
flags.DEFINE_integer('byzfl_small_d', 100_000, 'd for ByzFL rules too slow / too big at full size')
flags.DEFINE_integer('byzfl_small_n', 16, 'n for ByzFL rules that enumerate subsets (mda, smea)')
flags.DEFINE_integer('byzfl_small_f', 3, 'f for ByzFL rules that enumerate subsets (mda, smea)')

# Rules whose cost is dominated by the n × n Gram product: also reported against it.
DISTANCE_RULES = {'krum', 'multikrum', 'bulyan', 'mda', 'smea', 'monna', 'nnm', 'arc'}
ITERATIVE = {'geometric_median': 'iters', 'centered_clipping': 'iters'}


def _params(name: str, n: int, f: int, iters: int) -> dict:
  """Sensible parameters for each rule at (n, f)."""
  if name == 'multikrum':
    return {'m': n - f}
  if name == 'geometric_median':
    return {'iters': iters, 'tol': 0.0}  # fixed iteration count: no early stop
  if name == 'centered_clipping':
    return {'iters': iters, 'tau': 10.0}
  if name == 'clipping':
    return {'c': 1.0}
  if name == 'bucketing':
    return {'s': 2}
  return {}


def _time(fn, *args, repeats: int, warmup: int) -> tuple[float, float]:
  """(compile seconds, median run seconds) of a jitted fn.

  Each timed run dispatches `--calls_per_time` calls back to back and waits for them all: one
  call's time is the total over the count. With one call the time includes the host's dispatch
  and wait (about 0.1 ms on a GPU); with several, an accelerator runs them back to back.
  """
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  return compile_s, _run_time(compiled, *args, repeats=repeats, warmup=warmup)


def _run_time(compiled, *args, repeats: int, warmup: int) -> float:
  """Median run seconds of a compiled fn (see `_time`)."""
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  calls = FLAGS.calls_per_time
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready([compiled(*args) for _ in range(calls)])
    times.append((time.perf_counter() - t0) / calls)
  return statistics.median(times)


def _sharded() -> bool:
  return FLAGS.cpu_devices > 1


def _place(x):
  """The stack as the timed functions take it: coordinates split over the devices if sharded."""
  if not _sharded() or x.shape[1] % FLAGS.cpu_devices:
    return x  # sharded_update pads and reshards it inside the timed call
  sharding = jax.sharding.NamedSharding(
    parallel.make_mesh(), jax.sharding.PartitionSpec(None, 'workers')
  )
  return jax.device_put(x, sharding)


def _make_fn(kind: str, name: str, f: int, params: dict):
  """A jitted function of (stack, key) calling the rule."""
  if _sharded():
    if kind == 'preaggregator':
      raise ValueError('--cpu_devices times aggregators and pipelines (stack -> vector) only')
    if kind == 'pipeline':
      rule = pipeline.as_rule(name, f)
    else:
      rule = pipeline.compose(name, f=f, **params)
    update = parallel.sharded_update(rule, parallel.make_mesh())

    def run(x, key):
      state = rule.init(jnp.zeros(x.shape[1:], x.dtype))
      return update(x, state, key if rule.stochastic else None)[0]

    return _jit(run)
  if kind == 'pipeline':
    rule = pipeline.as_rule(name, f)
    return _jit(lambda x, key: rule(x, key=key if rule.stochastic else None))
  if kind == 'aggregator':
    rule = aggregators.get(name)
  else:
    rule = preaggregators.get(name)
  if kind == 'preaggregator' and name == 'bucketing':
    return _jit(lambda x, key: rule(x, f=f, key=key, **params))
  return _jit(lambda x, key: rule(x, f=f, **params))


def _jit(fn):
  """jax.jit with the benchmark's compiler options (the same for every rule and reference)."""
  if FLAGS.xla_cpu_vector_width and jax.default_backend() == 'cpu':
    opts = {'xla_cpu_prefer_vector_width': str(FLAGS.xla_cpu_vector_width)}
    return jax.jit(fn, compiler_options=opts)
  return jax.jit(fn)


def _all_rules():
  rules = [('aggregator', r) for r in aggregators.names()]
  if preaggregators is not None and FLAGS.preaggregators:
    rules += [('preaggregator', r) for r in preaggregators.names()]
  return rules


def _requested_rules():
  if not FLAGS.rules:
    return _all_rules()
  out = []
  pre_names = preaggregators.names() if preaggregators is not None else []
  for r in FLAGS.rules:
    if r in aggregators.names():
      out.append(('aggregator', r))
    elif r in pre_names:
      out.append(('preaggregator', r))
    elif '+' in r:
      out.append(('pipeline', r))
    else:
      out.append(('missing', r))
  return out


def _stack(n, d, seed, dtype):
  x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
  return x, jnp.asarray(x, dtype=dtype)


def time_robustjax(kind, name, x, f, *, repeats, warmup, iters, compile_only=False):
  """Dict with compile_s and time_s (and per_iter_s for iterative rules)."""
  n = x.shape[0]
  x = _place(x)  # the references (floor, x @ x.T) stay on one device
  key = jax.random.key(0)
  params = _params(name, n, f, iters)
  fn = _make_fn(kind, name, f, params)
  reps = 0 if compile_only else repeats
  compile_s, t = _time(fn, x, key, repeats=max(reps, 1), warmup=0 if compile_only else warmup)
  if compile_only:
    return {'compile_s': compile_s}
  row = {'compile_s': compile_s, 'time_s': t}
  if name in ITERATIVE and not compile_only and iters > 1:
    fn1 = _make_fn(kind, name, f, {**params, ITERATIVE[name]: 1})
    _, t1 = _time(fn1, x, key, repeats=repeats, warmup=warmup)
    row['time_1iter_s'] = t1
    row['per_iter_s'] = max(t - t1, 0.0) / (iters - 1)
  return row


# --- Buffer donation of stack -> stack pre-aggregators -------------------------------------------


def donation_section(x, f: int, repeats: int) -> list[dict]:
  """Standalone pre-aggregators that accept ``donate=``: a fresh output stack against writing
  into the input's buffers. Each donated call gets its own copy of the stack (made outside the
  timer), since donation consumes it."""
  rows = []
  n = x.shape[0]
  print('# donation (standalone, outside jit)      fresh ms  donated ms')
  for name in preaggregators.names():
    rule = preaggregators.get(name)
    if 'donate' not in inspect.signature(rule).parameters:
      continue
    params = _params(name, n, f, FLAGS.iters)
    jax.block_until_ready(rule(x, f=f, **params))  # compile both variants
    jax.block_until_ready(rule(jnp.array(x, copy=True), f=f, donate=True, **params))
    fresh, donated = [], []
    for _ in range(max(repeats, 3)):
      t0 = time.perf_counter()
      jax.block_until_ready(rule(x, f=f, **params))
      fresh.append(time.perf_counter() - t0)
      y = jax.block_until_ready(jnp.array(x, copy=True))
      t0 = time.perf_counter()
      jax.block_until_ready(rule(y, f=f, donate=True, **params))
      donated.append(time.perf_counter() - t0)
    row = {
      'rule': name,
      'fresh_s': statistics.median(fresh),
      'donated_s': statistics.median(donated),
    }
    print(f'# {name:38s} {row["fresh_s"] * 1e3:9.1f} {row["donated_s"] * 1e3:11.1f}')
    rows.append(row)
  return rows


def _standalone(x, key, *, rule, f, params):
  """The rule called directly, outside any jit of the benchmark's (key unused)."""
  return rule(x, f=f, **params)


def scaling_section(
  ns, rules, d: int, repeats: int, rounds: int, calls=('jit',), f: int | None = None
) -> list[dict]:
  """Each rule at each n (f given, or n/8 when None; d fixed): ms, ns per worker-coordinate, and
  that per-worker cost over the first n's (the coordinate-wise rules leave their unrolled network
  above `robustjax._sorting.NETWORK_MAX_N`), for each way of calling it (`calls`: inside a jax.jit
  of the benchmark's, or standalone).

  Every cell is compiled first, then timed in `rounds` rounds over all the cells (each round
  times each cell `repeats` times, its median); a cell's time is its best round. On a shared
  machine a slow period then costs a round, not the cells it happens to fall on (the ratio to the
  first n compares cells timed minutes apart otherwise)."""
  cells = []
  for n in ns:
    _, x = _stack(n, d, FLAGS.seed, jnp.float32)
    for name in rules:
      f_n = n // 8 if f is None else f
      params = _params(name, n, f_n, FLAGS.iters)
      for call in calls:
        t0 = time.perf_counter()
        if call == 'jit':
          fn = _make_fn('aggregator', name, f_n, params).lower(x, jax.random.key(0)).compile()
        elif call == 'standalone':
          rule = aggregators.get(name)
          fn = functools.partial(_standalone, rule=rule, f=f_n, params=params)
          jax.block_until_ready(fn(x, jax.random.key(0)))  # compiles
        else:
          raise ValueError(f"--scaling_calls: {call!r} is not 'jit' or 'standalone'")
        cells.append(
          dict(rule=name, call=call, n=n, f=f_n, x=x, fn=fn, compile_s=time.perf_counter() - t0)
        )
  for k in range(rounds):
    if rounds > 1:
      print(f'# scaling: round {k + 1} of {rounds}', flush=True)
    for cell in cells:
      t = _run_time(cell['fn'], cell['x'], jax.random.key(0), repeats=repeats, warmup=1)
      cell['time_s'] = min(t, cell.get('time_s', math.inf))
  print(
    f'# {"rule":<14} {"call":<10} {"n":>5} {"d":>7} {"f":>4} {"compile s":>9} {"ms":>9} '
    f'{"ns/(worker·coord)":>18} {"× first n":>9}'
  )
  rows, base = [], {}
  for cell in cells:
    name, call, n, f, t = cell['rule'], cell['call'], cell['n'], cell['f'], cell['time_s']
    per = t / (n * d) * 1e9
    base.setdefault((name, call), per)
    row = dict(
      rule=name,
      call=call,
      n=n,
      d=d,
      f=f,
      compile_s=cell['compile_s'],
      time_s=t,
      ns_per_entry=per,
      over_first=per / base[name, call],
      rounds=rounds,
    )
    rows.append(row)
    print(
      f'# {name:<14} {call:<10} {n:>5} {d:>7} {f:>4} {cell["compile_s"]:>9.1f} {t * 1e3:>9.2f} '
      f'{per:>18.2f} '
      f'{row["over_first"]:>9.2f}',
      flush=True,
    )
  return rows


def cc_switch_section(ns, iters_list, elements: int, repeats: int) -> list[dict]:
  """centered_clipping's two paths ('direct': about two matvecs per iteration; 'gram': one centred
  Gram, then O(n²) per iteration) at each (n, L), with the one `method='auto'` picks."""
  from robustjax.aggregators._iterative import cc_auto_method

  rule = aggregators.get('centered_clipping')
  rows = []
  print(
    '# centered_clipping paths        n         d   L  direct ms    gram ms  faster  auto  '
    'auto / best'
  )
  for n in ns:
    d = elements // n
    _, x = _stack(n, d, FLAGS.seed, jnp.float32)
    for iters in iters_list:
      t = {}
      for method in ('direct', 'gram'):
        fn = _jit(lambda x, m=method, i=iters: rule(x, f=0, tau=10.0, iters=i, method=m))
        _, t[method] = _time(fn, x, repeats=repeats, warmup=1)
      auto = cc_auto_method(iters, n)
      best = min(t, key=t.get)
      row = dict(n=n, d=d, iters=iters, direct_s=t['direct'], gram_s=t['gram'])
      row.update(auto=auto, faster=best, auto_over_best=t[auto] / t[best])
      rows.append(row)
      print(
        f'# {"":<28} {n:>4} {d:>9} {iters:>3} {t["direct"] * 1e3:>10.1f} {t["gram"] * 1e3:>10.1f}'
        f'  {best:>6}  {auto:>6}  {row["auto_over_best"]:>6.2f}',
        flush=True,
      )
  return rows


# --- The Gram product against the machine's peak ----------------------------------------------


def gram_section(x, x_np, m: int, repeats: int) -> dict:
  """Prints and returns GFLOP/s of the Gram products against the measured matmul peak.

  The peak is the best of a jitted square float32 matmul (m × m @ m × m, 2m³ flops) and NumPy's
  (its BLAS) on the same sizes: a dense-matmul microbenchmark, not a datasheet figure. With
  `--fma_peak` (the default) the cores' FMA peak is measured too where it can be
  (`_process.fma_peak_gflops`: `experiments/fma_peak.c` built with gcc for the widest vectors,
  16-lane AVX-512 or 8-lane AVX2 FMAs), and each product is also given as a fraction of it: what
  the FMA units allow, which a library's matmul reaches only in part. A Gram product
  of the (n, d) stack is counted as 2n²d flops (what a dense matmul does; the symmetric
  half alone is n(n + 1)d): robustjax's centred, scaled Gram (`stack.scaled_gram`, what the
  distance rules call), its centred product alone (`stack.centred_gram` with the centre given: no
  scale pass), the plain jitted `x @ x.T`, and NumPy's `x @ x.T` on the same input.

  The jitted products run at `Precision.HIGHEST`, full float32, as the rules' Gram does (on a
  CPU every precision is that). At the default precision a GPU multiplies float32 in TF32 (a
  10-bit mantissa): that product is printed beside them, for scale, not as the reference.
  """
  n, d = x.shape
  flops = 2 * n * n * d

  def scaled(x):
    return stack.scaled_gram(x)[0]

  def product(x):
    return stack.centred_gram(x, center=x[0])[0]

  ours_label = 'robustjax scaled_gram (centred)'
  product_label = 'robustjax centred product only'
  if _sharded():

    def on_devices(fn):
      def local(xl):
        with stack.sharded_coordinates('workers'):
          return fn(xl)

      spec = jax.sharding.PartitionSpec
      mesh = parallel.make_mesh()
      return jax.shard_map(local, mesh=mesh, in_specs=spec(None, 'workers'), out_specs=spec())

    scaled, product = on_devices(scaled), on_devices(product)
    ours_label = f'robustjax scaled_gram, {FLAGS.cpu_devices} devices'
    product_label = f'robustjax centred product, {FLAGS.cpu_devices} devices'
  pad = (-d) % FLAGS.cpu_devices  # zero columns: the centred Gram is unchanged
  x_ours = _place(jnp.pad(x, ((0, 0), (0, pad))) if pad else x)
  _, t_ours = _time(_jit(scaled), x_ours, repeats=max(repeats, 3), warmup=1)
  _, t_product = _time(_jit(product), x_ours, repeats=max(repeats, 3), warmup=1)
  # NumPy last: OpenBLAS's threads keep spinning after a product and took a core from the next
  # jitted timing (robustjax's Gram ran at 114-126 ms instead of 72-78 in some processes).
  a = jax.random.normal(jax.random.key(1), (m, m), jnp.float32)
  a_np = np.asarray(a)
  mm = _jit(lambda a: jnp.matmul(a, a, precision=HIGHEST))
  _, t_mm = _time(mm, a, repeats=max(repeats, 3), warmup=1)
  gram = _jit(lambda x: jnp.matmul(x, x.T, precision=HIGHEST))
  _, t_xla = _time(gram, x, repeats=max(repeats, 3), warmup=1)
  _, t_default = _time(_jit(lambda x: x @ x.T), x, repeats=max(repeats, 3), warmup=1)
  t_np = min(_wall(lambda: x_np @ x_np.T) for _ in range(max(repeats, 3)))
  t_np_mm = min(_wall(lambda: a_np @ a_np) for _ in range(max(repeats, 3)))
  time.sleep(1.0)  # the OpenBLAS threads stop spinning before the rules are timed
  peak = 2 * m**3 / min(t_mm, t_np_mm) / 1e9
  out = {
    'peak_gflops': peak,
    'matmul_jax_gflops': 2 * m**3 / t_mm / 1e9,
    'matmul_numpy_gflops': 2 * m**3 / t_np_mm / 1e9,
    'peak_m': m,
  }
  print(
    f'# peak (square float32 matmul m={m}): jax {out["matmul_jax_gflops"]:.0f} GFLOP/s, '
    f'NumPy {out["matmul_numpy_gflops"]:.0f} GFLOP/s -> peak {peak:.0f} GFLOP/s'
  )
  fma = fma_peak_gflops() if FLAGS.fma_peak and jax.default_backend() == 'cpu' else None
  if fma:
    out['fma_peak_gflops'] = fma
    out['fma_lanes'] = lanes = fma_lanes()
    print(
      f'# FMA peak (experiments/fma_peak.c, {lanes}-lane {"AVX-512" if lanes == 16 else "AVX2"} '
      f'FMAs): {fma:.0f} GFLOP/s; '
      f'the matmul peak is {peak / fma:.0%} of it'
    )
  label = f'Gram (n, d) = ({n}, {d})'
  of_fma = f' {"of FMA":>8}' if fma else ''
  print(f'# {label:<34} {"ms":>8} {"GFLOP/s":>8} {"of peak":>8}{of_fma}')
  for name, t in (
    (ours_label, t_ours),
    (product_label, t_product),
    ('jax x @ x.T', t_xla),
    ('jax x @ x.T, default precision', t_default),
    ('NumPy x @ x.T', t_np),
  ):
    g = flops / t / 1e9
    out[name] = {'ms': t * 1e3, 'gflops': g, 'of_peak': g / peak}
    if fma:
      out[name]['of_fma_peak'] = g / fma
    of_fma = f' {g / fma:>8.0%}' if fma else ''
    print(f'# {name:<34} {t * 1e3:>8.1f} {g:>8.0f} {g / peak:>8.0%}{of_fma}')
  return out


def _wall(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


# --- ByzFL (optional) -----------------------------------------------------------------------------


def _byzfl_rule(bz, name, n, f):
  """(callable on a torch (n, d) tensor) for our rule or pipeline spec `name`, or None if ByzFL
  lacks a stage. A pipeline ('nnm+krum') is ByzFL's pre-aggregators applied in order, then its
  aggregator; a stage's parameters ('clipping(c=2.0)') are passed where ByzFL has the same one."""

  def make(stage):
    cls, takes_f = STAGES[stage]
    return lambda **kw: getattr(bz, cls)(**({'f': f} if takes_f else {}), **kw)

  # `DEFAULTS_DIFFER`: the parameters of the comparison set here.
  fixed = {
    'geometric_median': lambda: bz.GeometricMedian(nu=0.1, T=FLAGS.iters),
    'centered_clipping': lambda: bz.CenteredClipping(L=FLAGS.iters, tau=10.0),
    'bucketing': lambda s=2: bz.Bucketing(s=s),
    'clipping': lambda c=1.0: bz.Clipping(c=c),
  }
  assert set(fixed) == set(DEFAULTS_DIFFER)
  table = {stage: fixed.get(stage) or make(stage) for stage in STAGES}
  pre, agg, agg_params = parse_rule(name)
  stages = [*((p, {}) if isinstance(p, str) else p for p in pre), (agg, agg_params)]
  for stage, params in stages:  # a stage or parameter ByzFL lacks: no like-for-like rule
    if stage not in table:
      return None
    if not all(pipeline.accepts(table[stage], k, var_keyword=False) for k in params):
      return None

  def run(v):
    # Fresh objects per call: CenteredClipping keeps its centre as state.
    for stage, params in stages:
      v = table[stage](**params)(v)
    return v

  return run


def _byzfl_config(name, n, d, f):
  """Where ByzFL cannot run at the full size, the (n, d, f) it is compared at, and why."""
  if name in ('mda', 'smea') and math.comb(n, f) > 5000:
    return (FLAGS.byzfl_small_n, min(d, FLAGS.byzfl_small_d), FLAGS.byzfl_small_f), (
      f'ByzFL enumerates all C(n, f) = {math.comb(n, f):.2g} subsets'
    )
  if 'nnm' in name.split('+') and n * (n - f) * d * 4 > 2e9:
    return (n, min(d, FLAGS.byzfl_small_d), f), 'ByzFL builds an n × (n − f) × d tensor'
  return None, ''


def time_byzfl(fn, xt, repeats, warmup=1) -> tuple[float, float, float]:
  """(median, fastest, slowest) seconds of `repeats` calls of a ByzFL rule on a copy of xt, after
  `warmup` untimed calls (as ours: a first call maps and faults in its temporaries)."""
  import torch

  times = []
  for i in range(warmup + repeats):
    v = xt.clone()  # some ByzFL pre-aggregators write into their input
    t0 = time.perf_counter()
    out = fn(v)
    if isinstance(out, torch.Tensor):
      out.sum().item()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return statistics.median(times), min(times), max(times)


def _byzfl_columns(row, times, ours_s):
  """The ByzFL columns of a row: its median, fastest and slowest call, and our median's speed-up
  over its median and over its fastest call."""
  median, fastest, slowest = times
  row.update(byzfl_s=median, byzfl_fastest_s=fastest, byzfl_slowest_s=slowest)
  row['speedup_vs_byzfl'] = median / ours_s
  row['speedup_vs_byzfl_fastest'] = fastest / ours_s


# --- main -----------------------------------------------------------------------------------------


def _fmt(v, spec):
  return '-' if v is None else format(v, spec)


def main(argv):
  del argv
  n, d, f = FLAGS.n, FLAGS.d, FLAGS.f
  if _sharded():
    # Before the first array is made: the CPU client starts with this many devices.
    jax.config.update('jax_num_cpu_devices', FLAGS.cpu_devices)
    if jax.default_backend() != 'cpu':
      raise app.UsageError('--cpu_devices splits the coordinates over CPU devices: CPU only')
  dtype = jnp.dtype(FLAGS.dtype)
  x_np, x = _stack(n, d, FLAGS.seed, dtype)
  info = {
    'jax': jax.__version__,
    'backend': jax.default_backend(),
    'device': str(jax.devices()[0].device_kind),
    'cpu': cpu_name(),
    'n': n,
    'd': d,
    'f': f,
    'dtype': FLAGS.dtype,
    'cpu_devices': FLAGS.cpu_devices,
  }
  info['xla_cpu_vector_width'] = FLAGS.xla_cpu_vector_width
  info['calls_per_time'] = FLAGS.calls_per_time
  info['retain_host_memory'] = FLAGS.retain_host_memory and host.retain_freed_memory(
    FLAGS.heap_top_mib << 20
  )
  info['heap_top_mib'] = FLAGS.heap_top_mib if info['retain_host_memory'] else None
  if FLAGS.cc_switch:
    print(f'# jax {info["jax"]} on {info["backend"]} ({info["device"]}; {info["cpu"]}), float32')
    ns = [int(v) for v in FLAGS.cc_switch]
    iters_list = [int(v) for v in FLAGS.cc_switch_iters]
    rows = cc_switch_section(ns, iters_list, FLAGS.cc_switch_elements, FLAGS.repeats)
    if FLAGS.json_out:
      with open(FLAGS.json_out, 'w') as fh:
        json.dump({'info': info, 'cc_switch': rows}, fh, indent=1)
    return

  if FLAGS.scaling:
    print(f'# jax {info["jax"]} on {info["backend"]} ({info["device"]}; {info["cpu"]}), float32')
    ns = [int(v) for v in FLAGS.scaling]
    rows = scaling_section(
      ns,
      FLAGS.scaling_rules,
      FLAGS.scaling_d,
      FLAGS.repeats,
      FLAGS.scaling_rounds,
      FLAGS.scaling_calls,
      FLAGS.scaling_f,
    )
    if FLAGS.json_out:
      with open(FLAGS.json_out, 'w') as fh:
        json.dump({'info': info, 'scaling': rows}, fh, indent=1)
    return

  print(
    f'# jax {info["jax"]} on {info["backend"]} ({info["device"]}; {info["cpu"]}), '
    f'stack ({n}, {d}) {dtype}; '
    f'freed host memory kept: {info["retain_host_memory"]}'
    + (f' (heap top {info["heap_top_mib"]} MiB)' if info['heap_top_mib'] else '')
  )
  floor_fn = _jit(lambda x: jnp.ones((x.shape[0],), x.dtype) @ x)
  gram_fn = _jit(lambda x: jnp.matmul(x, x.T, precision=HIGHEST))
  _, floor = _time(floor_fn, x, repeats=max(FLAGS.repeats, 3), warmup=1)
  _, gram = _time(gram_fn, x, repeats=max(FLAGS.repeats, 3), warmup=1)
  gbps = x.size * x.dtype.itemsize / floor / 1e9  # the floor's bandwidth: one read of the stack
  print(
    f'# floor (ones(n) @ x): {floor * 1e3:.2f} ms ({gbps:.0f} GB/s); '
    f'Gram (x @ x.T, float32): {gram * 1e3:.2f} ms'
  )
  info.update(floor_s=floor, floor_gbps=gbps, gram_s=gram)
  if FLAGS.peak_size and not FLAGS.compile_only:
    info['gram'] = gram_section(x, x_np, FLAGS.peak_size, FLAGS.repeats)
  if FLAGS.donation and preaggregators is not None and not FLAGS.compile_only and not _sharded():
    info['donation'] = donation_section(x, f, FLAGS.repeats)

  bz = xt = None
  if FLAGS.byzfl:
    try:
      import torch

      bz = import_byzfl('aggregators')
    except ImportError as e:
      raise app.UsageError(
        f'--byzfl needs torch (CPU) and byzfl: `pip install torch` then '
        f'`pip install --no-deps byzfl==0.0.11` ({e})'
      ) from e
    xt = torch.from_numpy(x_np.copy())
    info['torch'] = torch.__version__
    info['torch_threads'] = torch.get_num_threads()

  rows = []
  for kind, name in _requested_rules():
    row = {'rule': name, 'kind': kind, 'n': n, 'd': d, 'f': f}
    if kind == 'missing':
      row['note'] = 'not registered'
      rows.append(row)
      _print_row(row, header=len(rows) == 1)
      continue
    try:
      row.update(
        time_robustjax(
          kind,
          name,
          x,
          f,
          repeats=FLAGS.repeats,
          warmup=FLAGS.warmup,
          iters=FLAGS.iters,
          compile_only=FLAGS.compile_only,
        )
      )
    except Exception as e:  # noqa: BLE001  (report and go on)
      row['note'] = f'error: {type(e).__name__}: {str(e)[:80]}'
      rows.append(row)
      _print_row(row, header=len(rows) == 1)
      continue
    if not FLAGS.compile_only:
      # The references are re-timed next to each rule: on a shared machine the load drifts.
      _, row['floor_s'] = _time(floor_fn, x, repeats=max(FLAGS.repeats, 3), warmup=0)
      t = row.get('per_iter_s', row['time_s'])
      row['vs_floor'] = t / row['floor_s']
      if name in DISTANCE_RULES:
        _, row['gram_s'] = _time(gram_fn, x, repeats=max(FLAGS.repeats, 3), warmup=0)
        row['vs_gram'] = row['time_s'] / row['gram_s']
    if bz is not None and not FLAGS.compile_only:
      fn = _byzfl_rule(bz, name, n, f)
      if fn is None:
        row['note'] = 'not in ByzFL'
      else:
        small, why = _byzfl_config(name, n, d, f)
        try:
          if small is None:
            _byzfl_columns(row, time_byzfl(fn, xt, FLAGS.byzfl_repeats), row['time_s'])
          else:
            sn, sd, sf = small
            sx_np, sx = _stack(sn, sd, FLAGS.seed, dtype)
            fn_small = _byzfl_rule(bz, name, sn, sf)
            import torch

            tb = time_byzfl(fn_small, torch.from_numpy(sx_np), 1)
            ours = time_robustjax(
              kind, name, sx, sf, repeats=FLAGS.repeats, warmup=FLAGS.warmup, iters=FLAGS.iters
            )
            _byzfl_columns(row, tb, ours['time_s'])
            row['note'] = f'ByzFL compared at n={sn}, d={sd}, f={sf}: {why}'
        except Exception as e:  # noqa: BLE001
          row['note'] = f'ByzFL error: {type(e).__name__}: {str(e)[:60]}'
    rows.append(row)
    _print_row(row, header=len(rows) == 1)
  if FLAGS.json_out:
    with open(FLAGS.json_out, 'w') as fh:
      json.dump({'info': info, 'rows': rows}, fh, indent=1)
    print(f'# wrote {FLAGS.json_out}')


_HEADER = (
  f'{"rule":<22} {"n":>4} {"d":>9} {"f":>3} {"compile s":>9} {"time ms":>10} '
  f'{"×floor":>8} {"×gram":>7} {"ByzFL ms":>10} {"its range":>11} {"speed-up":>9} '
  f'{"vs fastest":>10}  note'
)


def _line(r):
  t = r.get('time_s')
  per = r.get('per_iter_s')
  time_txt = _fmt(t and t * 1e3, '.1f')
  if per is not None:
    time_txt = f'{per * 1e3:.1f}/it'
  return (
    f'{r["rule"]:<22} {r["n"]:>4} {r["d"]:>9} {r["f"]:>3} {_fmt(r.get("compile_s"), ".2f"):>9} '
    f'{time_txt:>10} {_fmt(r.get("vs_floor"), ".2f"):>8} {_fmt(r.get("vs_gram"), ".2f"):>7} '
    f'{_fmt(r.get("byzfl_s") and r["byzfl_s"] * 1e3, ".0f"):>10} {_byzfl_range(r):>11} '
    f'{_fmt(r.get("speedup_vs_byzfl"), ".0f"):>9} '
    f'{_fmt(r.get("speedup_vs_byzfl_fastest"), ".0f"):>10}  {r.get("note", "")}'
  )


def _byzfl_range(r) -> str:
  """ByzFL's fastest–slowest call in ms, or '-'."""
  if r.get('byzfl_fastest_s') is None:
    return '-'
  return f'{r["byzfl_fastest_s"] * 1e3:.0f}-{r["byzfl_slowest_s"] * 1e3:.0f}'


def _print_row(r, header=False):
  if header:
    print(_HEADER)
  print(_line(r), flush=True)


if __name__ == '__main__':
  app.run(main)
