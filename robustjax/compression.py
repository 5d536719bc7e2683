"""Compressors for the messages workers send (Com-LAD), and error feedback.

A compressor is a frozen, hashable dataclass (so it can be a static `jit` argument) called as
`compressor(tree, key) -> tree` on *one* message (a pytree, no worker axis); `compress_stack`
applies it to every worker of a stack with independent (or deliberately shared) keys. The message
is treated as one vector: the leaves are raveled and concatenated (`jax.flatten_util`), so "k
coordinates" means k coordinates of the whole pytree.

Two families, two constants (D is the message's total number of coordinates):

* **unbiased**, E[Q(x)] = x and E‖Q(x) − x‖² <= ω ‖x‖²: `RandK` (ω = D/k − 1, exact),
  `QSGD` (ω = min(D/s², √D/s), Alistarh et al. 2017, Lemma 3.1). Com-LAD sends Q(c_i).
* **biased contractive**, ‖C(x) − x‖² <= (1 − δ) ‖x‖²: `TopK` (δ = k/D), `ScaledSign`
  (δ = ‖x‖₁²/(D‖x‖₂²) >= 1/D). Use them with `ErrorFeedback`: e ← e + c − C(e + c), send
  C(e + c) (Seide et al. 2014; Karimireddy et al. 2019, EF-SignSGD; Stich et al. 2018).

`bits(D)` counts the bits of one message with a plain encoding (32-bit floats, ⌈log₂ D⌉-bit
indices, no entropy coding), the communication metric of the training engine (`robustjax.training`).

Every source of randomness is an explicit `jax.random` key.

References:
  Li, Allouah, Guerraoui, Skoglund, Xiao, arXiv:2603.28780, 2026 (Com-LAD: compressed coded
  vectors).
  Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-Efficient SGD via Gradient
  Quantization and Encoding", NeurIPS 2017.
  Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018 (rand-k, top-k).
  Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes SignSGD and other Gradient
  Compression Schemes", ICML 2019 (scaled sign, error feedback).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from robustjax._checks import check_positive_int, num_workers
from robustjax._registry import Registry

__all__ = [
  'Compressor',
  'Identity',
  'RandK',
  'QSGD',
  'TopK',
  'ScaledSign',
  'ErrorFeedback',
  'compress_stack',
  'make',
  'message_size',
  'get',
  'names',
  'REGISTRY',
]

REGISTRY = Registry('compressor')
get = REGISTRY.get
names = REGISTRY.names


def make(spec):
  """A compressor from a spec string: ``'rand_k(fraction=0.1)'``, ``'qsgd(levels=2)'``,
  ``'ef+top_k(k=10)'`` (error feedback around a compressor), ``'none'``; a `Compressor` or an
  `ErrorFeedback` is returned as is.

  Raises:
    ValueError: for an unknown name (listing the known ones) or bad parameters.
  """
  from robustjax._spec import parse_spec

  if not isinstance(spec, str):
    return spec
  if spec.startswith('ef+'):
    return ErrorFeedback(make(spec[3:]))
  name, params = parse_spec(spec)
  try:
    return get(name)(**params)
  except TypeError as e:
    raise ValueError(f'compressor {name!r}: {e}') from None


_FLOAT_BITS = 32


def message_size(tree) -> int:
  """D, the total number of coordinates of one message (a pytree without the worker axis)."""
  return int(sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree)))


def _index_bits(dim: int) -> int:
  return max(1, math.ceil(math.log2(max(dim, 2))))


def _resolve_k(rule: str, k, fraction, dim: int) -> int:
  if (k is None) == (fraction is None):
    raise ValueError(f'{rule}: give exactly one of k and fraction')
  if k is None:
    if not 0 < fraction <= 1:
      raise ValueError(f'{rule}: fraction must be in (0, 1]; got {fraction}')
    k = max(1, int(round(fraction * dim)))
  check_positive_int(rule, 'k', k)
  if k > dim:
    raise ValueError(f'{rule}: needs k <= D (the message size); got k={k}, D={dim}')
  return k


class Compressor:
  """Base class: `compressor(tree, key) -> tree`, plus its constants and its message size in bits.

  Attributes:
    unbiased: whether E[C(x)] = x.
  """

  unbiased: bool = True
  stochastic: bool = False

  def init(self, like):
    """The state carried across steps: none (``()``) for a plain compressor."""
    del like
    return ()

  def update(self, tree, state, key: jax.Array | None = None):
    """``(sent, state)``: the state protocol shared with `ErrorFeedback`."""
    return self(tree, key), state

  def __call__(self, tree, key: jax.Array | None = None):
    flat, unravel = ravel_pytree(tree)
    return unravel(self.compress_flat(flat, key).astype(flat.dtype))

  def compress_flat(self, v: jax.Array, key: jax.Array | None) -> jax.Array:
    raise NotImplementedError

  def omega(self, dim: int) -> float:
    """Variance factor ω (unbiased compressors): E‖Q(x) − x‖² <= ω‖x‖²."""
    raise NotImplementedError(f'{type(self).__name__} is biased: see delta()')

  def delta(self, dim: int) -> float:
    """Contraction factor δ (worst case): ‖C(x) − x‖² <= (1 − δ)‖x‖²."""
    raise NotImplementedError(f'{type(self).__name__} is unbiased: see omega()')

  def bits(self, dim: int) -> int:
    """Bits of one compressed message of D = dim coordinates (plain encoding)."""
    raise NotImplementedError

  @property
  def name(self) -> str:
    return type(self).__name__.lower()


@dataclasses.dataclass(frozen=True)
class Identity(Compressor):
  """No compression: ω = 0, D float32 values."""

  unbiased: bool = dataclasses.field(default=True, init=False, repr=False)

  def compress_flat(self, v, key):
    return v

  def omega(self, dim):
    return 0.0

  def delta(self, dim):
    return 1.0

  def bits(self, dim):
    return _FLOAT_BITS * dim

  @property
  def name(self):
    return 'none'


@dataclasses.dataclass(frozen=True)
class RandK(Compressor):
  """Unbiased random sparsification: keep k uniformly random coordinates, scaled by D/k.

  E[Q(x)] = x and E‖Q(x) − x‖² = (D/k − 1)‖x‖² exactly, so ω = D/k − 1.

  Args:
    k: coordinates kept; or `fraction` of D (rounded, at least 1).

  Cost: one uniform draw and a top-k over D coordinates; message k floats + k indices.
  """

  stochastic = True  # needs a key (a class constant, not a field)

  k: int | None = None
  fraction: float | None = None
  unbiased: bool = dataclasses.field(default=True, init=False, repr=False)

  def compress_flat(self, v, key):
    if key is None:
      raise ValueError('rand_k: needs an explicit PRNG key')
    dim = v.shape[0]
    k = _resolve_k('rand_k', self.k, self.fraction, dim)
    _, idx = jax.lax.top_k(jax.random.uniform(key, (dim,)), k)
    mask = jnp.zeros((dim,), v.dtype).at[idx].set(1)
    return v * mask * (dim / k)

  def omega(self, dim):
    return dim / _resolve_k('rand_k', self.k, self.fraction, dim) - 1.0

  def bits(self, dim):
    k = _resolve_k('rand_k', self.k, self.fraction, dim)
    return k * (_FLOAT_BITS + _index_bits(dim))

  @property
  def name(self):
    return f'rand_k({self.k if self.k is not None else self.fraction})'


@dataclasses.dataclass(frozen=True)
class QSGD(Compressor):
  """QSGD stochastic quantisation with s levels (Alistarh et al. 2017).

  Q(x)_i = ‖x‖₂ · sign(x_i) · ξ_i, where with r_i = s|x_i|/‖x‖₂ and l = ⌊r_i⌋, ξ_i = (l + 1)/s with
  probability r_i − l and l/s otherwise. Unbiased, with
  E‖Q(x) − x‖² = (‖x‖²/s²) Σ_i p_i(1 − p_i) <= min(D/s², √D/s) ‖x‖², so ω = min(D/s², √D/s).

  Args:
    levels: s >= 1 (s = 1 is ternary {−‖x‖, 0, ‖x‖}).

  Cost: one pass; message 32 bits (the norm) + D (1 + ⌈log₂(s + 1)⌉) bits (plain, no Elias code).
  """

  stochastic = True  # needs a key (a class constant, not a field)

  levels: int = 16
  unbiased: bool = dataclasses.field(default=True, init=False, repr=False)

  def compress_flat(self, v, key):
    if key is None:
      raise ValueError('qsgd: needs an explicit PRNG key')
    check_positive_int('qsgd', 'levels', self.levels)
    s = self.levels
    norm = jnp.sqrt(jnp.sum(v * v))
    safe = jnp.where(norm > 0, norm, 1.0)
    r = jnp.abs(v) / safe * s
    low = jnp.floor(r)
    up = jax.random.uniform(key, v.shape, dtype=v.dtype) < (r - low)
    xi = (low + up.astype(v.dtype)) / s
    return jnp.where(norm > 0, norm * jnp.sign(v) * xi, 0.0)

  def omega(self, dim):
    s = self.levels
    return min(dim / s**2, math.sqrt(dim) / s)

  def bits(self, dim):
    return _FLOAT_BITS + dim * (1 + math.ceil(math.log2(self.levels + 1)))

  @property
  def name(self):
    return f'qsgd({self.levels})'


@dataclasses.dataclass(frozen=True)
class TopK(Compressor):
  """Biased top-k sparsification: keep the k coordinates of largest magnitude (no scaling).

  Contractive: ‖C(x) − x‖² <= (1 − k/D)‖x‖², δ = k/D. Deterministic (the key is ignored). Use with
  `ErrorFeedback`.

  Cost: a top-k over D coordinates; message k floats + k indices.
  """

  k: int | None = None
  fraction: float | None = None
  unbiased: bool = dataclasses.field(default=False, init=False, repr=False)

  def compress_flat(self, v, key):
    dim = v.shape[0]
    k = _resolve_k('top_k', self.k, self.fraction, dim)
    _, idx = jax.lax.top_k(jnp.abs(v), k)
    mask = jnp.zeros((dim,), v.dtype).at[idx].set(1)
    return v * mask

  def delta(self, dim):
    return _resolve_k('top_k', self.k, self.fraction, dim) / dim

  def bits(self, dim):
    k = _resolve_k('top_k', self.k, self.fraction, dim)
    return k * (_FLOAT_BITS + _index_bits(dim))

  @property
  def name(self):
    return f'top_k({self.k if self.k is not None else self.fraction})'


@dataclasses.dataclass(frozen=True)
class ScaledSign(Compressor):
  """Biased scaled sign: C(x) = (‖x‖₁ / D) · sign(x) (Karimireddy et al. 2019).

  ‖C(x) − x‖² = ‖x‖² − ‖x‖₁²/D, so δ(x) = ‖x‖₁²/(D‖x‖₂²) ∈ [1/D, 1]; the worst case δ = 1/D is
  what `delta` returns (dense vectors are far better). sign(0) = 0. Deterministic. Use with
  `ErrorFeedback`.

  Cost: one pass; message 32 + D bits.
  """

  unbiased: bool = dataclasses.field(default=False, init=False, repr=False)

  def compress_flat(self, v, key):
    dim = v.shape[0]
    return jnp.sum(jnp.abs(v)) / dim * jnp.sign(v)

  def delta(self, dim):
    return 1.0 / dim

  def bits(self, dim):
    return _FLOAT_BITS + dim

  @property
  def name(self):
    return 'sign'


REGISTRY.register('none', Identity)
REGISTRY.register('rand_k', RandK)
REGISTRY.register('qsgd', QSGD)
REGISTRY.register('top_k', TopK)
REGISTRY.register('sign', ScaledSign)


@dataclasses.dataclass(frozen=True)
class ErrorFeedback:
  """Error feedback around any compressor, with the error memory as explicit state.

  With memory e (zeros at start) and the vector c to send: p = e + c, send C(p), keep
  e ← p − C(p). Summed over steps the sent messages track the summed inputs:
  Σ_t sent_t = Σ_t c_t − e_T (the telescoping identity the tests check). With a δ-contractive C
  the memory stays bounded (‖e‖² = O(‖c‖²/δ²)), which is what makes biased compressors converge.

  .. warning::
     The compressor must be contractive (`TopK`, `ScaledSign`). Unbiased compressors scaled up
     (`RandK` multiplies by D/k, ω > 1) are not, and error feedback around them diverges.

  Example:
    >>> ef = ErrorFeedback(TopK(k=10))
    >>> e = ef.init(c)
    >>> sent, e = ef.update(c, e, key)

  Args:
    compressor: a `Compressor`.
  """

  compressor: Compressor

  def init(self, like):
    """Zero memory shaped like one message (or like a stack: a memory per worker)."""
    return jax.tree.map(jnp.zeros_like, like)

  def update(self, tree, state, key: jax.Array | None = None):
    """``(sent, new memory)``: send C(e + c), keep e + c − C(e + c)."""
    p = jax.tree.map(jnp.add, state, tree)
    sent = self.compressor(p, key)
    return sent, jax.tree.map(jnp.subtract, p, sent)

  @property
  def stochastic(self) -> bool:
    return self.compressor.stochastic

  def bits(self, dim: int) -> int:
    return self.compressor.bits(dim)

  @property
  def name(self) -> str:
    return f'ef+{self.compressor.name}'


def compress_stack(compressor, stack, state, key: jax.Array | None, *, key_ids=None):
  """Applies `compressor` to every worker's message of a stack (vmap over the worker axis).

  Every compressor follows one state protocol: ``state = compressor.init(stack)`` (``()``, or the
  error-feedback memories: one per worker), then ``sent, state = compress_stack(...)``.

  Args:
    compressor: a `Compressor` or an `ErrorFeedback`.
    stack: the messages, leading axis n.
    state: from ``compressor.init(stack)`` or the previous call.
    key: one key; worker i uses `fold_in(key, key_ids[i])`.
    key_ids: (n,) ints; default arange(n) (independent randomness). Workers with equal ids share
      their randomness, e.g. the members of a DRACO group, whose identical messages must stay
      identical after compression for the majority vote.

  Returns:
    ``(compressed stack, new state)``.
  """
  n = num_workers(stack, 'compress_stack')
  ids = jnp.arange(n) if key_ids is None else jnp.asarray(key_ids)
  if key is None:
    if compressor.stochastic:
      raise ValueError(f'compress_stack: {compressor.name} needs an explicit PRNG key')
    key = jax.random.key(0)  # deterministic compressors ignore it
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
  return jax.vmap(compressor.update)(stack, state, keys)  # state () maps to ()
