"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021) in JAX.

Follows `DiffAugment` with `aug_mode='S'` and the `ParamDiffAug` defaults of `VICO-UoE/DatasetCondensation`:
each call draws ONE family uniformly from the '_'-separated strategy and applies it to the whole batch.
Every op is differentiable with respect to the images, so gradient matching (DC/DSA), distribution matching
(DM) and trajectory matching (MTT) can backpropagate through the augmentation into the synthetic images.

Conventions:
  * Images are NHWC floats. "x"/width is axis 2, "y"/height is axis 1 (the reference is NCHW; the maths is the
    same).
  * Randomness is explicit: a family's parameters are a pure function of `(key, family, images.shape, siamese,
    params)`, returned by `draw_params`, so the same draw can be recomputed or inspected.
  * Siamese mode (`siamese=True`, the reference's `seed != -1`): ONE parameter draw is shared by every image
    of the batch (the reference draws per sample and copies sample 0's parameters). The draw does not depend
    on the batch size, so calling `dsa_augment` with the SAME key on the real batch and on the synthetic batch
    applies the same family with identical parameters to both; this is how DC/DSA/DM/MTT use it.
  * Non-Siamese mode (`siamese=False`, the reference's `seed == -1`): parameters are drawn independently per
    sample; used when training or evaluating networks.
  * Under `jax.vmap` over keys (e.g. a different key per class) the family index is batched, so `lax.switch`
    evaluates every family of the strategy and selects; pass one key for all classes to avoid that cost.
"""

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from calibjax.errors import ConfigError
from calibjax.registry import Registry

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
# Strings that the reference treats as "no augmentation".
_NO_AUGMENTATION = ("", "none", "None")

Drawn = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class DSAParams:
  """Augmentation strengths; the defaults are the reference `ParamDiffAug` values.

  Hashable, so it can be a static argument of `jax.jit`.

  Attributes:
    scale: sx, sy ~ U(1/scale, scale), independently.
    rotate_degrees: rotation angle ~ U(-rotate_degrees, rotate_degrees) degrees.
    flip_prob: probability of a horizontal flip.
    brightness: additive shift (U(0, 1) - 0.5) * brightness.
    saturation: saturation factor U(0, 1) * saturation.
    contrast: contrast factor U(0, 1) + contrast.
    crop_ratio: maximum integer translation per axis is floor(crop_ratio * size + 0.5) pixels.
    cutout_ratio: side of the zeroed square per axis is floor(cutout_ratio * size + 0.5) pixels.
    align_corners: PyTorch `affine_grid`/`grid_sample` convention of scale and rotate. DC/DSA/DM run on
      torch >= 1.3 and so use False (torch's default); MTT passes True, which is also what torch 1.2 did when
      the DSA paper's numbers were produced.
  """
  scale: float = 1.2
  rotate_degrees: float = 15.0
  flip_prob: float = 0.5
  brightness: float = 1.0
  saturation: float = 2.0
  contrast: float = 0.5
  crop_ratio: float = 0.125
  cutout_ratio: float = 0.5
  align_corners: bool = False

  def __post_init__(self):
    checks = {"scale >= 1": self.scale >= 1.0, "rotate_degrees >= 0": self.rotate_degrees >= 0.0,
              "0 <= flip_prob <= 1": 0.0 <= self.flip_prob <= 1.0, "brightness >= 0": self.brightness >= 0.0,
              "saturation >= 0": self.saturation >= 0.0, "contrast >= 0": self.contrast >= 0.0,
              "0 <= crop_ratio <= 1": 0.0 <= self.crop_ratio <= 1.0,
              "0 <= cutout_ratio <= 1": 0.0 <= self.cutout_ratio <= 1.0}
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
      raise ConfigError(f"invalid DSA parameters {self}: need {', '.join(failed)}")


def _pixels(ratio: float, size: int) -> int:
  # The reference's int(size * ratio + 0.5), i.e. round half up (Python's round() rounds half to even).
  return int(math.floor(size * ratio + 0.5))


def _per_sample(values: jax.Array) -> jax.Array:
  return values[:, None, None, None]


def _base_grid(size: int, align_corners: bool) -> jax.Array:
  # torch.nn.functional.affine_grid's normalised pixel coordinates along one axis.
  return jnp.linspace(-1.0, 1.0, size) * (1.0 if align_corners else (size - 1) / size)


def _unnormalise(coords: jax.Array, size: int, align_corners: bool) -> jax.Array:
  # torch.nn.functional.grid_sample's map from [-1, 1] to pixel indices.
  if align_corners:
    return (coords + 1.0) / 2.0 * (size - 1)
  return ((coords + 1.0) * size - 1.0) / 2.0


def affine_sample(images: jax.Array, theta: jax.Array, *, align_corners: bool) -> jax.Array:
  """`grid_sample(x, affine_grid(theta, x.shape))` of PyTorch: bilinear, zero padding.

  Output pixel (i, j) has normalised coordinates (x_j, y_i) in [-1, 1] (x along the width); it reads the input
  at (x', y') = theta[:, :2] @ (x_j, y_i) + theta[:, 2] by bilinear interpolation, where corners outside the
  image contribute zero (weights are not renormalised). `align_corners` selects where -1 and 1 lie: the
  centres (True) or the outer edges (False) of the border pixels. Differentiable w.r.t. images and theta.

  Args:
    images: (N, H, W, C) float.
    theta: (N, 2, 3) affine matrices in PyTorch's `affine_grid` convention (rows: x', y').
    align_corners: PyTorch's `align_corners`.

  Returns:
    (N, H, W, C) resampled images, in the promoted dtype of images and theta.
  """
  n, h, w, c = images.shape
  xs = _base_grid(w, align_corners)[None, None, :]
  ys = _base_grid(h, align_corners)[None, :, None]
  t = theta[:, :, :, None, None]
  ix = _unnormalise(t[:, 0, 0] * xs + t[:, 0, 1] * ys + t[:, 0, 2], w, align_corners)
  iy = _unnormalise(t[:, 1, 0] * xs + t[:, 1, 1] * ys + t[:, 1, 2], h, align_corners)
  x0 = jnp.floor(ix)
  y0 = jnp.floor(iy)
  fx = ix - x0
  fy = iy - y0
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  # One gather of the 2x2 neighbourhood per output pixel from a zero-padded copy: corners that fall on the
  # padding read zeros (grid_sample's zero padding); a neighbourhood wholly outside the padded image gets zero
  # weight. This is 4x fewer gather indices than gathering each corner (XLA's CPU gather cost is per index).
  reachable = (x0 >= -1) & (x0 < w) & (y0 >= -1) & (y0 < h)
  # The image axis is a batching dimension of the gather (not an index into it), so a batch split over devices
  # stays split: XLA's partitioner cannot see through explicit image indices and would gather the whole batch.
  padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
  starts = jnp.stack([jnp.clip(y0 + 1, 0, h), jnp.clip(x0 + 1, 0, w)], axis=-1)
  dims = lax.GatherDimensionNumbers(offset_dims=(3, 4, 5), collapsed_slice_dims=(), start_index_map=(1, 2),
                                    operand_batching_dims=(0,), start_indices_batching_dims=(0,))
  patches = lax.gather(padded, starts, dims, slice_sizes=(1, 2, 2, c), mode="promise_in_bounds")
  weight = jnp.stack([1.0 - fy, fy], -1)[..., :, None] * jnp.stack([1.0 - fx, fx], -1)[..., None, :]
  weight = jnp.where(reachable[..., None, None], weight, 0.0)
  # HIGHEST: accelerators would otherwise run this f32 contraction in TF32/bf16 and blur the interpolation.
  return jnp.einsum("nhwabc,nhwab->nhwc", patches, weight, precision=lax.Precision.HIGHEST)


def _uniform(key: jax.Array, n: int, low: float = 0.0, high: float = 1.0) -> jax.Array:
  return jax.random.uniform(key, (n,), minval=low, maxval=high)


def _draw_brightness(key, n, h, w, p):
  del h, w
  return {"brightness_shift": (_uniform(key, n) - 0.5) * p.brightness}


def _apply_brightness(x, d, p):
  del p
  return x + _per_sample(d["brightness_shift"])


def _draw_saturation(key, n, h, w, p):
  del h, w
  return {"saturation_factor": _uniform(key, n) * p.saturation}


def _apply_saturation(x, d, p):
  del p
  # A sum of channel slices rather than jnp.mean(axis=3): XLA:CPU reduces a tiny minor axis ~15x slower.
  mean = sum(x[..., i:i + 1] for i in range(x.shape[3])) / x.shape[3]
  return (x - mean) * _per_sample(d["saturation_factor"]) + mean


def _draw_contrast(key, n, h, w, p):
  del h, w
  return {"contrast_factor": _uniform(key, n) + p.contrast}


def _apply_contrast(x, d, p):
  del p
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) * _per_sample(d["contrast_factor"]) + mean


def _draw_flip(key, n, h, w, p):
  del h, w
  return {"flip": _uniform(key, n) < p.flip_prob}


def _apply_flip(x, d, p):
  del p
  return jnp.where(_per_sample(d["flip"]), x[:, :, ::-1, :], x)


def _draw_scale(key, n, h, w, p):
  del h, w
  kx, ky = jax.random.split(key)
  return {"scale_x": _uniform(kx, n, 1.0 / p.scale, p.scale),
          "scale_y": _uniform(ky, n, 1.0 / p.scale, p.scale)}


def _apply_scale(x, d, p):
  sx, sy = d["scale_x"], d["scale_y"]
  zero = jnp.zeros_like(sx)
  theta = jnp.stack([jnp.stack([sx, zero, zero], -1), jnp.stack([zero, sy, zero], -1)], 1)
  return affine_sample(x, theta, align_corners=p.align_corners)


def _draw_rotate(key, n, h, w, p):
  del h, w
  return {"angle": (_uniform(key, n) - 0.5) * 2.0 * math.radians(p.rotate_degrees)}


def _apply_rotate(x, d, p):
  # The rotation acts on normalised [-1, 1]^2 coordinates, as in the reference, so on a non-square image it is
  # a rotation conjugated by the aspect-ratio stretch.
  cos, sin = jnp.cos(d["angle"]), jnp.sin(d["angle"])
  zero = jnp.zeros_like(cos)
  theta = jnp.stack([jnp.stack([cos, -sin, zero], -1), jnp.stack([sin, cos, zero], -1)], 1)
  return affine_sample(x, theta, align_corners=p.align_corners)


def _draw_crop(key, n, h, w, p):
  ky, kx = jax.random.split(key)
  max_y, max_x = _pixels(p.crop_ratio, h), _pixels(p.crop_ratio, w)
  return {"translate_y": jax.random.randint(ky, (n,), -max_y, max_y + 1),
          "translate_x": jax.random.randint(kx, (n,), -max_x, max_x + 1)}


def _translation_matrix(shift: jax.Array, size: int, dtype) -> jax.Array:
  """(N, size, size) one-hot rows: m[n, i, k] = 1 iff k = i + shift[n] (rows with no such k are zero)."""
  index = jnp.arange(size)
  return (index[None, None, :] == index[None, :, None] + shift[:, None, None]).astype(dtype)


def _apply_crop(x, d, p):
  # out[i, j] = x[i + ty, j + tx], zero outside: the reference pads by one zero pixel and clamps indices into
  # the padding, which is the same zero fill. Batched one-hot matmuls instead of a per-sample dynamic shift:
  # exact (HIGHEST avoids TF32/bf16 on accelerators) and without the gather/scatter pair that is slow on CPU.
  del p
  _, h, w, _ = x.shape
  rows = _translation_matrix(d["translate_y"], h, x.dtype)
  cols = _translation_matrix(d["translate_x"], w, x.dtype)
  x = jnp.einsum("nik,nkwc->niwc", rows, x, precision=lax.Precision.HIGHEST)
  return jnp.einsum("njl,nilc->nijc", cols, x, precision=lax.Precision.HIGHEST)


def _draw_cutout(key, n, h, w, p):
  ky, kx = jax.random.split(key)
  size_y, size_x = _pixels(p.cutout_ratio, h), _pixels(p.cutout_ratio, w)
  # Centres in [0, H] for an even square side and [0, H - 1] for an odd one (the reference's range), so that
  # the clipped square is equally likely to hang over either border.
  return {"cutout_y": jax.random.randint(ky, (n,), 0, h + 1 - size_y % 2),
          "cutout_x": jax.random.randint(kx, (n,), 0, w + 1 - size_x % 2)}


def _apply_cutout(x, d, p):
  _, h, w, _ = x.shape

  def covered(centre, size, length):
    # Rows (or columns) [centre - size // 2, centre - size // 2 + size) of the square, clipped to the image.
    start = (centre - size // 2)[:, None]
    index = jnp.arange(length)[None, :]
    return (index >= start) & (index < start + size)

  rows = covered(d["cutout_y"], _pixels(p.cutout_ratio, h), h)
  cols = covered(d["cutout_x"], _pixels(p.cutout_ratio, w), w)
  return jnp.where((rows[:, :, None] & cols[:, None, :])[..., None], 0.0, x)


@dataclasses.dataclass(frozen=True)
class _Op:
  draw: Callable[..., Drawn]  # (key, n, h, w, params) -> {name: (n,) array}
  apply: Callable[[jax.Array, Drawn, DSAParams], jax.Array]


_OPS = {
    "brightness": _Op(_draw_brightness, _apply_brightness),
    "saturation": _Op(_draw_saturation, _apply_saturation),
    "contrast": _Op(_draw_contrast, _apply_contrast),
    "flip": _Op(_draw_flip, _apply_flip),
    "scale": _Op(_draw_scale, _apply_scale),
    "rotate": _Op(_draw_rotate, _apply_rotate),
    "crop": _Op(_draw_crop, _apply_crop),
    "cutout": _Op(_draw_cutout, _apply_cutout),
}


@dataclasses.dataclass(frozen=True)
class Family:
  """One DSA family: a fixed sequence of ops (one op, or brightness/saturation/contrast for 'color').

  Calling it, `family(key, images, *, siamese, params)`, draws the parameters with `draw` and applies them
  with `apply`; ops of a family get the keys `jax.random.split(key, len(ops))` in order.
  """
  ops: tuple[str, ...]

  def draw(self, key: jax.Array, shape: tuple[int, ...], *, siamese: bool, params: DSAParams) -> Drawn:
    """Returns {parameter name: (N,) array} for images of `shape` (N, H, W, C); see `draw_params`."""
    n, h, w, _ = shape
    count = 1 if siamese else n
    drawn = {}
    for op_key, op in zip(jax.random.split(key, len(self.ops)), self.ops):
      drawn.update(_OPS[op].draw(op_key, count, h, w, params))
    return {name: jnp.broadcast_to(value, (n,)) for name, value in drawn.items()}

  def apply(self, images: jax.Array, drawn: Drawn, *, params: DSAParams) -> jax.Array:
    """Applies already drawn parameters ((N,) arrays) to (N, H, W, C) images; keeps the images' dtype."""
    out = images
    for op in self.ops:
      out = _OPS[op].apply(out, drawn, params)
    return out.astype(images.dtype)

  def __call__(self, key: jax.Array, images: jax.Array, *, siamese: bool, params: DSAParams) -> jax.Array:
    _check_images(images)
    return self.apply(images, self.draw(key, images.shape, siamese=siamese, params=params), params=params)


FAMILIES: Registry[Family] = Registry("DSA augmentation family")
FAMILIES.register("color")(Family(("brightness", "saturation", "contrast")))
for _name in _OPS:
  FAMILIES.register(_name)(Family((_name,)))
del _name


def _check_images(images: jax.Array) -> None:
  if images.ndim != 4:
    raise ValueError(f"DSA expects NHWC images of rank 4, got shape {images.shape}")


def draw_params(key: jax.Array, family: str, shape: tuple[int, ...], *, siamese: bool,
                params: DSAParams = DSAParams()) -> Drawn:
  """The parameters that `apply_family(key, images, family, ...)` uses for images of `shape`.

  Args:
    key: PRNG key.
    family: a name in `FAMILIES` ('color', 'crop', 'cutout', 'flip', 'scale', 'rotate', or one of the colour
      ops 'brightness', 'saturation', 'contrast').
    shape: (N, H, W, C) of the images.
    siamese: one draw shared by the batch (True) or one draw per sample (False).
    params: augmentation strengths.

  Returns:
    {name: (N,) array}. Names and meanings: brightness_shift (added), saturation_factor, contrast_factor
    (multipliers of the deviation from the channel / image mean), flip (bool, reverse the width axis),
    scale_x, scale_y (affine diagonal), angle (radians; theta = [[cos, -sin, 0], [sin, cos, 0]]),
    translate_y, translate_x (int; out[i, j] = in[i + translate_y, j + translate_x]), cutout_y, cutout_x
    (int centre of the zeroed square). With `siamese=True` every row is the same value and does not depend
    on N.
  """
  return FAMILIES.get(family).draw(key, tuple(shape), siamese=siamese, params=params)


def apply_family(key: jax.Array, images: jax.Array, family: str, *, siamese: bool,
                 params: DSAParams = DSAParams()) -> jax.Array:
  """Applies one family with parameters `draw_params(key, family, images.shape, ...)`.

  Args:
    key: PRNG key.
    images: (N, H, W, C) float.
    family: a name in `FAMILIES`.
    siamese: see the module docstring.
    params: augmentation strengths.

  Returns:
    (N, H, W, C) augmented images, same dtype.
  """
  return FAMILIES.get(family)(key, images, siamese=siamese, params=params)


def strategy_families(strategy: str) -> tuple[str, ...]:
  """Splits a strategy string on '_' and checks every name; '', 'none' and 'None' mean no augmentation.

  Raises:
    UnknownNameError: a name is not in `FAMILIES`.
  """
  if strategy in _NO_AUGMENTATION:
    return ()
  names = tuple(strategy.split("_"))
  for name in names:
    FAMILIES.get(name)
  return names


def dsa_augment(key: jax.Array, images: jax.Array, *, strategy: str = DEFAULT_STRATEGY, siamese: bool = False,
                params: DSAParams = DSAParams()) -> jax.Array:
  """DSA with the reference's single-family mode ('S'): one family of `strategy`, uniformly, for the batch.

  The family index is `jax.random.randint(k0, (), 0, len(families))` and the family runs with key `k1`, where
  `k0, k1 = jax.random.split(key)`. `lax.switch` keeps the whole augmentation one graph, so with `strategy`,
  `siamese` and `params` static (closed over, or `static_argnames` of `jax.jit`) it compiles once per shape.

  Args:
    key: PRNG key. Siamese use: pass the same key for the real and the synthetic batch.
    images: (N, H, W, C) float.
    strategy: '_'-separated family names, e.g. 'color_crop_cutout_flip_scale_rotate' (CIFAR, Fashion-MNIST)
      or 'color_crop_cutout_scale_rotate' (MNIST, SVHN); '', 'none' or 'None' returns the images unchanged.
    siamese: True shares one parameter draw across the batch (and across batches given the same key); False
      draws per sample.
    params: augmentation strengths and the `align_corners` convention.

  Returns:
    (N, H, W, C) augmented images, same dtype; differentiable w.r.t. `images`.
  """
  names = strategy_families(strategy)
  _check_images(images)
  if not names:
    return images
  choice_key, family_key = jax.random.split(key)
  index = jax.random.randint(choice_key, (), 0, len(names))
  branches = [functools.partial(FAMILIES.get(name), siamese=siamese, params=params) for name in names]
  return lax.switch(index, branches, family_key, images)
