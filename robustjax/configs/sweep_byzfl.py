"""Sweep: ByzFL's benchmark setting (Allouah et al.; ByzFL ``benchmark``), on the digits data.

ByzFL's published grid: MNIST CNN, 10 honest workers, f ∈ {1, 2, 3, 4}, gamma-similarity
γ ∈ {1, 0.66, 0.33, 0}, attacks sign flip / optimal IPM / optimal ALIE, static clipping (c = 2) +
NNM before geometric median or trimmed mean, D-SGD 800 steps, lr 0.1, worker momentum 0.9,
weight decay 1e-4, batch 25. Worst case = min over attacks of the test accuracy.

Variants (``robustjax/configs/sweep_byzfl.py:<variant>``):
  ``''`` (default): the full published grid, 800 steps, the default CNN, on ``digits``
    (``dataset='mnist'`` through the Hugging Face loader where it can be downloaded: ``mnist``).
  ``'mnist'``: the same on MNIST.
  ``'fast'``: what was run for docs/reproductions.md on a shared 2-core CPU: the same grid and
    optimisation settings (800 steps; seeds 0 and 1) with a one-hidden-layer MLP (64 units) instead
    of the CNN, ByzFL's geometric-median budget (ν = 0.1, 3 Weiszfeld iterations) and a coarser
    optimal-attack search (see the docstring of `get_config`).
  ``'fast_baseline'``: the no-attack reference of ``'fast'`` (f = 0, the mean).
  ``'smoke'``: a few steps on a tiny grid (tests).
"""

from robustjax.configs import default
from robustjax.configs.default import sweep_config  # noqa: F401  (resolved by the sweep CLI's loader)

RULES = ('clipping(c=2.0)+nnm+geometric_median', 'clipping(c=2.0)+nnm+trimmed_mean')
ATTACKS = ('sign_flip', 'optimal_ipm', 'optimal_alie')
GAMMAS = (1.0, 0.66, 0.33, 0.0)
NUM_HONEST = 10
# ByzFL's published worst-case accuracies (GM / TM) on MNIST, f = 1..4, γ = 1 and γ = 0.
PUBLISHED = {
  ('geometric_median', 1.0): (0.98, 0.98, 0.98, 0.97),
  ('trimmed_mean', 1.0): (0.98, 0.98, 0.98, 0.98),
  ('geometric_median', 0.0): (0.87, 0.56, 0.26, 0.27),
  ('trimmed_mean', 0.0): (0.87, 0.61, 0.26, 0.21),
}


def get_config(variant: str = ''):
  """The sweep: ``{'name', 'base', 'grid'}``.

  ``'fast'`` cuts (because the full grid takes hours on 2 shared CPU cores): CNN → MLP with one
  hidden layer of 64 units; geometric median with ν = 0.1 and 3 iterations (ByzFL's own
  setting; robustjax's default is RFA's ν = 1e-6, up to 100 iterations); optimal attacks search
  8 scales + 2 refinement rounds of 4 (16 defender evaluations) instead of 16 + 4 × 4 (32).
  """
  base = default.get_config()
  base.dataset = 'digits'
  base.model = 'cnn'
  base.split = 'gamma'
  base.batch_size = 25
  base.learning_rate = 0.1
  base.momentum = 0.9
  base.weight_decay = 1e-4
  base.num_steps = 800
  base.eval_every = 50
  base.backend = 'vmap'
  base.checkpoint_every = 0
  base.progress = False
  attacks = list(ATTACKS)
  fs = [1, 2, 3, 4]
  gammas = list(GAMMAS)
  rules = list(RULES)
  seeds = [0]
  name = 'byzfl'
  if variant == 'mnist':
    base.dataset = 'mnist'
    name = 'byzfl_mnist'
  elif variant == 'fast':
    base.model = 'mlp(hidden=(64,))'
    search = 'num_scales=8, refine_rounds=2, num_refine=4'
    attacks = ['sign_flip', f'optimal_ipm({search})', f'optimal_alie({search})']
    rules = [r.replace('geometric_median', 'geometric_median(nu=0.1, iters=3)') for r in rules]
    seeds = [0, 1]
    name = 'byzfl_fast'
  elif variant == 'fast_baseline':
    # The no-attack reference: 10 honest workers, f = 0, the plain mean, same settings as 'fast'.
    base.model = 'mlp(hidden=(64,))'
    rules, attacks, fs, seeds = ['mean'], ['none'], [0], [0, 1]
    name = 'byzfl_fast_baseline'
  elif variant == 'smoke':
    base.num_steps = 4
    base.eval_every = 2
    base.model = 'mlp(hidden=(8,))'
    base.batch_size = 4
    fs, gammas, seeds = [1], [1.0, 0.0], [0, 1]
    rules = ['clipping(c=2.0)+nnm+trimmed_mean']
    attacks = ['sign_flip', 'optimal_ipm(num_scales=4, refine_rounds=0)']
    name = 'byzfl_smoke'
  elif variant:
    raise ValueError(f'unknown variant {variant!r}; known: mnist, fast, fast_baseline, smoke')
  grid = {
    'rule': rules,
    'workers': [{'num_workers': NUM_HONEST + f, 'num_byzantine': f} for f in fs],
    'attack': attacks,
    'gamma': gammas,
    'seed': seeds,
  }
  return sweep_config(name, base, grid)
