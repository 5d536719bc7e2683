"""Tests for robustjax.compression: unbiasedness and variance (Monte-Carlo), contraction, EF."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustjax import compression as C

DRAWS = 20000


def _x(dim=24, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=dim).astype(np.float32) * np.linspace(0.1, 2.0, dim).astype(np.float32)


def _draws(comp, x):
  keys = jax.random.split(jax.random.key(1), DRAWS)
  return np.asarray(jax.jit(jax.vmap(lambda k: comp(jnp.asarray(x), k)))(keys), np.float64)


def _check_unbiased(q, x):
  # coordinate-wise: |mean − x| within 5 standard errors
  se = q.std(0) / np.sqrt(q.shape[0]) + 1e-7
  assert np.all(np.abs(q.mean(0) - x) <= 5 * se + 1e-6)


def test_rand_k_unbiased_with_exact_variance():
  x = _x()
  comp = C.RandK(k=6)
  q = _draws(comp, x)
  _check_unbiased(q, x)
  assert np.all(np.count_nonzero(q, axis=1) <= 6)
  var = np.mean(np.sum((q - x) ** 2, axis=1))
  omega = comp.omega(x.size)
  assert omega == pytest.approx(24 / 6 - 1)
  assert var == pytest.approx(omega * np.sum(x.astype(np.float64) ** 2), rel=0.05)


@pytest.mark.parametrize('levels', [1, 4])
def test_qsgd_unbiased_and_variance(levels):
  x = _x(seed=levels)
  comp = C.QSGD(levels=levels)
  q = _draws(comp, x)
  _check_unbiased(q, x)
  x64 = x.astype(np.float64)
  norm = np.linalg.norm(x64)
  r = np.abs(x64) / norm * levels
  p = r - np.floor(r)
  exact = norm**2 / levels**2 * np.sum(p * (1 - p))  # the variance from the definition
  var = np.mean(np.sum((q - x64) ** 2, axis=1))
  assert var == pytest.approx(exact, rel=0.05)
  assert var <= comp.omega(x.size) * norm**2 * 1.05
  # values lie on the grid ‖x‖·l/s
  levels_seen = np.abs(q[:100]) / norm * levels
  np.testing.assert_allclose(levels_seen, np.round(levels_seen), atol=1e-3)
  # zero in, zero out
  np.testing.assert_array_equal(comp(jnp.zeros(5), jax.random.key(0)), 0.0)


def test_top_k_matches_reference_and_contracts():
  x = _x(seed=3)
  comp = C.TopK(k=5)
  out = np.asarray(comp(jnp.asarray(x)))
  ref = np.zeros_like(x)
  idx = np.argsort(-np.abs(x))[:5]
  ref[idx] = x[idx]
  np.testing.assert_array_equal(out, ref)
  err = np.sum((out - x) ** 2)
  assert err <= (1 - comp.delta(x.size)) * np.sum(x**2) + 1e-6
  assert not comp.unbiased


def test_scaled_sign_matches_reference_and_contraction_identity():
  x = _x(seed=4)
  out = np.asarray(C.ScaledSign()(jnp.asarray(x)), np.float64)
  x64 = x.astype(np.float64)
  ref = np.abs(x64).sum() / x.size * np.sign(x64)
  np.testing.assert_allclose(out, ref, rtol=1e-6)
  err = np.sum((out - x64) ** 2)
  np.testing.assert_allclose(err, np.sum(x64**2) - np.abs(x64).sum() ** 2 / x.size, rtol=1e-5)
  assert err <= (1 - C.ScaledSign().delta(x.size)) * np.sum(x64**2)


@pytest.mark.parametrize('comp', [C.TopK(k=2), C.ScaledSign()])
def test_error_feedback_accumulation(comp):
  # Σ_t sent_t = Σ_t c_t − e_T, and the average of what was sent tracks the average input
  ef = C.ErrorFeedback(comp)
  rng = np.random.default_rng(0)
  cs = rng.normal(size=(200, 10)).astype(np.float32) + 1.0
  e = ef.init(jnp.zeros(10))
  total = np.zeros(10)
  step = jax.jit(ef.update)
  for t, c in enumerate(cs):
    sent, e = step(jnp.asarray(c), e, jax.random.key(t))
    total += np.asarray(sent, np.float64)
  np.testing.assert_allclose(
    total + np.asarray(e), cs.astype(np.float64).sum(0), rtol=1e-4, atol=1e-3
  )
  # contractive: the memory stays bounded, so the averages agree
  np.testing.assert_allclose(total / len(cs), cs.mean(0), atol=0.1)


def test_pytree_messages_and_bits():
  tree = {'a': jnp.arange(6.0).reshape(2, 3) + 1, 'b': -jnp.ones(4, jnp.float32)}
  assert C.message_size(tree) == 10
  out = C.TopK(k=3)(tree)
  assert jax.tree.structure(out) == jax.tree.structure(tree)
  np.testing.assert_array_equal(out['a'], [[0, 0, 0], [4, 5, 6]])
  assert C.Identity().bits(10) == 320
  assert C.RandK(k=3).bits(10) == 3 * (32 + 4)
  assert C.QSGD(levels=16).bits(100) == 32 + 100 * 6
  assert C.ScaledSign().bits(100) == 132
  assert C.RandK(fraction=0.25).omega(100) == pytest.approx(3.0)
  assert C.QSGD(levels=4).omega(100) == pytest.approx(2.5)
  assert C.get('qsgd') is C.QSGD


def test_compress_stack_keys_independent_or_shared():
  stack = jnp.tile(jnp.asarray(_x(10))[None], (4, 1))
  out, st = C.compress_stack(C.QSGD(2), stack, (), jax.random.key(0), key_ids=[0, 0, 1, 1])
  out = np.asarray(out)
  assert st == ()
  np.testing.assert_array_equal(out[0], out[1])
  np.testing.assert_array_equal(out[2], out[3])
  assert not np.array_equal(out[0], out[2])
  ef = C.ErrorFeedback(C.TopK(k=2))
  sent, state = C.compress_stack(ef, stack, ef.init(stack), None)
  np.testing.assert_allclose(sent + state, stack, rtol=1e-6)


def test_validation_errors():
  x = jnp.ones(8)
  with pytest.raises(ValueError, match='k <= D'):
    C.RandK(k=9)(x, jax.random.key(0))
  with pytest.raises(ValueError, match='exactly one of k and fraction'):
    C.TopK(k=2, fraction=0.5)(x)
  with pytest.raises(ValueError, match='needs an explicit PRNG key'):
    C.RandK(k=2)(x)
  with pytest.raises(ValueError, match='needs an explicit PRNG key'):
    C.compress_stack(C.QSGD(4), jnp.ones((3, 8)), (), None)
  with pytest.raises(ValueError, match='needs an explicit PRNG key'):
    C.compress_stack(C.ErrorFeedback(C.RandK(k=2)), jnp.ones((3, 8)), jnp.zeros((3, 8)), None)
  with pytest.raises(ValueError, match='levels must be an int >= 1'):
    C.QSGD(levels=0)(x, jax.random.key(0))
  with pytest.raises(ValueError, match='unknown compressor'):
    C.get('zip')
  assert C.make('ef+top_k(k=2)') == C.ErrorFeedback(C.TopK(k=2))
  assert C.make('qsgd(levels=3)') == C.QSGD(levels=3)
  with pytest.raises(ValueError, match='compressor .rand_k.'):
    C.make('rand_k(q=1)')
