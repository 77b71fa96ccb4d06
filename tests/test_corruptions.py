"""Generated corruptions (calibjax.data.corruptions): hand values of the deterministic ones, the statistics of
the noises, the defocus kernel, and the invariants every corruption keeps (range, 8-bit levels, seeding, and
damage that grows with the severity)."""

import numpy as np
import pytest
from scipy import ndimage

from calibjax.data import corruptions

SMOOTH = np.clip(0.5 + 2.5 * ndimage.gaussian_filter(np.random.default_rng(0).normal(size=(12, 28, 28, 1)),
                                                     sigma=(0, 3, 3, 0)), 0, 1).astype(np.float32)
SMOOTH = np.floor(SMOOTH * 255) / 255  # 8-bit levels, as datasets are
COLOUR = np.repeat(SMOOTH, 3, -1) * np.float32([1.0, 0.8, 0.6])


@pytest.mark.parametrize("corruption", corruptions.GENERATED)
@pytest.mark.parametrize("images", [SMOOTH, COLOUR], ids=["grey", "colour"])
def test_every_corruption_keeps_range_and_levels_is_seeded_and_grows_with_severity(corruption, images):
  damage = []
  for severity in range(1, 6):
    out = corruptions.corrupt(images, corruption=corruption, severity=severity, seed=3)
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(out * 255, np.round(out * 255))  # 8-bit levels
    np.testing.assert_array_equal(out, corruptions.corrupt(images, corruption=corruption, severity=severity, seed=3))
    damage.append(float(np.abs(out - images).mean()))
  assert damage[0] > 0 and damage[-1] > damage[0], damage  # severity 5 damages more than severity 1
  if corruption.endswith("noise"):
    other = corruptions.corrupt(images, corruption=corruption, severity=3, seed=4)
    assert not np.array_equal(other, corruptions.corrupt(images, corruption=corruption, severity=3, seed=3))


def test_contrast_and_brightness_hand_values():
  image = np.zeros((1, 2, 2, 1), np.float32) + np.float32([[0.2], [0.6]])[None, :, None, :]  # mean 0.4
  # Severity 2: (x - 0.4) * 0.5 + 0.4 = 0.3, 0.5, then floor to 8 bits.
  np.testing.assert_allclose(corruptions.corrupt(image, corruption="contrast", severity=2)[0, :, 0, 0],
                             np.floor(np.float64([0.3, 0.5]) * 255) / 255, atol=1e-7)
  np.testing.assert_allclose(corruptions.corrupt(image, corruption="brightness", severity=5)[0, :, 0, 0],
                             np.floor(np.float64([0.5, 0.9]) * 255) / 255, atol=1e-7)  # grey: x + 0.3
  # Colour: HSV value + 0.3 scales a pixel (0.6, 0.3, 0.0) to value 0.9 with hue and saturation kept.
  pixel = np.float32([0.6, 0.3, 0.0]).reshape(1, 1, 1, 3)
  np.testing.assert_allclose(corruptions.corrupt(pixel, corruption="brightness", severity=5).reshape(3),
                             np.floor(np.float64([0.9, 0.45, 0.0]) * 255) / 255, atol=1e-6)


def test_blurs_keep_constant_images_and_the_defocus_kernel():
  flat = np.full((2, 10, 10, 3), 100 / 255, np.float32)
  for corruption in ("gaussian_blur", "defocus_blur"):
    np.testing.assert_allclose(corruptions.corrupt(flat, corruption=corruption, severity=5), flat, atol=1e-6)
  kernel = corruptions.defocus_kernel(0.3, 0.4)  # a radius under one pixel: the disk is the centre alone
  taps = np.exp(-np.float64([1, 0, 1]) / (2 * 0.4 ** 2))
  taps /= taps.sum()
  assert kernel.shape == (17, 17) and np.isclose(kernel.sum(), 1.0)
  np.testing.assert_allclose(kernel[7:10, 7:10], np.outer(taps, taps), atol=1e-12)
  wide = corruptions.defocus_kernel(1.5, 0.1)  # x² + y² ≤ 2.25: the 3 x 3 block; sigma 0.1 hardly smooths it
  np.testing.assert_allclose(wide[7:10, 7:10], 1 / 9, atol=1e-6)
  assert np.count_nonzero(wide > 1e-6) == 9


def test_noise_statistics():
  grey = np.full((200, 20, 20, 1), 0.5, np.float32)
  shot = corruptions.corrupt(grey, corruption="shot_noise", severity=5)  # Poisson(25) / 50: mean 0.5, std 0.1
  assert abs(shot.mean() - 0.5) < 0.01 and abs(shot.std() - 0.1) < 0.01
  gaussian = corruptions.corrupt(grey, corruption="gaussian_noise", severity=5)
  assert abs(gaussian.std() - 0.10) < 0.005
  impulse = corruptions.corrupt(grey, corruption="impulse_noise", severity=5)
  replaced = impulse != np.float32(np.floor(0.5 * 255) / 255)
  assert abs(replaced.mean() - 0.07) < 0.005 and abs((impulse[replaced] == 1).mean() - 0.5) < 0.05


def test_unknown_names_and_severities():
  with pytest.raises(ValueError, match="generated ones: gaussian_noise"):
    corruptions.corrupt(SMOOTH, corruption="frost", severity=1)
  with pytest.raises(ValueError, match="severity must be 1 ... 5"):
    corruptions.corrupt(SMOOTH, corruption="contrast", severity=0)
