"""Tests for `robustjax kappa` (robustjax/cli/kappa.py): the MultiKrum evaluator, witnesses."""

import jax
import numpy as np
import pytest

from robustjax import robustness as R
from robustjax.cli import kappa as study


def test_multikrum_evaluator_matches_the_registered_rule():
  n, f = 10, 2
  specs = study.multikrum_specs(n, f)
  assert len(specs) == 2 * (n - f)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, n, 3)).astype(np.float32)
  x[:16, :f] += 20.0  # a Byzantine group
  x[16:32] = np.round(x[16:32])  # ties in the scores
  masks = np.stack([rng.permutation(n) < n - f for _ in range(x.shape[0])])
  fast = np.asarray(study.multikrum_evaluator(n, f)(x, masks))
  for col, (_, spec) in enumerate(specs):
    want = np.asarray(R.ratios(spec, x, masks, f=f))
    np.testing.assert_allclose(fast[:, col], want, rtol=2e-4, atol=1e-6)


def test_witness_archive_roundtrip(tmp_path):
  stack = np.arange(12, dtype=np.float32).reshape(4, 3)
  honest = np.array([True, True, False, True])
  key = 'nnm+multikrum(m=2)|n=4|f=1'
  study._store_witnesses(str(tmp_path), 'kappa', 4, {key: (stack, honest)})
  study._store_witnesses(str(tmp_path), 'kappa', 4, {'median|n=4|f=1': (stack, ~honest)})
  s, h = study.load_witness(str(tmp_path), 'kappa', 4, key)
  np.testing.assert_array_equal(s, stack)
  np.testing.assert_array_equal(h, honest)
  assert study.load_witness(str(tmp_path), 'kappa', 4, 'median|n=4|f=1')[1].sum() == 1


@pytest.mark.slow
def test_multikrum_study_cells_recheck():
  est = R.estimate_kappas(
    [s for _, s in study.multikrum_specs(10, 2)],
    10,
    2,
    4,
    jax.random.key(0),
    1024,
    evaluate=study.multikrum_evaluator(10, 2),
  )
  for (_, spec), e in zip(study.multikrum_specs(10, 2), est):
    assert R.ratio(spec, e.witness.stack, e.witness.honest) == e.kappa
    assert e.kappa >= R.lower_bound(10, 2) * (1 - 1e-9)
