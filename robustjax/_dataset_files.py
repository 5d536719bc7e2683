"""Readers of the image datasets' standard local files, so that MNIST, Fashion-MNIST and CIFAR-10
load offline.

Formats, searched for below a directory (any depth up to four):

- **IDX** (MNIST, Fashion-MNIST; LeCun's and Zalando's downloads, torchvision's ``raw/``):
  ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, each optionally ``.gz``;
- **CIFAR-10 python batches** (``cifar-10-python.tar.gz`` unpacked): ``data_batch_1`` …
  ``data_batch_5`` and ``test_batch``, pickles of ``{b'data': uint8 (N, 3072), b'labels': [...]}``;
- **Hugging Face parquet** (the hub repository's files, e.g. ``mnist/train-00000-of-00001.parquet``,
  as in ``~/.cache/huggingface/hub/datasets--ylecun--mnist/snapshots/<rev>/``) and **arrow** (the
  ``datasets`` cache, ``~/.cache/huggingface/datasets/ylecun___mnist/…/mnist-train.arrow``):
  an image column of ``{'bytes': PNG, 'path': …}`` and an integer label column. These need
  ``pyarrow`` and ``pillow`` (both come with ``robustjax[datasets]``).

`find(name, roots)` returns ``(format, reader)`` for the first root holding a complete set.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ['find', 'read_idx', 'expected_files']

_IDX = {
  'train_x': 'train-images-idx3-ubyte',
  'train_y': 'train-labels-idx1-ubyte',
  'test_x': 't10k-images-idx3-ubyte',
  'test_y': 't10k-labels-idx1-ubyte',
}
_CIFAR_TRAIN = tuple(f'data_batch_{i}' for i in range(1, 6))
_MAX_DEPTH = 4


def expected_files(name: str) -> str:
  """A one-line description of the files `find` accepts for dataset `name`."""
  hf = 'or the Hugging Face parquet / arrow files of its train and test splits'
  if name == 'cifar10':
    return f'cifar-10-batches-py/{{data_batch_1..5, test_batch}} (CIFAR python batches) {hf}'
  return f'{", ".join(_IDX.values())} (IDX, optionally .gz) {hf}'


def _walk(root: str, exclude=()):
  """(directory, file names) below `root`, at most `_MAX_DEPTH` levels down, sorted; directories
  whose lower-cased name is in `exclude` (another dataset's) are not entered."""
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    return
  base = root.rstrip(os.sep).count(os.sep)
  for d, subdirs, files in os.walk(root):
    subdirs[:] = sorted(s for s in subdirs if s.lower() not in exclude)
    if d.count(os.sep) - base >= _MAX_DEPTH:
      subdirs[:] = []
    yield d, sorted(files)


def read_idx(path: str) -> np.ndarray:
  """An IDX file (optionally gzipped) as a NumPy array (LeCun's format: a 4-byte magic whose
  third byte is the element type and fourth the rank, the big-endian int32 dimensions, the data).

  Raises:
    ValueError: a truncated file or an unknown element type.
  """
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as fh:
    raw = fh.read()
  types = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}
  if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in types:
    raise ValueError(f'{path}: not an IDX file')
  rank = raw[3]
  shape = tuple(int(v) for v in np.frombuffer(raw, '>i4', rank, 4))
  dtype = np.dtype(types[raw[2]])
  count = int(np.prod(shape))
  start = 4 + 4 * rank
  if len(raw) - start < count * dtype.itemsize:
    raise ValueError(f'{path}: truncated ({len(raw) - start} bytes of data, expected {count})')
  return np.frombuffer(raw, dtype, count, start).reshape(shape)


def _find_idx(root: str, exclude):
  for d, files in _walk(root, exclude):
    paths = {}
    for key, stem in _IDX.items():
      hit = next((f for f in (stem, stem + '.gz') if f in files), None)
      if hit is None:
        break
      paths[key] = os.path.join(d, hit)
    else:
      return lambda: tuple(read_idx(paths[k]) for k in ('train_x', 'train_y', 'test_x', 'test_y'))
  return None


def _read_cifar(d: str):
  def batch(name):
    with open(os.path.join(d, name), 'rb') as fh:
      b = pickle.load(fh, encoding='bytes')
    x = np.asarray(b[b'data'], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x, np.asarray(b[b'labels'], np.int64)

  parts = [batch(n) for n in _CIFAR_TRAIN]
  x_te, y_te = batch('test_batch')
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), x_te, y_te


def _find_cifar(root: str, exclude):
  for d, files in _walk(root, exclude):
    if all(n in files for n in (*_CIFAR_TRAIN, 'test_batch')):
      return lambda d=d: _read_cifar(d)
  return None


def _split_of(filename: str) -> str | None:
  base = filename.lower()
  for split in ('train', 'test'):
    if base.startswith(f'{split}-') or f'-{split}' in base or base.startswith(f'{split}.'):
      return split
  return None


def _read_table(path: str):
  import pyarrow as pa

  if path.endswith('.parquet'):
    import pyarrow.parquet as pq

    return pq.read_table(path)
  with pa.memory_map(path) as source:  # the datasets cache: the arrow streaming format
    try:
      return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
      return pa.ipc.open_file(source).read_all()


def _decode(column, image_shape) -> np.ndarray:
  from PIL import Image

  def one(v):
    if isinstance(v, dict):
      v = v.get('bytes')
    return np.asarray(Image.open(io.BytesIO(v)), dtype=np.uint8)

  return np.stack([one(v) for v in column]).reshape((-1, *image_shape))


def _read_hf(files: dict, image_col: str, label_col: str, image_shape):
  out = []
  for split in ('train', 'test'):
    tables = [_read_table(p) for p in files[split]]
    images = [v for t in tables for v in t.column(image_col).to_pylist()]
    labels = [v for t in tables for v in t.column(label_col).to_pylist()]
    out += [_decode(images, image_shape), np.asarray(labels, np.int64)]
  return tuple(out)


def _find_hf(root: str, exclude, image_col: str, label_col: str, image_shape):
  for ext in ('.parquet', '.arrow'):
    for d, names in _walk(root, exclude):
      files = {'train': [], 'test': []}
      for n in names:
        split = _split_of(n) if n.endswith(ext) else None
        if split:
          files[split].append(os.path.join(d, n))
      if files['train'] and files['test']:
        return lambda files=files: _read_hf(files, image_col, label_col, image_shape)
  return None


def find(
  name: str, roots: Sequence[str], hf_columns: tuple, exclude=()
) -> tuple[str, Callable] | None:
  """The first complete set of files of dataset `name` below one of `roots`.

  Args:
    name: ``'mnist'``, ``'fashion_mnist'`` or ``'cifar10'``.
    roots: directories to search, in order (missing ones are skipped).
    hf_columns: ``(image column, label column, image shape)`` of the Hugging Face files.
    exclude: lower-cased directory names not to enter (other datasets' folders: MNIST and
      Fashion-MNIST share their IDX file names).

  Returns:
    ``(description, reader)``: ``reader()`` gives uint8 images (N, H, W[, C]) and integer labels
    ``(x_train, y_train, x_test, y_test)``; or None when no root holds a complete set.
  """
  native = _find_cifar if name == 'cifar10' else _find_idx
  for root in roots:
    if not root:
      continue
    reader = native(root, exclude)
    if reader is not None:
      return f'{"CIFAR python batches" if name == "cifar10" else "IDX files"} in {root}', reader
    reader = _find_hf(root, exclude, *hf_columns)
    if reader is not None:
      return f'Hugging Face files in {root}', reader
  return None
