"""Tests of calibjax.data.augment.mixing: mixup, CutMix, cutout and the mixed label loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calibjax.calibration import losses
from calibjax.data.augment import mixing
from calibjax.errors import ConfigError

B, H, W, C, K = 16, 8, 10, 3, 5


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(B, H, W, C)).astype(np.float32)
  labels = rng.integers(0, K, size=B).astype(np.int32)
  return jnp.asarray(images), jnp.asarray(labels)


def _constant_images():
  """Image i is filled with i + 1, so every pixel tells which image it came from."""
  return jnp.broadcast_to(jnp.arange(1.0, B + 1.0)[:, None, None, None], (B, H, W, C))


@pytest.mark.parametrize("per_sample", [False, True])
def test_mixup_is_the_lambda_mixture_of_a_permutation(per_sample):
  images, labels = _batch()
  mixed = mixing.mixup(jax.random.key(1), images, labels, alpha=0.4, per_sample=per_sample)
  assert mixed.lam.shape == ((B,) if per_sample else ())
  assert np.all((np.asarray(mixed.lam) > 0) & (np.asarray(mixed.lam) < 1))
  perm = np.asarray(mixed.perm)
  np.testing.assert_array_equal(np.sort(perm), np.arange(B))
  lam = np.asarray(mixed.lam).reshape(-1, 1, 1, 1) if per_sample else float(mixed.lam)
  want = lam * np.asarray(images) + (1 - lam) * np.asarray(images)[perm]
  np.testing.assert_allclose(mixed.images, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(mixed.labels_a, labels)
  np.testing.assert_array_equal(mixed.labels_b, np.asarray(labels)[perm])


def test_mixup_one_hot_labels_and_mixed_targets():
  images, labels = _batch()
  mixed = mixing.mixup(jax.random.key(2), images, labels, num_classes=K, per_sample=True)
  eye = np.eye(K)
  np.testing.assert_array_equal(mixed.labels_a, eye[labels])
  targets = np.asarray(mixing.mixed_targets(mixed))
  lam = np.asarray(mixed.lam)[:, None]
  np.testing.assert_allclose(targets, lam * eye[labels] + (1 - lam) * eye[np.asarray(labels)[mixed.perm]],
                             rtol=1e-6)
  np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
  int_mixed = mixing.mixup(jax.random.key(2), images, labels, per_sample=True)
  np.testing.assert_allclose(mixing.mixed_targets(int_mixed, K), targets, rtol=1e-6)
  with pytest.raises(ConfigError, match="num_classes"):
    mixing.mixed_targets(int_mixed)


def test_mixed_loss_equals_cross_entropy_on_mixed_targets():
  images, labels = _batch()
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(B, K)).astype(np.float32))
  for per_sample in (False, True):
    mixed = mixing.mixup(jax.random.key(4), images, labels, per_sample=per_sample)
    got = mixing.mixed_loss(losses.cross_entropy, logits, mixed, reduction="none")
    want = losses.cross_entropy(logits=logits, labels=mixing.mixed_targets(mixed, K), reduction="none")
    np.testing.assert_allclose(got, want, rtol=1e-5)
  batch_lam = mixing.mixup(jax.random.key(4), images, labels)
  per_sample = mixing.mixed_loss(losses.cross_entropy, logits, batch_lam, reduction="none")
  np.testing.assert_allclose(mixing.mixed_loss(losses.cross_entropy, logits, batch_lam), np.mean(per_sample),
                             rtol=1e-6)
  with pytest.raises(ConfigError, match="per-sample"):
    mixing.mixed_loss(losses.cross_entropy, logits, mixed)


def test_mixup_rejects_bad_inputs():
  images, labels = _batch()
  with pytest.raises(ConfigError, match="alpha"):
    mixing.mixup(jax.random.key(0), images, labels, alpha=0.0)
  with pytest.raises(ConfigError, match="floating"):
    mixing.mixup(jax.random.key(0), images.astype(jnp.uint8), labels)


def test_box_mask_is_clipped_at_the_borders():
  def area(cy, cx, half):
    return int(mixing.box_mask(height=6, width=6, center_y=cy, center_x=cx, half_h=half, half_w=half).sum())

  assert area(3, 3, 2) == 16   # rows 1..4, columns 1..4
  assert area(0, 0, 2) == 4    # rows/columns [-2, 2) clipped to [0, 2)
  assert area(5, 5, 2) == 9    # [3, 7) clipped to [3, 6)
  assert area(0, 3, 2) == 8
  assert area(2, 2, 0) == 0
  mask = mixing.box_mask(height=6, width=6, center_y=0, center_x=0, half_h=2, half_w=2)
  np.testing.assert_array_equal(np.argwhere(np.asarray(mask)).max(axis=0), [1, 1])


def _pasted_box(mixed_images, original):
  """The pasted region (pixels that changed); asserted to be one rectangle shared by every image."""
  changed = np.any(np.asarray(mixed_images) != np.asarray(original), axis=-1)
  region = np.any(changed, axis=0)
  if region.any():
    rows, cols = np.nonzero(region)
    box = np.zeros_like(region)
    box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    np.testing.assert_array_equal(region, box)
  return region


def test_cutmix_lambda_is_the_kept_fraction():
  images = _constant_images()
  labels = jnp.arange(B) % K
  seen_clipped = False
  for seed in range(12):
    mixed = mixing.cutmix(jax.random.key(seed), images, labels, alpha=1.0, prob=1.0)
    perm = np.asarray(mixed.perm)
    region = _pasted_box(mixed.images, images)
    kept = np.mean(np.asarray(mixed.images)[..., 0] == np.arange(1, B + 1)[:, None, None], axis=(1, 2))
    moved = perm != np.arange(B)
    np.testing.assert_allclose(kept[moved], float(mixed.lam), rtol=1e-6)
    np.testing.assert_allclose(1.0 - region.mean(), float(mixed.lam), rtol=1e-6)
    # The pasted pixels come from the partner.
    np.testing.assert_array_equal(np.asarray(mixed.images)[:, region, 0],
                                  np.broadcast_to((perm + 1.0)[:, None], (B, region.sum())))
    np.testing.assert_array_equal(mixed.labels_b, np.asarray(labels)[perm])
    rows, cols = np.nonzero(region) if region.any() else (np.array([1]), np.array([1]))
    seen_clipped |= bool(rows.min() == 0 or cols.min() == 0 or rows.max() == H - 1 or cols.max() == W - 1)
  assert seen_clipped


def test_cutmix_probability_zero_returns_the_input():
  images, labels = _batch()
  for seed in range(3):
    mixed = mixing.cutmix(jax.random.key(seed), images, labels, prob=0.0)
    np.testing.assert_array_equal(mixed.images, images)
    assert float(mixed.lam) == 1.0


def test_cutmix_probability_is_respected():
  images, labels = _batch()
  fn = jax.jit(functools.partial(mixing.cutmix, alpha=1.0, prob=0.5))
  applied = [float(fn(jax.random.key(s), images, labels).lam) < 1.0 for s in range(60)]
  assert 15 <= sum(applied) <= 45


def test_cutout_zero_count_equals_the_clipped_hole_area():
  images = jnp.ones((64, 8, 8, 1))
  out = np.asarray(mixing.cutout(jax.random.key(0), images, size=4))[..., 0]
  zeros = out == 0
  counts = zeros.sum(axis=(1, 2))
  full, partial = 0, 0
  for hole, count in zip(zeros, counts):
    rows, cols = np.nonzero(hole)
    assert count == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # one rectangle
    assert count <= 16
    if rows.min() > 0 and cols.min() > 0 and rows.max() < 7 and cols.max() < 7:
      assert count == 16  # a hole off the borders is never clipped
    full += count == 16
    partial += count < 16
  assert full > 0 and partial > 0
  two = np.asarray(mixing.cutout(jax.random.key(1), images, size=4, n_holes=2))
  assert np.all((two == 0).sum(axis=(1, 2, 3)) <= 32)
  assert np.any((two == 0).sum(axis=(1, 2, 3)) > 16)


def test_cutout_relative_size_and_validation():
  images, _ = _batch()
  np.testing.assert_array_equal(mixing.cutout(jax.random.key(5), images, size=0.5),
                                mixing.cutout(jax.random.key(5), images, size=4))
  with pytest.raises(ConfigError, match="fraction"):
    mixing.cutout(jax.random.key(5), images, size=1.5)


def test_deterministic_by_key_and_jittable():
  images, labels = _batch()
  key, other = jax.random.key(7), jax.random.key(8)
  for fn in (functools.partial(mixing.mixup, alpha=1.0), functools.partial(mixing.cutmix, prob=1.0)):
    jitted = jax.jit(fn)
    a, b, c = fn(key, images, labels), jitted(key, images, labels), jitted(other, images, labels)
    np.testing.assert_allclose(a.images, b.images, rtol=1e-6, atol=1e-6)  # XLA may fuse to FMA
    np.testing.assert_array_equal(a.perm, b.perm)
    assert not np.array_equal(a.images, c.images)
  cut = jax.jit(functools.partial(mixing.cutout, size=4))
  np.testing.assert_array_equal(cut(key, images), mixing.cutout(key, images, size=4))
  assert not np.array_equal(cut(key, images), cut(other, images))
