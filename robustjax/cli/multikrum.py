r"""MultiKrum in practice: a mis-specified f, f unknown, many workers, clipping and privacy.

The MultiKrum article this project started from names three practical limits beside the theory:
the number of Byzantine workers must be declared (too low lets attacks through, too high throws
honest gradients away), the cost grows with n², and the rule is combined with clipping and
differential privacy. Studies (config ``multikrum``; see its docstring):

- ``misspecified``: true b against declared f, final accuracy and convergence speed as heatmaps,
  for the fixed-f rules and for the adaptive ones (`gap_multikrum`, `adaptive_multikrum`);
- ``privacy``: accuracy against ε (local and central DP) and f, and MultiKrum's selection under
  local noise;
- ``sketch``: the approximate MultiKrum's agreement with the exact selection and κ̂ against k;
- ``kappa``: κ̂ of the adaptive rules (the robustness search) next to MultiKrum's.

Usage:
  robustjax multikrum --workdir=/tmp/mk                           # every study (resumable)
  robustjax multikrum --workdir=/tmp/mk --config.studies=privacy
  robustjax multikrum --workdir=/tmp/mk --docs       # also docs/figures and docs/multikrum.md
  robustjax multikrum --config=multikrum:smoke --workdir=/tmp/s

The training studies are sweeps (`robustjax.sweeps`, seeds vmapped, resumable) under
``<workdir>/<study>``; the others write ``<workdir>/<study>.json``. Timings at large n are a
benchmark (experiments/benchmark_multikrum_large_n.py, BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from robustjax import configs

FLAGS = flags.FLAGS
DOC = 'docs/multikrum.md'


def define_flags():
  """Defines the command's absl flags (the `robustjax` command calls it)."""
  config_flags.DEFINE_config_file('config', configs.path('multikrum'), 'Study config.')
  flags.DEFINE_string('workdir', None, 'Results directory (the studies resume from it).')
  flags.DEFINE_bool('docs', False, 'Write the figures to docs/figures and the tables to the doc.')
  flags.DEFINE_bool('plot_only', False, 'Redraw figures and tables from the workdir.')
  flags.mark_flags_as_required(['workdir'])


def _plt():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def _threats(cfg):
  """(b, attack) pairs: b = 0 once (no attack), then every attack at every b > 0."""
  out = [{'num_byzantine': 0, 'attack': 'none'}]
  out += [
    {'num_byzantine': int(b), 'attack': a} for b in cfg.true_byzantine if b > 0 for a in cfg.attacks
  ]
  return out


def _sweep(base, grid, out, name, plot_only):
  from robustjax import sweeps

  if not plot_only:
    sweeps.run_sweep(base, grid, out, name=name)
  return sweeps.load_results(out)


# ------------------------------------------------------------------------------------------------
# A mis-specified f, and f unknown


def run_misspecified(cfg, workdir, plot_only=False) -> dict:
  seeds = list(range(int(cfg.num_seeds)))
  fixed = _sweep(
    cfg.base,
    {
      'rule': list(cfg.rules),
      'threat': _threats(cfg),
      'declared_byzantine': [int(f) for f in cfg.declared],
      'seed': seeds,
    },
    os.path.join(workdir, 'misspecified'),
    'multikrum_misspecified',
    plot_only,
  )
  adaptive = _sweep(
    cfg.base,
    {
      'rule': list(cfg.adaptive_rules),
      'threat': _threats(cfg),
      'declared_byzantine': [max(int(f) for f in cfg.declared)],
      'seed': seeds,
    },
    os.path.join(workdir, 'adaptive'),
    'multikrum_adaptive',
    plot_only,
  )
  return {'fixed': fixed, 'adaptive': adaptive}


def _cells(records, target):
  """(rule, attack, b, f) -> mean final accuracy over seeds, steps to the target accuracy."""
  groups = {}
  for r in records:
    c = r['config']
    key = (c['rule'], c['attack'], c['num_byzantine'], c['declared_byzantine'])
    groups.setdefault(key, []).append(r)
  out = {}
  for key, recs in groups.items():
    steps = np.asarray(recs[0]['curve']['step'])
    curve = np.mean([r['curve']['test_accuracy'] for r in recs], axis=0)
    out[key] = {'acc': float(curve[-1]), 'curve': curve, 'steps': steps, 'seeds': len(recs)}
  # Speed: the first evaluated step at which the curve reaches `target` × the rule's clean
  # accuracy (b = 0, f = its smallest declared value; inf if never).
  for key, v in out.items():
    rule = key[0]
    clean = [w['acc'] for (r, _, b, _), w in out.items() if r == rule and b == 0]
    ref = max(clean) if clean else v['acc']
    hit = np.flatnonzero(v['curve'] >= target * ref)
    v['speed'] = float(v['steps'][hit[0]]) if hit.size else float('inf')
  return out


def _heatmap_figure(cfg, cells, adaptive_cells, value, path, title, fmt):
  plt = _plt()
  attacks = list(cfg.attacks)
  rules = list(cfg.rules) + list(cfg.adaptive_rules)
  bs = [int(b) for b in cfg.true_byzantine]
  fs = [int(f) for f in cfg.declared]
  fig, axes = plt.subplots(
    len(attacks),
    len(rules),
    figsize=(2.3 * len(rules) + 1.2, 2.2 * len(attacks) + 0.9),
    squeeze=False,
    layout='constrained',
    gridspec_kw={'width_ratios': [len(fs)] * len(cfg.rules) + [1.6] * len(cfg.adaptive_rules)},
  )
  vals = [v[value] for v in list(cells.values()) + list(adaptive_cells.values())]
  finite = [v for v in vals if np.isfinite(v)]
  vmin, vmax = (min(finite), max(finite)) if finite else (0, 1)
  cmap = 'RdYlGn' if value == 'acc' else 'RdYlGn_r'
  im = None
  for i, attack in enumerate(attacks):
    for j, rule in enumerate(rules):
      ax = axes[i, j]
      adaptive = rule in cfg.adaptive_rules
      cols = [max(fs)] if adaptive else fs
      src = adaptive_cells if adaptive else cells
      t = np.full((len(bs), len(cols)), np.nan)
      for a, b in enumerate(bs):
        for k, f in enumerate(cols):
          cell = src.get((rule, 'none' if b == 0 else attack, b, f))
          if cell is not None:
            t[a, k] = cell[value]
      shown = np.where(np.isfinite(t), t, vmax if value == 'speed' else vmin)
      im = ax.imshow(shown, vmin=vmin, vmax=vmax, cmap=cmap, aspect='auto')
      for a in range(len(bs)):
        for k in range(len(cols)):
          ax.text(k, a, fmt(t[a, k]), ha='center', va='center', fontsize=6.5)
      ax.set_xticks(range(len(cols)), [f'≤{c}' if adaptive else str(c) for c in cols], fontsize=7)
      ax.set_yticks(range(len(bs)), [str(b) for b in bs], fontsize=7)
      if i == len(attacks) - 1:
        ax.set_xlabel('f_max' if adaptive else 'declared f', fontsize=7)
      if j == 0:
        ax.set_ylabel(f'{attack}\ntrue b', fontsize=7)
      if i == 0:
        ax.set_title(rule, fontsize=7)
  label = (
    'final test accuracy' if value == 'acc' else f'steps to {cfg.target:.0%} of clean accuracy'
  )
  fig.colorbar(im, ax=list(axes.flat), shrink=0.6, label=label)
  fig.suptitle(title, fontsize=9, wrap=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _fmt_acc(v):
  return '–' if not np.isfinite(v) else f'{v:.2f}'


def _fmt_speed(v):
  return 'never' if not np.isfinite(v) else f'{v:.0f}'


def report_misspecified(cfg, results, figures) -> tuple[list[str], dict[str, str]]:
  cells = _cells(results['fixed'], cfg.target)
  adaptive = _cells(results['adaptive'], cfg.target)
  b = cfg.base
  what = (
    f'digits, {b.model}, n = {b.num_workers}, Dirichlet({b.alpha:g}) split, {b.num_steps} '
    f'steps, mean of {cfg.num_seeds} seeds'
  )
  paths = [
    _heatmap_figure(
      cfg,
      cells,
      adaptive,
      'acc',
      os.path.join(figures, 'multikrum_misspecified_accuracy.png'),
      f'Final test accuracy: true b (rows) against declared f (columns); {what}',
      _fmt_acc,
    ),
    _heatmap_figure(
      cfg,
      cells,
      adaptive,
      'speed',
      os.path.join(figures, 'multikrum_misspecified_speed.png'),
      f"Convergence speed: steps to {cfg.target:.0%} of the rule's clean accuracy; {what}",
      _fmt_speed,
    ),
  ]
  # Tables: per rule and attack, accuracy at f = b (right), f < b (too low), f > b (too high).
  lines = [
    '| rule | attack | b | f = b | f = b − 2 (too low) | f = b + 2 (too high) | adaptive |',
    '|---|---|---|---:|---:|---:|---|',
  ]
  fmax = max(int(f) for f in cfg.declared)
  for rule in cfg.rules:
    for attack in cfg.attacks:
      for bb in cfg.true_byzantine:
        if bb == 0:
          continue
        get = lambda f, rule=rule, attack=attack, bb=bb: cells.get((rule, attack, bb, f))
        row = [get(bb), get(bb - 2), get(bb + 2)]
        ad = [
          f'{r}: {_fmt_acc(adaptive[(r, attack, bb, fmax)]["acc"])}'
          for r in cfg.adaptive_rules
          if (r, attack, bb, fmax) in adaptive
        ]
        lines.append(
          f'| {rule} | {attack} | {bb} | '
          + ' | '.join('–' if c is None else _fmt_acc(c['acc']) for c in row)
          + f' | {"; ".join(ad)} |'
        )
  clean = ['| rule | declared f = ' + ' | '.join(str(f) for f in cfg.declared) + ' |']
  clean.append('|---|' + '---:|' * len(cfg.declared))
  for rule in cfg.rules:
    vals = [cells.get((rule, 'none', 0, int(f))) for f in cfg.declared]
    clean.append(
      f'| {rule} (b = 0) | '
      + ' | '.join('–' if v is None else f'{v["acc"]:.3f} / {_fmt_speed(v["speed"])}' for v in vals)
      + ' |'
    )
  return paths, {'misspecified': '\n'.join(lines), 'misspecified_clean': '\n'.join(clean)}


# ------------------------------------------------------------------------------------------------
# Clipping and differential privacy


def run_privacy(cfg, workdir, plot_only=False):
  p = cfg.privacy
  noise = [{'dp_clip': float(p.clip), 'dp_local_noise': float(s)} for s in p.local_noise]
  noise += [{'dp_clip': float(p.clip), 'dp_central_noise': float(s)} for s in p.central_noise]
  base = cfg.base.copy_and_resolve_references()
  base.attack = p.attack
  return _sweep(
    base,
    {
      'rule': list(p.rules),
      'num_byzantine': [int(f) for f in p.byzantine],
      'noise': noise,
      'seed': list(range(int(cfg.num_seeds))),
    },
    os.path.join(workdir, 'privacy'),
    'multikrum_privacy',
    plot_only,
  )


def selection_under_noise(cfg, key) -> list[dict]:
  """The share of Byzantine inputs among MultiKrum's m = n − f selected, with local DP noise:
  honest inputs N(μ, s² I) (‖μ‖ = C, spread s = C / (2√d) per coordinate), f from an attack on
  them, every input clipped to C and given N(0, σ² C² I)."""
  from robustjax import attacks, privacy
  from robustjax.aggregators import _krum

  p = cfg.privacy
  n, f, d, c = int(p.selection_n), int(p.selection_f), int(p.selection_dim), float(p.clip)
  nh = n - f
  rows = []
  for attack in ('alie', 'sign_flip', 'gaussian'):
    atk = attacks.get(attack)

    @jax.jit
    def trial(k, sigma, atk=atk):
      k1, k2, k3, k4 = jax.random.split(k, 4)
      mu = jax.random.normal(k1, (d,))
      mu = c * mu / jnp.linalg.norm(mu)
      honest = mu + (c / (2 * jnp.sqrt(d))) * jax.random.normal(k2, (nh, d))
      byz, _ = atk.apply(atk.init(k3, honest), honest, k3, f=f, rule=None)
      x = jnp.concatenate([honest, byz.astype(honest.dtype)])
      x = privacy.clip_rows(x, c)
      x = privacy.add_noise(x, sigma * c, k4, jnp.arange(n))
      scores = _krum._scores(x, n - f - 2, None)
      chosen = jnp.argsort(scores)[: n - f]
      return jnp.mean(chosen >= nh)

    for sigma in (0.0, *[float(s) for s in p.local_noise if s > 0], 4.0, 8.0):
      keys = jax.random.split(jax.random.fold_in(key, hash(attack) % (2**31)), p.selection_trials)
      share = float(np.mean([trial(k, sigma) for k in keys]))
      rows.append({'attack': attack, 'sigma': sigma, 'byzantine_share': share, 'f_over_n': f / n})
  return rows


def report_privacy(cfg, records, selection, figures) -> tuple[list[str], dict[str, str]]:
  from robustjax import privacy

  plt = _plt()
  p = cfg.privacy
  steps = int(cfg.base.num_steps)
  groups = {}
  for r in records:
    c = r['config']
    kind = 'central' if c.get('dp_central_noise') else 'local'
    sigma = c.get('dp_central_noise') or c.get('dp_local_noise') or 0.0
    groups.setdefault((c['rule'], c['num_byzantine'], kind, float(sigma)), []).append(
      r['final']['test_accuracy']
    )
  rules = list(p.rules)
  fig, axes = plt.subplots(
    1, len(rules), figsize=(3.6 * len(rules), 3.4), squeeze=False, layout='constrained', sharey=True
  )
  rows = []
  for ax, rule in zip(axes[0], rules):
    for j, f in enumerate(p.byzantine):
      color = f'C{j}'
      for kind, marker, ls in (('local', 'o', '-'), ('central', 's', '--')):
        pts = sorted(
          (privacy.epsilon(s, steps, p.delta), float(np.mean(v)), s)
          for (r, ff, k, s), v in groups.items()
          if r == rule and ff == f and k == kind and s > 0
        )
        if pts:
          ax.plot(
            [x for x, _, _ in pts],
            [y for _, y, _ in pts],
            marker=marker,
            ls=ls,
            color=color,
            ms=4,
            label=f'f = {f}, {kind} DP',
          )
        for eps, acc, s in pts:
          rows.append((rule, f, kind, s, eps, acc))
      clip_only = groups.get((rule, f, 'local', 0.0))
      if clip_only:
        ax.axhline(np.mean(clip_only), color=color, lw=0.8, ls=':')
        rows.append((rule, f, 'clipping only', 0.0, float('inf'), float(np.mean(clip_only))))
    ax.set_xscale('log')
    ax.set_xlabel(f'ε at δ = {p.delta:g} ({steps} steps)', fontsize=8)
    ax.set_title(rule, fontsize=8)
    ax.grid(alpha=0.3, which='both')
    ax.tick_params(labelsize=7)
  axes[0, 0].set_ylabel('final test accuracy', fontsize=8)
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='outside lower center', ncols=6, fontsize=7)
  fig.suptitle(
    f'Clipping (C = {p.clip:g}) and Gaussian noise, {p.attack} with f Byzantine of '
    f'{cfg.base.num_workers}; dotted: clipping alone (ε = ∞); mean of {cfg.num_seeds} seeds',
    fontsize=9,
  )
  path1 = os.path.join(figures, 'multikrum_privacy.png')
  fig.savefig(path1, dpi=110)
  plt.close(fig)
  # Selection under noise.
  fig, ax = plt.subplots(figsize=(5.2, 3.4), layout='constrained')
  for attack in ('alie', 'sign_flip', 'gaussian'):
    pts = [r for r in selection if r['attack'] == attack]
    ax.plot(
      [r['sigma'] for r in pts], [r['byzantine_share'] for r in pts], marker='o', label=attack
    )
  share = selection[0]['f_over_n'] if selection else 0.0
  ax.axhline(share, color='k', ls=':', lw=0.8, label=f'f / n = {share:.2f}')
  ax.set_xlabel('local noise multiplier σ (noise N(0, σ²C²) per coordinate)', fontsize=8)
  ax.set_ylabel("share of Byzantine inputs in MultiKrum's selection", fontsize=8)
  ax.set_xscale('symlog', linthresh=0.25)
  ax.set_xlim(left=0.0)  # σ ≥ 0: no negative half of the symlog axis
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title(
    f'n = {p.selection_n}, f = {p.selection_f}, d = {p.selection_dim}, honest spread ≪ C: '
    'what distance-based rules see under local DP',
    fontsize=8,
    wrap=True,
  )
  path2 = os.path.join(figures, 'multikrum_privacy_selection.png')
  fig.savefig(path2, dpi=110)
  plt.close(fig)
  table = [
    '| rule | f | noise | σ | ε (δ = 1e-5) | final test accuracy |',
    '|---|---|---|---:|---:|---:|',
  ]
  for rule, f, kind, s, eps, acc in sorted(rows, key=lambda t: (t[0], t[1], t[2], t[3])):
    e = '∞' if not np.isfinite(eps) else f'{eps:.3g}'
    table.append(f'| {rule} | {f} | {kind} | {s:g} | {e} | {acc:.3f} |')
  sel = ['| attack | σ | Byzantine share of the selection |', '|---|---:|---:|']
  sel += [f'| {r["attack"]} | {r["sigma"]:g} | {r["byzantine_share"]:.2f} |' for r in selection]
  return [path1, path2], {'privacy': '\n'.join(table), 'selection': '\n'.join(sel)}


# ------------------------------------------------------------------------------------------------
# The sketch: agreement with the exact selection, κ̂ against k


def run_sketch(cfg, key) -> dict:
  from robustjax import attacks, robustness
  from robustjax import stack as st
  from robustjax.aggregators import _krum

  s = cfg.sketch
  scores = jax.jit(_krum._scores, static_argnums=(1, 2))  # one compile per shape, not per op
  project = jax.jit(st.random_projection, static_argnums=1)
  agree = []
  for n in s.ns:
    n = int(n)
    f = max(1, int(round(s.f_fraction * n)))
    nh = n - f
    for attack in s.attacks:
      atk = attacks.get(attack)
      for t in range(int(s.trials)):
        k0 = jax.random.fold_in(key, n * 1000 + t)
        k1, k2, k3 = jax.random.split(k0, 3)
        honest = 1.0 + jax.random.normal(k1, (nh, int(s.dim)))
        byz, _ = atk.apply(atk.init(k2, honest), honest, k2, f=f, rule=None)
        x = jnp.concatenate([honest, byz.astype(honest.dtype)])
        exact = np.argsort(np.asarray(scores(x, n - f - 2, None)), kind='stable')[: n - f]
        for k in s.ks:
          y = project(x, int(k), k3)
          sk = np.argsort(np.asarray(scores(y, n - f - 2, None)), kind='stable')[: n - f]
          agree.append(
            {
              'n': n,
              'f': f,
              'attack': attack,
              'k': int(k),
              'trial': t,
              'agreement': len(set(exact) & set(sk)) / (n - f),
              'byzantine_exact': int(np.sum(exact >= nh)),
              'byzantine_sketch': int(np.sum(sk >= nh)),
            }
          )
  kappas = []
  n, f, dim = int(s.kappa_n), int(s.kappa_f), int(s.kappa_dim)
  specs = [('multikrum', {})] + [('multikrum_sketch', {'k': int(k)}) for k in s.kappa_ks]
  ests = robustness.estimate_kappas(specs, n, f, dim, key, int(s.kappa_budget))
  for (name, params), est in zip(specs, ests):
    row = {'rule': name, 'k': params.get('k'), 'kappa': float(est.kappa), 'n': n, 'f': f}
    if 'k' in params:
      row['null_space'] = {
        str(t): sketch_null_space_ratio(n, f, dim, params['k'], t, key) for t in WITNESS_OFFSETS
      }
    kappas.append(row)
  return {'agreement': agree, 'kappa': kappas}


# Offsets t of `sketch_null_space_ratio`'s witness reported by the study: the ratio grows as t².
WITNESS_OFFSETS = (100.0, 10000.0)


def sketch_null_space_ratio(n: int, f: int, dim: int, k: int, t: float, key) -> float | None:
  """The (f, κ) ratio of `multikrum_sketch` (its default key) on a witness against a known R.

  Honest rows N(0, I) in dimension `dim`; the f Byzantine rows are the honest mean plus t·u, with
  u a unit vector in the null space of Rᵀ (R the default key's projection, `random_projection` of
  the unit vectors): their sketches are the honest mean's, so they get the lowest scores, are
  selected, and move the average by f·t / (n − f) along u. The ratio grows as t²: against an
  attacker who knows R, the sketch is not (f, κ)-robust for any κ when k < dim. None when Rᵀ has
  no null space (k ≥ dim, R of full rank).
  """
  from robustjax import robustness
  from robustjax import stack as st

  r = np.asarray(st.random_projection(jnp.eye(dim, dtype=jnp.float32), k, jax.random.key(0)))
  _, sv, vt = np.linalg.svd(r.T.astype(np.float64))
  if k >= dim and sv.min() > 1e-6 * sv.max():
    return None
  u = vt[-1]  # Rᵀu = 0 (rank of Rᵀ ≤ k < dim) or the weakest direction of a singular R
  honest = np.asarray(jax.random.normal(jax.random.fold_in(key, 7), (n - f, dim)), np.float64)
  byz = np.broadcast_to(honest.mean(0) + t * u, (f, dim))
  x = jnp.asarray(np.concatenate([honest, byz]), jnp.float32)
  return robustness.ratio(f'multikrum_sketch(k={k})', x, np.arange(n - f))


def report_sketch(cfg, res, figures):
  plt = _plt()
  s = cfg.sketch
  rows = res['agreement']
  fig, axes = plt.subplots(
    1,
    len(s.attacks),
    figsize=(3.8 * len(s.attacks), 3.3),
    squeeze=False,
    layout='constrained',
    sharey=True,
  )
  for ax, attack in zip(axes[0], s.attacks):
    for j, n in enumerate(s.ns):
      pts = [
        (
          k,
          np.mean(
            [r['agreement'] for r in rows if r['n'] == n and r['k'] == k and r['attack'] == attack]
          ),
        )
        for k in s.ks
      ]
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', color=f'C{j}', label=f'n = {n}')
    ax.axhline(0.99, color='k', ls=':', lw=0.8, label='0.99')
    ax.set_xscale('log', base=2)
    ax.set_xlabel('sketch dimension k', fontsize=8)
    ax.set_title(f'{attack}, f = {s.f_fraction:.0%} of n, d = {s.dim}', fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)
  axes[0, 0].set_ylabel(
    f'selection agreement with exact MultiKrum\n(mean of {s.trials} trials)', fontsize=8
  )
  axes[0, 0].legend(fontsize=7)
  path = os.path.join(figures, 'multikrum_sketch_agreement.png')
  fig.savefig(path, dpi=110)
  plt.close(fig)
  table = [
    '| attack | n | k | agreement (mean) | Byzantine kept: exact / sketch |',
    '|---|---|---|---:|---|',
  ]
  for attack in s.attacks:
    for n in s.ns:
      for k in s.ks:
        sub = [r for r in rows if r['n'] == n and r['k'] == k and r['attack'] == attack]
        if sub:
          table.append(
            f'| {attack} | {n} | {k} | {np.mean([r["agreement"] for r in sub]):.3f} | '
            f'{np.mean([r["byzantine_exact"] for r in sub]):.1f} / '
            f'{np.mean([r["byzantine_sketch"] for r in sub]):.1f} |'
          )
  offsets = ' / '.join(f't = {t:g}' for t in WITNESS_OFFSETS)
  kt = [
    f'| rule | k | κ̂ (n = {s.kappa_n}, f = {s.kappa_f}) | null-space witness ({offsets}) |',
    '|---|---|---:|---:|',
  ]
  for r in res['kappa']:
    witness = r.get('null_space')
    cells = ' / '.join('–' if v is None else f'{v:.3g}' for v in (witness or {}).values())
    kt.append(f'| {r["rule"]} | {r["k"] or "–"} | {r["kappa"]:.3g} | {cells or "–"} |')
  return [path], {'sketch': '\n'.join(table), 'sketch_kappa': '\n'.join(kt)}


# ------------------------------------------------------------------------------------------------
# κ̂ of the adaptive rules


def run_kappa(cfg, key) -> list[dict]:
  from robustjax import robustness

  out = []
  for n in cfg.kappa.ns:
    n = int(n)
    for f in range(1, (n - 3) // 2 + 1):
      rules = ['multikrum', *cfg.adaptive_rules]
      ests = robustness.estimate_kappas(
        rules, n, f, None, jax.random.fold_in(key, n * 100 + f), int(cfg.kappa.budget)
      )
      for rule, est in zip(rules, ests):
        out.append(
          {
            'rule': rule,
            'n': n,
            'f': f,
            'kappa': float(est.kappa),
            'lower': robustness.lower_bound(n, f),
          }
        )
  return out


def report_kappa(cfg, rows) -> dict[str, str]:
  rules = ['multikrum', *cfg.adaptive_rules]
  lines = [
    '| n | f | f/(n−2f) | ' + ' | '.join(rules) + ' |',
    '|---|---|---:|' + '---:|' * len(rules),
  ]
  for n in cfg.kappa.ns:
    for f in sorted({r['f'] for r in rows if r['n'] == n}):
      vals = {r['rule']: r['kappa'] for r in rows if r['n'] == n and r['f'] == f}
      lower = [r['lower'] for r in rows if r['n'] == n and r['f'] == f][0]
      lines.append(
        f'| {n} | {f} | {lower:.3g} | ' + ' | '.join(f'{vals[r]:.3g}' for r in rules) + ' |'
      )
  return {'kappa': '\n'.join(lines)}


# ------------------------------------------------------------------------------------------------


def _cached(path, fn, plot_only):
  if os.path.exists(path):
    with open(path) as fh:
      return json.load(fh)
  if plot_only:
    raise FileNotFoundError(f'{path}: run the study first (without --plot_only)')
  out = fn()
  with open(path + '.tmp', 'w') as fh:
    json.dump(out, fh, indent=1)
  os.replace(path + '.tmp', path)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cfg = FLAGS.config
  workdir = FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  figures = 'docs/figures' if FLAGS.docs else os.path.join(workdir, 'figures')
  os.makedirs(figures, exist_ok=True)
  t0 = time.time()
  key = jax.random.key(0)
  paths, blocks = [], {}
  studies = set(cfg.studies)
  if 'misspecified' in studies:
    res = run_misspecified(cfg, workdir, FLAGS.plot_only)
    p, b = report_misspecified(cfg, res, figures)
    paths += p
    blocks.update(b)
  if 'privacy' in studies:
    records = run_privacy(cfg, workdir, FLAGS.plot_only)
    selection = _cached(
      os.path.join(workdir, 'selection.json'),
      lambda: selection_under_noise(cfg, key),
      FLAGS.plot_only,
    )
    p, b = report_privacy(cfg, records, selection, figures)
    paths += p
    blocks.update(b)
  if 'sketch' in studies:
    res = _cached(
      os.path.join(workdir, 'sketch.json'), lambda: run_sketch(cfg, key), FLAGS.plot_only
    )
    p, b = report_sketch(cfg, res, figures)
    paths += p
    blocks.update(b)
  if 'kappa' in studies:
    rows = _cached(
      os.path.join(workdir, 'kappa.json'), lambda: run_kappa(cfg, key), FLAGS.plot_only
    )
    blocks.update(report_kappa(cfg, rows))
  for tag, text in blocks.items():
    print(f'\n## {tag}\n{text}')
  for p in paths:
    print('wrote', p)
  if FLAGS.docs:
    from robustjax.cli.coding import update_doc

    update_doc(DOC, blocks)
    print('updated', DOC)
  print(f'total {time.time() - t0:.0f} s')


if __name__ == '__main__':
  define_flags()
  app.run(main)
