"""Flax NNX models, used functionally so per-worker gradients can be vmapped over workers.

Every model here holds only `nnx.Param` state (no batch statistics, no dropout RNG), so it splits
into a graph definition and a parameter pytree and is a pure function of the two:

  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> from robustjax import models
  >>> model = models.make('mlp', num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  >>> graphdef, params = nnx.split(model, nnx.Param)
  >>> def loss(p, x, y):
  ...   logits = nnx.merge(graphdef, p)(x)
  ...   return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
  >>> # per-worker gradients: params broadcast, a (n, b, ...) batch per worker
  >>> grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, xs, ys)  # doctest: +SKIP

Models (`make(name, ...)`):

===================== ===========================================================================
name                  model
===================== ===========================================================================
``linear_regression`` w·x (+ b), output (batch,): the gradient-coding regression problem
``logistic``          multinomial logistic regression (one dense layer on the flattened input)
``mlp``               flatten → dense(hidden) → ReLU → ... → dense(classes)
``cnn``               two 3×3 conv + ReLU + 2×2 average-pool stages, dense(128), dense(classes);
                      works on 8×8×1 (digits), 28×28×1 (MNIST) and 32×32×3 (CIFAR-10)
``resnet20``          ResNet-20 (He et al. 2016, CIFAR variant: 3 stages × 3 basic blocks,
                      16/32/64 channels) with GroupNorm instead of BatchNorm
===================== ===========================================================================

.. warning::
   ``resnet20`` normalises with GroupNorm (or nothing, ``norm='none'``), not BatchNorm. BatchNorm's
   running statistics are mutable state shared across a batch: with workers as a vmapped axis each
   worker would need its own statistics and Byzantine workers could poison shared ones. GroupNorm
   is per-sample, so the model stays a pure function of its parameters (the choice of Hsieh et al.
   2020 for non-iid federated training). Accuracy is close to, not equal to, BatchNorm ResNet-20.

The dense layers use `linear_dot_general`: on CPU, the per-worker kernel gradients of short
batches through narrow layers are sums of outer products, faster there than XLA:CPU's batched
products. Forward-mode differentiation (`jax.jvp`) through the models is not supported.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from robustjax._registry import Registry

__all__ = [
  'CNN',
  'MLP',
  'LinearRegression',
  'LogisticRegression',
  'ResNet20',
  'linear_dot_general',
  'make',
  'names',
]

_MODELS = Registry('model')


def names() -> list[str]:
  """The names `make` accepts."""
  return _MODELS.names()


def make(
  name: str, *, num_classes: int, input_shape: Sequence[int], rngs: nnx.Rngs, **kwargs
) -> nnx.Module:
  """Builds a model by name.

  Args:
    name: one of `names()`: ``'linear_regression'``, ``'logistic'``, ``'mlp'``, ``'cnn'``,
      ``'resnet20'``.
    num_classes: the number of outputs (classes); 0 for ``'linear_regression'`` (scalar output).
    input_shape: the shape of one input (no batch axis), e.g. ``ds.input_shape``.
    rngs: `nnx.Rngs` for initialisation.
    **kwargs: model options (e.g. ``hidden=(128, 128)`` for ``'mlp'``, ``norm='none'`` for
      ``'resnet20'``).

  Returns:
    An `nnx.Module` mapping a (batch, *input_shape) array to (batch, num_classes) logits
    ((batch,) for ``'linear_regression'``).

  Raises:
    ValueError: for an unknown name (listing the known ones) or an input shape the model rejects.
  """
  builder = _MODELS.get(name)
  return builder(num_classes=num_classes, input_shape=tuple(input_shape), rngs=rngs, **kwargs)


def _check_classes(model: str, num_classes: int) -> None:
  if not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f'{model}: num_classes must be an int >= 2; got {num_classes!r}')


def _flatten(x: jax.Array, input_shape: tuple[int, ...]) -> jax.Array:
  return x.reshape(x.shape[: x.ndim - len(input_shape)] + (-1,))


# The kernel gradient of a dense layer, x^T g, summed as outer products x_r ⊗ g_r of its rows on
# XLA:CPU when the batch is short and the layer narrow. Under `jax.vmap` over workers x^T g is a
# batched product of one small matrix per worker, which XLA:CPU runs at 10-60 GFLOP/s; the sum of
# outer products (a balanced tree, one fused loop) took 0.2-0.5× its time for 25 rows and 10
# output features, 0.54-0.9× for 64 × 64 kernels, and more than the product for 128 × 128 or
# 64 × 256 kernels (BENCHMARKS.md). Other platforms keep the product.
OUTER_SUM_MAX_ROWS = 32
OUTER_SUM_MAX_FEATURES = 16  # output features at or below which a kernel of any height qualifies
OUTER_SUM_MAX_KERNEL = 64 * 64  # else the kernel's size


def _outer_sum_pays(rows: int, kernel_shape: tuple[int, int]) -> bool:
  d_in, d_out = kernel_shape
  small = d_out <= OUTER_SUM_MAX_FEATURES or d_in * d_out <= OUTER_SUM_MAX_KERNEL
  return 1 <= rows <= OUTER_SUM_MAX_ROWS and small


def linear_dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
  """`jax.lax.dot_general` as `nnx.Linear` calls it (``x @ kernel``), with the kernel's gradient
  computed on XLA:CPU as a sum of the rows' outer products when the batch has at most
  `OUTER_SUM_MAX_ROWS` rows and the kernel at most `OUTER_SUM_MAX_FEATURES` columns or
  `OUTER_SUM_MAX_KERNEL` entries. The value and gradients are the product's (to float rounding);
  with per-worker gradients vmapped over workers they take 0.2-0.9× the time. Other calls, and
  other platforms, are `jax.lax.dot_general`.

  The models here pass it to their dense layers. Reverse mode (`jax.grad`, `jax.vjp`) works as
  for the product; forward mode (`jax.jvp`, `jax.jacfwd`) does not (a custom VJP). In `shard_map`,
  per-device gradients need the kernel marked varying (``jax.lax.pcast(params, axis,
  to='varying')``, as `robustjax.training` does): for a replicated kernel JAX refuses the custom
  VJP's per-device gradient, where the plain product would sum the devices' gradients silently.
  """
  (lhs_c, rhs_c), batch = dimension_numbers
  plain = (
    tuple(lhs_c) == (lhs.ndim - 1,)
    and tuple(rhs_c) == (0,)
    and batch == ((), ())
    and rhs.ndim == 2
    and not any(v is not None for v in kwargs.values())
  )
  if plain and _outer_sum_pays(math.prod(lhs.shape[:-1]), rhs.shape):
    return _dense(lhs, rhs, precision)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x, w, precision):
  return jnp.matmul(x, w, precision=precision)


def _dense_fwd(x, w, precision):
  return _dense(x, w, precision), (x, w)


def _dense_bwd(precision, residuals, g):
  x, w = residuals
  dx = jnp.matmul(g, w.T, precision=precision)
  rows_x, rows_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])

  def outer_sum(x, g):
    acc = jnp.promote_types(jnp.result_type(x, g), jnp.float32)
    terms = [x[r, :, None].astype(acc) * g[r, None, :].astype(acc) for r in range(x.shape[0])]
    while len(terms) > 1:  # a balanced tree of sums (a chain of 25 ran 1.4-1.5× slower)
      pairs = range(0, len(terms) - 1, 2)
      terms = [terms[i] + terms[i + 1] for i in pairs] + terms[len(terms) & ~1 :]
    return terms[0].astype(w.dtype)

  def product(x, g):
    return jnp.matmul(x.T, g, precision=precision).astype(w.dtype)

  dw = jax.lax.platform_dependent(rows_x, rows_g, cpu=outer_sum, default=product)
  return dx.astype(x.dtype), dw


_dense.defvjp(_dense_fwd, _dense_bwd)


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, dot_general=linear_dot_general, rngs=rngs)


class LinearRegression(nnx.Module):
  """A linear model x ↦ ⟨w, x⟩ (+ b) with a scalar output, initialised at zero.

  Args:
    in_features: d (inputs of shape (..., d)).
    use_bias: add an intercept (off by default: the gradient-coding problem has none).
    rngs: unused (the model starts at w = 0); accepted for a uniform signature.
  """

  def __init__(self, in_features: int, *, use_bias: bool = False, rngs: nnx.Rngs):
    del rngs
    self.w = nnx.Param(jnp.zeros((in_features,), jnp.float32))
    self.b = nnx.Param(jnp.zeros((), jnp.float32)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x @ self.w[...]
    return y + self.b[...] if self.b is not None else y


class LogisticRegression(nnx.Module):
  """Multinomial logistic regression: one dense layer on the flattened input.

  Args:
    input_shape: the shape of one input.
    num_classes: C >= 2.
    rngs: initialisation keys.
  """

  def __init__(self, input_shape: Sequence[int], num_classes: int, *, rngs: nnx.Rngs):
    self.input_shape = tuple(input_shape)
    self.dense = _linear(math.prod(self.input_shape), num_classes, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.dense(_flatten(x, self.input_shape))


class MLP(nnx.Module):
  """A ReLU multi-layer perceptron on the flattened input.

  Args:
    input_shape: the shape of one input.
    num_classes: C >= 2.
    hidden: the hidden widths.
    rngs: initialisation keys.
  """

  def __init__(
    self,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    hidden: Sequence[int] = (64, 64),
    rngs: nnx.Rngs,
  ):
    self.input_shape = tuple(input_shape)
    widths = [math.prod(self.input_shape), *hidden]
    self.hidden = nnx.List([_linear(a, b, rngs) for a, b in zip(widths[:-1], widths[1:])])
    self.out = _linear(widths[-1], num_classes, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = _flatten(x, self.input_shape)
    for layer in self.hidden:
      h = jax.nn.relu(layer(h))
    return self.out(h)


def _pool(x: jax.Array) -> jax.Array:
  """2×2 average pooling (stride 2) when the spatial size allows it, else identity."""
  if x.shape[-3] < 2 or x.shape[-2] < 2:
    return x
  return nnx.avg_pool(x, (2, 2), strides=(2, 2))


class CNN(nnx.Module):
  """A small CNN: [3×3 conv → ReLU → 2×2 avg-pool] × len(features) → dense → ReLU → dense.

  For 28×28×1 inputs the feature map after two stages is 7×7×64; for 8×8×1 it is 2×2×64.

  Args:
    input_shape: (H, W, C).
    num_classes: C >= 2.
    features: channels of the conv stages.
    hidden: width of the dense layer.
    rngs: initialisation keys.
  """

  def __init__(
    self,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    features: Sequence[int] = (32, 64),
    hidden: int = 128,
    rngs: nnx.Rngs,
  ):
    if len(input_shape) != 3:
      raise ValueError(f'cnn: input_shape must be (H, W, C); got {tuple(input_shape)}')
    h, w, c = input_shape
    chans = [c, *features]
    self.convs = nnx.List(
      [nnx.Conv(a, b, (3, 3), rngs=rngs) for a, b in zip(chans[:-1], chans[1:])]
    )
    for _ in features:
      h, w = (h // 2, w // 2) if h >= 2 and w >= 2 else (h, w)
    self.dense = _linear(h * w * chans[-1], hidden, rngs)
    self.out = _linear(hidden, num_classes, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv in self.convs:
      x = _pool(jax.nn.relu(conv(x)))
    x = x.reshape(*x.shape[:-3], -1)
    return self.out(jax.nn.relu(self.dense(x)))


def _norm(kind: str, channels: int, rngs: nnx.Rngs):
  if kind == 'group':
    return nnx.GroupNorm(channels, num_groups=min(8, channels), rngs=rngs)
  if kind == 'none':
    return None
  raise ValueError(f"resnet20: norm must be 'group' or 'none'; got {kind!r}")


class _BasicBlock(nnx.Module):
  def __init__(self, cin: int, cout: int, stride: int, norm: str, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=norm == 'none', rngs=rngs)
    self.norm1 = _norm(norm, cout, rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=norm == 'none', rngs=rngs)
    self.norm2 = _norm(norm, cout, rngs)
    if stride != 1 or cin != cout:  # Projection shortcut (option B).
      self.proj = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=norm == 'none', rngs=rngs)
      self.proj_norm = _norm(norm, cout, rngs)
    else:
      self.proj = None
      self.proj_norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    def nrm(layer, h):
      return layer(h) if layer is not None else h

    h = jax.nn.relu(nrm(self.norm1, self.conv1(x)))
    h = nrm(self.norm2, self.conv2(h))
    s = x if self.proj is None else nrm(self.proj_norm, self.proj(x))
    return jax.nn.relu(h + s)


class ResNet20(nnx.Module):
  """ResNet-20 for CIFAR-10 (He et al. 2016, section 4.2) with GroupNorm.

  A 3×3 conv with 16 channels, then three stages of `blocks_per_stage` basic blocks with 16, 32 and
  64 channels (stride 2 at the start of stages 2 and 3, projection shortcuts), global average
  pooling and a dense layer: 6·3 + 2 = 20 layers, about 0.27 M parameters.

  .. warning::
     GroupNorm (8 groups, or ``norm='none'``) replaces BatchNorm so the model is stateless and
     per-worker gradients can be vmapped; see the module docstring.

  Args:
    input_shape: (H, W, C), e.g. (32, 32, 3).
    num_classes: C >= 2.
    width: channels of the first stage (16 in the paper).
    blocks_per_stage: 3 for ResNet-20 (n = 5 gives ResNet-32, ...).
    norm: ``'group'`` or ``'none'``.
    rngs: initialisation keys.
  """

  def __init__(
    self,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    width: int = 16,
    blocks_per_stage: int = 3,
    norm: str = 'group',
    rngs: nnx.Rngs,
  ):
    if len(input_shape) != 3:
      raise ValueError(f'resnet20: input_shape must be (H, W, C); got {tuple(input_shape)}')
    _norm(norm, width, rngs)  # Validates `norm` early.
    self.stem = nnx.Conv(input_shape[-1], width, (3, 3), use_bias=norm == 'none', rngs=rngs)
    self.stem_norm = _norm(norm, width, rngs)
    blocks = []
    cin = width
    for stage in range(3):
      cout = width * 2**stage
      for b in range(blocks_per_stage):
        stride = 2 if stage > 0 and b == 0 else 1
        blocks.append(_BasicBlock(cin, cout, stride, norm, rngs=rngs))
        cin = cout
    self.blocks = nnx.List(blocks)
    self.out = _linear(cin, num_classes, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.stem(x)
    h = jax.nn.relu(self.stem_norm(h) if self.stem_norm is not None else h)
    for block in self.blocks:
      h = block(h)
    return self.out(h.mean(axis=(-3, -2)))


@_MODELS.register('linear_regression')
def _make_linear_regression(*, num_classes, input_shape, rngs, use_bias=False):
  if num_classes not in (0, 1):
    raise ValueError(f'linear_regression: num_classes must be 0 (regression); got {num_classes}')
  return LinearRegression(math.prod(input_shape), use_bias=use_bias, rngs=rngs)


@_MODELS.register('logistic')
def _make_logistic(*, num_classes, input_shape, rngs):
  _check_classes('logistic', num_classes)
  return LogisticRegression(input_shape, num_classes, rngs=rngs)


@_MODELS.register('mlp')
def _make_mlp(*, num_classes, input_shape, rngs, hidden=(64, 64)):
  _check_classes('mlp', num_classes)
  return MLP(input_shape, num_classes, hidden=tuple(hidden), rngs=rngs)


@_MODELS.register('cnn')
def _make_cnn(*, num_classes, input_shape, rngs, features=(32, 64), hidden=128):
  _check_classes('cnn', num_classes)
  return CNN(input_shape, num_classes, features=tuple(features), hidden=hidden, rngs=rngs)


@_MODELS.register('resnet20')
def _make_resnet20(*, num_classes, input_shape, rngs, **kwargs):
  _check_classes('resnet20', num_classes)
  return ResNet20(input_shape, num_classes, rngs=rngs, **kwargs)
