"""The one resolver (`robustjax.pipeline`) and the rule properties consumers query."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robustjax import aggregators, attacks, pipeline, preaggregators, robustness
from robustjax import stack as stk

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_form_of_a_rule_resolves_to_the_same_pipeline():
  a = pipeline.as_rule('clipping(c=2.0)+nnm+multikrum(m=3)', 2)
  b = pipeline.compose(('multikrum', {'m': 3}), pre=[('clipping', {'c': 2.0}), 'nnm'], f=2)
  c = pipeline.as_rule(('clipping(c=2.0)+nnm+multikrum', {'m': 3}), 2)
  d = pipeline.compose(aggregators.multikrum, pre=[('clipping', {'c': 2.0}), 'nnm'], f=2, m=3)
  assert a == b == c == d and hash(a) == hash(d)
  assert a.spec == 'clipping(c=2.0)+nnm+multikrum(m=3)' and a.name == 'clipping+nnm+multikrum'
  assert pipeline.as_rule(a, 1).f == 1 and pipeline.as_rule(a, 2) is a
  with pytest.raises(ValueError, match='unknown aggregator'):
    pipeline.as_rule('nope', 1)
  with pytest.raises(ValueError, match='f must be a Python int'):
    pipeline.as_rule('mean', -1)


def test_properties_come_from_the_declarations():
  assert pipeline.as_rule('nnm+krum', 1).orthogonally_equivariant
  assert pipeline.as_rule('nnm+krum', 1).distance_based
  assert not pipeline.as_rule('nnm+median', 1).orthogonally_equivariant
  assert pipeline.as_rule('median', 1).coordinatewise
  assert pipeline.as_rule('mda', 1).exponential and pipeline.as_rule('nnm+smea', 1).exponential
  assert pipeline.as_rule('monna', 1).trusted_input == (0,)
  assert pipeline.as_rule('nnm+centered_clipping', 1).center_state
  assert pipeline.as_rule('bucketing(s=2)+mean', 1).stochastic
  assert aggregators.properties('draco').decodes
  # A user callable declares nothing: no equivariance, no bound.
  user = pipeline.as_rule(lambda x: x.mean(0), 1)
  assert not user.orthogonally_equivariant and user.kappa_bound(10) is None


def test_kappa_bounds_compose_through_nnm():
  n, f = 10, 3
  r = f / (n - 2 * f)
  tm = r  # κ⋆ of CWTM, proven exactly (docs/robustness.md)
  assert pipeline.as_rule('trimmed_mean', f).kappa_bound(n) == pytest.approx(tm)
  assert pipeline.as_rule('nnm+trimmed_mean', f).kappa_bound(n) == pytest.approx(
    (8 * f / (n - f)) * (tm + 1)
  )
  assert pipeline.as_rule('multikrum(m=1)', f).kappa_bound(n) == pytest.approx(6 * (1 + r))
  assert pipeline.as_rule('multikrum(m=2)', f).kappa_bound(n) is None
  assert pipeline.as_rule('clipping(c=1.0)+trimmed_mean', f).kappa_bound(n) is None
  assert pipeline.as_rule('trimmed_mean', 5).kappa_bound(10) is None  # 2f >= n
  assert robustness.upper_bound('nnm+trimmed_mean', n, f) == pytest.approx(
    (8 * f / (n - f)) * (tm + 1)
  )


def test_state_protocol_of_a_rule():
  x = jax.random.normal(jax.random.key(0), (7, 4))
  cc = pipeline.as_rule('centered_clipping(tau=0.5)', 1)
  state = cc.init(jnp.zeros(4))
  out1, state = cc.update(x, state)
  out2, state = cc.update(x, state)
  np.testing.assert_allclose(out1, aggregators.centered_clipping(x, f=1, tau=0.5))
  np.testing.assert_allclose(out2, aggregators.centered_clipping(x, f=1, tau=0.5, center=out1))
  np.testing.assert_allclose(state['center'], out2)
  mean = pipeline.as_rule('mean', 1)
  assert mean.init(jnp.zeros(4)) == {} and mean.update(x, {})[1] == {}


def test_optional_key_stages_run_without_a_key():
  x = jnp.ones((5, 3))
  rule = pipeline.as_rule(lambda s, key=None: s.mean(0), 1)
  np.testing.assert_allclose(rule(x), jnp.ones(3))
  with pytest.raises(ValueError, match='needs a jax.random key'):
    pipeline.as_rule('bucketing(s=2)+mean', 1)(x)


def _string_constants(path):
  """String literals of a module that are not docstrings."""
  tree = ast.parse(path.read_text())
  docs = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
      body = getattr(node, 'body', [])
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        docs.add(id(body[0].value))
  return [
    n.value
    for n in ast.walk(tree)
    if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
  ]


def test_no_consumer_lists_rule_or_attack_names():
  """Outside the registries' own modules, no library code names a rule or an attack: consumers
  ask the declared properties. The study definitions (the command's jobs in ``cli/`` and the
  shipped ``configs/``, formerly ``experiments/``) name the rules they compare and label them in
  tables and figures, as a user's config and script do; they are not consumers."""
  # Words that are also something else ('none' compression, float('nan'), a Gaussian family of
  # configurations) are left out; coding.py names its DRACO *code*, which the rule shares.
  generic = {'none', 'nan', 'inf', 'gaussian'}
  names = (set(aggregators.names()) | set(preaggregators.names()) | set(attacks.names())) - generic
  own = {'aggregators', 'attacks', 'preaggregators.py', 'coding.py', 'cli', 'configs'}
  offenders = []
  for path in sorted((ROOT / 'robustjax').rglob('*.py')):
    rel = path.relative_to(ROOT / 'robustjax')
    if rel.parts[0] in own:
      continue
    offenders += [f'{rel}: {v!r}' for v in _string_constants(path) if v in names]
  assert offenders == []


_ROW_SCALED = [
  ('bucketing', {'s': 2}, 'median'),
  ('bucketing', {'s': 3}, 'mean'),
  ('bucketing', {'s': 3}, 'trimmed_mean'),
  ('clipping', {'c': 1.5}, 'mean'),
  ('arc', {}, 'mean'),
  ('arc', {}, 'trimmed_mean'),
  ('clipping', {'c': 1.5}, 'median'),
  ('arc', {}, 'meamed'),
]


@pytest.mark.parametrize('pre, params, agg', _ROW_SCALED)
def test_fused_pipelines_equal_their_stages(pre, params, agg):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 40)).astype(np.float32)
  x[3] = np.nan  # clipped to 0 (clipping, ARC), counted as 0 in its bucket (bucketing)
  x[7] *= 1e30  # finite, clipped
  x = {'a': jnp.asarray(x[:, :30]), 'b': jnp.asarray(x[:, 30:]).reshape(16, 2, 5)}
  key = jax.random.key(4)
  rule = pipeline.compose(agg, pre=[(pre, params)], f=2)
  pre_fn = preaggregators.get(pre)
  if rule.stochastic:  # the pipeline gives the stage the first subkey of its key
    params = dict(params, key=jax.random.split(key, 1)[0])
  staged = aggregators.get(agg)(pre_fn(x, f=2, **params), f=2)
  fused = jax.jit(rule)(x, key)
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(staged)):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize('pre, params, agg', _ROW_SCALED)
def test_fused_pipelines_write_no_intermediate_stack(pre, params, agg):
  # XLA's temporaries of the compiled pipeline: a rescaled or bucketed stack would be >= 1/s of
  # a stack (the unfused pipelines: 1.0).
  # The bound is relative to what this XLA writes for one row reduction with an elementwise
  # producer (max |x_i|, which clipping and ARC need): nothing where XLA fuses the producer into
  # the reduction, one stack where it does not (XLA CPU of jax 0.8, the floor).
  x = jnp.ones((16, 100_000))
  reduction = jax.jit(lambda x: jnp.max(jnp.abs(x), axis=1)).lower(x).compile().memory_analysis()
  rule = pipeline.compose(agg, pre=[(pre, params)], f=2)
  mem = jax.jit(rule).lower(x, jax.random.key(0)).compile().memory_analysis()
  if mem is None or reduction is None:
    pytest.skip('this backend gives no memory analysis')
  assert mem.temp_size_in_bytes < reduction.temp_size_in_bytes + 0.3 * x.size * 4


def test_fused_mean_keeps_the_aggregators_check():
  with pytest.raises(ValueError, match='mean'):
    pipeline.compose('mean', pre=[('bucketing', {'s': 4})], f=2)(
      jnp.ones((8, 3)), jax.random.key(0)
    )


_DISTANCE_FUSED = [('krum', {}), ('multikrum', {}), ('multikrum', {'m': 3})]


@pytest.mark.parametrize('agg, params', _DISTANCE_FUSED)
@pytest.mark.parametrize('case', ['plain', 'one_nan', 'shifted', 'too_many_nan'])
def test_distance_space_pipelines_equal_their_stages(agg, params, case):
  # NNM then Krum / MultiKrum run from one Gram product (W G Wᵀ): the same aggregate as the
  # stages one after the other, non-finite inputs included.
  rng = np.random.default_rng(7)
  x = rng.normal(size=(16, 40)).astype(np.float32)
  if case == 'one_nan':
    x[3] = np.nan
  elif case == 'shifted':
    x[-3:] += 50.0
  elif case == 'too_many_nan':
    x[:4, 0] = np.inf  # more non-finite inputs than f = 3: the aggregate is NaN either way
  x = {'a': jnp.asarray(x[:, :30]), 'b': jnp.asarray(x[:, 30:]).reshape(16, 2, 5)}
  rule = pipeline.compose((agg, params), pre=['nnm'], f=3)
  fused = jax.jit(rule)(x)
  staged = aggregators.get(agg)(preaggregators.get('nnm')(x, f=3), f=3, **params)
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(staged)):
    if case == 'too_many_nan':
      assert np.all(np.isnan(a)) and np.all(np.isnan(b))
    else:
      assert np.all(np.isfinite(a))
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_distance_space_pipeline_writes_no_mixed_stack():
  x = jnp.ones((16, 100_000))
  rule = pipeline.compose('multikrum', pre=['nnm'], f=3)
  mem = jax.jit(rule).lower(x).compile().memory_analysis()
  staged = jax.jit(lambda x: aggregators.get('multikrum')(preaggregators.get('nnm')(x, f=3), f=3))
  mem_staged = staged.lower(x).compile().memory_analysis()
  if mem is None or mem_staged is None:
    pytest.skip('this backend gives no memory analysis')
  # The staged pipeline writes NNM's mixed stack (one stack); the fused one does not.
  assert mem.temp_size_in_bytes < mem_staged.temp_size_in_bytes - 0.5 * x.size * 4


def test_distance_space_pipeline_keeps_the_rules_checks():
  with pytest.raises(ValueError, match='krum'):
    pipeline.compose('krum', pre=['nnm'], f=3)(jnp.ones((8, 3)))
  with pytest.raises(ValueError, match='m must be <= n'):
    pipeline.compose(('multikrum', {'m': 20}), pre=['nnm'], f=3)(jnp.ones((16, 3)))


_MIXED_COORDINATEWISE = ['mean', 'median', 'trimmed_mean', 'meamed']


@pytest.mark.parametrize('agg', _MIXED_COORDINATEWISE)
@pytest.mark.parametrize('case', ['plain', 'one_nan', 'too_many_nan', 'many_blocks', 'n130'])
def test_mixed_coordinatewise_pipelines_equal_their_stages(agg, case):
  # NNM then a coordinate-wise rule over column blocks (the mixed stack never written): the
  # same aggregate as the stages one after the other. 'many_blocks': the stack spans several
  # column blocks on CPU; 'n130': the aggregator beyond its unrolled network.
  n, d, f = (130, 600, 16) if case == 'n130' else (16, 40, 3)
  if case == 'many_blocks':
    d = 3 * (1 << 18) // n + 37  # three blocks, and a fourth overlapping the third
  rng = np.random.default_rng(8)
  x = (rng.normal(size=(n, d)) + 2.0).astype(np.float32)
  x[-2:] += 30.0  # far inputs, finite
  if case in ('one_nan', 'many_blocks', 'n130'):
    x[3, ::7] = np.nan
  elif case == 'too_many_nan':
    x[:4, 0] = np.inf  # more non-finite inputs than f = 3: the aggregate is NaN either way
  x = jnp.asarray(x)
  fused = jax.jit(pipeline.compose(agg, pre=['nnm'], f=f))(x)
  staged = aggregators.get(agg)(preaggregators.get('nnm')(x, f=f), f=f)
  assert fused.shape == staged.shape and fused.dtype == staged.dtype
  if case == 'too_many_nan':
    assert np.all(np.isnan(fused)) and np.all(np.isnan(staged))
    return
  # The mean is not robust: NNM's NaN output for the NaN input reaches it, staged or fused.
  assert np.all(np.isfinite(fused)) or (agg == 'mean' and case != 'plain')
  close = np.isclose(fused, staged, rtol=2e-5, atol=2e-5) | (np.isnan(fused) & np.isnan(staged))
  # MeaMed's window may flip where two distances to the median tie within the mixing's rounding
  # (the blocked product sums in another order): a coordinate or two, by a small step.
  assert np.all(close) or (agg == 'meamed' and np.sum(~close) <= 2)
  np.testing.assert_allclose(fused, staged, rtol=1e-3, atol=1e-3)


def test_mixed_coordinatewise_pipeline_writes_no_mixed_stack():
  x = jnp.ones((16, 200_000))
  rule = pipeline.compose('trimmed_mean', pre=['nnm'], f=3)
  mem = jax.jit(rule).lower(x).compile().memory_analysis()
  staged = jax.jit(lambda x: aggregators.trimmed_mean(preaggregators.nnm(x, f=3), f=3))
  mem_staged = staged.lower(x).compile().memory_analysis()
  if mem is None or mem_staged is None:
    pytest.skip('this backend gives no memory analysis')
  # The staged pipeline writes NNM's mixed stack (one stack); the fused one a few blocks.
  assert mem.temp_size_in_bytes < mem_staged.temp_size_in_bytes - 0.5 * x.size * 4


@pytest.mark.parametrize('narrow', [(240, 4), (240, 100, 4)])
@pytest.mark.parametrize('agg', ['median', 'trimmed_mean'])
def test_mixed_coordinatewise_pipeline_on_a_pytree_equals_the_stages(monkeypatch, agg, narrow):
  # A pytree through one loop over the blocks of all its leaves (blocks of 256 columns here):
  # a leaf over several blocks whose last one overlaps, one of exactly a block, and narrow ones
  # concatenated into one more matrix (244 columns padded to a block, or 344 in two blocks);
  # NaN entries in several leaves, far inputs.
  monkeypatch.setattr(stk, '_column_block', lambda n, d: 256 if d > 512 else None)
  widths = (700, 256, *narrow)
  rng = np.random.default_rng(9)
  x = (rng.normal(size=(16, sum(widths))) + 1.0).astype(np.float32)
  x[3, ::5] = np.nan
  x[-2:] += 30.0
  cuts = np.cumsum(widths)[:-1]
  tree = {f'leaf{j}': jnp.asarray(p) for j, p in enumerate(np.split(x, cuts, axis=1))}
  tree['leaf2'] = tree['leaf2'].reshape(16, 6, 40)
  rule = pipeline.compose(agg, pre=['nnm'], f=3)
  fused = jax.jit(rule)(tree)
  staged = aggregators.get(agg)(preaggregators.nnm(tree, f=3), f=3)
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(staged)):
    assert a.shape == b.shape and a.dtype == b.dtype and np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
  # No mixed stack among the temporaries (the stages write one, 16 × 1,200 floats).
  mem = jax.jit(rule).lower(tree).compile().memory_analysis()
  mem_staged = (
    jax.jit(lambda t: aggregators.get(agg)(preaggregators.nnm(t, f=3), f=3))
    .lower(tree)
    .compile()
    .memory_analysis()
  )
  if mem is not None and mem_staged is not None:
    assert mem.temp_size_in_bytes < mem_staged.temp_size_in_bytes - 0.5 * x.size * 4


def test_mixed_coordinatewise_pipeline_on_leaves_of_two_dtypes_runs_the_stages():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(16, 40)).astype(np.float32)
  x[3, ::5] = np.nan
  tree = {'a': jnp.asarray(x[:, :30]), 'b': jnp.asarray(x[:, 30:], jnp.bfloat16).reshape(16, 2, 5)}
  fused = jax.jit(pipeline.compose('trimmed_mean', pre=['nnm'], f=3))(tree)
  staged = aggregators.trimmed_mean(preaggregators.nnm(tree, f=3), f=3)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), fused, staged)


def test_mixed_coordinatewise_fusion_on_a_pytree_only_on_cpu(monkeypatch):
  # Off CPU the blocks are one piece: a pytree would be concatenated first (a copy of the stack
  # beside the mixed one), so it runs the stages there; a one-leaf stack is fused everywhere.
  two = [jnp.ones((4, 3)), jnp.ones((4, 2))]
  assert pipeline._fuses_mixing(two) == (jax.default_backend() == 'cpu')
  assert not pipeline._fuses_mixing([two[0], two[1].astype(jnp.bfloat16)])
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert not pipeline._fuses_mixing(two)
  assert pipeline._fuses_mixing(two[:1])
