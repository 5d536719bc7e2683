"""Sweep: a tiny grid for tests and for trying the sweep CLI (seconds on a CPU).

Two rules × one attack × γ ∈ {1, 0} × two seeds on digits with a tiny MLP, 4 steps: two groups of
four runs each (the γ and seed values of a group run vmapped in one program).
"""

from robustjax.configs import default
from robustjax.configs.default import sweep_config


def get_config(variant: str = ''):
  if variant:
    raise ValueError(f'unknown variant {variant!r}; sweep_smoke has none')
  base = default.get_config()
  base.dataset = 'digits'
  base.model = 'mlp(hidden=(8,))'
  base.num_workers = 5
  base.num_byzantine = 1
  base.split = 'gamma'
  base.batch_size = 4
  base.num_steps = 4
  base.eval_every = 2
  base.eval_chunk = 512
  base.backend = 'vmap'
  base.checkpoint_every = 0
  base.progress = False
  grid = {
    'rule': ['trimmed_mean', 'median'],
    'attack': ['sign_flip'],
    'gamma': [1.0, 0.0],
    'seed': [0, 1],
  }
  return sweep_config('smoke', base, grid)
