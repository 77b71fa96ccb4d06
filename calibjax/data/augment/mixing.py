"""Mixing augmentations: mixup, CutMix and cutout, jittable with explicit PRNG keys.

Conventions:
  * Images are NHWC arrays (B, H, W, C); labels are integer (B,) or targets (B, K). Every shape is static:
    boxes and holes are masks built from iota comparisons, so nothing is sliced dynamically.
  * The partner of sample i is `images[perm[i]]` with `perm` a uniformly random permutation of the batch (the
    MTS fork's `mixup.py`, Zhang et al.'s mixup-cifar10 and the CutMix reference all pair this way).
  * `lam` is the weight of the sample's own labels (`labels_a`); `labels_b = labels_a[perm]`. The label loss
    is lam * loss(labels_a) + (1 - lam) * loss(labels_b) (`mixed_loss`, paper 004 Eq. 12), or the loss on
    the soft targets of `mixed_targets`.
  * Hyperparameters (alpha, prob, size, n_holes, per_sample, num_classes) are Python values, static under jit.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from calibjax.errors import ConfigError


class Mixed(NamedTuple):
  """A mixed batch.

  Attributes:
    images: (B, H, W, C) mixed images.
    labels_a: the samples' own labels, integer (B,) or targets (B, K).
    labels_b: the partners' labels, `labels_a[perm]`.
    lam: weight of `labels_a`: () for one lambda per batch, (B,) for per-sample lambdas.
    perm: (B,) int32 partner indices.
  """
  images: jax.Array
  labels_a: jax.Array
  labels_b: jax.Array
  lam: jax.Array
  perm: jax.Array


def _encode(labels: jax.Array, num_classes: int | None) -> jax.Array:
  """One-hot encodes integer labels when `num_classes` is given; targets (B, K) pass through."""
  labels = jnp.asarray(labels)
  if num_classes is None or labels.ndim == 2:
    return labels
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def _check_alpha(alpha: float) -> None:
  if not alpha > 0:
    raise ConfigError(f"the Beta(alpha, alpha) parameter must be > 0; got alpha={alpha}")


def box_mask(*, height: int, width: int, center_y: jax.Array, center_x: jax.Array, half_h: jax.Array,
             half_w: jax.Array) -> jax.Array:
  """Boolean masks of the boxes rows [cy - hh, cy + hh) x columns [cx - hw, cx + hw), clipped to the image.

  Clipping is implicit: the mask only has image pixels, so a box crossing a border keeps its inside part.
  The side is 2 * half, as in the CutMix and cutout references (an odd requested side loses one pixel).

  Args:
    height: image height H.
    width: image width W.
    center_y: integer centres, any batch shape S.
    center_x: integer centres, shape S.
    half_h: integer half-heights, broadcastable to S.
    half_w: integer half-widths, broadcastable to S.

  Returns:
    bool (*S, H, W).
  """
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  cy, cx = jnp.asarray(center_y)[..., None, None], jnp.asarray(center_x)[..., None, None]
  hh, hw = jnp.asarray(half_h)[..., None, None], jnp.asarray(half_w)[..., None, None]
  return (rows >= cy - hh) & (rows < cy + hh) & (cols >= cx - hw) & (cols < cx + hw)


def mixup(key: jax.Array, images: jax.Array, labels: jax.Array, *, alpha: float = 1.0,
          num_classes: int | None = None, per_sample: bool = False) -> Mixed:
  """mixup (Zhang et al., ICLR 2018): images lam * x + (1 - lam) * x[perm], lam ~ Beta(alpha, alpha).

  One lambda per batch by default (the MTS fork and the common CIFAR code); `per_sample=True` draws a lambda
  per sample. The MTS fork uses alpha = 1 (lambda uniform); paper 004 uses alpha = 0.4.

  Args:
    key: PRNG key.
    images: (B, H, W, C) floating images.
    labels: integer (B,) or targets (B, K).
    alpha: Beta parameter, > 0.
    num_classes: when given, integer labels are returned one-hot (B, K) in `labels_a`/`labels_b`.
    per_sample: draw lam per sample (shape (B,)) instead of once per batch.

  Returns:
    A `Mixed`.
  """
  _check_alpha(alpha)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ConfigError(f"mixup needs floating images; got {images.dtype} (convert and normalise first)")
  key_lam, key_perm = jax.random.split(key)
  batch = images.shape[0]
  lam = jax.random.beta(key_lam, alpha, alpha, (batch,) if per_sample else ())
  perm = jax.random.permutation(key_perm, batch).astype(jnp.int32)
  weight = lam.reshape(lam.shape + (1,) * (images.ndim - lam.ndim)).astype(images.dtype)
  mixed = weight * images + (1.0 - weight) * images[perm]
  labels = _encode(labels, num_classes)
  return Mixed(images=mixed, labels_a=labels, labels_b=labels[perm], lam=lam, perm=perm)


def cutmix(key: jax.Array, images: jax.Array, labels: jax.Array, *, alpha: float = 1.0, prob: float = 0.5,
           num_classes: int | None = None) -> Mixed:
  """CutMix (Yun et al., ICCV 2019): paste one box of the partner image into every image of the batch.

  With lam0 ~ Beta(alpha, alpha), the box has sides floor(H sqrt(1 - lam0)) and floor(W sqrt(1 - lam0))
  (each rounded down to even, see `box_mask`), a centre uniform over the pixels, and is clipped at the
  borders; the returned lam = 1 - (clipped box area) / (H W) is the fraction of pixels kept from the sample
  itself. With probability 1 - prob nothing is pasted and lam = 1 (images unchanged). The box and the
  decision are shared by the whole batch, as in the reference (Yun et al.'s CIFAR setting alpha = 1, which
  paper 004 uses with prob = 0.5).

  Args:
    key: PRNG key.
    images: (B, H, W, C) images (any dtype).
    labels: integer (B,) or targets (B, K).
    alpha: Beta parameter, > 0.
    prob: probability of applying CutMix to the batch.
    num_classes: when given, integer labels are returned one-hot (B, K) in `labels_a`/`labels_b`.

  Returns:
    A `Mixed` whose `lam` is a scalar.
  """
  _check_alpha(alpha)
  key_lam, key_perm, key_y, key_x, key_apply = jax.random.split(key, 5)
  batch, height, width = images.shape[:3]
  ratio = jnp.sqrt(1.0 - jax.random.beta(key_lam, alpha, alpha, ()))
  half_h = jnp.floor(height * ratio).astype(jnp.int32) // 2
  half_w = jnp.floor(width * ratio).astype(jnp.int32) // 2
  inside = box_mask(height=height, width=width, center_y=jax.random.randint(key_y, (), 0, height),
                    center_x=jax.random.randint(key_x, (), 0, width), half_h=half_h, half_w=half_w)
  inside = inside & jax.random.bernoulli(key_apply, prob)
  perm = jax.random.permutation(key_perm, batch).astype(jnp.int32)
  mixed = jnp.where(inside[None, :, :, None], images[perm], images)
  lam = 1.0 - jnp.mean(inside, dtype=jnp.float32)
  labels = _encode(labels, num_classes)
  return Mixed(images=mixed, labels_a=labels, labels_b=labels[perm], lam=lam, perm=perm)


def cutout(key: jax.Array, images: jax.Array, *, size: int | float = 16, n_holes: int = 1) -> jax.Array:
  """Cutout (DeVries & Taylor 2017): zero `n_holes` squares per image; labels are unchanged.

  Each hole has its own centre, uniform over the pixels of its image, and is clipped at the borders, so a
  hole fully inside zeroes (2 * (side // 2))^2 pixels and one crossing a border fewer; holes may overlap.
  The reference uses 16 px on 32-px CIFAR images, i.e. half the side: pass `size=0.5` to keep that ratio on
  other resolutions (14 px on 28-px Fashion-MNIST). Zeroing happens on whatever `images` holds; DeVries &
  Taylor's CIFAR code applies cutout after normalisation, so zero is the dataset mean there.

  Args:
    key: PRNG key.
    images: (B, H, W, C) images.
    size: hole side in pixels (int), or as a fraction of min(H, W) (float in (0, 1]), rounded to pixels.
    n_holes: number of holes per image.

  Returns:
    (B, H, W, C) images with the holes set to zero.
  """
  batch, height, width = images.shape[:3]
  if isinstance(size, float):
    if not 0.0 < size <= 1.0:
      raise ConfigError(f"cutout size as a fraction of the image must be in (0, 1]; got {size}")
    size = round(size * min(height, width))
  key_y, key_x = jax.random.split(key)
  holes = box_mask(height=height, width=width,
                   center_y=jax.random.randint(key_y, (batch, n_holes), 0, height),
                   center_x=jax.random.randint(key_x, (batch, n_holes), 0, width),
                   half_h=size // 2, half_w=size // 2)
  return jnp.where(jnp.any(holes, axis=1)[..., None], jnp.zeros((), images.dtype), images)


def mixed_targets(mixed: Mixed, num_classes: int | None = None) -> jax.Array:
  """Soft targets lam * y_a + (1 - lam) * y_b, (B, K).

  Args:
    mixed: a `Mixed`.
    num_classes: needed when the labels in `mixed` are integers.

  Returns:
    float (B, K) targets whose rows sum to 1.
  """
  if mixed.labels_a.ndim == 1 and num_classes is None:
    raise ConfigError("mixed_targets needs num_classes for integer labels")
  y_a, y_b = _encode(mixed.labels_a, num_classes), _encode(mixed.labels_b, num_classes)
  lam = mixed.lam.reshape(mixed.lam.shape + (1,) * (y_a.ndim - mixed.lam.ndim)).astype(y_a.dtype)
  return lam * y_a + (1.0 - lam) * y_b


def mixed_loss(loss_fn: Callable[..., jax.Array], logits: jax.Array, mixed: Mixed,
               **kwargs: Any) -> jax.Array:
  """lam * loss_fn(y_a) + (1 - lam) * loss_fn(y_b) on the logits of the mixed images (paper 004 Eq. 12).

  `loss_fn` is called as `loss_fn(logits=logits, labels=..., **kwargs)`. With a per-batch lam any loss works
  (scalar or per-sample values); with per-sample lams it must return per-sample values (reduction="none"),
  and the result is per-sample too (reduce it yourself).

  Args:
    loss_fn: a loss taking `logits` and `labels` keywords.
    logits: (B, K) logits of `mixed.images`.
    mixed: a `Mixed`.
    **kwargs: passed to `loss_fn` (e.g. reduction="none").

  Returns:
    The mixed loss, of the shape `loss_fn` returns.
  """
  loss_a = loss_fn(logits=logits, labels=mixed.labels_a, **kwargs)
  loss_b = loss_fn(logits=logits, labels=mixed.labels_b, **kwargs)
  if mixed.lam.ndim > jnp.ndim(loss_a):
    raise ConfigError("per-sample mixup lambdas need a per-sample loss; pass reduction='none' to the loss")
  return mixed.lam * loss_a + (1.0 - mixed.lam) * loss_b
