"""Tests of calibjax.data: sources (IDX, CIFAR pickles, tfds, digits), transforms and sampling."""

import gzip
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from calibjax import data
from calibjax.data import sources
from calibjax.errors import ConfigError, DatasetNotFoundError, UnknownNameError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
  # The developer's own data directories must not leak into tests that build their own.
  for var in ("CALIBJAX_DATA_DIR", "CALIBJAX_MNIST_DIR", "CALIBJAX_FASHION_MNIST_DIR", "TFDS_DATA_DIR"):
    monkeypatch.delenv(var, raising=False)


# ------------------------------------------------------------------------------------------------------ IDX


def _write_idx(path, array, type_code=0x08):
  header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
  payload = header + array.astype(sources._IDX_DTYPES[type_code]).tobytes()
  if path.endswith(".gz"):
    with gzip.open(path, "wb") as f:
      f.write(payload)
  else:
    with open(path, "wb") as f:
      f.write(payload)


def _fake_idx_dir(directory, *, n_train=12, n_test=5, seed=0):
  """IDX files with the train split gzipped and the test split raw."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, prefix, n, ext in (("train", "train", n_train, ".gz"), ("test", "t10k", n_test, "")):
    images = rng.integers(0, 256, size=(n, 4, 5), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    _write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"), images)
    _write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"), labels)
    arrays[split] = images, labels
  return arrays


@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_files_load_gz_and_raw(tmp_path, split):
  arrays = _fake_idx_dir(str(tmp_path / "mnist"))
  ds = data.load("mnist", split, data_dir=str(tmp_path))
  images, labels = arrays[split]
  assert ds.images.shape == images.shape + (1,) and ds.images.dtype == np.float32
  assert ds.labels.dtype == np.int32
  np.testing.assert_array_equal(ds.images[..., 0], images.astype(np.float32) / 255)
  np.testing.assert_array_equal(ds.labels, labels)
  assert ds.num_classes == 10 and ds.class_names[3] == "3" and ds.split == split
  assert ("t10k-images-idx3-ubyte" if split == "test" else "train-images-idx3-ubyte.gz") in ds.source


def test_idx_directories_env_and_data_dir(tmp_path, monkeypatch):
  env_arrays = _fake_idx_dir(str(tmp_path / "env"), seed=1)
  root_arrays = _fake_idx_dir(str(tmp_path / "root" / "fashion-mnist"), seed=2)
  arg_arrays = _fake_idx_dir(str(tmp_path / "arg"), seed=3)
  monkeypatch.setenv("CALIBJAX_DATA_DIR", str(tmp_path / "root"))
  ds = data.load("fashion_mnist", "test")
  np.testing.assert_array_equal(ds.labels, root_arrays["test"][1])
  assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
  monkeypatch.setenv("CALIBJAX_FASHION_MNIST_DIR", str(tmp_path / "env"))  # Comes before $CALIBJAX_DATA_DIR.
  np.testing.assert_array_equal(data.load("fashion_mnist", "test").labels, env_arrays["test"][1])
  ds = data.load("fashion_mnist", "test", data_dir=str(tmp_path / "arg"))  # data_dir replaces the env vars.
  np.testing.assert_array_equal(ds.labels, arg_arrays["test"][1])


def test_read_idx_big_endian_types(tmp_path):
  array = np.arange(-6, 6, dtype=np.int16).reshape(3, 4) * 1000
  _write_idx(str(tmp_path / "x"), array, type_code=0x0B)
  got = sources.read_idx(str(tmp_path / "x"))
  assert got.dtype == np.int16 and got.dtype.isnative
  np.testing.assert_array_equal(got, array)


def test_truncated_idx_is_reported(tmp_path):
  _fake_idx_dir(str(tmp_path))
  path = str(tmp_path / "t10k-images-idx3-ubyte")
  with open(path, "rb") as f:
    payload = f.read()
  with open(path, "wb") as f:
    f.write(payload[:-1])
  with pytest.raises(DatasetNotFoundError, match="truncated"):
    data.load("mnist", "test", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------------- CIFAR


def _dump(path, obj):
  with open(path, "wb") as f:
    pickle.dump(obj, f)


def _fake_cifar10(root, per_batch=2, n_test=3):
  directory = os.path.join(root, "cifar-10-batches-py")
  os.makedirs(directory)
  rng = np.random.default_rng(0)
  rows, labels = {}, {}
  for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
    rows[name] = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels[name] = rng.integers(0, 10, size=n).tolist()
    # Byte-string keys, as in the official Python 2 pickles.
    _dump(os.path.join(directory, name), {b"data": rows[name], b"labels": labels[name]})
  _dump(os.path.join(directory, "batches.meta"), {b"label_names": [b"airplane"] + [b"x"] * 9})
  return rows, labels


def test_cifar10_pickles(tmp_path):
  rows, labels = _fake_cifar10(str(tmp_path))
  train = data.load("cifar10", "train", data_dir=str(tmp_path))
  assert train.images.shape == (10, 32, 32, 3) and train.images.dtype == np.float32
  np.testing.assert_array_equal(train.labels, sum((labels[f"data_batch_{i}"] for i in range(1, 6)), []))
  # Row k of data_batch_3 is image 4 + k; channel c, row r, column q sits at byte c * 1024 + r * 32 + q.
  k, r, q, c = 1, 5, 17, 2
  assert train.images[4 + k, r, q, c] == np.float32(rows["data_batch_3"][k, c * 1024 + r * 32 + q]) / 255
  test = data.load("cifar10", "test", data_dir=str(tmp_path))
  expected = rows["test_batch"].reshape(3, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255
  np.testing.assert_array_equal(test.images, expected)
  assert test.class_names[0] == "airplane" and test.class_names[9] == "truck"  # Fixed names for CIFAR-10.
  assert "cifar-10-batches-py" in test.source


def test_cifar100_pickles_via_env(tmp_path, monkeypatch):
  directory = tmp_path / "cifar-100-python"
  directory.mkdir()
  rng = np.random.default_rng(1)
  for split, n in (("train", 6), ("test", 4)):
    _dump(str(directory / split), {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                                   b"fine_labels": list(range(90, 90 + n)), b"coarse_labels": [0] * n})
  _dump(str(directory / "meta"), {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                  b"coarse_label_names": [b"a"] * 20})
  monkeypatch.setenv("CALIBJAX_DATA_DIR", str(tmp_path))
  ds = data.load("cifar100", "test")
  assert ds.images.shape == (4, 32, 32, 3) and ds.num_classes == 100 and ds.class_names[93] == "c93"
  np.testing.assert_array_equal(ds.labels, [90, 91, 92, 93])


# ----------------------------------------------------------------------------------------------------- tfds


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3)),
                                        ("cifar100", (32, 32, 3)), ("imagenette", (128, 128, 3))])
def test_tfds_mock(tmp_path, name, shape):
  with tfds.testing.mock_data(num_examples=7):
    ds = data.load(name, "train", data_dir=str(tmp_path))  # Empty data_dir: no IDX/pickle source has it.
  assert ds.images.shape == (7,) + shape and ds.images.dtype == np.float32 and ds.labels.dtype == np.int32
  assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
  assert ((0 <= ds.labels) & (ds.labels < ds.num_classes)).all() and ds.source.startswith("tfds")


def test_tfds_varying_sizes_need_image_size(tmp_path):
  with tfds.testing.mock_data(num_examples=3), pytest.raises(ConfigError, match="image_size"):
    data.load("tfds:imagenette/160px", "train", data_dir=str(tmp_path))


class CalibjaxTestImages(tfds.core.GeneratorBasedBuilder):
  """Four 6x7 RGB images filled with 10 * i (train) or 100 + i (validation); no test split."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, supervised_keys=("image", "label"),
        features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(6, 7, 3)),
                                             "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 10), "validation": self._generate_examples(100, 1)}

  def _generate_examples(self, offset, step):
    for i in range(4):
      # PIL images keep the preparation free of TensorFlow (numpy images would be encoded by tf.image).
      yield i, {"image": Image.fromarray(np.full((6, 7, 3), offset + step * i, np.uint8)), "label": i % 3}


def test_tfds_array_record_without_tensorflow(tmp_path):
  builder = tfds.builder("calibjax_test_images", data_dir=str(tmp_path))
  builder.download_and_prepare(file_format="array_record")
  ds = data.load("tfds:calibjax_test_images", "test", data_dir=str(tmp_path))
  assert "'validation' split" in ds.source and ds.class_names == ("a", "b", "c")
  assert ds.images.shape == (4, 6, 7, 3)
  # Records come back in tfds' shuffled order; pair each image with its label to check the content.
  pixels = np.round(ds.images * 255).astype(int)
  values = pixels[:, 0, 0, 0]
  np.testing.assert_array_equal(pixels, np.broadcast_to(values[:, None, None, None], pixels.shape))
  np.testing.assert_array_equal(ds.labels, (values - 100) % 3)
  assert sorted(values) == [100, 101, 102, 103]


def test_resize_center_crop():
  image = np.arange(4 * 8, dtype=np.uint8).reshape(4, 8, 1)
  # The short side already has the target size: a pure centre crop of columns 2..5.
  np.testing.assert_array_equal(sources.resize_center_crop(image, 4), image[:, 2:6])
  constant = np.full((30, 20, 3), 77, np.uint8)
  np.testing.assert_array_equal(sources.resize_center_crop(constant, 10), np.full((10, 10, 3), 77))


# ---------------------------------------------------------------------------------- real data, digits, errors


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist():
  train, test = data.load("fashion_mnist", "train"), data.load("fashion_mnist", "test")
  assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
  assert train.images.dtype == np.float32 and train.images.min() == 0.0 and train.images.max() == 1.0
  assert train.class_names[0] == "T-shirt/top" and FASHION_DIR in train.source
  # Cached and read-only: the next caller gets the same, unmodified arrays.
  assert data.load("fashion_mnist", "train") is train
  with pytest.raises(ValueError):
    train.images[0, 0, 0, 0] = 1.0
  # The reference normalisation constants describe this data.
  mean, std = data.dataset_stats(train.images)
  np.testing.assert_allclose([mean[0], std[0]], [0.2861, 0.3530], atol=1e-4)


def test_digits():
  from sklearn.datasets import load_digits

  train, test = data.load("digits", "train"), data.load("digits", "test")
  assert train.images.shape[1:] == (8, 8, 1) and len(train.labels) + len(test.labels) == 1797
  assert train.images.max() == 1.0 and train.num_classes == 10
  counts = np.bincount(load_digits().target)
  np.testing.assert_array_equal(np.bincount(test.labels), [round(n / 4) for n in counts])
  np.testing.assert_array_equal(np.bincount(train.labels) + np.bincount(test.labels), counts)


def test_digits_file_reads_what_load_digits_gives():
  from sklearn.datasets import load_digits

  source = sources.SklearnDigits()
  location = source.find("digits", "train", None, [])
  assert location.endswith("digits.csv.gz")  # read without importing scikit-learn
  for split in ("train", "test"):
    from_file, from_sklearn = (source.read(split, where) for where in (location, "sklearn.datasets.load_digits"))
    np.testing.assert_array_equal(from_file.images, from_sklearn.images)
    np.testing.assert_array_equal(from_file.labels, from_sklearn.labels)
  digits = load_digits()
  train = source.read("train", location)
  first = np.flatnonzero(digits.target == train.labels[0])  # a row of the file, scaled to [0, 1]
  assert any(np.array_equal(train.images[0, :, :, 0], digits.images[i] / 16) for i in first)


def test_missing_dataset_names_every_place(tmp_path):
  with pytest.raises(DatasetNotFoundError) as info:
    data.load("fashion_mnist", "train", data_dir=str(tmp_path))
  message = str(info.value)
  assert "\n" not in message and isinstance(info.value, FileNotFoundError)
  assert str(tmp_path / "fashion_mnist") in message and str(tmp_path / "fashion-mnist") in message
  assert f"IDX files in {tmp_path} (data_dir)" in message and "tfds 'fashion_mnist' in" in message
  assert "apt-get install dataset-fashion-mnist" in message and "CALIBJAX_FASHION_MNIST_DIR" in message
  with pytest.raises(DatasetNotFoundError) as info:
    data.load("cifar10", "test")
  message = str(info.value)
  assert "$CALIBJAX_DATA_DIR (not set)" in message and "tfds 'cifar10'" in message
  assert "TFDS_DATA_DIR" in message


def test_unknown_names():
  with pytest.raises(UnknownNameError, match="fashion_mnist.*mnist.*tiny_imagenet.*tfds:.*folder:"):
    data.load("tiny_imagenet_v2", "train")
  with pytest.raises(UnknownNameError, match="catalog"):
    data.load("tfds:not_a_tfds_dataset_xyz", "train")
  with pytest.raises(ConfigError, match="train, test"):
    data.load("digits", "validation")


# ----------------------------------------------------------------------------------------------- transforms


def test_normalize():
  x = np.random.default_rng(0).uniform(size=(20, 3, 4, 3)).astype(np.float32)
  norm = data.Normalize.fit(x)
  np.testing.assert_allclose(norm.mean, x.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(norm.std, x.std(axis=(0, 1, 2)), rtol=1e-5)
  y = norm.apply(x)
  assert y.dtype == np.float32
  np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.std(axis=(0, 1, 2)), 1.0, atol=1e-5)
  np.testing.assert_allclose(norm.invert(y), x, atol=1e-6)
  y_jax = jax.jit(norm.apply)(jnp.asarray(x))
  assert isinstance(y_jax, jax.Array)
  np.testing.assert_allclose(y_jax, y, atol=1e-6)
  again = data.Normalize.from_dict(norm.to_dict())
  np.testing.assert_array_equal(again.apply(x), y)
  cifar = data.Normalize.for_dataset("cifar10")
  np.testing.assert_array_equal(cifar.std, np.float32([0.2023, 0.1994, 0.2010]))
  cifar100 = data.Normalize.for_dataset("cifar100")
  np.testing.assert_array_equal(cifar100.mean, np.float32([0.5071, 0.4866, 0.4409]))
  assert data.Normalize.for_dataset("mnist").mean.shape == (1,)
  assert data.Normalize.for_dataset("digits") is None
  with pytest.raises(ConfigError):
    data.Normalize(mean=(0.5,), std=(0.0,))


def _correlated(n, shape, seed=0):
  rng = np.random.default_rng(seed)
  d = int(np.prod(shape))
  mixing = rng.normal(size=(d, d)) * np.linspace(0.1, 2.0, d)
  return (rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)).reshape((n,) + shape).astype(np.float32)


def test_zca_matches_kornia_formula():
  x = _correlated(400, (2, 3, 2))
  zca = data.ZCA.fit(x, eps=0.1)
  # Direct formula (kornia's zca_mean): unbiased covariance, SVD, U diag((S + eps)^-1/2) U^T.
  flat = x.reshape(400, -1).astype(np.float64)
  centred = flat - flat.mean(axis=0)
  u, s, _ = np.linalg.svd(centred.T @ centred / 399)
  whiten = u @ np.diag((s + 0.1) ** -0.5) @ u.T
  y = zca.apply(x)
  assert y.shape == x.shape and y.dtype == np.float32
  np.testing.assert_allclose(y.reshape(400, -1), centred @ whiten, rtol=1e-4, atol=1e-4)
  # Whitened training data has covariance U diag(S / (S + eps)) U^T.
  flat_y = y.reshape(400, -1).astype(np.float64)
  np.testing.assert_allclose(np.cov(flat_y, rowvar=False), u @ np.diag(s / (s + 0.1)) @ u.T, atol=1e-4)
  np.testing.assert_allclose(zca.invert(y), x, rtol=1e-4, atol=1e-4)


def test_zca_tiny_eps_gives_identity_covariance():
  x = _correlated(300, (2, 2, 1), seed=1)
  y = data.ZCA.fit(x, eps=1e-10).apply(x).reshape(300, -1).astype(np.float64)
  np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(4), atol=1e-4)


def test_zca_serialises_and_takes_jax_arrays(tmp_path):
  x = _correlated(50, (3, 4, 3), seed=2)
  zca = data.ZCA.fit(x)
  np.savez(tmp_path / "zca.npz", **zca.to_dict())
  with np.load(tmp_path / "zca.npz") as stored:
    again = data.ZCA.from_dict(dict(stored))
  assert again.image_shape == (3, 4, 3) and again.eps == 0.1
  np.testing.assert_array_equal(again.apply(x), zca.apply(x))
  y_jax = jax.jit(zca.apply)(jnp.asarray(x[0]))  # One image, no batch axis.
  np.testing.assert_allclose(y_jax, zca.apply(x)[0], atol=1e-4)
  np.testing.assert_allclose(zca.invert(y_jax), x[0], atol=1e-4)
  with pytest.raises(ConfigError, match="fitted on images of shape"):
    zca.apply(np.zeros((2, 4, 3, 3), np.float32))


# -------------------------------------------------------------------------------------------------- sampling


def test_class_balanced_indices():
  labels = np.random.default_rng(0).integers(0, 4, size=200)
  idx = data.class_balanced_indices(labels, 5, seed=3)
  assert idx.shape == (20,) and len(set(idx.tolist())) == 20
  np.testing.assert_array_equal(labels[idx], np.repeat(np.arange(4), 5))  # Class-major.
  np.testing.assert_array_equal(idx, data.class_balanced_indices(labels, 5, seed=3))
  assert not np.array_equal(idx, data.class_balanced_indices(labels, 5, seed=4))
  with pytest.raises(ConfigError, match="class 4 has 0 examples"):
    data.class_balanced_indices(labels, 5, seed=3, num_classes=5)
  groups = data.class_indices(labels, 4)
  assert [len(g) for g in groups] == np.bincount(labels).tolist() and all((labels[g] == c).all()
                                                                          for c, g in enumerate(groups))


def test_split_per_class():
  labels = np.repeat(np.arange(3), [10, 20, 40])
  train, val = data.split_per_class(labels, val_per_class=4, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[val]), [4, 4, 4])
  assert not set(train) & set(val) and sorted(np.concatenate([train, val])) == list(range(70))
  train_f, val_f = data.split_per_class(labels, val_fraction=0.25, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[val_f]), [2, 5, 10])  # round(2.5) = 2 (half to even).
  again = data.split_per_class(labels, val_fraction=0.25, seed=0)
  np.testing.assert_array_equal(again[1], val_f)
  assert not np.array_equal(data.split_per_class(labels, val_fraction=0.25, seed=1)[1], val_f)
  for kwargs in ({}, {"val_per_class": 1, "val_fraction": 0.1}, {"val_fraction": 1.0}, {"val_per_class": 11}):
    with pytest.raises(ConfigError):
      data.split_per_class(labels, seed=0, **kwargs)


def test_batch_indices():
  batches = data.batch_indices(10, 4, seed=7, epoch=2, drop_remainder=False)
  assert [len(b) for b in batches] == [4, 4, 2] and sorted(np.concatenate(batches)) == list(range(10))
  dropped = data.batch_indices(10, 4, seed=7, epoch=2, drop_remainder=True)
  np.testing.assert_array_equal(np.concatenate(dropped), np.concatenate(batches)[:8])
  np.testing.assert_array_equal(np.concatenate(batches), np.random.default_rng([7, 2]).permutation(10))
  other_epoch = data.batch_indices(10, 4, seed=7, epoch=3, drop_remainder=False)
  assert not np.array_equal(np.concatenate(other_epoch), np.concatenate(batches))
  assert data.batch_indices(3, 4, seed=0, epoch=0, drop_remainder=True) == []
