"""Singular-value analysis of image sets, per class: the spectrum and the set with its top-k components removed.

The MTS paper (Sec. 3, Figs. 3 and 5) flattens each class's images into a matrix X (n, D), one image per row, and
looks at the singular values of X: distilled images concentrate their energy in a few leading components, real
images spread it. Its truncation study removes the top-k singular components of every class,
X_k = X - sum_{i<k} s_i u_i v_i^T, retrains on X_k and measures accuracy against k. Conventions here: no mean is
subtracted (the paper decomposes the images themselves), singular values are in descending order, and a class
matrix of rank r < k loses all r components (X_k = 0).
"""

import numpy as np

from calibjax.data.sampling import class_indices


def class_spectra(images: np.ndarray, labels: np.ndarray, *, num_classes: int) -> list[np.ndarray]:
  """The singular values (descending, float64) of each class's flattened images: C arrays of min(n_c, D)."""
  flat = np.asarray(images, np.float64).reshape(len(images), -1)
  return [np.linalg.svd(flat[idx], compute_uv=False) for idx in class_indices(labels, num_classes)]


def explained_variance(singular_values: np.ndarray) -> np.ndarray:
  """The cumulative share of the squared singular values: entry j is sum_{i<=j} s_i^2 / sum_i s_i^2."""
  energy = np.asarray(singular_values, np.float64) ** 2
  return np.cumsum(energy) / energy.sum()


def drop_top_components(images: np.ndarray, labels: np.ndarray, k: int, *, num_classes: int) -> np.ndarray:
  """`images` with the top-k singular components of each class removed (module docstring), same shape and dtype.

  k = 0 returns the images unchanged; the squared Frobenius norm of what is removed from a class equals the sum
  of its k largest squared singular values.
  """
  if k < 0:
    raise ValueError(f"k must be non-negative, got {k}")
  out = np.array(images, copy=True)
  if k == 0:
    return out
  flat = np.asarray(images, np.float64).reshape(len(images), -1)
  for idx in class_indices(labels, num_classes):
    if len(idx) == 0:
      continue
    u, s, vt = np.linalg.svd(flat[idx], full_matrices=False)
    top = min(k, len(s))
    truncated = flat[idx] - (u[:, :top] * s[:top]) @ vt[:top]
    out[idx] = truncated.reshape((len(idx),) + images.shape[1:]).astype(images.dtype)
  return out
