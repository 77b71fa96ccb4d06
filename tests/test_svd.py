"""The per-class SVD of calibjax.analysis.svd: spectra, explained variance and top-k truncation."""

import numpy as np
import pytest

from calibjax.analysis import svd


def _images(seed=0, per_class=6, num_classes=3):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(per_class * num_classes, 4, 4, 2)).astype(np.float32)
  return images, np.repeat(np.arange(num_classes), per_class)


def test_k_zero_returns_the_images_unchanged():
  images, labels = _images()
  np.testing.assert_array_equal(svd.drop_top_components(images, labels, 0, num_classes=3), images)


@pytest.mark.parametrize("k", [1, 2, 5, 6, 9])
def test_the_removed_energy_is_the_sum_of_the_dropped_squared_singular_values(k):
  images, labels = _images(seed=k)
  truncated = svd.drop_top_components(images, labels, k, num_classes=3)
  spectra = svd.class_spectra(images, labels, num_classes=3)
  for c, values in enumerate(spectra):
    rows = labels == c
    removed = (images[rows] - truncated[rows]).astype(np.float64)
    np.testing.assert_allclose(np.sum(removed**2), np.sum(values[:k] ** 2), rtol=1e-5)
    # What is left is the rank-(r - k) reconstruction: its squared norm is the sum of the kept squared values.
    np.testing.assert_allclose(np.sum(truncated[rows].astype(np.float64) ** 2), np.sum(values[k:] ** 2),
                               rtol=1e-4, atol=1e-4)
  if k >= 6:  # a class of 6 images has rank 6: everything is removed
    np.testing.assert_allclose(truncated, 0.0, atol=1e-4)


def test_spectra_and_explained_variance():
  images, labels = _images()
  spectra = svd.class_spectra(images, labels, num_classes=3)
  assert [len(s) for s in spectra] == [6, 6, 6] and all(np.all(np.diff(s) <= 0) for s in spectra)
  curve = svd.explained_variance(np.array([3.0, 2.0, 1.0]))
  np.testing.assert_allclose(curve, [9 / 14, 13 / 14, 1.0])
  # A rank-one class explains all its energy with one component.
  rank_one = np.outer(np.arange(1.0, 5.0), np.arange(1.0, 33.0)).reshape(4, 4, 4, 2)
  np.testing.assert_allclose(svd.explained_variance(svd.class_spectra(rank_one, np.zeros(4, int),
                                                                      num_classes=1)[0])[0], 1.0)
