"""The folder and array sources of calibjax.data (CINIC-10, Tiny ImageNet, image folders, CIFAR-10-C /
CIFAR-100-C), each read from a small generated fixture in its official layout: pixels and labels back exactly,
class numbering, which split a folder serves, and one-line errors."""

import os

import numpy as np
import pytest
from PIL import Image

from calibjax import data
from calibjax.data import sources
from calibjax.errors import DatasetNotFoundError, UnknownNameError


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
  for var in ("CALIBJAX_DATA_DIR", "TFDS_DATA_DIR"):
    monkeypatch.delenv(var, raising=False)


def _save(path, pixels, fmt="PNG"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels).save(path, format=fmt)


def _pixels(seed, shape):
  return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_cinic10_reads_its_class_folders_in_sorted_order(tmp_path):
  root = tmp_path / "CINIC-10"
  classes = sources.CIFAR10_CLASSES  # CINIC-10's folder names, already in sorted order
  written = {}
  for split in ("train", "valid", "test"):
    for k, name in enumerate(classes[:3]):
      for i in range(2):
        pixels = _pixels(100 * k + 10 * i + len(split), (32, 32, 3))
        _save(str(root / split / name / f"{split}_{name}_{i}.png"), pixels)
        written[split, k, i] = pixels
  test = data.load("cinic10", "test", data_dir=str(tmp_path))
  assert test.images.shape == (6, 32, 32, 3) and test.class_names == classes[:3]
  np.testing.assert_array_equal(test.labels, [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(test.images[3], written["test", 1, 1].astype(np.float32) / 255)
  train = data.load("cinic10", "train", data_dir=str(tmp_path))  # valid/ is not read
  np.testing.assert_array_equal(train.images[0], written["train", 0, 0].astype(np.float32) / 255)


def _tiny_imagenet(root):
  """wnids in an unsorted order; one greyscale JPEG; val labelled through val_annotations.txt."""
  wnids = ["n02", "n01", "n03"]
  (root / "wnids.txt").parent.mkdir(parents=True)
  (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
  (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tsalamander\nn03\tbullfrog, Rana\n"
                                  "n99\tunused\n")
  for k, wnid in enumerate(wnids):
    for i in range(2):
      _save(str(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG"), _pixels(k * 2 + i, (64, 64, 3)), "JPEG")
  _save(str(root / "train" / "n03" / "images" / "n03_2.JPEG"), np.full((64, 64), 200, np.uint8), "JPEG")
  val = [("val_1.JPEG", "n03"), ("val_0.JPEG", "n01")]
  for i, (name, _) in enumerate(val):
    _save(str(root / "val" / "images" / name), np.full((64, 64, 3), 40 * (i + 1), np.uint8), "PNG")
  (root / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t0\t63\t63\n" for n, w in val))


def test_tiny_imagenet_numbers_sorted_wnids_and_tests_on_the_labelled_val(tmp_path):
  _tiny_imagenet(tmp_path / "tiny-imagenet-200")
  train = data.load("tiny_imagenet", "train", data_dir=str(tmp_path))
  assert train.class_names == ("goldfish", "salamander", "bullfrog")  # sorted wnids n01, n02, n03
  np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 2, 2, 2])
  assert train.images.shape == (7, 64, 64, 3)
  np.testing.assert_array_equal(train.images[-1], np.float32(200) / 255)  # the greyscale JPEG, now RGB
  test = data.load("tiny_imagenet", "test", data_dir=str(tmp_path))
  # Files in sorted order: val_0 (n01 -> 0, pixels 80), val_1 (n03 -> 2, pixels 40); PNG content is exact.
  np.testing.assert_array_equal(test.labels, [0, 2])
  np.testing.assert_array_equal(test.images[:, 0, 0, 0], np.float32([80, 40]) / 255)
  assert "val, as test" in test.source


def test_image_folder_prefix_reads_train_and_val_as_test(tmp_path):
  for split in ("train", "val"):
    for name in ("zebra", "ant"):
      _save(str(tmp_path / "set" / split / name / "a.png"), _pixels(len(name), (5, 6)))  # greyscale
  train = data.load(f"folder:{tmp_path / 'set'}", "train")
  assert train.class_names == ("ant", "zebra") and train.images.shape == (2, 5, 6, 3)
  test = data.load(f"folder:{tmp_path / 'set'}", "test")  # no test/: val/ serves
  np.testing.assert_array_equal(test.labels, [0, 1])
  np.testing.assert_array_equal(test.images[1, ..., 0], _pixels(len("zebra"), (5, 6)).astype(np.float32) / 255)


def test_image_folders_of_mixed_sizes_or_broken_files_are_one_line_errors(tmp_path):
  _save(str(tmp_path / "a" / "train" / "c0" / "x.png"), _pixels(0, (4, 4, 3)))
  _save(str(tmp_path / "a" / "train" / "c1" / "y.png"), _pixels(1, (5, 4, 3)))
  with pytest.raises(DatasetNotFoundError, match="must share one size; resize them first"):
    data.load(f"folder:{tmp_path / 'a'}", "train")
  (tmp_path / "b" / "train" / "c0").mkdir(parents=True)
  (tmp_path / "b" / "train" / "c0" / "x.png").write_bytes(b"not a png")
  with pytest.raises(DatasetNotFoundError, match="cannot be decoded as an image"):
    data.load(f"folder:{tmp_path / 'b'}", "train")
  with pytest.raises(DatasetNotFoundError, match="class folders in"):
    data.load(f"folder:{tmp_path / 'missing'}", "test")


def _cifar_c(directory, n, corruption):
  directory.mkdir(parents=True, exist_ok=True)
  images = np.stack([np.full((32, 32, 3), 10 * s + i, np.uint8) for s in range(1, 6) for i in range(n)])
  np.save(directory / f"{corruption}.npy", images)
  np.save(directory / "labels.npy", np.tile(np.arange(n) % 10, 5))


@pytest.mark.parametrize("base, dirname, classes", [("cifar10_c", "CIFAR-10-C", 10), ("cifar100_c", "CIFAR-100-C",
                                                                                        100)])
def test_cifar_c_takes_the_severity_block_of_its_array(tmp_path, monkeypatch, base, dirname, classes):
  _cifar_c(tmp_path / dirname, 4, "fog")
  monkeypatch.setenv("CALIBJAX_DATA_DIR", str(tmp_path))
  severity3 = data.load(f"{base}:fog:3", "test")
  assert severity3.images.shape == (4, 32, 32, 3) and severity3.num_classes == classes
  np.testing.assert_array_equal(severity3.images[:, 0, 0, 0], np.float32([30, 31, 32, 33]) / 255)
  np.testing.assert_array_equal(severity3.labels, [0, 1, 2, 3])
  with pytest.raises(DatasetNotFoundError, match="a test split only"):
    data.load(f"{base}:fog:3", "train")
  with pytest.raises(DatasetNotFoundError, match="contrast.npy and labels.npy"):
    data.load(f"{base}:contrast:1", "test")


@pytest.mark.parametrize("name", ["cifar10_c:fogg:1", "cifar10_c:fog:6", "cifar10_c:fog", "cifar100_c:"])
def test_cifar_c_names_are_checked(name):
  with pytest.raises(UnknownNameError, match="<corruption>:<severity 1-5>"):
    data.load(name, "test")


def test_the_new_datasets_are_registered_and_not_found_says_how_to_get_them(tmp_path):
  assert {"cinic10", "tiny_imagenet"} <= set(sources.DATASETS.names())
  with pytest.raises(DatasetNotFoundError, match="tiny-imagenet-200.zip"):
    data.load("tiny_imagenet", "train", data_dir=str(tmp_path))
  with pytest.raises(DatasetNotFoundError, match="CINIC-10 archive"):
    data.load("cinic10", "test", data_dir=str(tmp_path))


@pytest.mark.slow
def test_train_from_the_cli_on_an_image_folder(tmp_path):
  """Ten classes of 8 x 8 grey images: the shapes of the digits smoke runs, whose compiled programs it reuses."""
  from test_cli import cli, read_json
  rng = np.random.default_rng(0)
  for split, n in (("train", 30), ("test", 5)):
    for k in range(10):
      for i in range(n):  # each class its own mean grey level, plus noise
        pixels = np.clip(20 * (k + 1) + 10 * rng.normal(size=(8, 8)), 0, 255).astype(np.uint8)
        _save(str(tmp_path / "levels" / split / f"level{k}" / f"{i}.png"), pixels)
  workdir = str(tmp_path / "run")
  result = cli("--config=configs/train.py:smoke", f"--config.data.name=folder:{tmp_path / 'levels'}", "--quiet",
               workdir=workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  results = read_json(os.path.join(workdir, "results.json"))
  # 30 per class minus the smoke preset's 20 validation images: 100 training images; 50 test images.
  assert (results["budget"]["train_examples"], results["budget"]["test_examples"]) == (100, 50)
  assert 0 <= results["raw"]["accuracy"] <= 1
