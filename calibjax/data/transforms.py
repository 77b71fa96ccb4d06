"""Invertible image transforms: per-channel normalisation and ZCA whitening.

Both act on NHWC images (any leading batch dimensions) held as numpy or jax arrays: the parameters are numpy
float32 constants and the arithmetic uses the operators of the input, so a numpy input gives a numpy output
and a jax input a jax output (inside `jit` the parameters become constants of the compiled function, so apply
a large ZCA once to the dataset on the host rather than per step). Both serialise to a flat dict of numpy
arrays and floats (`to_dict` / `from_dict`) for orbax checkpoints and `.npz` exports.
"""

import dataclasses
from typing import Any

import numpy as np

from calibjax.errors import ConfigError

# Fixed statistics of the dataset-distillation references (DC/DSA/DM utils.py; CIFAR-100 as in DC -- the MTT
# reference normalises CIFAR-100 with the CIFAR-10 statistics instead).
_REFERENCE_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2861,), (0.3530,)),
}


def dataset_stats(images: np.ndarray, *, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and (population, ddof=0) standard deviation over N, H and W.

  Accumulates in float64, `chunk` images at a time, so CIFAR-sized float32 sets need no float64 copy.

  Args:
    images: (N, H, W, C).
    chunk: images per accumulation step.

  Returns:
    (mean, std), each float64 (C,).
  """
  images = np.asarray(images)
  channels = images.shape[-1]
  mean = images.reshape(-1, channels).mean(axis=0, dtype=np.float64)
  sq = np.zeros(channels)
  for start in range(0, len(images), chunk):
    sq += np.square(images[start:start + chunk].reshape(-1, channels) - mean).sum(axis=0)
  return mean, np.sqrt(sq / (images.size // channels))


@dataclasses.dataclass(frozen=True, eq=False)
class Normalize:
  """Per-channel `(x - mean) / std` over the last axis.

  Attributes:
    mean: float32 (C,).
    std: float32 (C,), positive.
  """

  mean: np.ndarray
  std: np.ndarray

  def __post_init__(self):
    mean = np.asarray(self.mean, np.float32).reshape(-1)
    std = np.asarray(self.std, np.float32).reshape(-1)
    if mean.shape != std.shape or np.any(std <= 0):
      raise ConfigError(f"Normalize needs mean and std of one length with std > 0, got {mean} and {std}")
    object.__setattr__(self, "mean", mean)
    object.__setattr__(self, "std", std)

  @classmethod
  def fit(cls, images: np.ndarray) -> "Normalize":
    """Statistics of `images` (N, H, W, C), as `dataset_stats`."""
    return cls(*dataset_stats(images))

  @classmethod
  def for_dataset(cls, name: str) -> "Normalize | None":
    """The fixed statistics of the DD references for cifar10, cifar100, mnist and fashion_mnist, else None.

    These are what published numbers were obtained with; fit the statistics (`fit`) for other datasets.
    """
    stats = _REFERENCE_STATS.get(name)
    return None if stats is None else cls(*stats)

  def apply(self, x):
    """(..., C) -> (..., C) normalised; same array type as `x`."""
    return (x - self.mean) / self.std

  def invert(self, x):
    """Inverse of `apply`."""
    return x * self.std + self.mean

  def to_dict(self) -> dict[str, Any]:
    return {"mean": self.mean.copy(), "std": self.std.copy()}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Normalize":
    return cls(d["mean"], d["std"])


def black_pixel(transforms: dict) -> np.ndarray:
  """The input-space value (per channel, float32) of a black pixel (raw 0) after `transforms`, a
  `Splits.transforms` dict: -mean / std after `normalize`, 0 without it. (ZCA has no per-pixel value.)"""
  if "normalize" not in transforms:
    return np.zeros((), np.float32)
  normalize = Normalize.from_dict(transforms["normalize"])
  return normalize.apply(np.zeros_like(normalize.mean))


@dataclasses.dataclass(frozen=True, eq=False)
class ZCA:
  """ZCA whitening fitted on training images, as kornia's `ZCAWhitening` (used by the MTT reference).

  Each image is flattened to a D-vector. With the training mean m, the unbiased covariance
  Σ = Xcᵀ Xc / (N - 1) = U diag(S) Uᵀ and the regulariser eps:
    apply(x)  = (x - m) W,   W = U diag((S + eps)^-1/2) Uᵀ
    invert(y) = y W⁻¹ + m,   W⁻¹ = U diag((S + eps)^1/2) Uᵀ
  so whitened training data has covariance U diag(S / (S + eps)) Uᵀ. W is symmetric, and permuting the pixels
  permutes W alike, so NHWC flattening gives the same images as kornia's NCHW flattening.

  Attributes:
    mean: float32 (D,) training mean.
    whiten: float32 (D, D), W.
    unwhiten: float32 (D, D), W⁻¹.
    eps: the regulariser added to the eigenvalues.
    image_shape: the per-image shape (H, W, C), D = H * W * C.
  """

  mean: np.ndarray
  whiten: np.ndarray
  unwhiten: np.ndarray
  eps: float
  image_shape: tuple[int, ...]

  @classmethod
  def fit(cls, images: np.ndarray, *, eps: float = 0.1, chunk: int = 4096) -> "ZCA":
    """Fits on `images` (N, H, W, C), N >= 2, in float64.

    Args:
      images: training images.
      eps: regulariser; 0.1 as the MTT reference (kornia's own default is 1e-6).
      chunk: images per covariance accumulation step (bounds the float64 working copy).

    Returns:
      The fitted transform.
    """
    n = len(images)
    if n < 2:
      raise ConfigError(f"ZCA.fit needs at least 2 images for an unbiased covariance, got {n}")
    flat = np.asarray(images).reshape(n, -1)
    mean = flat.mean(axis=0, dtype=np.float64)
    cov = np.zeros((flat.shape[1],) * 2)
    for start in range(0, n, chunk):
      centred = flat[start:start + chunk].astype(np.float64) - mean
      cov += centred.T @ centred
    s, u = np.linalg.eigh(cov / (n - 1))
    # eigh may return tiny negative eigenvalues of the PSD covariance; kornia's SVD returns their magnitudes,
    # the clip returns 0, and both vanish next to eps.
    s = np.maximum(s, 0.0)
    return cls(mean=mean.astype(np.float32),
               whiten=((u * (s + eps) ** -0.5) @ u.T).astype(np.float32),
               unwhiten=((u * (s + eps) ** 0.5) @ u.T).astype(np.float32),
               eps=float(eps), image_shape=tuple(np.shape(images)[1:]))

  def _flat(self, x):
    if tuple(x.shape[x.ndim - len(self.image_shape):]) != self.image_shape:
      raise ConfigError(
          f"ZCA was fitted on images of shape {self.image_shape}, got an array of shape {x.shape}")
    return x.reshape(-1, self.mean.shape[0])

  def apply(self, x):
    """(..., H, W, C) -> whitened, same shape and array type."""
    return ((self._flat(x) - self.mean) @ self.whiten).reshape(x.shape)

  def invert(self, x):
    """Inverse of `apply`."""
    return (self._flat(x) @ self.unwhiten + self.mean).reshape(x.shape)

  def to_dict(self) -> dict[str, Any]:
    return {"mean": self.mean.copy(), "whiten": self.whiten.copy(), "unwhiten": self.unwhiten.copy(),
            "eps": self.eps, "image_shape": np.asarray(self.image_shape, np.int64)}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ZCA":
    return cls(mean=np.asarray(d["mean"], np.float32), whiten=np.asarray(d["whiten"], np.float32),
               unwhiten=np.asarray(d["unwhiten"], np.float32), eps=float(d["eps"]),
               image_shape=tuple(int(v) for v in np.asarray(d["image_shape"])))


def apply_transforms(images: np.ndarray, transforms: dict) -> np.ndarray:
  """Raw [0, 1] images through a `Splits.transforms` dict (normalize, then zca, in its order): new images in the
  input space of the run that recorded it."""
  classes = {"normalize": Normalize, "zca": ZCA}
  for name, state in transforms.items():
    images = np.asarray(classes[name].from_dict(state).apply(images))
  return images.astype(np.float32)
