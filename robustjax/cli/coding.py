r"""The LAD / Com-LAD study: robust gradient coding in the paper's regime and beyond it.

Li, Allouah, Guerraoui, Skoglund, Xiao (arXiv:2603.28780) report that with redundancy d ≥ 20 LAD
approaches DRACO at about half of DRACO's computation. This driver measures that claim, as
reconstructed (docs/gradient_coding.md says what is reconstructed): full-batch gradient descent on
`robustjax.data.synthetic_linear_regression` in an interpolating and a non-interpolating regime,
n workers of which f are Byzantine, methods

- **VA / CWTM / CWTM+NNM**: the rule on the workers' own subset gradients (fixed assignment, d = 1);
- **LAD-<rule>**: the rule on cyclic coded vectors (coefficients 1/d, π re-drawn every step);
- **DRACO** at load 2f + 1: its decoder recovers the full gradient exactly whenever at most f
  workers are Byzantine (Chen et al. 2018), so its trajectory is exact gradient descent, simulated
  as such (the registered repetition-code vote, `rule='draco'`, is checked to give the same
  trajectory where its groups fit);
- **compressed**: the same with RandK / QSGD on every message (Com-VA, Com-CWTM, Com-CWTM+NNM,
  Com-LAD).

Every run is the library's one training step (`robustjax.training.make_step`, coding a stage of
it) in its run loop (`make_advance`: one `lax.scan` over the steps, the seeds vmapped), evaluated
every step: the excess loss F(w_t) − F⋆, ‖∇F(w_t)‖² and ‖w_t − w⋆‖²/‖w⋆‖². Scenarios vary one
factor at a time from the config's baseline (groups ``core``, ``attacks``, ``placements``,
``compression``); ``real`` repeats the comparison on the embedded digits data through
`robustjax.sweeps`. Computation is counted in subset gradients per worker (the load d, 2f + 1 for
DRACO), communication in bits.

Usage:
  robustjax coding --config=lad --workdir=/tmp/lad                     # everything (resumable)
  robustjax coding --config=lad --workdir=/tmp/lad --config.groups=core,real
  robustjax coding --config=lad --workdir=/tmp/lad --docs   # also docs/figures + the doc's tables
  robustjax coding --config=lad:smoke --workdir=/tmp/s

Writes ``scenarios/<name>.npz`` (one per scenario; a rerun skips those present), ``real/`` (the
sweep), ``summary.json`` and the figures (``<workdir>/figures``, or docs/figures with ``--docs``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from robustjax import attacks, coding, compression, configs, data, pipeline, training
from robustjax._spec import slug

FLAGS = flags.FLAGS

LABELS = {'mean': 'VA', 'trimmed_mean': 'CWTM', 'nnm+trimmed_mean': 'CWTM+NNM'}
COLORS = {'mean': 'tab:gray', 'trimmed_mean': 'tab:blue', 'nnm+trimmed_mean': 'tab:green'}
DRACO = 'DRACO'
METRICS = ('excess_loss', 'grad_sq_norm', 'rel_dist')


def define_flags():
  """Defines the command's absl flags (the `robustjax` command calls it)."""
  config_flags.DEFINE_config_file('config', configs.path('lad'), 'Study config.')
  flags.DEFINE_string('workdir', None, 'Results directory (scenarios are resumed from it).')
  flags.DEFINE_bool('docs', False, 'Write the figures to docs/figures and the doc tables.')
  flags.DEFINE_bool('plot_only', False, 'Redraw the figures and tables from the workdir.')
  flags.mark_flags_as_required(['workdir'])


# ------------------------------------------------------------------------------------------------
# Scenarios
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scenario:
  """One setting of the threat model and the data; every method runs in it."""

  regime: str
  heterogeneity: float
  f: int
  attack: str
  placement: str
  compressor: str = ''  # '': uncompressed

  @property
  def name(self) -> str:
    comp = f'_{slug(self.compressor)}' if self.compressor else ''
    return (
      f'{self.regime}_s{self.heterogeneity:g}_f{self.f}_{slug(self.attack)}_{self.placement}' + comp
    )


def scenarios(cfg) -> dict[str, list[Scenario]]:
  """Group -> scenarios: each group varies one factor of the baseline (the baseline itself is in
  every group, so each figure has its reference)."""
  b = cfg.baseline
  base = dict(regime=b.regime, heterogeneity=float(b.heterogeneity), attack=b.attack)
  base['placement'] = b.placement
  groups = {}
  fs = [int(f) for f in cfg.byzantine]
  if 'core' in cfg.groups:
    groups['core'] = [
      Scenario(r, float(s), f, b.attack, b.placement)
      for r in cfg.regimes
      for s in cfg.heterogeneity
      for f in fs
    ]
  if 'attacks' in cfg.groups:
    groups['attacks'] = [Scenario(**{**base, 'attack': a}, f=f) for a in cfg.attacks for f in fs]
  if 'placements' in cfg.groups:
    groups['placements'] = [
      Scenario(**{**base, 'placement': p}, f=f) for p in cfg.placements for f in fs
    ]
  if 'compression' in cfg.groups:
    groups['compression'] = [
      Scenario(**{**base, 'regime': r, 'compressor': c}, f=f)
      for c in ('', *cfg.compressors)
      for r in cfg.regimes
      for f in fs
    ]
  return groups


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


def make_problem(cfg, regime: str, sigma: float) -> dict:
  """The seeds' datasets as one vmappable batch, the step size 1/L, and heterogeneity figures."""
  r = cfg.regimes[regime]
  n = cfg.num_workers
  sets = [
    data.synthetic_linear_regression(
      num_samples=r.num_samples,
      dim=r.dim,
      num_subsets=n,
      heterogeneity=sigma,
      noise=r.noise,
      seed=cfg.seed + s,
    )
    for s in range(cfg.num_seeds)
  ]
  m = r.num_samples // n
  parts = [np.arange(j * m, (j + 1) * m) for j in range(n)]
  lips, spread0, g_star = [], [], []
  for ds in sets:
    a, b = ds.x_train.astype(np.float64), ds.y_train.astype(np.float64)
    lips.append(np.linalg.eigvalsh(a.T @ a / a.shape[0]).max())
    for w, out in ((np.zeros(r.dim), spread0), (ds.info['solution'], g_star)):
      g = (a * (a @ w - b)[:, None]).reshape(n, m, -1).mean(1)
      full = np.sum(g.mean(0) ** 2)
      spread = np.mean(np.sum((g - g.mean(0)) ** 2, 1))
      out.append(spread / full if out is spread0 else spread)
  lr = cfg.learning_rate or 1.0 / max(lips)
  built = [
    training.least_squares_problem(ds, parts, optax.sgd(lr), solution=ds.info['solution'])
    for ds in sets
  ]
  datas = [p.data for p in built]
  batch = {k: jnp.asarray(np.stack([d[k] for d in datas])) for k in datas[0]}
  axes = {k: 0 for k in batch}
  for k in ('idx', 'sizes'):  # the subsets are the same for every seed
    batch[k], axes[k] = jnp.asarray(datas[0][k]), None
  return {
    'problem': built[0],
    'batch': batch,
    'axes': axes,
    'lr': float(lr),
    'dim': int(r.dim),
    'zeta_rel_at_0': float(np.median(spread0)),  # ζ²(0) / ‖∇F(0)‖²
    'G2_at_opt': float(np.median(g_star)),  # (1/n) Σ_k ‖g_k(w⋆)‖²
    'F_star': float(np.median([ds.info['optimum'] for ds in sets])),
  }


def run_method(cfg, prob, *, f, rule, code, attack, compressor, seed_offset=0) -> dict:
  """One method in one scenario, the seeds vmapped: metrics (S, T) and the load."""
  n = cfg.num_workers
  spec = training.TrainSpec(
    num_workers=n,
    num_byzantine=f,
    batch_size=0,
    momentum=0.0,
    algorithm='dsgd',
    local_steps=1,
    local_lr=0.0,
    pipeline=pipeline.as_rule(rule, f),
    attack=attacks.get(attack if f > 0 else 'none'),
    code=coding.make(code, n=n, f=f),
    compressor=compression.make(compressor) if compressor else None,
  )
  step = training.make_step(spec, prob['problem'])
  w0 = jnp.zeros((prob['dim'],), jnp.float32)
  seeds = [cfg.seed + 7919 * seed_offset + s for s in range(cfg.num_seeds)]
  states = [training.init_state(spec, prob['problem'], w0, {}, s) for s in seeds]
  state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  advance = training.make_advance(
    step, data_axes=prob['axes'], evaluate=training.make_eval(spec, prob['problem'])
  )
  _, hist = advance(state, prob['batch'], cfg.num_steps)
  out = {k: np.asarray(hist[f'eval_{k}'], np.float64).T for k in METRICS}  # (S, T)
  out['load'] = float(np.asarray(hist['load'])[0, 0])
  out['bits'] = float(np.asarray(hist['bits'])[0, 0])
  return out


def methods(cfg, sc: Scenario) -> list[tuple[str, str, int, str]]:
  """(key, rule, d, code spec) of every method of a scenario; DRACO separately."""
  p = sc.placement
  out = []
  for rule in cfg.rules:
    out.append((f'{rule}|fixed', rule, 1, f"cyclic(d=1, redraw=False, byzantine='{p}')"))
    for d in cfg.redundancies:
      out.append((f'{rule}|lad{d}', rule, int(d), f"cyclic(d={int(d)}, byzantine='{p}')"))
  return out


def run_scenario(cfg, sc: Scenario, prob) -> dict:
  """Every method of `sc`: {key: metrics}, DRACO (exact, load 2f + 1) when uncompressed."""
  res = {}
  for key, rule, _, code in methods(cfg, sc):
    res[key] = run_method(
      cfg, prob, f=sc.f, rule=rule, code=code, attack=sc.attack, compressor=sc.compressor
    )
  if not sc.compressor:
    # DRACO's decoder is exact with at most f Byzantine workers: exact gradient descent.
    exact = run_method(
      cfg, prob, f=0, rule='mean', code='cyclic(d=1, redraw=False)', attack='none', compressor=''
    )
    exact['load'] = float(2 * sc.f + 1)
    exact['bits'] = exact['bits']  # n messages of the model's size, as the others
    res[DRACO] = exact
  return res


def draco_vote_check(cfg, prob, f: int, attack: str) -> float | None:
  """Largest relative gap between the registered repetition-code vote (groups of ⌊n/(2f+1)⌋
  workers) and exact gradient descent; None when DRACO's groups do not fit."""
  try:
    vote = run_method(cfg, prob, f=f, rule='draco', code='draco', attack=attack, compressor='')
  except ValueError:
    return None
  exact = run_method(
    cfg, prob, f=0, rule='mean', code='cyclic(d=1, redraw=False)', attack='none', compressor=''
  )
  a, b = vote['excess_loss'], exact['excess_loss']
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def _save(path, res: dict, meta: dict) -> None:
  arrays = {f'{k}::{m}': v[m].astype(np.float32) for k, v in res.items() for m in METRICS}
  meta = {**meta, 'methods': {k: {'load': v['load'], 'bits': v['bits']} for k, v in res.items()}}
  tmp = path + '.tmp.npz'
  np.savez_compressed(tmp, meta=json.dumps(meta), **arrays)
  os.replace(tmp, path)


def load_scenario(path) -> tuple[dict, dict]:
  z = np.load(path)
  meta = json.loads(str(z['meta']))
  res = {k: dict(v) for k, v in meta['methods'].items()}
  for name in z.files:
    if '::' in name:
      k, m = name.split('::')
      res[k][m] = z[name].astype(np.float64)
  return res, meta


def run_synthetic(cfg, workdir: str) -> dict:
  """Runs (or resumes) every scenario; returns {scenario name: (results, meta)}.

  The scenarios of one regime share their programs' shapes (σ_H and f change the data, not the
  program), so a persistent compilation cache in the workdir compiles each program once."""
  jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  out_dir = os.path.join(workdir, 'scenarios')
  os.makedirs(out_dir, exist_ok=True)
  problems = {}
  done = {}
  todo = {sc.name: sc for group in scenarios(cfg).values() for sc in group}
  for i, (name, sc) in enumerate(todo.items()):
    path = os.path.join(out_dir, f'{name}.npz')
    if os.path.exists(path):
      done[name] = load_scenario(path)
      continue
    key = (sc.regime, sc.heterogeneity)
    if key not in problems:
      problems[key] = make_problem(cfg, *key)
    prob = problems[key]
    t0 = time.time()
    res = run_scenario(cfg, sc, prob)
    meta = {
      'scenario': dataclasses.asdict(sc),
      'lr': prob['lr'],
      'zeta_rel_at_0': prob['zeta_rel_at_0'],
      'G2_at_opt': prob['G2_at_opt'],
      'F_star': prob['F_star'],
      'wall_s': time.time() - t0,
    }
    base = cfg.baseline
    if sc.regime == base.regime and sc.heterogeneity == base.heterogeneity and not sc.compressor:
      meta['draco_vote_gap'] = draco_vote_check(cfg, prob, sc.f, sc.attack)
    _save(path, res, meta)
    done[name] = (res, meta)
    print(f'[{i + 1}/{len(todo)}] {name}: {meta["wall_s"]:.0f} s', flush=True)
  return done


# ------------------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------------------


def _median(y, t=None):
  """Median over seeds at step t (1-based; default the last), NaN kept out unless all NaN."""
  col = y[:, -1] if t is None else y[:, t - 1]
  col = np.where(np.isfinite(col), col, np.inf)
  return float(np.median(col))


def half_draco_ratio(res, key, f: int, steps: int) -> tuple[float, int]:
  """(loss ratio, budget): LAD's excess loss after C / (2d) steps over DRACO's after C / (2f+1),
  for the largest computation budget C (subset gradients per worker) both runs reach."""
  d = res[key]['load']
  r = res[DRACO]['load']
  budget = min(steps * r, 2 * steps * d)
  t_lad = max(1, int(budget // (2 * d)))
  t_draco = max(1, int(budget // r))
  lad = _median(res[key]['excess_loss'], t_lad)
  dr = _median(res[DRACO]['excess_loss'], t_draco)
  return lad / max(dr, 1e-300), int(budget)


def summarize(cfg, results: dict) -> list[dict]:
  """One row per (scenario, method): final excess loss (median, IQR), ‖∇F‖², the half-DRACO
  ratio (uncompressed LAD) and the equal-communication / equal-computation comparison with the
  compressed baseline (compressed LAD)."""
  rows = []
  for name, (res, meta) in results.items():
    sc = meta['scenario']
    for key, v in res.items():
      y = v['excess_loss']
      q = np.nanquantile(np.where(np.isfinite(y[:, -1]), y[:, -1], np.inf), [0.25, 0.5, 0.75])
      rule, _, kind = key.partition('|')
      row = {
        'scenario': name,
        **sc,
        'method': key,
        'rule': rule if key != DRACO else DRACO,
        'd': int(kind[3:]) if kind.startswith('lad') else (1 if kind == 'fixed' else None),
        'load': v['load'],
        'bits': v['bits'],
        'final_excess_median': float(q[1]),
        'final_excess_q25': float(q[0]),
        'final_excess_q75': float(q[2]),
        'final_grad_sq_median': _median(v['grad_sq_norm']),
        'final_rel_dist_median': _median(v['rel_dist']),
      }
      if kind.startswith('lad') and DRACO in res:
        row['half_draco_ratio'], row['half_draco_budget'] = half_draco_ratio(
          res, key, sc['f'], cfg.num_steps
        )
      if kind.startswith('lad') and sc['compressor']:
        fixed = res[f'{rule}|fixed']['excess_loss']
        d = int(v['load'])
        row['vs_fixed_same_steps'] = _median(y) / max(_median(fixed), 1e-300)
        row['vs_fixed_same_compute'] = _median(y, max(1, cfg.num_steps // d)) / max(
          _median(fixed), 1e-300
        )
      rows.append(row)
  return rows


# ------------------------------------------------------------------------------------------------
# Figures and tables
# ------------------------------------------------------------------------------------------------


def _plt():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def _band(ax, x, y, label, color, ls='-', lw=1.4):
  """Median over seeds with the interquartile band; non-finite runs count as +inf."""
  y = np.where(np.isfinite(y), y, np.inf)
  med = np.median(y, axis=0)
  lo, hi = np.quantile(y, 0.25, axis=0), np.quantile(y, 0.75, axis=0)
  ok = np.isfinite(med)
  ax.plot(x[ok], med[ok], ls=ls, color=color, lw=lw, label=label)
  fill = np.isfinite(lo) & np.isfinite(hi)
  ax.fill_between(x[fill], lo[fill], hi[fill], color=color, alpha=0.15, lw=0)


_LAD_SHADES = {1: 0.35, 2: 0.5, 5: 0.65, 10: 0.75, 20: 0.88, 50: 1.0}


def _curves(ax, res, steps, *, xaxis, rules, ds, metric='excess_loss'):
  """The methods of one scenario on one axis: fixed assignment dotted, LAD-<rule> at each d in
  `ds` (darker = larger d), DRACO red."""
  from matplotlib import colors as mcolors

  for rule in rules:
    base = COLORS[rule]
    v = res[f'{rule}|fixed']
    x = steps * (v['load'] if xaxis == 'computation' else 1)
    _band(ax, x, v[metric], f'{LABELS[rule]} (d = 1, fixed)', base, ls=':')
    for d in ds:
      key = f'{rule}|lad{d}'
      if key not in res:
        continue
      v = res[key]
      shade = _LAD_SHADES.get(d, 0.8)
      color = tuple(1 - shade * (1 - c) for c in mcolors.to_rgb(base))
      x = steps * (v['load'] if xaxis == 'computation' else 1)
      _band(ax, x, v[metric], f'LAD-{LABELS[rule]}, d = {d}', color)
  if DRACO in res:
    v = res[DRACO]
    x = steps * (v['load'] if xaxis == 'computation' else 1)
    _band(ax, x, v[metric], 'DRACO (load 2f + 1, exact)', 'tab:red', lw=2)
  ax.set_yscale('log')
  if xaxis == 'computation':
    ax.set_xscale('log')
  ax.grid(alpha=0.3, which='both')


_YLABEL = {
  'excess_loss': 'F(w_t) − F⋆',
  'grad_sq_norm': '‖∇F(w_t)‖²',
  'rel_dist': '‖w_t − w⋆‖² / ‖w⋆‖²',
}
_XLABEL = {
  'iterations': 'iteration t',
  'computation': 'cumulative subset gradients per worker',
}


def _grid_figure(path, panels, steps, *, xaxis, rules, ds, title, metric='excess_loss', ncols=2):
  """A grid of scenario panels [(panel title, results)], one shared legend."""
  plt = _plt()
  nrows = -(-len(panels) // ncols)
  fig, axes = plt.subplots(
    nrows,
    ncols,
    figsize=(4.6 * ncols, 3.3 * nrows + 0.9),
    squeeze=False,
    layout='constrained',
    sharey='row',
  )
  for ax in axes.flat[len(panels) :]:
    ax.axis('off')
  for ax, (ptitle, res) in zip(axes.flat, panels):
    _curves(ax, res, steps, xaxis=xaxis, rules=rules, ds=ds, metric=metric)
    ax.set_title(ptitle, fontsize=9)
    ax.set_xlabel(_XLABEL[xaxis], fontsize=8)
    ax.tick_params(labelsize=7)
  for row in axes:
    row[0].set_ylabel(_YLABEL[metric], fontsize=8)
  for ax in axes.flat[: len(panels)]:
    # Diverging runs would stretch the axis over dozens of decades: cut 1e3 above the start.
    starts = [ln.get_ydata()[0] for ln in ax.get_lines() if len(ln.get_ydata())]
    starts = [v for v in starts if np.isfinite(v) and v > 0]
    if starts and ax.get_ylim()[1] > 1e3 * max(starts):
      ax.set_ylim(top=1e3 * max(starts))
  seeds = sorted({np.shape(res[k][metric])[0] for _, res in panels for k in res})
  title += f', median and interquartile band over {"/".join(map(str, seeds))} seeds'
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='outside lower center', ncols=4, fontsize=7)
  fig.suptitle(title, fontsize=9, wrap=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _describe(cfg, sc) -> str:
  r = cfg.regimes[sc['regime']]
  return (
    f'{sc["regime"]} ({r.num_samples} samples, d = {r.dim}, noise {r.noise:g}), '
    f'σ_H = {sc["heterogeneity"]:g}, f = {sc["f"]} of n = {cfg.num_workers}'
  )


def make_figures(cfg, results, outdir: str, real=None) -> list[str]:
  """The study's figures; returns their paths."""
  os.makedirs(outdir, exist_ok=True)
  steps = np.arange(1, cfg.num_steps + 1, dtype=np.float64)
  # Scenarios not run (a partial workdir under --plot_only) are left out of the figures.
  groups = {g: [s for s in scs if s.name in results] for g, scs in scenarios(cfg).items()}
  groups = {g: scs for g, scs in groups.items() if scs}
  b = cfg.baseline
  paths = []
  ds_shown = [d for d in (2, 5, 20, 50) if d in tuple(cfg.redundancies)]
  one_rule = ('trimmed_mean',) if 'trimmed_mean' in cfg.rules else tuple(cfg.rules[:1])

  def res_of(sc):
    return results[sc.name][0]

  def scene(sc):
    return results[sc.name][1]['scenario']

  if 'core' in groups:
    for regime in cfg.regimes:
      scs = [s for s in groups['core'] if s.regime == regime]
      panels = [(f'σ_H = {s.heterogeneity:g}, f = {s.f}', res_of(s)) for s in scs]
      for xaxis in ('computation', 'iterations'):
        paths.append(
          _grid_figure(
            os.path.join(outdir, f'lad_{regime}_{xaxis}.png'),
            panels,
            steps,
            xaxis=xaxis,
            rules=('mean', *one_rule) if 'mean' in cfg.rules else one_rule,
            ds=ds_shown,
            title=(
              f'{_describe(cfg, scene(scs[0])).split(", σ_H")[0]}, n = {cfg.num_workers}: '
              f'{b.attack} on the coded vectors, Byzantine workers {b.placement}; excess loss'
            ),
            ncols=len(cfg.byzantine),
          )
        )
      base = [s for s in scs if s.heterogeneity == float(b.heterogeneity)]
      paths.append(
        _grid_figure(
          os.path.join(outdir, f'lad_{regime}_gradnorm.png'),
          [(f'σ_H = {s.heterogeneity:g}, f = {s.f}', res_of(s)) for s in base],
          steps,
          xaxis='computation',
          rules=cfg.rules,
          ds=[d for d in (20,) if d in tuple(cfg.redundancies)],
          metric='grad_sq_norm',
          title=f'{regime} regime: squared gradient norm (every rule; LAD at d = 20)',
          ncols=len(cfg.byzantine),
        )
      )
    paths.append(_redundancy_figure(cfg, results, groups['core'], outdir))
  for group, what in (('attacks', 'attack'), ('placements', 'placement')):
    if group in groups:
      scs = groups[group]
      panels = [(f'{getattr(s, what)}, f = {s.f}', res_of(s)) for s in scs]
      # The panels vary f: the title names the rest of the setting.
      setting = f'{_describe(cfg, scene(scs[0])).split(", f = ")[0]}, n = {cfg.num_workers}'
      paths.append(
        _grid_figure(
          os.path.join(outdir, f'lad_{group}.png'),
          panels,
          steps,
          xaxis='computation',
          rules=one_rule,
          ds=ds_shown,
          title=(
            f'{setting} — by {what} '
            '(contiguous = the last f workers; random = a fixed random set; redrawn = every step)'
            if what == 'placement'
            else f'{setting} — by attack'
          ),
          ncols=len(cfg.byzantine),
        )
      )
  if 'compression' in groups:
    scs = [s for s in groups['compression'] if s.compressor]
    panels = [(f'{s.compressor}, {s.regime}, f = {s.f}', res_of(s)) for s in scs]
    for xaxis in ('computation', 'iterations'):
      paths.append(
        _grid_figure(
          os.path.join(outdir, f'lad_compression_{xaxis}.png'),
          panels,
          steps,
          xaxis=xaxis,
          rules=cfg.rules,
          ds=[d for d in (5, 20) if d in tuple(cfg.redundancies)],
          title=(
            f'Compressed messages (Com-VA / Com-CWTM / Com-CWTM+NNM at d = 1, Com-LAD), '
            f'σ_H = {float(b.heterogeneity):g}, {b.attack}; iterations = communication rounds'
          ),
          ncols=len(cfg.byzantine) * len(cfg.regimes),
        )
      )
  if real is not None:
    paths.append(plot_real(cfg, real, os.path.join(outdir, 'lad_real.png')))
  return paths


def _redundancy_figure(cfg, results, scs, outdir):
  """Final excess loss against d, per rule; DRACO's loss at T and at half of LAD's budget."""
  plt = _plt()
  regimes = list(cfg.regimes)
  fs = [int(f) for f in cfg.byzantine]
  fig, axes = plt.subplots(
    len(regimes),
    len(fs),
    figsize=(4.3 * len(fs), 3.2 * len(regimes) + 0.6),
    squeeze=False,
    layout='constrained',
  )
  ds = [int(d) for d in cfg.redundancies]
  for i, regime in enumerate(regimes):
    for j, f in enumerate(fs):
      ax = axes[i, j]
      for s in scs:
        if s.regime != regime or s.f != f:
          continue
        res = results[s.name][0]
        for rule in cfg.rules:
          ys = [_median(res[f'{rule}|lad{d}']['excess_loss']) for d in ds]
          ax.plot(
            ds,
            ys,
            marker='o',
            ms=3,
            color=COLORS[rule],
            alpha=0.35 + 0.3 * s.heterogeneity,
            label=f'LAD-{LABELS[rule]}, σ_H = {s.heterogeneity:g}',
          )
        ax.axhline(_median(res[DRACO]['excess_loss']), color='tab:red', lw=1, ls='--', alpha=0.6)
      ax.set_xscale('log')
      ax.set_yscale('log')
      ax.set_xticks(ds, [str(d) for d in ds])
      ax.set_xlabel('redundancy d (subset gradients per worker per step)', fontsize=8)
      ax.set_ylabel(f'F(w_T) − F⋆, T = {cfg.num_steps}', fontsize=8)
      ax.set_title(f'{regime}, f = {f} (dashed: DRACO, load {2 * f + 1})', fontsize=9)
      ax.grid(alpha=0.3, which='both')
      ax.tick_params(labelsize=7)
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='outside lower center', ncols=3, fontsize=7)
  fig.suptitle(
    f'Final excess loss against the redundancy d, {cfg.baseline.attack}, median of '
    f'{cfg.num_seeds} seeds',
    fontsize=9,
  )
  path = os.path.join(outdir, 'lad_redundancy.png')
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _fmt(v) -> str:
  if v is None or not np.isfinite(v) or v > 1e6:
    return 'diverged'
  return f'{v:.1e}'


def markdown_tables(cfg, rows, results) -> dict[str, str]:
  """Doc blocks: tag -> markdown."""
  out = {}
  fs = [int(f) for f in cfg.byzantine]
  b = cfg.baseline
  by = {(r['scenario'], r['method']): r for r in rows}

  def name(**kw):
    return Scenario(**{**dict(b), 'heterogeneity': float(b.heterogeneity), **kw}).name

  # Core: final excess loss per method, per regime × σ_H × f.
  for regime in cfg.regimes:
    lines = []
    cols = [(s, f) for s in cfg.heterogeneity for f in fs]
    lines.append('| method | load | ' + ' | '.join(f'σ_H = {s:g}, f = {f}' for s, f in cols) + ' |')
    lines.append('|---|---|' + '---:|' * len(cols))
    keys = [k for k, *_ in methods(cfg, Scenario(regime, 0.0, fs[0], b.attack, b.placement))]
    for key in [*keys, DRACO]:
      cells, load = [], None
      for s, f in cols:
        r = by.get((name(regime=regime, heterogeneity=float(s), f=f), key))
        cells.append(_fmt(r['final_excess_median']) if r else '–')
        load = r['load'] if r else load
      rule, _, kind = key.partition('|')
      label = (
        DRACO
        if key == DRACO
        else (f'{LABELS[rule]}' if kind == 'fixed' else f'LAD-{LABELS[rule]}, d = {kind[3:]}')
      )
      if load is None:
        continue  # not run
      shown = f'2f + 1 = {" / ".join(str(2 * f + 1) for f in fs)}' if key == DRACO else f'{load:g}'
      lines.append(f'| {label} | {shown} | ' + ' | '.join(cells) + ' |')
    if len(lines) > 2:
      out[f'core_{regime}'] = '\n'.join(lines)
  # Half-DRACO ratios: LAD at d >= 20, every core scenario.
  lines = [
    '| regime | σ_H | f | rule | d | budget C | LAD at C/2 ÷ DRACO at C |',
    '|---|---|---|---|---|---|---:|',
  ]
  for r in rows:
    if r.get('half_draco_ratio') is None or r['d'] is None or r['d'] < 20 or r['compressor']:
      continue
    if r['attack'] != b.attack or r['placement'] != b.placement:
      continue
    lines.append(
      f'| {r["regime"]} | {r["heterogeneity"]:g} | {r["f"]} | {LABELS[r["rule"]]} | {r["d"]} '
      f'| {r["half_draco_budget"]} | {r["half_draco_ratio"]:.2g} |'
    )
  out['half_draco'] = '\n'.join(lines)
  # Attacks and placements at the baseline: final excess of each method family.
  for group, field, values in (
    ('attacks', 'attack', cfg.attacks),
    ('placements', 'placement', cfg.placements),
  ):
    lines = ['| ' + field + ' | f | ' + ' | '.join(_family_heads(cfg)) + ' |']
    lines.append('|---|---|' + '---:|' * len(_family_heads(cfg)))
    for v in values:
      for f in fs:
        scn = name(**{field: v}, f=f)
        cells = [
          _fmt(by[(scn, k)]['final_excess_median']) if (scn, k) in by else '–'
          for k in _family_keys(cfg)
        ]
        lines.append(f'| {v} | {f} | ' + ' | '.join(cells) + ' |')
    out[group] = '\n'.join(lines)
  # Compression: Com-LAD against the compressed baselines.
  lines = [
    '| compressor | regime | f | rule | d = 1 (Com-baseline) | Com-LAD d = 5 | d = 20 | d = 50 '
    '| Com-LAD d = 20 ÷ baseline, same steps | same computation |',
    '|---|---|---|---|---:|---:|---:|---:|---:|---:|',
  ]
  for comp in cfg.compressors:
    for regime in cfg.regimes:
      for f in fs:
        scn = name(regime=regime, f=f, compressor=comp)
        for rule in cfg.rules:
          if (scn, f'{rule}|fixed') not in by:
            continue
          cells = [_fmt(by[(scn, f'{rule}|fixed')]['final_excess_median'])]
          cells += [
            _fmt(by[(scn, f'{rule}|lad{d}')]['final_excess_median'])
            if (scn, f'{rule}|lad{d}') in by
            else '–'
            for d in (5, 20, 50)
          ]
          r20 = by.get((scn, f'{rule}|lad20'))
          ratio = (
            [f'{r20["vs_fixed_same_steps"]:.2g}', f'{r20["vs_fixed_same_compute"]:.2g}']
            if r20
            else ['–', '–']
          )
          lines.append(
            f'| {comp} | {regime} | {f} | {LABELS[rule]} | ' + ' | '.join(cells + ratio) + ' |'
          )
  out['compression'] = '\n'.join(lines)
  return out


def _family_keys(cfg):
  return [
    *(f'{r}|fixed' for r in cfg.rules),
    *(f'{r}|lad{d}' for r in cfg.rules for d in (5, 20) if d in tuple(cfg.redundancies)),
    DRACO,
  ]


def _family_heads(cfg):
  heads = [LABELS[r] for r in cfg.rules]
  heads += [
    f'LAD-{LABELS[r]} d = {d}' for r in cfg.rules for d in (5, 20) if d in tuple(cfg.redundancies)
  ]
  return [*heads, DRACO]


# ------------------------------------------------------------------------------------------------
# The real task: digits through the sweeps
# ------------------------------------------------------------------------------------------------


def real_sweep_config(cfg):
  """The digits comparison as a sweep config: methods × compression × seeds."""
  from ml_collections import config_dict

  r = cfg.real
  base = configs.get('default')
  base.dataset = 'digits'
  base.model = r.model
  base.split = r.split
  base.num_workers = r.num_workers
  base.num_byzantine = r.num_byzantine
  base.attack = r.attack
  base.batch_size = r.batch_size
  base.learning_rate = r.learning_rate
  base.momentum = r.momentum
  base.weight_decay = 0.0
  base.num_steps = r.num_steps
  base.eval_every = r.eval_every
  base.checkpoint_every = 0
  base.progress = False
  base.backend = 'vmap'
  method = []
  for comp in ('none', r.compressor):
    for rule in cfg.rules:
      method.append({'rule': rule, 'coding': 'cyclic(d=1, redraw=False)', 'compression': comp})
      for d in r.redundancies:
        method.append({'rule': rule, 'coding': f'cyclic(d={int(d)})', 'compression': comp})
  method.append({'rule': 'draco', 'coding': 'draco', 'compression': 'none'})
  grid = {'method': method, 'seed': list(range(int(r.num_seeds)))}
  c = config_dict.ConfigDict(sort_keys=False)
  c.name = 'lad_real'
  c.base = base
  c.grid = config_dict.ConfigDict(grid, sort_keys=False)
  return c


def run_real(cfg, workdir: str) -> list[dict]:
  from robustjax import sweeps

  sc = real_sweep_config(cfg)
  out = os.path.join(workdir, 'real')
  sweeps.run_sweep(sc.base, sc.grid, out, name=sc.name)
  return sweeps.load_results(out)


def plot_real(cfg, records, path):
  """Digits: test accuracy and the honest training loss against computation and bits."""
  plt = _plt()
  fig, axes = plt.subplots(2, 2, figsize=(10, 6.6), layout='constrained')
  groups = {}
  for rec in records:
    c = rec['config']
    groups.setdefault((c['rule'], c['coding'], c['compression']), []).append(rec)
  n = cfg.real.num_workers
  for (rule, code, comp), recs in sorted(groups.items()):
    steps = np.asarray(recs[0]['curve']['step'], np.float64)
    load = (
      float(
        coding.loads(coding.make(code, n=n, f=cfg.real.num_byzantine).matrix(jax.random.key(0)))[0]
      )
      if rule != 'draco'
      else float(2 * cfg.real.num_byzantine + 1)
    )
    acc = np.asarray([r['curve']['test_accuracy'] for r in recs])
    loss = np.asarray([r['curve']['train_loss'] for r in recs])
    if rule == 'draco':
      label, color, ls = f'DRACO (load {load:g}, exact vote)', 'tab:red', '-'
    else:
      d = int(load)
      fixed = 'redraw=False' in code
      label = f'{LABELS[rule]} (d = 1, fixed)' if fixed else f'LAD-{LABELS[rule]}, d = {d}'
      from matplotlib import colors as mcolors

      shade = _LAD_SHADES.get(d, 0.8)
      base = COLORS[rule]
      color = base if fixed else tuple(1 - shade * (1 - c) for c in mcolors.to_rgb(base))
      ls = ':' if fixed else '-'
    if comp != 'none':
      label, ls = f'Com-{label}', '--'
    bits = _bits_per_step(recs[0]['config'], comp)
    _band(axes[0, 0], steps * load, acc, label, color, ls)
    _band(axes[0, 1], steps * load, loss, label, color, ls)
    if bits:
      _band(axes[1, 0], steps * bits / 1e6, acc, label, color, ls)
    _band(axes[1, 1], steps, acc, label, color, ls)
  for ax, (xl, yl) in zip(
    axes.flat,
    [
      ('cumulative subset gradients per worker', 'test accuracy'),
      ('cumulative subset gradients per worker', 'training loss (full set)'),
      ('cumulative Mbit sent (all workers)', 'test accuracy'),
      ('iteration', 'test accuracy'),
    ],
  ):
    ax.set_xlabel(xl, fontsize=8)
    ax.set_ylabel(yl, fontsize=8)
    ax.grid(alpha=0.3, which='both')
    ax.tick_params(labelsize=7)
  axes[0, 0].set_xscale('log')
  axes[0, 1].set_xscale('log')
  axes[0, 1].set_yscale('log')
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='outside lower center', ncols=4, fontsize=6.5)
  r = cfg.real
  fig.suptitle(
    f'digits, {r.model}, label-sorted split, n = {r.num_workers}, f = {r.num_byzantine}, '
    f'{r.attack}, batch {r.batch_size}, {r.num_steps} steps, {r.num_seeds} seeds '
    f'(median, quartiles)',
    fontsize=9,
  )
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _bits_per_step(config: dict, comp: str) -> float:
  """Bits all workers send in one step: n messages of the model's size, compressed or not."""
  from flax import nnx

  from robustjax import models
  from robustjax._spec import parse_spec

  ds = data.load(config['dataset'])
  name, params = parse_spec(config['model'])
  model = models.make(
    name, num_classes=ds.num_classes, input_shape=ds.input_shape, rngs=nnx.Rngs(0), **params
  )
  dim = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return float(compression.make(comp).bits(dim) * config['num_workers'])


def summarize_real(cfg, records) -> str:
  """Markdown: final test accuracy and loss per method (median over seeds)."""
  groups = {}
  for rec in records:
    c = rec['config']
    groups.setdefault((c['rule'], c['coding'], c['compression']), []).append(rec)
  lines = [
    '| method | compression | load | final test accuracy | final training loss |',
    '|---|---|---|---:|---:|',
  ]
  for (rule, code, comp), recs in sorted(groups.items()):
    acc = np.median([r['curve']['test_accuracy'][-1] for r in recs])
    loss = np.median([r['curve']['train_loss'][-1] for r in recs])
    if rule == 'draco':
      label, load = DRACO, 2 * cfg.real.num_byzantine + 1
    else:
      b = coding.make(code, n=cfg.real.num_workers, f=cfg.real.num_byzantine)
      load = int(dict(b.params).get('d', 1))
      label = LABELS[rule] if 'redraw=False' in code else f'LAD-{LABELS[rule]}, d = {load}'
    lines.append(f'| {label} | {comp} | {load} | {acc:.3f} | {loss:.3f} |')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------


def update_doc(path: str, blocks: dict[str, str]) -> None:
  """Rewrites each ``<!-- results:TAG -->`` … ``<!-- /results:TAG -->`` block of `path`."""
  with open(path) as fh:
    text = fh.read()
  for tag, table in blocks.items():
    start, end = f'<!-- results:{tag} -->', f'<!-- /results:{tag} -->'
    if start not in text or end not in text:
      raise ValueError(f'{path}: needs the markers {start} and {end}')
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    text = head + start + '\n' + table + '\n' + end + tail
  with open(path, 'w') as fh:
    fh.write(text)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cfg = FLAGS.config
  workdir = FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  if FLAGS.plot_only:
    results = {
      name[:-4]: load_scenario(os.path.join(workdir, 'scenarios', name))
      for name in sorted(os.listdir(os.path.join(workdir, 'scenarios')))
      if name.endswith('.npz') and not name.endswith('.tmp.npz')
    }
  else:
    results = run_synthetic(cfg, workdir)
  real = None
  if 'real' in cfg.groups:
    if FLAGS.plot_only:
      from robustjax import sweeps

      real = sweeps.load_results(os.path.join(workdir, 'real'))
    else:
      real = run_real(cfg, workdir)
  rows = summarize(cfg, results)
  blocks = markdown_tables(cfg, rows, results)
  if real is not None:
    blocks['real'] = summarize_real(cfg, real)
  with open(os.path.join(workdir, 'summary.json'), 'w') as fh:
    json.dump(
      {
        'rows': rows,
        'meta': {k: m for k, (_, m) in results.items()},
        'config': cfg.to_dict(),
        'wall_s': time.time() - t0,
      },
      fh,
      indent=1,
      default=str,
    )
  for tag, text in blocks.items():
    print(f'\n## {tag}\n{text}')
  if cfg.make_figures:
    figures = (
      'docs/figures' if FLAGS.docs else (cfg.figures_dir or os.path.join(workdir, 'figures'))
    )
    for p in make_figures(cfg, results, figures, real):
      print('wrote', p)
  if FLAGS.docs or cfg.update_doc:
    update_doc(cfg.doc, blocks)
    print('updated', cfg.doc)
  print(f'total {time.time() - t0:.0f} s on {jax.device_count()} {jax.default_backend()} device(s)')


if __name__ == '__main__':
  define_flags()
  app.run(main)
