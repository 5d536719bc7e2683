"""The LAD / Com-LAD study (arXiv:2603.28780), in the paper's regime and beyond it.

Synthetic linear regression (robustjax.data.synthetic_linear_regression; σ_H enters the
covariates) in two regimes: interpolating (the paper's 100 samples in dimension 100, one sample
per subset, F⋆ = 0) and non-interpolating (500 samples, 5 per subset, label noise 1: F⋆ > 0),
n = 100 workers, f ∈ {10, 20}; full-batch gradient descent with a constant step 1/L. Methods: VA,
CWTM, CWTM + NNM with the fixed assignment (d = 1), LAD-<rule> for d ∈ {1, 2, 5, 10, 20, 50}, DRACO
at load 2f + 1; compressed: Com-VA, Com-CWTM, Com-CWTM+NNM, Com-LAD with RandK (k = 10 %, ω = 9)
and QSGD (4 levels, ω = 2.5). Scenario groups, one factor at a time from the baseline
(interpolating, σ_H = 1, ALIE, Byzantine workers contiguous): ``core`` (both regimes × σ_H × f),
``attacks``, ``placements``, ``compression``; ``real``: the same comparison on the embedded digits
data (logistic regression, label-sorted split) with DRACO's exact vote (n = 27, r = 9).

Variants: ``smoke`` (tiny, seconds: what the tests run).
"""

from ml_collections import config_dict


def get_config(variant: str = '') -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.num_workers = 100
  # name -> synthetic_linear_regression arguments (num_subsets = num_workers).
  c.regimes = config_dict.ConfigDict(
    {
      'interpolating': {'num_samples': 100, 'dim': 100, 'noise': 0.0},
      'noisy': {'num_samples': 500, 'dim': 100, 'noise': 1.0},
    }
  )
  c.heterogeneity = (0.0, 1.0, 2.0)  # σ_H, swept in each regime
  c.byzantine = (10, 20)  # f
  c.rules = ('mean', 'trimmed_mean', 'nnm+trimmed_mean')
  c.redundancies = (1, 2, 5, 10, 20, 50)  # LAD's d (π re-drawn every step)
  c.attacks = ('alie', 'sign_flip', 'ipm', 'gaussian', 'optimal_alie')
  c.placements = ('last', 'random', 'redrawn')  # which workers are Byzantine (coding.Code)
  c.compressors = ('rand_k(fraction=0.1)', 'qsgd(levels=4)')
  # The baseline every group varies one factor of.
  c.baseline = config_dict.ConfigDict(
    {'regime': 'interpolating', 'heterogeneity': 1.0, 'attack': 'alie', 'placement': 'last'}
  )
  c.groups = ('core', 'attacks', 'placements', 'compression', 'real')
  # Optimisation: full-batch gradient descent, constant step.
  c.num_steps = 1000
  c.learning_rate = 0.0  # 0: 1 / L, L the largest Hessian eigenvalue (max over the seeds)
  c.num_seeds = 5
  c.seed = 0
  # The real task: digits, logistic regression, label-sorted split, minibatch SGD.
  c.real = config_dict.ConfigDict(
    {
      'num_workers': 27,
      'num_byzantine': 4,  # DRACO's r = 2f + 1 = 9 divides 27: its exact vote at load 9
      'model': 'logistic',
      'split': 'extreme',
      'attack': 'alie',
      'batch_size': 16,
      'learning_rate': 0.5,
      'momentum': 0.0,
      'num_steps': 300,
      'eval_every': 10,
      'redundancies': (1, 2, 5, 9),
      'compressor': 'rand_k(fraction=0.1)',
      'num_seeds': 5,
    }
  )
  # Outputs: <workdir>/scenarios/*.npz (resumable), summary.json, figures; docs only when asked.
  c.figures_dir = ''  # '': <workdir>/figures; 'docs/figures' to regenerate the published ones
  c.doc = 'docs/gradient_coding.md'  # its results blocks are rewritten when update_doc is set
  c.update_doc = False
  c.make_figures = True
  if variant == 'smoke':
    c.num_workers = 16
    c.regimes = config_dict.ConfigDict(
      {
        'interpolating': {'num_samples': 16, 'dim': 16, 'noise': 0.0},
        'noisy': {'num_samples': 32, 'dim': 8, 'noise': 1.0},
      }
    )
    c.heterogeneity = (1.0,)
    c.byzantine = (2,)
    c.rules = ('trimmed_mean',)
    c.redundancies = (1, 4)
    c.attacks = ('alie', 'optimal_alie')
    c.placements = ('last', 'redrawn')
    c.compressors = ('rand_k(fraction=0.25)',)
    c.num_steps = 5
    c.num_seeds = 2
    c.real.num_workers = 9
    c.real.num_byzantine = 1  # r = 3 divides 9
    c.real.num_steps = 4
    c.real.eval_every = 2
    c.real.redundancies = (1, 3)
    c.real.num_seeds = 2
    c.make_figures = False
  elif variant:
    raise ValueError(f'lad config: unknown variant {variant!r} (known: smoke)')
  return c
