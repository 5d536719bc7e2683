"""MultiKrum in practice (`robustjax multikrum`): a mis-specified f, f unknown, many workers,
clipping and differential privacy.

On the embedded digits data (an MLP of 32, n = 20 workers, Dirichlet(0.5) split: heterogeneous,
so that throwing honest gradients away costs something), D-SGD with worker momentum 0.9:

- ``misspecified``: the true number of Byzantine workers b against the f declared to the rule,
  for MultiKrum, Krum, CWTM, NNM + CWTM, NNM + MultiKrum, under ALIE, IPM (ε = 0.5), sign flipping
  and the optimal ALIE; and the adaptive rules (`gap_multikrum`, `adaptive_multikrum`) given only
  f_max;
- ``privacy``: worker-level clipping with local or central Gaussian noise, ε at δ = 1e-5, for
  MultiKrum, CWTM and the NNM compositions, f ∈ {0, 2, 4} under ALIE; and what the noise does to
  MultiKrum's selection (the share of Byzantine inputs it keeps, on synthetic stacks);
- ``sketch``: the approximate MultiKrum's selection agreement with the exact rule and its κ̂
  against the sketch dimension k;
- ``kappa``: κ̂ of the adaptive rules with the robustness search.

Variants: ``smoke`` (seconds: what the tests run).
"""

from ml_collections import config_dict

from robustjax.configs import default


def get_config(variant: str = '') -> config_dict.ConfigDict:
  base = default.get_config()
  base.dataset = 'digits'
  base.model = 'mlp(hidden=(32,))'
  base.split = 'dirichlet'
  base.alpha = 0.5
  base.num_workers = 20
  base.batch_size = 16
  base.learning_rate = 0.1
  base.momentum = 0.9
  base.num_steps = 200
  base.eval_every = 20
  base.log_every = 0
  base.checkpoint_every = 0
  base.progress = False
  base.backend = 'vmap'
  c = config_dict.ConfigDict()
  c.base = base
  c.studies = ('misspecified', 'privacy', 'sketch', 'kappa')
  c.num_seeds = 3
  c.rules = ('multikrum', 'krum', 'trimmed_mean', 'nnm+trimmed_mean', 'nnm+multikrum')
  c.adaptive_rules = ('gap_multikrum', 'adaptive_multikrum')
  c.attacks = ('alie', 'ipm(eps=0.5)', 'sign_flip', 'optimal_alie')
  c.true_byzantine = (0, 2, 4, 6)
  c.declared = (0, 2, 4, 6)  # the f told to the rule; the adaptive rules get f_max = max
  c.target = 0.8  # convergence speed: steps to reach this fraction of the clean run's accuracy
  c.privacy = config_dict.ConfigDict(
    {
      'rules': ('multikrum', 'trimmed_mean', 'nnm+trimmed_mean', 'nnm+multikrum'),
      'byzantine': (0, 2, 4),
      'attack': 'alie',
      'clip': 1.0,
      'local_noise': (0.0, 0.25, 0.5, 1.0, 2.0),
      'central_noise': (0.5, 1.0, 2.0, 4.0),
      'delta': 1e-5,
      # The selection study: n inputs of dimension dim, honest ones N(μ, I), f from an attack.
      'selection_n': 20,
      'selection_f': 4,
      'selection_dim': 2000,
      'selection_trials': 200,
    }
  )
  c.sketch = config_dict.ConfigDict(
    {
      'ns': (64, 256, 1024),
      'dim': 20000,
      'f_fraction': 0.2,
      'ks': (8, 16, 32, 64, 128, 256, 512),
      'attacks': ('alie', 'sign_flip', 'gaussian'),
      'trials': 3,
      'kappa_n': 20,
      'kappa_f': 4,
      'kappa_dim': 64,
      'kappa_ks': (4, 8, 16, 32, 64),
      'kappa_budget': 4000,
    }
  )
  c.kappa = config_dict.ConfigDict({'ns': (10, 20), 'budget': 4000})
  if variant == 'smoke':
    c.base.num_workers = 10
    c.base.num_steps = 4
    c.base.eval_every = 2
    c.base.model = 'mlp(hidden=(8,))'
    c.num_seeds = 2
    c.rules = ('multikrum', 'trimmed_mean')
    c.attacks = ('alie',)
    c.true_byzantine = (0, 2)
    c.declared = (0, 2)
    c.privacy.rules = ('multikrum',)
    c.privacy.byzantine = (2,)
    c.privacy.local_noise = (0.0, 1.0)
    c.privacy.central_noise = (1.0,)
    c.privacy.selection_trials = 4
    c.privacy.selection_dim = 50
    c.sketch.ns = (40,)
    c.sketch.dim = 300
    c.sketch.ks = (8, 64)
    c.sketch.attacks = ('alie',)
    c.sketch.trials = 1
    c.sketch.kappa_ks = (8,)
    c.sketch.kappa_budget = 200
    c.kappa.ns = (10,)
    c.kappa.budget = 200
  elif variant:
    raise ValueError(f'multikrum config: unknown variant {variant!r} (known: smoke)')
  return c
