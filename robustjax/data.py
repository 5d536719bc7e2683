"""Datasets and heterogeneous splits among honest workers.

Everything here is host-side NumPy: datasets are loaded once, split once, and then moved to the
device by the training code. A jitted step samples each worker's batch on device from the padded
index table that `pad_indices` builds (no host round trip per step).

Datasets (`load(name, seed=0, **kwargs)`):

=============================== ================================================================
name                            source
=============================== ================================================================
``digits``                      scikit-learn's bundled 8x8 digits (1,797 images, no download)
``mnist``                       local IDX files, or Hugging Face ``ylecun/mnist``
``fashion_mnist``               local IDX files, or ``zalando-datasets/fashion_mnist``
``cifar10``                     local CIFAR python batches, or ``uoft-cs/cifar10``
``synthetic_classification``    a Gaussian mixture, `synthetic_classification`
``synthetic_linear_regression`` the gradient-coding regression problem,
                                `synthetic_linear_regression`
=============================== ================================================================

The three image datasets load offline from their standard files (`robustjax._dataset_files`:
LeCun's / Zalando's IDX files, CIFAR-10's python batches, or the Hugging Face parquet / arrow
files), found in ``data_dir=``, else in ``$ROBUSTJAX_DATA_DIR``, else in the Hugging Face caches;
without any, they download through Hugging Face ``datasets`` (``robustjax[datasets]``). Offline
with no files, `load` fails within about a second, saying how to get them.

Splits (`split(labels, num_workers, method, ...)`): ``'iid'``, ``'dirichlet'`` (Dirichlet(α) class
proportions), ``'gamma'`` (gamma-similarity, as in ByzFL), ``'extreme'`` (label-sorted contiguous
chunks). Every split is deterministic from its seed, assigns every sample to exactly one worker, and
leaves no worker empty.

Example:
  >>> from robustjax import data
  >>> ds = data.load('digits')
  >>> ds.x_train.shape[1:], ds.num_classes
  ((8, 8, 1), 10)
  >>> parts = data.split(ds.y_train, 10, 'dirichlet', alpha=0.5, seed=0)
  >>> idx, sizes = data.pad_indices(parts)
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from robustjax import _dataset_files
from robustjax._checks import check_positive_int
from robustjax._registry import Registry

__all__ = [
  'Dataset',
  'least_squares_solution',
  'load',
  'names',
  'reads_files',
  'pad_indices',
  'split',
  'split_methods',
  'synthetic_classification',
  'synthetic_linear_regression',
]

_INSTALL_HINT = "pip install 'robustjax[datasets]'"


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A dataset held in host memory as NumPy arrays.

  Attributes:
    x_train: training inputs. Images are float32 NHWC in [0, 1]; vectors are float32 (N, d).
    y_train: training targets: int32 class labels, or float32 targets for regression.
    x_test: test inputs (same layout as `x_train`).
    y_test: test targets.
    num_classes: the number of classes; 0 for regression.
    input_shape: the shape of one input, e.g. ``(28, 28, 1)`` or ``(100,)``.
    name: the dataset's name.
    info: extra facts about the data (e.g. the generating parameter of a synthetic problem).
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  input_shape: tuple[int, ...]
  name: str
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_train(self) -> int:
    return int(self.x_train.shape[0])

  @property
  def num_test(self) -> int:
    return int(self.x_test.shape[0])

  def __repr__(self) -> str:
    return (
      f'Dataset(name={self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, '
      f'num_classes={self.num_classes}, input_shape={self.input_shape})'
    )


# ------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------

_LOADERS = Registry('dataset')


def names() -> list[str]:
  """The names `load` accepts."""
  return _LOADERS.names()


def reads_files(name: str) -> bool:
  """Whether dataset `name` is read from files (it takes ``data_dir``)."""
  return name in _HF


def load(name: str, *, seed: int = 0, **kwargs) -> Dataset:
  """Loads a dataset by name.

  Args:
    name: one of `names()`: ``'digits'``, ``'mnist'``, ``'fashion_mnist'``, ``'cifar10'``,
      ``'synthetic_classification'``, ``'synthetic_linear_regression'``.
    seed: the seed of generated data (the synthetic datasets). The real datasets have fixed
      train/test splits (for digits a fixed stratified split, ``split_seed=0``), so runs with
      different training seeds share the test set.
    **kwargs: passed to the loader: ``data_dir`` (a folder of the image datasets' standard
      files; see the module docstring) and ``cache_dir`` (Hugging Face's) for MNIST /
      Fashion-MNIST / CIFAR-10; ``num_samples`` / ``dim`` / ``heterogeneity`` for the synthetic
      problems; ``test_fraction`` for digits.

  Returns:
    A `Dataset`.

  Raises:
    ValueError: for an unknown name (the message lists the known names).
    FileNotFoundError: `data_dir` holds no complete set of the dataset's files.
    ImportError / RuntimeError: an image dataset with no local files, and the ``datasets`` extra
      missing or the hub unreachable (the message says how to get the files).
  """
  return _LOADERS.get(name)(seed=seed, **kwargs)


@_LOADERS.register('digits')
def _load_digits(*, seed: int = 0, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
  """scikit-learn's bundled digits: 1,797 8x8 grey images with values 0..16, scaled to [0, 1]."""
  del seed  # The split is fixed (split_seed) so that every training seed shares the test set.
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:  # pragma: no cover - scikit-learn is in the experiments extra
    raise ImportError(
      "the 'digits' dataset needs scikit-learn: pip install 'robustjax[experiments]'"
    ) from e
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f'digits: test_fraction must be in (0, 1); got {test_fraction}')
  raw = load_digits()
  x = (raw.images.astype(np.float32) / 16.0)[..., None]  # (1797, 8, 8, 1)
  y = raw.target.astype(np.int32)
  train, test = _stratified_split(y, test_fraction, split_seed)
  return Dataset(x[train], y[train], x[test], y[test], 10, (8, 8, 1), 'digits')


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int):
  """Per class, the first round(test_fraction * count) of a seeded permutation go to test."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    k = int(round(test_fraction * idx.size))
    test.append(idx[:k])
    train.append(idx[k:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# name -> (hub id, image column, label column, num_classes, input_shape, folder names)
_HF = {
  'mnist': ('ylecun/mnist', 'image', 'label', 10, (28, 28, 1), ('mnist',)),
  'fashion_mnist': (
    'zalando-datasets/fashion_mnist',
    'image',
    'label',
    10,
    (28, 28, 1),
    ('fashion_mnist', 'fashionmnist', 'fashion-mnist'),
  ),
  'cifar10': ('uoft-cs/cifar10', 'img', 'label', 10, (32, 32, 3), ('cifar10', 'cifar-10')),
}

DATA_DIR_ENV = 'ROBUSTJAX_DATA_DIR'


def _hf_cache_dirs(hub_id: str) -> list[str]:
  """The Hugging Face caches' folders of `hub_id`: the hub's parquet snapshots and the
  ``datasets`` library's arrow files (``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_DATASETS_CACHE``)."""
  home = os.environ.get('HF_HOME', os.path.join(os.path.expanduser('~'), '.cache', 'huggingface'))
  hub = os.environ.get('HF_HUB_CACHE', os.path.join(home, 'hub'))
  arrow = os.environ.get('HF_DATASETS_CACHE', os.path.join(home, 'datasets'))
  org, _, repo = hub_id.partition('/')
  return [
    os.path.join(hub, f'datasets--{org}--{repo}', 'snapshots'),
    os.path.join(arrow, f'{org}___{repo}'),
  ]


def _search_roots(name: str, data_dir: str | None) -> list[str]:
  """Where `_load_images` looks: a folder named for the dataset inside `data_dir` (torchvision
  names it ``MNIST`` / ``FashionMNIST``), then `data_dir` itself; without `data_dir`, the same in
  ``$ROBUSTJAX_DATA_DIR`` and then the Hugging Face caches."""
  folders = _HF[name][5]
  bases = [data_dir] if data_dir else [os.environ.get(DATA_DIR_ENV, '')]
  roots = []
  for base in filter(None, bases):
    base = os.path.expanduser(base)
    present = os.listdir(base) if os.path.isdir(base) else []
    roots += [os.path.join(base, d) for d in present if d.lower() in folders] + [base]
  if not data_dir:
    roots += _hf_cache_dirs(_HF[name][0])
  return roots


def _hub_reachable(timeout: float = 1.0) -> bool:
  """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds (False in
  offline mode, ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
  if any(os.environ.get(v, '').lower() in ('1', 'true', 'yes') for v in _OFFLINE_VARS):
    return False
  import socket
  import threading
  import urllib.parse

  host = urllib.parse.urlparse(os.environ.get('HF_ENDPOINT', 'https://huggingface.co')).hostname
  ok = []

  def connect():
    try:
      socket.create_connection((host, 443), timeout=timeout).close()
      ok.append(True)
    except OSError:
      pass

  t = threading.Thread(target=connect, daemon=True)  # name resolution has no timeout of its own
  t.start()
  t.join(timeout)
  return bool(ok)


_OFFLINE_VARS = ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE')


def _how_to_get(name: str) -> str:
  return (
    f'put its standard files in a folder and pass data_dir= (--config.data_dir=...) or set '
    f'${DATA_DIR_ENV}: {_dataset_files.expected_files(name)}; or, with network access once, '
    f'{_INSTALL_HINT} (the Hugging Face cache is read offline afterwards); or use the embedded '
    'dataset: --config.dataset=digits'
  )


def _load_images(
  name: str, *, seed: int = 0, data_dir: str | None = None, cache_dir: str | None = None
) -> Dataset:
  """MNIST / Fashion-MNIST / CIFAR-10: local standard files first (`robustjax._dataset_files`),
  then the Hugging Face hub (``robustjax[datasets]``, network needed once)."""
  del seed  # Fixed train/test splits.
  hub_id, image_col, label_col, num_classes, input_shape, _ = _HF[name]
  image_shape = input_shape if input_shape[-1] > 1 else input_shape[:-1]
  roots = _search_roots(name, data_dir)
  if cache_dir and not data_dir:
    roots.append(os.path.join(cache_dir, hub_id.replace('/', '___')))
  found = _dataset_files.find(
    name,
    roots,
    (image_col, label_col, image_shape),
    exclude={d for other, v in _HF.items() if other != name for d in v[5]},
  )
  if found is None and data_dir:
    raise FileNotFoundError(
      f'{name}: no dataset files under data_dir={data_dir!r}; expected '
      f'{_dataset_files.expected_files(name)}'
    )
  if found is not None:
    where, reader = found
    logging.info('%s: reading %s', name, where)
    x_tr, y_tr, x_te, y_te = reader()
  else:
    x_tr, y_tr, x_te, y_te = _download(name, hub_id, image_col, label_col, cache_dir)
  scale = lambda x: (np.asarray(x, np.float32) / 255.0).reshape((-1, *input_shape))
  as_labels = lambda y: np.asarray(y, np.int32)
  return Dataset(
    scale(x_tr), as_labels(y_tr), scale(x_te), as_labels(y_te), num_classes, input_shape, name
  )


def _download(name, hub_id, image_col, label_col, cache_dir):
  """The train and test splits through Hugging Face `datasets` (downloads once, then caches)."""
  try:
    datasets = importlib.import_module('datasets')
  except ImportError:
    raise ImportError(
      f'{name}: no local files found and the Hugging Face `datasets` package is missing; '
      + _how_to_get(name)
    ) from None
  if not _hub_reachable():
    raise RuntimeError(
      f'{name}: no local files found and the Hugging Face hub is unreachable (offline); '
      + _how_to_get(name)
    )
  try:
    raw = datasets.load_dataset(hub_id, cache_dir=cache_dir)
  except Exception as e:  # noqa: BLE001 - the hub raises many types (ConnectionError, OSError, ...)
    raise RuntimeError(
      f'{name}: could not load {hub_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); '
      + _how_to_get(name)
    ) from e
  out = []
  for part in ('train', 'test'):
    d = raw[part]
    out += [np.stack([np.asarray(im, np.uint8) for im in d[image_col]]), d[label_col]]
  return tuple(out)


for _name in _HF:
  _LOADERS.register(_name, lambda *, _n=_name, **kw: _load_images(_n, **kw))


# ------------------------------------------------------------------------------------------------
# Synthetic data
# ------------------------------------------------------------------------------------------------


@_LOADERS.register('synthetic_classification')
def synthetic_classification(
  *,
  num_samples: int = 2000,
  num_test: int = 500,
  num_classes: int = 10,
  dim: int = 32,
  separation: float = 3.0,
  seed: int = 0,
) -> Dataset:
  """A Gaussian-mixture classification problem.

  Class means mu_c ~ N(0, separation^2 / dim * I_dim); an input of class c is mu_c + N(0, I_dim);
  labels are uniform over the classes. Two class means are about ``separation * sqrt(2)`` apart,
  so ``separation`` of 3 is easy and 1 is hard for a linear model.

  Args:
    num_samples: training samples.
    num_test: test samples (drawn from the same mixture).
    num_classes: C >= 2.
    dim: input dimension.
    separation: the scale of the class means relative to the unit noise.
    seed: seeds everything.

  Returns:
    A `Dataset` with float32 (N, dim) inputs and int32 labels; ``info['means']`` holds the means.
  """
  check_positive_int('synthetic_classification', 'num_samples', num_samples)
  check_positive_int('synthetic_classification', 'num_test', num_test)
  check_positive_int('synthetic_classification', 'num_classes', num_classes, minimum=2)
  check_positive_int('synthetic_classification', 'dim', dim)
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(num_classes, dim)) * (separation / math.sqrt(dim))

  def draw(m):
    y = rng.integers(0, num_classes, size=m).astype(np.int32)
    x = (means[y] + rng.normal(size=(m, dim))).astype(np.float32)
    return x, y

  x_train, y_train = draw(num_samples)
  x_test, y_test = draw(num_test)
  return Dataset(
    x_train,
    y_train,
    x_test,
    y_test,
    num_classes,
    (dim,),
    'synthetic_classification',
    {'means': means},
  )


@_LOADERS.register('synthetic_linear_regression')
def synthetic_linear_regression(
  *,
  num_samples: int = 100,
  dim: int = 100,
  num_subsets: int | None = None,
  heterogeneity: float = 1.0,
  noise: float = 0.0,
  seed: int = 0,
) -> Dataset:
  r"""The linear-regression problem of the gradient-coding experiments (LAD / Com-LAD).

  Li, Allouah, Guerraoui, Skoglund, Xiao (arXiv:2603.28780) train a linear regression of dimension
  100 on 100 samples, one sample per data subset, with a heterogeneity level σ_H across subsets.
  Their generator is not public; this is a reconstruction in which σ_H enters the **covariates**,
  so that it changes the subset gradients. The samples are split into `num_subsets` consecutive
  blocks (subset k holds samples k·m … (k + 1)·m − 1, m = N / num_subsets); then

  .. math::
     w^\star \sim N(0, I_d), \quad \eta_k \sim N(0, 1), \quad
     s_k = e^{\sigma_H \eta_k} / \sqrt{\tfrac{1}{K} \textstyle\sum_{k'} e^{2 \sigma_H \eta_{k'}}},
     \quad a_j = s_{k(j)} z_j, \; z_j \sim N(0, I_d), \quad
     b_j = \langle a_j, w^\star \rangle + \text{noise} \cdot \varepsilon_j,

  i.e. each subset's covariates have their own scale s_k (log-normal with spread σ_H, normalised
  to mean square 1, so the objective keeps its size while the subsets drift apart). Subset k's
  gradient at w is s_k² (1/m) Σ_{j∈k} z_j z_jᵀ (w − w⋆) minus its noise term: σ_H = 0 gives
  identically distributed subsets, and the spread of the subset gradients around the full
  gradient grows with σ_H (tested). The objective is F(w) = (1/N) Σ_j ½(⟨a_j, w⟩ − b_j)².

  Two regimes:

  - **interpolating** (N ≤ d, e.g. the paper's 100 × 100): some w fits every sample, F⋆ = 0 and
    every subset gradient vanishes at the minimiser (with or without noise): G = 0;
  - **non-interpolating** (N > d and noise > 0): F⋆ > 0 and the subset gradients disagree at the
    minimiser (G > 0), the floor a rule that does not decode pays.

  Args:
    num_samples: N.
    dim: d.
    num_subsets: K (a divisor of N); default N, one sample per subset.
    heterogeneity: σ_H >= 0.
    noise: the standard deviation of the additive label noise.
    seed: seeds everything.

  Returns:
    A `Dataset` with ``x_train = A`` (float32 (N, d)), ``y_train = b`` (float32 (N,)),
    ``num_classes = 0``; the test split is the training split. ``info`` holds ``'w_star'`` (the
    generating model), ``'solution'`` (the float64 least-squares minimiser of the float32 data),
    ``'optimum'`` (F⋆ at it, float64), ``'scales'`` (s_k) and ``'heterogeneity'``.

  Example:
    >>> ds = synthetic_linear_regression(heterogeneity=0.5)
    >>> w = ds.info['solution']  # == least_squares_solution(ds)
  """
  check_positive_int('synthetic_linear_regression', 'num_samples', num_samples)
  check_positive_int('synthetic_linear_regression', 'dim', dim)
  k = num_samples if num_subsets is None else num_subsets
  check_positive_int('synthetic_linear_regression', 'num_subsets', k)
  if num_samples % k:
    raise ValueError(
      f'synthetic_linear_regression: num_subsets={k} must divide num_samples={num_samples}'
    )
  if heterogeneity < 0 or noise < 0:
    raise ValueError(
      'synthetic_linear_regression: heterogeneity and noise must be >= 0; '
      f'got {heterogeneity}, {noise}'
    )
  rng = np.random.default_rng(seed)
  w_star = rng.normal(size=dim)
  log_s = heterogeneity * rng.normal(size=k)
  scales = np.exp(log_s - 0.5 * np.log(np.mean(np.exp(2 * log_s))))
  a = np.repeat(scales, num_samples // k)[:, None] * rng.normal(size=(num_samples, dim))
  b = a @ w_star + noise * rng.normal(size=num_samples)
  a32, b32 = a.astype(np.float32), b.astype(np.float32)
  a64, b64 = a32.astype(np.float64), b32.astype(np.float64)
  solution = np.linalg.lstsq(a64, b64, rcond=None)[0]
  optimum = 0.5 * float(np.mean((a64 @ solution - b64) ** 2))
  return Dataset(
    a32,
    b32,
    a32,
    b32,
    0,
    (dim,),
    'synthetic_linear_regression',
    {
      'w_star': w_star,
      'solution': solution,
      'optimum': optimum,
      'scales': scales,
      'heterogeneity': float(heterogeneity),
    },
  )


def least_squares_solution(ds: Dataset, *, ridge: float = 0.0) -> np.ndarray:
  """The minimiser of (1/N) Σ_j ½ (⟨a_j, w⟩ − b_j)² + (ridge/2) ||w||², in float64.

  With ``ridge = 0`` and a rank-deficient A this is the minimum-norm minimiser
  (`numpy.linalg.lstsq`).

  Args:
    ds: a regression `Dataset` (``num_classes == 0``) with ``x_train`` of shape (N, d).
    ridge: λ >= 0.

  Returns:
    float64 (d,).
  """
  if ds.num_classes != 0:
    raise ValueError(f'least_squares_solution: {ds.name!r} is not a regression dataset')
  a = np.asarray(ds.x_train, np.float64).reshape(ds.x_train.shape[0], -1)
  b = np.asarray(ds.y_train, np.float64)
  if ridge == 0:
    return np.linalg.lstsq(a, b, rcond=None)[0]
  n, d = a.shape
  return np.linalg.solve(a.T @ a / n + ridge * np.eye(d), a.T @ b / n)


# ------------------------------------------------------------------------------------------------
# Heterogeneous splits
# ------------------------------------------------------------------------------------------------

_SPLITS = Registry('split method')


def split_methods() -> list[str]:
  """The methods `split` accepts."""
  return _SPLITS.names()


def split(
  labels: np.ndarray | Sequence[int],
  num_workers: int,
  method: str = 'iid',
  *,
  seed: int = 0,
  alpha: float = 1.0,
  gamma: float = 1.0,
) -> list[np.ndarray]:
  """Splits sample indices among `num_workers` honest workers.

  Methods:
    * ``'iid'``: a seeded permutation dealt in near-equal contiguous chunks (sizes differ by <= 1).
    * ``'dirichlet'``: for every class c, proportions p_c ~ Dirichlet(α·1_n) over the workers and
      class c's (shuffled) samples are dealt by p_c (Hsu, Qi, Brown 2019; ByzFL's
      ``dirichlet_niid``). Small α concentrates each worker on few classes; α → ∞ tends to iid.
      Worker sizes are unequal.
    * ``'gamma'``: gamma-similarity (Karimireddy, He, Jaggi 2022; ByzFL's
      ``gamma_similarity_niid``): after a seeded shuffle, the first ⌊γN⌋ samples are dealt
      iid and the rest are sorted by label and dealt in contiguous chunks. γ = 1 is iid,
      γ = 0 is exactly ``'extreme'`` (same seed).
    * ``'extreme'``: samples sorted by label (ties in a seeded random order) and dealt in
      near-equal contiguous chunks, so a worker holds about C/n classes (at most ⌈C/n⌉ + 1 for
      balanced classes).

  Every sample goes to exactly one worker and no worker is empty: when the Dirichlet draw leaves a
  worker empty, the largest worker gives it one sample (deterministically), a negligible change.
  ``'iid'``, ``'gamma'`` and ``'extreme'`` also accept real-valued targets (regression): they sort
  by target value.

  Args:
    labels: (N,) class labels (or regression targets, except for ``'dirichlet'``).
    num_workers: n >= 1, the number of honest workers.
    method: one of `split_methods()`.
    seed: seeds the split; the same seed gives the same split.
    alpha: α > 0 for ``'dirichlet'``.
    gamma: γ in [0, 1] for ``'gamma'``.

  Returns:
    A list of n int64 index arrays (each sorted ascending) into `labels`.

  Raises:
    ValueError: for an unknown method (listing the known ones), N < n, α <= 0, γ outside [0, 1],
      or non-integer labels with ``'dirichlet'``.
  """
  fn = _SPLITS.get(method)
  check_positive_int('split', 'num_workers', num_workers)
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'split: labels must be 1-D; got shape {labels.shape}')
  if labels.size < num_workers:
    raise ValueError(
      f'split: cannot give each of {num_workers} workers a sample from {labels.size} samples'
    )
  parts = fn(labels, num_workers, np.random.default_rng(seed), alpha=alpha, gamma=gamma)
  return [np.sort(p).astype(np.int64) for p in parts]


def _deal(idx: np.ndarray, n: int) -> list[np.ndarray]:
  return np.array_split(idx, n)


@_SPLITS.register('iid')
def _split_iid(labels, n, rng, **_):
  return _deal(rng.permutation(labels.size), n)


def _label_sorted(labels, idx):
  """`idx` reordered by label; ties keep the (already random) order of `idx`."""
  return idx[np.argsort(labels[idx], kind='stable')]


@_SPLITS.register('extreme')
def _split_extreme(labels, n, rng, **_):
  return _split_gamma(labels, n, rng, gamma=0.0)


@_SPLITS.register('gamma')
def _split_gamma(labels, n, rng, *, gamma, **_):
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f'split: gamma must be in [0, 1]; got {gamma}')
  perm = rng.permutation(labels.size)
  m = int(math.floor(gamma * labels.size))
  shared = _deal(perm[:m], n)
  sorted_rest = _deal(_label_sorted(labels, perm[m:]), n)
  return [np.concatenate([s, r]) for s, r in zip(shared, sorted_rest)]


@_SPLITS.register('dirichlet')
def _split_dirichlet(labels, n, rng, *, alpha, **_):
  if not alpha > 0:
    raise ValueError(f'split: alpha must be > 0 for dirichlet; got {alpha}')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'split: dirichlet needs integer class labels; got dtype {labels.dtype}')
  buckets: list[list[np.ndarray]] = [[] for _ in range(n)]
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    p = rng.dirichlet(np.full(n, float(alpha)))
    if not np.all(np.isfinite(p)):  # Tiny alpha can underflow every gamma variate.
      p = np.zeros(n)
      p[rng.integers(n)] = 1.0
    cuts = np.round(np.cumsum(p)[:-1] * idx.size).astype(np.int64)
    for i, chunk in enumerate(np.split(idx, cuts)):
      buckets[i].append(chunk)
  parts = [np.concatenate(b) for b in buckets]
  for i in range(n):  # Fill empty workers from the largest one (deterministic).
    if parts[i].size == 0:
      donor = int(np.argmax([p.size for p in parts]))
      parts[i], parts[donor] = parts[donor][-1:], parts[donor][:-1]
  return parts


def pad_indices(parts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Packs per-worker index lists into a rectangular table for on-device batch sampling.

  Row i holds worker i's indices repeated cyclically up to the longest worker's length, so both
  ``idx[i, randint(0, sizes[i])]`` (exact uniform sampling over worker i's data) and
  ``idx[i, randint(0, max_len)]`` (approximately uniform) are valid.

  Args:
    parts: n non-empty integer index arrays (as returned by `split`).

  Returns:
    ``(idx, sizes)``: int32 (n, max_len) and int32 (n,).

  Example:
    >>> idx, sizes = pad_indices([np.array([0, 1, 2]), np.array([5])])
    >>> idx.tolist(), sizes.tolist()
    ([[0, 1, 2], [5, 5, 5]], [3, 1])
    >>> # In a jitted step: j = jax.random.randint(key, (n, b), 0, sizes[:, None])
    >>> #                   batch_idx = jnp.take_along_axis(idx, j, axis=1)
  """
  if len(parts) == 0:
    raise ValueError('pad_indices: no workers')
  sizes = np.array([len(p) for p in parts], dtype=np.int64)
  if np.any(sizes == 0):
    raise ValueError(f'pad_indices: workers {np.flatnonzero(sizes == 0).tolist()} are empty')
  max_len = int(sizes.max())
  if max_len >= 2**31:
    raise ValueError('pad_indices: more than 2^31 samples per worker')
  idx = np.stack([np.resize(np.asarray(p, dtype=np.int32), max_len) for p in parts])
  return idx, sizes.astype(np.int32)
