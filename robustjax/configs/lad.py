"""The LAD / Com-LAD experiment (arXiv:2603.28780), as reconstructed in docs/gradient_coding.md.

Synthetic linear regression (dimension 100, 100 samples, one sample per subset, heterogeneity σ_H,
a small ridge so that the subset gradients disagree at the optimum), n = 100 workers, f in
{5, 10, 20} Byzantine (the last f) running ALIE on the coded vectors; rules: averaging, CWTM,
NNM + CWTM, each with plain assignment (d = 1, fixed) and LAD (re-drawn cyclic code,
d in {1, 2, 5, 10, 20, 50}); DRACO (r = 2f + 1); every method also compressed (QSGD, Com-LAD).

Variants: ``--config=robustjax/configs/lad.py:smoke`` (tiny, seconds; what the tests run),
``:sign_flip`` (the same sweep under the sign-flipping attack).
"""

from ml_collections import config_dict


def get_config(variant: str = '') -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  # Problem (robustjax.data.synthetic_linear_regression).
  c.num_samples = 100
  c.dim = 100
  c.heterogeneity = 1.0  # σ_H
  c.noise = 0.0
  c.ridge = 0.25  # λ: F(w) = (1/N) Σ_j ½(⟨a_j, w⟩ − b_j)² + (λ/2)‖w‖²
  # Workers and threat model.
  c.num_workers = 100  # n = number of subsets (num_samples / n samples per subset)
  c.byzantine = (5, 10, 20)  # f values
  c.attack = 'alie'
  # Methods.
  c.rules = ('mean', 'trimmed_mean', 'nnm+trimmed_mean')
  c.redundancies = (1, 2, 5, 10, 20, 50)  # LAD's d
  c.draco = True
  c.compressor = 'qsgd'  # Com-LAD compressor: qsgd | rand_k | none
  c.qsgd_levels = 16
  c.rand_k_fraction = 0.25
  # Optimisation: full-batch gradient descent.
  c.num_steps = 300
  c.learning_rate = 0.0  # 0: 1 / L, L the largest eigenvalue of the Hessian (max over seeds)
  c.num_seeds = 5
  c.seed = 0
  # Outputs.
  c.figures_dir = ''  # '': <workdir>/figures; 'docs/figures' to regenerate the published ones
  c.figure_prefix = 'gradient_coding'  # figures: <figures_dir>/<prefix>_{iterations,...}.png
  c.doc = 'docs/gradient_coding.md'  # its results block is rewritten when update_doc is set
  c.update_doc = False
  c.make_figures = True
  c.replot_from = ''  # a workdir of an earlier run: redraw its figures and table without rerunning
  if variant == 'sign_flip':
    c.attack = 'sign_flip'
    c.figure_prefix = 'gradient_coding_sign_flip'
  elif variant == 'smoke':
    c.num_samples = 16
    c.dim = 8
    c.num_workers = 16
    c.byzantine = (2,)
    c.rules = ('trimmed_mean', 'nnm+trimmed_mean')
    c.redundancies = (2,)
    c.num_steps = 5
    c.num_seeds = 2
    c.make_figures = False
  elif variant:
    raise ValueError(f'lad config: unknown variant {variant!r} (known: smoke, sign_flip)')
  return c
