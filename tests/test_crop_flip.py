"""Random crop with padding + horizontal flip (calibjax.data.augment.crop_flip): windows of the padded image
against a NumPy reference, identity at the centre offset, the offset and flip distributions, the padding value
(a normalised black pixel), and which configs turn it on."""

import importlib.util
import os

import jax
import ml_collections
import numpy as np
import pytest

from calibjax import config_lib
from calibjax.data import transforms
from calibjax.data.augment import augment_config, crop_flip, make_batch_transform
from calibjax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = np.random.default_rng(0).uniform(0.5, 1.5, size=(6, 5, 7, 3)).astype(np.float32)
FILL = np.array([-1.0, -2.0, -3.0], np.float32)


def numpy_crop_flip(images, offsets, flips, padding, fill):
  """The reference: pad each channel with its fill value, slice the window, mirror it."""
  n, h, w, c = images.shape
  padded = np.empty((n, h + 2 * padding, w + 2 * padding, c), np.float32)
  padded[...] = fill
  padded[:, padding:padding + h, padding:padding + w] = images
  out = np.stack([padded[i, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
  return np.where(np.asarray(flips)[:, None, None, None], out[:, :, ::-1], out)


def test_windows_equal_the_numpy_reference():
  offsets = np.array([[0, 0], [4, 4], [2, 2], [0, 4], [3, 1], [4, 0]], np.int32)
  flips = np.array([False, True, False, True, True, False])
  out = jax.jit(crop_flip.crop_flip, static_argnames="padding")(IMAGES, offsets=offsets, flips=flips, padding=2,
                                                                fill=FILL)
  np.testing.assert_array_equal(out, numpy_crop_flip(IMAGES, offsets, flips, 2, FILL))


def test_centre_offset_is_the_identity_and_corner_offsets_shift_in_the_fill():
  n = len(IMAGES)
  centre = crop_flip.crop_flip(IMAGES, offsets=np.full((n, 2), 3), flips=np.zeros(n, bool), padding=3, fill=FILL)
  np.testing.assert_array_equal(centre, IMAGES)
  flipped = crop_flip.crop_flip(IMAGES, offsets=np.full((n, 2), 3), flips=np.ones(n, bool), padding=3, fill=FILL)
  np.testing.assert_array_equal(flipped, IMAGES[:, :, ::-1])
  # Offset (0, 0): the image moves down and right by the padding; the top rows and left columns are the fill.
  corner = np.asarray(crop_flip.crop_flip(IMAGES, offsets=np.zeros((n, 2), int), flips=np.zeros(n, bool),
                                          padding=2, fill=FILL))
  np.testing.assert_array_equal(corner[:, 2:, 2:], IMAGES[:, :-2, :-2])
  np.testing.assert_array_equal(corner[:, :2], np.broadcast_to(FILL, corner[:, :2].shape))
  np.testing.assert_array_equal(corner[:, :, :2], np.broadcast_to(FILL, corner[:, :, :2].shape))


def test_random_offsets_are_uniform_and_flips_fair():
  """Images whose pixels code their own (row + 1, column + 1), padded with 0: each window gives its draw back."""
  n, h, w, padding = 4000, 6, 6, 4
  rows, cols = np.meshgrid(np.arange(1, h + 1), np.arange(1, w + 1), indexing="ij")
  coded = np.broadcast_to(np.stack([rows, cols], -1).astype(np.float32), (n, h, w, 2))
  draw = jax.jit(crop_flip.random_crop_flip, static_argnames="padding")
  out = np.asarray(draw(jax.random.key(0), coded, padding=padding, fill=0.0))
  draws = np.array([_decode(window, padding) for window in out])  # (n, 3): dy, dx, flipped
  # Every (dy, dx) in {0, ..., 8}^2 occurs (49 expected each), each axis uniform within 5 binomial sds.
  assert len({(dy, dx) for dy, dx, _ in draws}) == (2 * padding + 1) ** 2
  expected = n / (2 * padding + 1)
  for axis in (0, 1):
    counts = np.bincount(draws[:, axis], minlength=2 * padding + 1)
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts
  assert abs(draws[:, 2].sum() - n / 2) < 5 * np.sqrt(n / 4), draws[:, 2].sum()  # fair coins
  np.testing.assert_array_equal(out, draw(jax.random.key(0), coded, padding=padding, fill=0.0))


def _decode(window, padding):
  """(dy, dx, flipped) of a window of a coded image: output pixel (i, j) holding image pixel (r, c) lies at padded
  row dy + i = r + padding and, unflipped, padded column dx + j = c + padding (flipped: dx + w - 1 - j)."""
  w = window.shape[1]
  i, j = np.argwhere(window[..., 0] > 0)[0]
  r, c = int(window[i, j, 0]) - 1, int(window[i, j, 1]) - 1
  row = window[i, :, 1][window[i, :, 1] > 0]
  flipped = bool(row[0] > row[-1])
  return r + padding - i, c + padding - (w - 1 - j if flipped else j), int(flipped)


def test_black_pixel_is_the_normalised_zero():
  normalize = transforms.Normalize((0.5, 0.25), (0.5, 0.125))
  np.testing.assert_allclose(transforms.black_pixel({"normalize": normalize.to_dict()}), [-1.0, -2.0])
  assert float(transforms.black_pixel({})) == 0.0


def test_batch_transform_pads_with_black_and_refuses_zca():
  cfg = augment_config()
  cfg.crop_flip = True
  normalize = transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
  transform = make_batch_transform(cfg, num_classes=3, data_transforms={"normalize": normalize.to_dict()})
  out = np.asarray(transform(jax.random.key(1), {"images": IMAGES, "labels": np.zeros(6, np.int32)})["images"])
  black = np.array([-2.0, -1.0, -0.5], np.float32)
  assert np.all(np.isclose(out, black).all(-1) | (out >= 0.5).all(-1))  # every pixel: an image pixel or black
  assert np.isclose(out, black).all(-1).any()
  with pytest.raises(ConfigError, match="crop_flip pads images with black pixels"):
    make_batch_transform(cfg, num_classes=3, data_transforms={"zca": {}})
  cfg.crop_flip = False
  assert make_batch_transform(cfg, num_classes=3, data_transforms={"zca": {}}) is None


def _config(name, arg):
  spec = importlib.util.spec_from_file_location(f"{name}_config", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name, arg, on", [
    ("kd", "recipe=kd_uc,teacher=t", True),  # CIFAR-100, the papers' recipe
    ("kd", "recipe=aug,teacher=t,dataset=cifar10", True),
    ("kd", "recipe=kd_uc,teacher=t,dataset=fashion_mnist", False),  # the CPU-budget tables' protocol
    ("kd", "recipe=kd_uc,teacher=t,smoke=True", False),  # digits
    ("train", "protocol=kd,dataset=cifar100,model=resnet32x4", True),  # the KD papers' teachers
    ("train", "protocol=dd,dataset=cifar10", False),  # the DD protocol has no crop + flip
])
def test_the_kd_protocol_crops_and_flips_cifar_only(name, arg, on):
  config = _config(name, arg)
  assert config.augment.crop_flip is on and config.augment.crop_padding == 4
  assert isinstance(config, ml_collections.ConfigDict) and config_lib.KD_CROP_FLIP_DATASETS == ("cifar10",
                                                                                                "cifar100")
