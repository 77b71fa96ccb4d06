"""Common corruptions at five severities, generated on the host for any dataset (Fashion-MNIST-C for the
robustness study on this machine; CIFAR-10-C / CIFAR-100-C themselves are read from their official arrays).

The corruptions and their severity parameters are those of Hendrycks & Dietterich's CIFAR-10-C (ICLR 2019), for
32-pixel images; they are applied unchanged to 28-pixel Fashion-MNIST. Generated here (10): the noises
(gaussian, shot, impulse, speckle), the blurs (gaussian, defocus) and the digital ones (contrast, brightness,
pixelate, jpeg_compression). Not generated: those that need image assets or ImageMagick (frost, snow, spatter,
motion blur), fog, glass, zoom and elastic blur, and saturate (colour only).

Conventions: images are float32 (N, H, W, C) in [0, 1], C = 1 or 3; the result has the same shape, is clipped to
[0, 1] and quantised to 8 bits as the released arrays are (uint8, truncating). Randomness is seeded per
(seed, corruption, severity) with NumPy's default generator, so a corrupted set is the same on every machine.
Impulse noise replaces each value independently with probability c (salt or pepper at even odds); scikit-image,
which the reference uses, replaces exactly round(c · size) values — the same in expectation.
"""

import io

import numpy as np
from PIL import Image
from scipy import ndimage

# corruption -> its parameter at severities 1 ... 5 (CIFAR-10-C)
PARAMETERS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std
    "shot_noise": (500, 250, 100, 75, 50),  # Poisson rate per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # share of values replaced by 0 or 1
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),  # multiplicative noise std
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in pixels
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, its blur sigma
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards each image's channel means
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # box-downsampling factor
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
}
GENERATED = tuple(PARAMETERS)


def defocus_kernel(radius: float, alias_blur: float) -> np.ndarray:
  """The reference's defocus kernel: a disk of `radius` on a 17 x 17 grid (a 2·ceil(radius) + 1 grid past radius
  8), normalised, then smoothed by a 3 x 3 Gaussian of sigma `alias_blur` with mirrored borders."""
  half = 8 if radius <= 8 else int(np.ceil(radius))
  grid = np.arange(-half, half + 1)
  x, y = np.meshgrid(grid, grid)
  disk = (x ** 2 + y ** 2 <= radius ** 2).astype(np.float64)
  disk /= disk.sum()
  taps = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_blur ** 2))
  taps /= taps.sum()
  return ndimage.correlate(disk, np.outer(taps, taps), mode="mirror")


def _per_image(images: np.ndarray, fn) -> np.ndarray:
  """Applies a PIL round trip `fn(PIL image) -> PIL image` to each image as 8-bit L / RGB."""
  mode = "L" if images.shape[-1] == 1 else "RGB"
  out = []
  for image in np.round(images * 255).astype(np.uint8):
    result = np.asarray(fn(Image.fromarray(image[..., 0] if mode == "L" else image, mode)), np.float64) / 255
    out.append(result.reshape(image.shape))
  return np.stack(out)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
  buffer = io.BytesIO()
  image.save(buffer, "JPEG", quality=quality)
  return Image.open(buffer)


def _brightness(x: np.ndarray, c: float) -> np.ndarray:
  if x.shape[-1] == 1:  # grey: the HSV value is the intensity itself
    return x + c
  from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
  hsv = rgb_to_hsv(np.clip(x, 0, 1))
  hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
  return hsv_to_rgb(hsv)


def corrupt(images: np.ndarray, *, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
  """`images` with `corruption` at `severity` (1 ... 5); see the module docstring.

  Raises:
    ValueError: an unknown corruption or a severity outside 1 ... 5.
  """
  if corruption not in PARAMETERS:
    raise ValueError(f"unknown corruption '{corruption}'; generated ones: {', '.join(GENERATED)}")
  if severity not in (1, 2, 3, 4, 5):
    raise ValueError(f"severity must be 1 ... 5, got {severity}")
  c = PARAMETERS[corruption][severity - 1]
  rng = np.random.default_rng((seed, GENERATED.index(corruption), severity))
  x = np.asarray(images, np.float64)
  h, w = x.shape[1:3]
  if corruption == "gaussian_noise":
    x = x + rng.normal(scale=c, size=x.shape)
  elif corruption == "shot_noise":
    x = rng.poisson(np.clip(x, 0, None) * c) / c
  elif corruption == "impulse_noise":
    hit = rng.random(x.shape) < c
    x = np.where(hit, (rng.random(x.shape) < 0.5).astype(np.float64), x)
  elif corruption == "speckle_noise":
    x = x + x * rng.normal(scale=c, size=x.shape)
  elif corruption == "gaussian_blur":
    x = ndimage.gaussian_filter(x, sigma=(0, c, c, 0), mode="nearest")
  elif corruption == "defocus_blur":
    kernel = defocus_kernel(*c)[None, :, :, None]
    x = ndimage.correlate(x, kernel, mode="mirror")
  elif corruption == "contrast":
    means = x.mean(axis=(1, 2), keepdims=True)
    x = (x - means) * c + means
  elif corruption == "brightness":
    x = _brightness(x, c)
  elif corruption == "pixelate":
    small = (int(w * c), int(h * c))
    x = _per_image(x, lambda image: image.resize(small, Image.BOX).resize((w, h), Image.BOX))
  elif corruption == "jpeg_compression":
    x = _per_image(x, lambda image: _jpeg(image, c))
  return (np.floor(np.clip(x, 0, 1) * 255) / 255).astype(np.float32)
