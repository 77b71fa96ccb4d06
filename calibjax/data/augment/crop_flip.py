"""The standard CIFAR training augmentation: random crop with zero padding, then a random horizontal flip.

As torchvision's `RandomCrop(size, padding=p)` + `RandomHorizontalFlip()` in the KD papers' recipes, per sample
and on the device:
  * the image (H, W) is padded by `padding` pixels on every side with `fill`, and an H x W window is cut out at a
    uniformly random offset (dy, dx) in {0, ..., 2p}^2 (dy = dx = p gives the image back);
  * the window is mirrored left-right with probability 1/2.
torchvision pads the raw image with black before normalising it, so `fill` is the input-space value of a black
pixel (`calibjax.data.transforms.black_pixel`), not 0.

Conventions: images NHWC (B, H, W, C); `padding` is a Python int (static under jit); offsets are (B, 2) int32
(dy, dx); flips are (B,) bool.
"""

import jax
import jax.numpy as jnp


def crop_flip(images: jax.Array, *, offsets: jax.Array, flips: jax.Array, padding: int,
              fill: jax.Array | float) -> jax.Array:
  """The H x W window at `offsets` of each image padded by `padding` with `fill` (per channel or a scalar),
  mirrored left-right where `flips`."""
  n, h, w, c = images.shape
  padded = jnp.broadcast_to(jnp.asarray(fill, images.dtype), (n, h + 2 * padding, w + 2 * padding, c))
  padded = padded.at[:, padding:padding + h, padding:padding + w].set(images)
  windows = jax.vmap(lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c)))(
      padded, offsets)
  return jnp.where(flips[:, None, None, None], windows[:, :, ::-1], windows)


def random_crop_flip(key: jax.Array, images: jax.Array, *, padding: int, fill: jax.Array | float) -> jax.Array:
  """`crop_flip` with per-sample offsets uniform in {0, ..., 2·padding}^2 and fair-coin flips."""
  offset_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(offset_key, (images.shape[0], 2), 0, 2 * padding + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (images.shape[0],))
  return crop_flip(images, offsets=offsets, flips=flips, padding=padding, fill=fill)
