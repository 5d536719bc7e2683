"""MNIST / Fashion-MNIST / CIFAR-10 from their standard local files, offline, on small files the
tests write in each format (IDX, CIFAR python batches, Hugging Face parquet and arrow)."""

import gzip
import io
import os
import pickle
import socket
import time

import numpy as np
import pytest

from robustjax import data

pa = pytest.importorskip('pyarrow')  # in the test extra: never skipped in CI
PIL = pytest.importorskip('PIL.Image')


@pytest.fixture(autouse=True)
def _no_user_caches(tmp_path, monkeypatch):
  """No real data folder or Hugging Face cache of this machine is searched."""
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))
  for var in ('HF_HUB_CACHE', 'HF_DATASETS_CACHE', 'HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE'):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)


def _idx_bytes(arr: np.ndarray) -> bytes:
  header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, '>i4').tobytes()
  return header + arr.astype(np.uint8).tobytes()


def _write_idx(folder, x_tr, y_tr, x_te, y_te, gz=False):
  os.makedirs(folder, exist_ok=True)
  for stem, arr in (
    ('train-images-idx3-ubyte', x_tr),
    ('train-labels-idx1-ubyte', y_tr),
    ('t10k-images-idx3-ubyte', x_te),
    ('t10k-labels-idx1-ubyte', y_te),
  ):
    raw = _idx_bytes(arr)
    path = os.path.join(folder, stem + ('.gz' if gz else ''))
    with (gzip.open if gz else open)(path, 'wb') as fh:
      fh.write(raw)


def _images(rng, n, shape):
  return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


@pytest.mark.parametrize('gz', [False, True])
def test_idx_files_in_torchvision_layout_pick_the_right_dataset(tmp_path, gz):
  rng = np.random.default_rng(0)
  mnist = (*_images(rng, 5, (28, 28)), *_images(rng, 3, (28, 28)))
  fashion = (*_images(rng, 4, (28, 28)), *_images(rng, 2, (28, 28)))
  # torchvision's layout: both datasets' IDX files have the same names.
  _write_idx(tmp_path / 'FashionMNIST' / 'raw', *fashion, gz=gz)
  _write_idx(tmp_path / 'MNIST' / 'raw', *mnist, gz=gz)
  ds = data.load('mnist', data_dir=str(tmp_path))
  assert ds.x_train.shape == (5, 28, 28, 1) and ds.x_train.dtype == np.float32
  np.testing.assert_allclose(ds.x_train[..., 0], mnist[0] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(ds.y_train, mnist[1])
  np.testing.assert_array_equal(ds.y_test, mnist[3])
  assert ds.y_train.dtype == np.int32 and ds.num_classes == 10
  fm = data.load('fashion_mnist', data_dir=str(tmp_path))
  np.testing.assert_array_equal(fm.y_train, fashion[1])


def test_idx_alone_in_a_folder_and_through_the_environment(tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  arrays = (*_images(rng, 3, (28, 28)), *_images(rng, 2, (28, 28)))
  _write_idx(tmp_path / 'only', *arrays)
  ds = data.load('fashion_mnist', data_dir=str(tmp_path / 'only'))
  np.testing.assert_array_equal(ds.y_test, arrays[3])
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / 'only'))
  np.testing.assert_array_equal(data.load('mnist').y_train, arrays[1])


def test_a_truncated_idx_file_is_named():
  from robustjax import _dataset_files

  raw = _idx_bytes(np.zeros((4, 2, 2), np.uint8))[:-3]
  path = os.path.join(os.environ.get('TMPDIR', '/tmp'), f'trunc-{os.getpid()}-idx3-ubyte')
  with open(path, 'wb') as fh:
    fh.write(raw)
  try:
    with pytest.raises(ValueError, match='truncated'):
      _dataset_files.read_idx(path)
  finally:
    os.remove(path)


def test_cifar_python_batches(tmp_path):
  rng = np.random.default_rng(2)
  folder = tmp_path / 'cifar-10-batches-py'
  folder.mkdir()
  batches = {}
  for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
    img = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 2).tolist()
    batches[name] = (img, labels)
    flat = img.transpose(0, 3, 1, 2).reshape(2, 3072)  # CIFAR's rows: R plane, G plane, B plane
    with open(folder / name, 'wb') as fh:
      pickle.dump({b'data': flat, b'labels': labels}, fh)
  ds = data.load('cifar10', data_dir=str(tmp_path))
  assert ds.x_train.shape == (10, 32, 32, 3) and ds.x_test.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(ds.x_train[:2], batches['data_batch_1'][0] / 255.0, rtol=1e-6)
  np.testing.assert_allclose(ds.x_test, batches['test_batch'][0] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(ds.y_train[8:], batches['data_batch_5'][1])


def _png(img):
  buf = io.BytesIO()
  PIL.fromarray(img).save(buf, format='PNG')
  return buf.getvalue()


def _hf_table(images, labels, image_col):
  return pa.table(
    {image_col: [{'bytes': _png(im), 'path': None} for im in images], 'label': labels}
  )


def test_hugging_face_parquet_snapshot_in_the_hub_cache(tmp_path):
  import pyarrow.parquet as pq

  rng = np.random.default_rng(3)
  x_tr, y_tr = _images(rng, 4, (28, 28))
  x_te, y_te = _images(rng, 2, (28, 28))
  snap = tmp_path / 'hf_home' / 'hub' / 'datasets--ylecun--mnist' / 'snapshots' / 'abc' / 'mnist'
  snap.mkdir(parents=True)
  pq.write_table(_hf_table(x_tr, y_tr.tolist(), 'image'), snap / 'train-00000-of-00001.parquet')
  pq.write_table(_hf_table(x_te, y_te.tolist(), 'image'), snap / 'test-00000-of-00001.parquet')
  ds = data.load('mnist')  # no data_dir: the (fake) Hugging Face cache of HF_HOME
  np.testing.assert_allclose(ds.x_train[..., 0], x_tr / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(ds.y_test, y_te)


def test_hugging_face_arrow_cache_of_the_datasets_library(tmp_path):
  rng = np.random.default_rng(4)
  x_tr, y_tr = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), [1, 2, 3]
  x_te, y_te = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), [4, 5]
  cache = tmp_path / 'cache'
  folder = cache / 'uoft-cs___cifar10' / 'plain_text' / '0.0.0' / 'f00'
  folder.mkdir(parents=True)
  for split, x, y in (('train', x_tr, y_tr), ('test', x_te, y_te)):
    table = _hf_table(x, y, 'img')
    with pa.OSFile(str(folder / f'cifar10-{split}.arrow'), 'wb') as sink:
      with pa.ipc.new_stream(sink, table.schema) as writer:  # the datasets library's format
        writer.write_table(table)
  ds = data.load('cifar10', cache_dir=str(cache))
  np.testing.assert_allclose(ds.x_test, x_te / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(ds.y_train, y_tr)


def test_a_data_dir_without_files_names_what_it_expects(tmp_path):
  with pytest.raises(FileNotFoundError, match='train-images-idx3-ubyte.*parquet'):
    data.load('mnist', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match='data_batch_1'):
    data.load('cifar10', data_dir=str(tmp_path))


def test_offline_without_files_fails_within_a_second(monkeypatch):
  """No files, the datasets extra present, and a hub that never answers (DNS hanging): a clear
  message within about a second, not retries."""
  import sys
  import types

  fake = types.ModuleType('datasets')
  fake.load_dataset = lambda *a, **k: pytest.fail('load_dataset must not be called offline')
  monkeypatch.setitem(sys.modules, 'datasets', fake)

  def hang(*args, **kwargs):
    time.sleep(5)
    raise OSError('timed out')

  monkeypatch.setattr(socket, 'create_connection', hang)
  t0 = time.perf_counter()
  with pytest.raises(RuntimeError, match='unreachable.*data_dir.*digits'):
    data.load('fashion_mnist')
  assert time.perf_counter() - t0 < 2.0
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  t0 = time.perf_counter()
  with pytest.raises(RuntimeError, match='unreachable'):
    data.load('mnist')
  assert time.perf_counter() - t0 < 1.0


def test_data_dir_through_the_config_and_refused_for_embedded_data(tmp_path):
  from robustjax import configs, training

  c = configs.get('default', 'smoke')
  c.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match="data_dir is set, but dataset 'digits' reads no files"):
    training.build(c)
  rng = np.random.default_rng(5)
  _write_idx(tmp_path, *_images(rng, 40, (28, 28)), *_images(rng, 10, (28, 28)))
  c.dataset = 'mnist'
  exp = training.build(c)
  assert exp.problem.data['x_train'].shape == (40, 28, 28, 1)
