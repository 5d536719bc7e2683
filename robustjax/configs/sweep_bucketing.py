"""Sweep: Karimireddy, He, Jaggi (ICLR 2022) bucketing study, on the digits data.

Their setting: n = 25 workers of which f = 5 Byzantine, label-sorted non-iid data (each honest
worker holds one or two classes), attacks ALIE, bit flip, IPM, label flip and mimic; aggregators
Krum, coordinate-wise median (CM), RFA (geometric median) and centered clipping (CClip), each with
and without bucketing (s = 2), with worker momentum 0 and 0.9.

Mapping to robustjax spec strings:

* label-sorted non-iid: ``split='extreme'`` over the 20 honest workers;
* ALIE: ``'alie(variant="karimireddy")'`` (their code's z); bit flip: each Byzantine worker sends
  the negation of an honestly computed update, ``'sign_flip(variant="negate")'`` (negates f honest
  workers' momentums); IPM: ``'ipm(eps=0.1)'``; label flip: ``'label_flip'`` (y → 9 − y);
  mimic: ``'mimic_heuristic'`` (their warm-up heuristic picks the honest worker to copy);
* Krum: ``'krum'``; CM: ``'median'``; RFA: ``'geometric_median'``; CClip:
  ``'centered_clipping(tau=10.0)'`` (one iteration, started at the previous aggregate);
* bucketing: the ``pre`` axis, ``''`` or ``'bucketing(s=2)'``;
* momentum: worker momentum β ∈ {0, 0.9} (robustjax's momentum is the damped
  m ← β m + (1 − β) g, so τ = 10 matches their τ = 10 / (1 − β) on undamped momentum, and
  lr 0.1 their lr 0.01 with β = 0.9).

Variants: ``''`` (600 steps, the default CNN), ``'fast'`` (what docs/reproductions.md ran on 2
shared CPU cores: 300 steps, an MLP with one hidden layer of 64 units instead of the CNN),
``'fast_baseline'`` (the same without attack, and the plain mean), ``'smoke'`` (tests).
"""

from robustjax.configs import default
from robustjax.configs.default import sweep_config

AGGREGATORS = ('krum', 'median', 'geometric_median', 'centered_clipping(tau=10.0)')
ATTACKS = (
  'alie(variant="karimireddy")',
  'sign_flip(variant="negate")',
  'ipm(eps=0.1)',
  'label_flip',
  'mimic_heuristic',
)


def get_config(variant: str = ''):
  base = default.get_config()
  base.dataset = 'digits'
  base.model = 'cnn'
  base.split = 'extreme'
  base.num_workers = 25
  base.num_byzantine = 5
  base.batch_size = 32
  base.learning_rate = 0.1
  base.weight_decay = 0.0
  base.num_steps = 600
  base.eval_every = 50
  base.backend = 'vmap'
  base.checkpoint_every = 0
  base.progress = False
  grid = {
    'momentum': [0.9, 0.0],
    'pre': ['', 'bucketing(s=2)'],
    'rule': list(AGGREGATORS),
    'attack': list(ATTACKS),
    'seed': [0],
  }
  name = 'bucketing'
  if variant == 'fast':
    base.num_steps = 300
    base.eval_every = 25
    base.model = 'mlp(hidden=(64,))'
    grid['seed'] = [0, 1]
    name = 'bucketing_fast'
  elif variant == 'fast_baseline':
    # No attack (the f Byzantine workers behave honestly; the rules still assume f = 5), plus the
    # plain mean: what each rule loses to heterogeneity alone.
    base.num_steps = 300
    base.eval_every = 25
    base.model = 'mlp(hidden=(64,))'
    grid = dict(grid, rule=['mean', *AGGREGATORS], attack=['none'], seed=[0, 1])
    name = 'bucketing_fast_baseline'
  elif variant == 'smoke':
    base.num_steps = 4
    base.eval_every = 2
    base.model = 'mlp(hidden=(8,))'
    base.batch_size = 4
    grid = {'rule': ['median'], 'pre': ['', 'bucketing(s=2)'], 'attack': ['label_flip']}
    name = 'bucketing_smoke'
  elif variant:
    raise ValueError(f'unknown variant {variant!r}; known: fast, fast_baseline, smoke')
  return sweep_config(name, base, grid)
