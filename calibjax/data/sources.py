"""Dataset sources: local IDX files, CIFAR python pickles, image folders, the CIFAR-C arrays, tensorflow-datasets,
scikit-learn digits.

`load(name, split)` returns a `Dataset` of host numpy arrays: images float32 NHWC in [0, 1], labels int32.
Each dataset lists its sources; they are tried in this order and the first that has the dataset wins:

1. **IDX files** (MNIST format, each file gzipped or raw) -- `fashion_mnist`, `mnist`. The files are
   `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]` and
   `t10k-labels-idx1-ubyte[.gz]`. Directories, in order: when `data_dir` is given, `data_dir/<name>`,
   `data_dir/<name with '-'>` and `data_dir` itself; otherwise `$CALIBJAX_FASHION_MNIST_DIR` (resp.
   `$CALIBJAX_MNIST_DIR`) alone when it is set (a named directory without the files is an error, not a reason
   to read another copy), else `$CALIBJAX_DATA_DIR/<name>` (and the hyphenated name), then the system directory
   `/usr/share/datasets/fashion-mnist` (Debian package `dataset-fashion-mnist`) resp.
   `/usr/share/datasets/mnist`.
2. **CIFAR python pickles** -- `cifar10`, `cifar100`: the official tarballs extracted, i.e.
   `cifar-10-batches-py/` (`data_batch_1..5`, `test_batch`, `batches.meta`) or `cifar-100-python/` (`train`,
   `test`, `meta`; labels `fine_labels`), under `data_dir`, else under `$CALIBJAX_DATA_DIR`.
3. **tensorflow-datasets** -- `fashion_mnist`, `mnist`, `cifar10`, `cifar100`, `imagenette` (the first
   prepared of its 160px, 320px and full-size configs, resized and centre-cropped to 128x128 as the MTT
   ImageNet subsets) and any catalog name as `tfds:<name>` (e.g. `tfds:svhn_cropped`). Reads a *prepared*
   dataset from `data_dir`, else from tfds' default (`$TFDS_DATA_DIR`, else `~/tensorflow_datasets`); nothing
   is downloaded. array_record data is read through the builder's data source (`tfds.data_source`), which
   needs no TensorFlow; data prepared in the tfrecord format is read through `builder.as_dataset` only where
   `tensorflow` is importable (e.g. Colab). A `test` request falls back to the `validation` split when the
   dataset has no `test` split, and `Dataset.source` says so.
4. **Image folders** (PNG, JPEG, ...; decoded with Pillow, all of one size) -- `cinic10`: the official archive
   extracted, `CINIC-10/{train,test}/<class>/*.png` (its `valid/` is not read); `tiny_imagenet`:
   `tiny-imagenet-200/` as released (train/<wnid>/images, val/images + val_annotations.txt; 'test' is the
   labelled val set); any `folder:<path>` in torchvision's ImageFolder layout (`<path>/train/<class>/...`,
   `<path>/test/<class>/...` or `val/`; classes numbered in sorted folder order). Named datasets lie under
   `data_dir`, else `$CALIBJAX_DATA_DIR`.
5. **CIFAR-C arrays** -- `cifar10_c:<corruption>:<severity>` and `cifar100_c:...` (test only): the official
   `CIFAR-10-C/<corruption>.npy` (the test set at severities 1-5, stacked) and `labels.npy`; CIFAR-10-C also
   from tfds' `cifar10_corrupted`.
6. **scikit-learn** -- `digits` (8x8x1, pixel values / 16, 10 classes; bundled with scikit-learn, so always
   available): a stratified split with 1/4 of each class in `test`, drawn by
   `calibjax.data.sampling.split_per_class(val_fraction=0.25, seed=0)`.

When `data_dir` is given it replaces every environment variable and system directory above (so a run that
names its data never silently reads other data). A dataset found nowhere raises `DatasetNotFoundError` with
one line naming every place looked and how to get the data.

Loaded datasets are cached in-process, keyed on (name, split, source, resolved location); their arrays are
read-only so that no caller can change what the next caller gets.
"""

import dataclasses
import functools
import gzip
import importlib.util
import os
import pickle
import zlib
from collections.abc import Hashable
from typing import Protocol

import numpy as np

from calibjax.data.sampling import split_per_class
from calibjax.errors import ConfigError, DatasetNotFoundError, UnknownNameError
from calibjax.registry import Registry

SPLITS = ("train", "test")
TFDS_PREFIX = "tfds:"

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """One split of a labelled image dataset, as host numpy arrays.

  Attributes:
    name: the name passed to `load` (e.g. 'fashion_mnist', 'tfds:svhn_cropped').
    split: 'train' or 'test'.
    images: float32 (N, H, W, C) with values in [0, 1]; read-only.
    labels: int32 (N,) in [0, num_classes); read-only.
    num_classes: number of classes, `len(class_names)`.
    class_names: one name per class index.
    source: human-readable origin (files, directory or tfds split actually read).
  """

  name: str
  split: str
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]
  source: str


@dataclasses.dataclass(frozen=True, eq=False)
class RawSplit:
  """One split as a `Source` reads it.

  Attributes:
    images: float32 (N, H, W, C) in [0, 1].
    labels: integer (N,).
    class_names: the source's class names, or None where it has none (IDX files).
    source: human-readable origin, becomes `Dataset.source`.
  """

  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...] | None
  source: str


class Source(Protocol):
  """A place a dataset may be stored. Implementations are frozen (hashable) dataclasses.

  `find` returns a hashable location (resolved paths) or None, appending a description of every place it
  looked to `looked`; `read` returns the split stored at that location.
  """

  def find(self, name: str, split: str, data_dir: str | None, looked: list[str]) -> Hashable | None:
    ...

  def read(self, split: str, location: Hashable) -> RawSplit:
    ...


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to get one dataset.

  Attributes:
    sources: tried in order; the first that finds the dataset is read.
    fix: how a user gets the dataset, appended to the not-found message.
    class_names: fixed class names; None takes them from the source that is read.
  """

  sources: tuple[Source, ...]
  fix: str
  class_names: tuple[str, ...] | None = None


def _to_unit_float(images: np.ndarray, scale: float) -> np.ndarray:
  """Integer pixels / scale as C-contiguous float32, without a second full-size temporary."""
  out = images.astype(np.float32, order="C")
  out /= np.float32(scale)
  return out


# -------------------------------------------------------------------------------------------------------- IDX

# IDX type codes (http://yann.lecun.com/exdb/mnist/): data are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (raw, or gzipped when `path` ends in '.gz').

  Args:
    path: file path.

  Returns:
    The array with the file's dimensions and dtype in native byte order (e.g. uint8 (60000, 28, 28) for MNIST
    images); single-byte data are a read-only view of the file's bytes.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
    raise DatasetNotFoundError(f"{path} cannot be read ({error}); replace it with the original file") from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise DatasetNotFoundError(
        f"{path} is not an IDX file (bad magic number); replace it with the original file")
  dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
  shape = tuple(int(s) for s in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
  offset = 4 + 4 * ndim
  if len(data) - offset != dtype.itemsize * int(np.prod(shape)):
    raise DatasetNotFoundError(
        f"{path} is truncated (header says shape {shape}); replace it with the original file")
  array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
  return array.astype(dtype.newbyteorder("="), copy=False)


def _unique_dirs(candidates: list[tuple[str, str]]) -> list[tuple[str, str]]:
  """Drops repeated directories, keeping the first description of each."""
  seen, unique = set(), []
  for directory, why in candidates:
    key = os.path.realpath(directory)
    if key not in seen:
      seen.add(key)
      unique.append((directory, why))
  return unique


@dataclasses.dataclass(frozen=True)
class IdxFiles:
  """MNIST-format IDX files (see the module docstring for the directories searched).

  Attributes:
    env_var: environment variable naming the directory that holds the files.
    system_dir: directory a system package installs the files into.
  """

  env_var: str
  system_dir: str

  def _candidates(self, name: str, data_dir: str | None) -> list[tuple[str, str]]:
    names = (name, name.replace("_", "-"))
    if data_dir is not None:
      return _unique_dirs([(os.path.join(data_dir, n), "data_dir") for n in names]
                            + [(data_dir, "data_dir")])
    if os.environ.get(self.env_var):  # the user named the directory: no fallback to another copy
      return [(os.environ[self.env_var], f"${self.env_var}")]
    candidates = []
    if os.environ.get("CALIBJAX_DATA_DIR"):
      candidates += [(os.path.join(os.environ["CALIBJAX_DATA_DIR"], n), "$CALIBJAX_DATA_DIR") for n in names]
    candidates.append((self.system_dir, "system directory"))
    return _unique_dirs(candidates)

  def find(self, name: str, split: str, data_dir: str | None, looked: list[str]) -> Hashable | None:
    for directory, why in self._candidates(name, data_dir):
      paths = []
      for kind in ("images-idx3", "labels-idx1"):
        stem = os.path.join(directory, f"{_IDX_PREFIX[split]}-{kind}-ubyte")
        paths += [p for p in (stem, stem + ".gz") if os.path.isfile(p)][:1]
      if len(paths) == 2:
        return tuple(os.path.realpath(p) for p in paths)
      looked.append(f"IDX files in {directory} ({why})")
    return None

  def read(self, split: str, location: Hashable) -> RawSplit:
    images_path, labels_path = location
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
      raise DatasetNotFoundError(
          f"{images_path} {images.shape} and {labels_path} {labels.shape} do not form a labelled image set; "
          "replace them with the original files")
    return RawSplit(_to_unit_float(images[..., None], 255), labels, None,
                    f"IDX files {images_path}, {labels_path}")


# ------------------------------------------------------------------------------------------------------ CIFAR


def _dataset_dir(dirname: str, data_dir: str | None, looked: list[str]) -> tuple[str | None, str]:
  """(`dirname` under data_dir, else under $CALIBJAX_DATA_DIR; how that root was chosen). (None, ...) when
  neither is set, which is noted in `looked`."""
  root, why = (data_dir, "data_dir") if data_dir is not None else (os.environ.get("CALIBJAX_DATA_DIR") or None,
                                                                    "$CALIBJAX_DATA_DIR")
  if root is None:
    looked.append(f"{dirname}/ under $CALIBJAX_DATA_DIR (not set)")
    return None, why
  return os.path.join(root, dirname), why


def _unpickle(path: str) -> dict[str, object]:
  """Reads one CIFAR python pickle; keys become str whether the file was written by Python 2 or 3."""
  # The official files are Python 2 pickles; encoding='bytes' keeps their byte strings undecoded. They are
  # trusted input in the same sense as any file the user points the loader at.
  with open(path, "rb") as f:
    content = pickle.load(f, encoding="bytes")
  return {(k.decode() if isinstance(k, bytes) else k): v for k, v in content.items()}


@dataclasses.dataclass(frozen=True)
class CifarPickles:
  """An extracted official CIFAR python tarball.

  Attributes:
    dirname: directory the tarball extracts to ('cifar-10-batches-py', 'cifar-100-python').
    train_files, test_files: pickles that make up each split, concatenated in this order.
    meta_file: pickle that holds the class names under `names_key`.
    label_key: label entry of the data pickles ('labels' for CIFAR-10, 'fine_labels' for CIFAR-100).
  """

  dirname: str
  train_files: tuple[str, ...]
  test_files: tuple[str, ...]
  meta_file: str
  names_key: str
  label_key: str

  def find(self, name: str, split: str, data_dir: str | None, looked: list[str]) -> Hashable | None:
    directory, why = _dataset_dir(self.dirname, data_dir, looked)
    if directory is None:
      return None
    files = (self.train_files if split == "train" else self.test_files) + (self.meta_file,)
    if all(os.path.isfile(os.path.join(directory, f)) for f in files):
      return os.path.realpath(directory)
    looked.append(f"{directory} ({why})")
    return None

  def read(self, split: str, location: Hashable) -> RawSplit:
    parts = [_unpickle(os.path.join(location, f))
             for f in (self.train_files if split == "train" else self.test_files)]
    # Rows are 3072 bytes: the red, green and blue 32x32 planes, each row-major (NCHW).
    images = np.concatenate([np.asarray(p["data"], np.uint8) for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(p[self.label_key]) for p in parts])
    names = _unpickle(os.path.join(location, self.meta_file))[self.names_key]
    class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return RawSplit(_to_unit_float(images.transpose(0, 2, 3, 1), 255), labels, class_names,
                    f"CIFAR python pickles in {location}")


# ------------------------------------------------------------------------------------------------------- tfds


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes the shorter side to `size` (bilinear, antialiased) and crops the centre `size` x `size` square.

  Follows torchvision's `Resize(size)` + `CenterCrop(size)` as used for the ImageNet subsets of the MTT
  reference: the longer side becomes int(size * long / short), the crop offset round((long - size) / 2).

  Args:
    image: uint8 (H, W, C) with C in {1, 3}.
    size: output side.

  Returns:
    uint8 (size, size, C).
  """
  from PIL import Image  # Lazy: only datasets whose images vary in size need it.

  h, w, c = image.shape
  short = min(h, w)
  new_h, new_w = (size, int(size * w / short)) if h == short else (int(size * h / short), size)
  resized = np.asarray(Image.fromarray(image[..., 0] if c == 1 else image).resize((new_w, new_h),
                                                                                   Image.BILINEAR))
  top, left = round((new_h - size) / 2), round((new_w - size) / 2)
  return resized[top:top + size, left:left + size].reshape(size, size, c)


def _tensorflow_importable() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


@dataclasses.dataclass(frozen=True)
class Tfds:
  """A dataset prepared by tensorflow-datasets.

  Attributes:
    tfds_name: catalog name, optionally with config/version ('imagenette/160px').
    image_size: when set, every image goes through `resize_center_crop(image, image_size)`; needed for
      datasets whose images vary in size.
  """

  tfds_name: str
  image_size: int | None = None

  def _builder(self, data_dir: str | None):
    import tensorflow_datasets as tfds  # Lazy: takes 0.4 s and only this source needs it.

    try:
      return tfds.builder(self.tfds_name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise UnknownNameError(
          f"'{self.tfds_name}' is not in the tensorflow-datasets catalog; see "
          "https://www.tensorflow.org/datasets/catalog for the names") from None

  @staticmethod
  def _split(builder, split: str) -> str:
    # Unprepared (and mocked) builders know no splits; only a prepared dataset can say 'test' is missing.
    splits = builder.info.splits
    return "validation" if split == "test" and "test" not in splits and "validation" in splits else split

  def _records(self, builder, split: str):
    """The records of `split`, or a string saying why they cannot be read."""
    try:
      return builder.as_data_source(split=self._split(builder, split))
    except NotImplementedError:
      # Raised when nothing is prepared (the builder then defaults to tfrecord) and for tfrecord data.
      if not builder.is_prepared():
        return "not prepared"
      if not _tensorflow_importable():
        return "prepared as tfrecord, which needs tensorflow; prepare it with file_format='array_record'"
    except ValueError as e:  # A prepared dataset without the split.
      return str(e).splitlines()[0]
    import tensorflow_datasets as tfds

    return tfds.as_numpy(builder.as_dataset(split=self._split(builder, split)))

  def find(self, name: str, split: str, data_dir: str | None, looked: list[str]) -> Hashable | None:
    builder = self._builder(data_dir)
    records = self._records(builder, split)
    if isinstance(records, str):
      looked.append(f"tfds '{self.tfds_name}' in {builder.data_dir} ({records})")
      return None
    return data_dir, builder.data_dir

  def read(self, split: str, location: Hashable) -> RawSplit:
    builder = self._builder(location[0])
    tfds_split = self._split(builder, split)
    image_key, label_key = builder.info.supervised_keys
    images, labels = [], []
    for record in self._records(builder, split):
      image = np.asarray(record[image_key], np.uint8)
      images.append(image if self.image_size is None else resize_center_crop(image, self.image_size))
      labels.append(record[label_key])
    if len({image.shape for image in images}) > 1:
      raise ConfigError(
          f"images of tfds '{self.tfds_name}' vary in size; register a calibjax.data.DatasetSpec whose "
          "calibjax.data.sources.Tfds source sets image_size (as 'imagenette' does)")
    note = "" if tfds_split == split else f" ('{tfds_split}' split: the dataset has no '{split}' split)"
    return RawSplit(_to_unit_float(np.stack(images), 255), np.asarray(labels),
                    tuple(builder.info.features[label_key].names),
                    f"tfds '{self.tfds_name}' {tfds_split} in {builder.data_dir}{note}")


# ---------------------------------------------------------------------------------------------------- sklearn


@dataclasses.dataclass(frozen=True)
class SklearnDigits:
  """scikit-learn's bundled 8x8 digits (1797 images), split 3/4 train, 1/4 test per class with seed 0.

  Read from the file `sklearn.datasets.load_digits` reads (digits.csv.gz in scikit-learn's package: 64 pixel
  values then the label per row), without importing scikit-learn, which takes two seconds — paid by every smoke
  run; `load_digits` itself where scikit-learn keeps its data elsewhere."""

  def find(self, name: str, split: str, data_dir: str | None, looked: list[str]) -> Hashable | None:
    package = importlib.util.find_spec("sklearn")
    bundled = package and os.path.join(package.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    return bundled if bundled and os.path.exists(bundled) else "sklearn.datasets.load_digits"

  def read(self, split: str, location: Hashable) -> RawSplit:
    if location == "sklearn.datasets.load_digits":
      from sklearn.datasets import load_digits
      digits = load_digits()
      images, labels = digits.images, digits.target
    else:
      rows = np.loadtxt(location, delimiter=",")
      images, labels = rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(int)
    train_idx, test_idx = split_per_class(labels, val_fraction=0.25, seed=0)
    idx = train_idx if split == "train" else test_idx
    return RawSplit(_to_unit_float(images[idx, :, :, None], 16), labels[idx], None,
                    f"scikit-learn's digits ({location}), stratified split: 1/4 of each class in test, seed 0")


# ------------------------------------------------------------------------------------------- image folders


def read_images(paths: list[str], *, mode: str) -> np.ndarray:
  """Decodes image files (PNG, JPEG, ...) to uint8 (N, H, W, C) in PIL `mode` ("RGB" or "L"), several at a time.

  Raises:
    DatasetNotFoundError: a file cannot be decoded, or the images differ in size (one line naming the file).
  """
  from concurrent.futures import ThreadPoolExecutor

  from PIL import Image, UnidentifiedImageError

  def decode(path):
    try:
      with Image.open(path) as image:
        return np.asarray(image.convert(mode))
    except (OSError, UnidentifiedImageError) as error:
      raise DatasetNotFoundError(f"{path} cannot be decoded as an image ({error}); replace or remove it") from None

  with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    images = list(pool.map(decode, paths))
  if not images:
    return np.zeros((0, 1, 1, 3 if mode == "RGB" else 1), np.uint8)
  for path, image in zip(paths, images):
    if image.shape != images[0].shape:
      raise DatasetNotFoundError(f"{path} is {image.shape[:2]} but {paths[0]} is {images[0].shape[:2]}: the "
                                 "images of a folder dataset must share one size; resize them first")
  stacked = np.stack(images)
  return stacked[..., None] if stacked.ndim == 3 else stacked


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _image_files(directory: str) -> list[str]:
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if f.lower().endswith(_IMAGE_SUFFIXES) and not f.startswith("."))


@dataclasses.dataclass(frozen=True)
class ImageFolders:
  """torchvision's ImageFolder layout, one folder per split: `<root>/<split dir>/<class name>/<image files>`;
  classes are the sorted class folder names, as ImageFolder numbers them.

  Attributes:
    dirname: the dataset's folder under data_dir / $CALIBJAX_DATA_DIR (e.g. 'CINIC-10'); '' when `root` is given.
    split_dirs: (split, candidate folder names) pairs; the first folder present serves the split (e.g. test
      from 'test', else 'val').
    mode: PIL mode the images are converted to ('RGB', or 'L' for one channel).
    root: a folder named directly (the `folder:<path>` datasets), searched instead of data_dir.
  """

  dirname: str
  split_dirs: tuple[tuple[str, tuple[str, ...]], ...] = (("train", ("train",)), ("test", ("test", "val")))
  mode: str = "RGB"
  root: str = ""

  def find(self, name: str, split: str, data_dir: str | None, looked: list[str]) -> Hashable | None:
    base, why = (self.root, "folder: path") if self.root else _dataset_dir(self.dirname, data_dir, looked)
    if base is None:
      return None
    for candidate in dict(self.split_dirs)[split]:
      directory = os.path.join(base, candidate)
      if os.path.isdir(directory) and any(os.path.isdir(os.path.join(directory, c)) for c in os.listdir(directory)):
        return os.path.realpath(directory)
    looked.append(f"class folders in {base}/{{{','.join(dict(self.split_dirs)[split])}}} ({why})")
    return None

  def read(self, split: str, location: Hashable) -> RawSplit:
    classes = sorted(c for c in os.listdir(location) if os.path.isdir(os.path.join(location, c)))
    paths, labels = [], []
    for index, class_name in enumerate(classes):
      files = _image_files(os.path.join(location, class_name))
      paths += files
      labels += [index] * len(files)
    images = read_images(paths, mode=self.mode)
    return RawSplit(_to_unit_float(images, 255), np.asarray(labels, np.int64), tuple(classes),
                    f"image folders in {location} ({len(classes)} classes)")


@dataclasses.dataclass(frozen=True)
class TinyImageNetFolder:
  """The official Tiny ImageNet archive extracted (`tiny-imagenet-200/`): `wnids.txt`, `words.txt`,
  `train/<wnid>/images/*.JPEG` and `val/images/*.JPEG` labelled by `val/val_annotations.txt` (file, wnid, box).

  The 'test' split is the labelled official validation set (the official test images have no labels), as the
  papers report. Classes are the sorted wnids (ImageFolder's numbering of train/), named by their first WordNet
  lemma in words.txt; 64 x 64 RGB (the few greyscale JPEGs are converted).
  """

  dirname: str = "tiny-imagenet-200"

  def find(self, name: str, split: str, data_dir: str | None, looked: list[str]) -> Hashable | None:
    directory, why = _dataset_dir(self.dirname, data_dir, looked)
    if directory is None:
      return None
    needed = ("wnids.txt", "train") if split == "train" else ("wnids.txt", "val/val_annotations.txt", "val/images")
    if all(os.path.exists(os.path.join(directory, n)) for n in needed):
      return os.path.realpath(directory)
    looked.append(f"{directory} ({why})")
    return None

  def read(self, split: str, location: Hashable) -> RawSplit:
    with open(os.path.join(location, "wnids.txt")) as f:
      wnids = sorted(line.strip() for line in f if line.strip())
    index = {wnid: i for i, wnid in enumerate(wnids)}
    words = {}
    if os.path.isfile(os.path.join(location, "words.txt")):
      with open(os.path.join(location, "words.txt")) as f:
        words = dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
    if split == "train":
      pairs = [(path, index[wnid]) for wnid in wnids
               for path in _image_files(os.path.join(location, "train", wnid, "images"))]
    else:
      with open(os.path.join(location, "val", "val_annotations.txt")) as f:
        rows = [line.split("\t") for line in f if line.strip()]
      unknown = sorted({row[1] for row in rows} - set(index))
      if unknown:
        raise DatasetNotFoundError(f"val/val_annotations.txt in {location} names wnids not in wnids.txt "
                                   f"({', '.join(unknown[:3])}); replace the archive's files")
      pairs = sorted((os.path.join(location, "val", "images", row[0]), index[row[1]]) for row in rows)
    images = read_images([path for path, _ in pairs], mode="RGB")
    names = tuple(words.get(wnid, wnid).split(",")[0].strip() for wnid in wnids)
    return RawSplit(_to_unit_float(images, 255), np.asarray([label for _, label in pairs], np.int64), names,
                    f"Tiny ImageNet folders in {location} ({'train' if split == 'train' else 'val, as test'})")


# The corruptions of CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019): 15 benchmark ones, then 4 extra.
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)


@dataclasses.dataclass(frozen=True)
class CorruptedNpy:
  """The official CIFAR-10-C / CIFAR-100-C release extracted: `<dirname>/<corruption>.npy`, uint8 (5 N, 32, 32, 3),
  the N test images at severity 1, then 2, ... 5, and `labels.npy` (5 N,). A test split only.

  Attributes:
    dirname: 'CIFAR-10-C' or 'CIFAR-100-C'.
    corruption: one of `CORRUPTIONS`.
    severity: 1 ... 5.
  """

  dirname: str
  corruption: str
  severity: int

  def find(self, name: str, split: str, data_dir: str | None, looked: list[str]) -> Hashable | None:
    directory, why = _dataset_dir(self.dirname, data_dir, looked)
    if directory is None:
      return None
    if split == "train":
      looked.append(f"{self.dirname} (a test split only: train on the clean dataset)")
      return None
    if all(os.path.isfile(os.path.join(directory, f)) for f in (f"{self.corruption}.npy", "labels.npy")):
      return os.path.realpath(directory)
    looked.append(f"{self.corruption}.npy and labels.npy in {directory} ({why})")
    return None

  def read(self, split: str, location: Hashable) -> RawSplit:
    images = np.load(os.path.join(location, f"{self.corruption}.npy"), mmap_mode="r")
    labels = np.load(os.path.join(location, "labels.npy"))
    if images.ndim != 4 or len(images) != len(labels) or len(images) % len(SEVERITIES):
      raise DatasetNotFoundError(f"{location}/{self.corruption}.npy {images.shape} and labels.npy {labels.shape} "
                                 "are not 5 stacked severities of one labelled test set; replace them")
    per = len(images) // len(SEVERITIES)
    rows = slice((self.severity - 1) * per, self.severity * per)
    return RawSplit(_to_unit_float(np.asarray(images[rows]), 255), labels[rows], None,
                    f"{location}/{self.corruption}.npy, severity {self.severity}")


# --------------------------------------------------------------------------------------------------- registry

DATASETS: Registry[DatasetSpec] = Registry("dataset")

_CIFAR_FIX = ("extract the official python tarball (https://www.cs.toronto.edu/~kriz/cifar.html) into "
              "$CALIBJAX_DATA_DIR, or prepare the tfds dataset '{0}' into $TFDS_DATA_DIR")
_TFDS_FIX = ("prepare the tfds dataset into $TFDS_DATA_DIR (where tensorflow is installed: python -c "
             "\"import tensorflow_datasets as tfds; "
             "tfds.builder('{0}').download_and_prepare(file_format='array_record')\")")

DATASETS.register("fashion_mnist")(DatasetSpec(
    sources=(IdxFiles("CALIBJAX_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"),
             Tfds("fashion_mnist")),
    fix="apt-get install dataset-fashion-mnist (as root) or set CALIBJAX_FASHION_MNIST_DIR to a directory "
        "with the Fashion-MNIST IDX files",
    class_names=FASHION_MNIST_CLASSES))
DATASETS.register("mnist")(DatasetSpec(
    sources=(IdxFiles("CALIBJAX_MNIST_DIR", "/usr/share/datasets/mnist"), Tfds("mnist")),
    fix="set CALIBJAX_MNIST_DIR to a directory with the MNIST IDX files (train-images-idx3-ubyte.gz, ...), "
        "or " + _TFDS_FIX.format("mnist"),
    class_names=DIGIT_CLASSES))
DATASETS.register("cifar10")(DatasetSpec(
    sources=(CifarPickles("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                          ("test_batch",), "batches.meta", "label_names", "labels"),
             Tfds("cifar10")),
    fix=_CIFAR_FIX.format("cifar10"),
    class_names=CIFAR10_CLASSES))
DATASETS.register("cifar100")(DatasetSpec(
    sources=(CifarPickles("cifar-100-python", ("train",), ("test",), "meta", "fine_label_names",
                          "fine_labels"),
             Tfds("cifar100")),
    fix=_CIFAR_FIX.format("cifar100")))
DATASETS.register("digits")(DatasetSpec(sources=(SklearnDigits(),), fix="pip install scikit-learn",
                                         class_names=DIGIT_CLASSES))
DATASETS.register("cinic10")(DatasetSpec(
    sources=(ImageFolders("CINIC-10", split_dirs=(("train", ("train",)), ("test", ("test",)))),),
    fix="extract the official CINIC-10 archive (https://datashare.ed.ac.uk/handle/10283/3192) into "
        "$CALIBJAX_DATA_DIR/CINIC-10 (train/, valid/, test/ with one folder per class)"))
DATASETS.register("tiny_imagenet")(DatasetSpec(
    sources=(TinyImageNetFolder(),),
    fix="extract the official archive (http://cs231n.stanford.edu/tiny-imagenet-200.zip) into $CALIBJAX_DATA_DIR"))
# ImageNette at 128x128 as the MTT ImageNet subsets (resize + centre crop); any prepared size variant will do.
DATASETS.register("imagenette")(DatasetSpec(
    sources=tuple(Tfds(f"imagenette/{config}", image_size=128) for config in ("160px", "320px", "full-size")),
    fix=_TFDS_FIX.format("imagenette/160px")))


def _corrupted_spec(name: str) -> DatasetSpec:
  """'cifar10_c:<corruption>:<severity>' / 'cifar100_c:...': the official .npy release, then (CIFAR-10-C) tfds."""
  base, _, rest = name.partition(":")
  corruption, _, severity = rest.partition(":")
  if corruption not in CORRUPTIONS or severity not in tuple(str(s) for s in SEVERITIES):
    raise UnknownNameError(f"dataset '{name}' must be {base}:<corruption>:<severity 1-5> with a corruption of: "
                           f"{', '.join(CORRUPTIONS)}")
  dirname = {"cifar10_c": "CIFAR-10-C", "cifar100_c": "CIFAR-100-C"}[base]
  sources = (CorruptedNpy(dirname, corruption, int(severity)),)
  if base == "cifar10_c":
    sources += (Tfds(f"cifar10_corrupted/{corruption}_{severity}"),)
  return DatasetSpec(sources=sources, class_names=CIFAR10_CLASSES if base == "cifar10_c" else
                     tuple(str(k) for k in range(100)),
                     fix=f"extract the official {dirname} release (https://zenodo.org/records/2535967, "
                         "/3555552) into $CALIBJAX_DATA_DIR; it has a test split only")


CORRUPTED_PREFIXES = ("cifar10_c:", "cifar100_c:")
FOLDER_PREFIX = "folder:"


def get_spec(name: str) -> DatasetSpec:
  """The spec of a registered name, or of a prefixed one: 'tfds:<catalog name>', 'folder:<path>' (an
  ImageFolder tree: <path>/train/<class>/..., <path>/test (or val)/<class>/...), 'cifar10_c:<corruption>:<s>'
  and 'cifar100_c:<corruption>:<s>' (test only).

  Raises:
    UnknownNameError: `name` is neither registered nor validly prefixed.
  """
  if name.startswith(TFDS_PREFIX):
    tfds_name = name[len(TFDS_PREFIX):]
    return DatasetSpec(sources=(Tfds(tfds_name),), fix=_TFDS_FIX.format(tfds_name))
  if name.startswith(FOLDER_PREFIX):
    root = name[len(FOLDER_PREFIX):]
    return DatasetSpec(sources=(ImageFolders("", root=os.path.abspath(root)),),
                       fix=f"give {FOLDER_PREFIX}<path> with <path>/train/<class>/<images> and "
                           "<path>/test/<class>/<images> (or val/)")
  if name.startswith(CORRUPTED_PREFIXES):
    return _corrupted_spec(name)
  if name not in DATASETS:
    raise UnknownNameError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS.names())}, or "
                           f"'{TFDS_PREFIX}<catalog name>' (e.g. {TFDS_PREFIX}svhn_cropped), "
                           f"'{FOLDER_PREFIX}<path>', 'cifar10_c:<corruption>:<severity>'")
  return DATASETS.get(name)


def _read_only(array: np.ndarray) -> np.ndarray:
  array = np.ascontiguousarray(array)
  array.flags.writeable = False
  return array


@functools.lru_cache(maxsize=16)
def _read(name: str, spec: DatasetSpec, source: Source, split: str, location: Hashable) -> Dataset:
  raw = source.read(split, location)
  class_names = spec.class_names or raw.class_names
  labels = np.asarray(raw.labels).astype(np.int32)
  if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
    raise DatasetNotFoundError(f"{raw.source} has labels outside [0, {len(class_names)}); replace the files")
  return Dataset(name=name, split=split, images=_read_only(raw.images), labels=_read_only(labels),
                 num_classes=len(class_names), class_names=tuple(class_names), source=raw.source)


def load(name: str, split: str, *, data_dir: str | None = None) -> Dataset:
  """Loads one split of a dataset from the first source that has it (order in the module docstring).

  Args:
    name: a registered name (`DATASETS.names()`: 'cifar10', 'cifar100', 'cinic10', 'digits', 'fashion_mnist',
      'imagenette', 'mnist', 'tiny_imagenet') or a prefixed one (`get_spec`).
    split: 'train' or 'test'.
    data_dir: directory searched instead of the environment variables and system directories.

  Returns:
    The cached `Dataset` (read-only arrays; copy them to modify).

  Raises:
    UnknownNameError: unknown `name`.
    ConfigError: `split` is not 'train' or 'test'.
    DatasetNotFoundError: no source has the dataset; the message lists every place looked and the fix.
  """
  spec = get_spec(name)
  if split not in SPLITS:
    raise ConfigError(f"unknown split '{split}' for dataset '{name}'; choose one of: {', '.join(SPLITS)}")
  looked: list[str] = []
  for source in spec.sources:
    location = source.find(name, split, data_dir, looked)
    if location is not None:
      return _read(name, spec, source, split, location)
  raise DatasetNotFoundError(
      f"dataset '{name}' ({split}) not found; looked in: {'; '.join(looked)}; to get it: {spec.fix}")
