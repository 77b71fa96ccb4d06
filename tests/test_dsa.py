"""Tests of Differentiable Siamese Augmentation against numpy re-computations and hand-worked cases."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calibjax.data.augment import dsa
from calibjax.errors import ConfigError, UnknownNameError

ALL_FAMILIES = ("brightness", "saturation", "contrast", "color", "flip", "scale", "rotate", "crop", "cutout")
# Non-square on purpose, so that a swapped height/width convention cannot pass.
SHAPE = (12, 8, 6, 2)
# One compiled dsa_augment per (shape, static arguments), shared by the tests.
_augment = jax.jit(dsa.dsa_augment, static_argnames=("strategy", "siamese", "params"))
_apply = jax.jit(dsa.apply_family, static_argnames=("family", "siamese", "params"))


def _images(shape=SHAPE, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 1.0, size=shape), jnp.float32)


def _np_affine_sample(x, theta, align_corners):
  """PyTorch's affine_grid + grid_sample (bilinear, zero padding), one output pixel at a time."""
  n, h, w, c = x.shape

  def normalised(index, size):
    if align_corners:
      return -1.0 + 2.0 * index / (size - 1)
    return (2.0 * index + 1.0) / size - 1.0

  def pixel(coord, size):
    if align_corners:
      return (coord + 1.0) / 2.0 * (size - 1)
    return ((coord + 1.0) * size - 1.0) / 2.0

  out = np.zeros(x.shape)
  for b in range(n):
    for i in range(h):
      for j in range(w):
        src = theta[b] @ np.array([normalised(j, w), normalised(i, h), 1.0])
        px, py = pixel(src[0], w), pixel(src[1], h)
        x0, y0 = int(np.floor(px)), int(np.floor(py))
        for yy in (y0, y0 + 1):
          for xx in (x0, x0 + 1):
            if 0 <= yy < h and 0 <= xx < w:
              out[b, i, j] += (1 - abs(py - yy)) * (1 - abs(px - xx)) * x[b, yy, xx]
  return out


def _np_family(images, family, drawn, params):
  """The reference DiffAugment maths, written out in numpy for already drawn parameters."""
  x = np.asarray(images, np.float64)
  d = {name: np.asarray(value) for name, value in drawn.items()}
  n, h, w, _ = x.shape
  ops = ("brightness", "saturation", "contrast") if family == "color" else (family,)
  for op in ops:
    if op == "brightness":
      x = x + d["brightness_shift"][:, None, None, None]
    elif op == "saturation":
      mean = x.mean(axis=3, keepdims=True)
      x = (x - mean) * d["saturation_factor"][:, None, None, None] + mean
    elif op == "contrast":
      mean = x.mean(axis=(1, 2, 3), keepdims=True)
      x = (x - mean) * d["contrast_factor"][:, None, None, None] + mean
    elif op == "flip":
      x = np.where(d["flip"][:, None, None, None], x[:, :, ::-1], x)
    elif op == "scale":
      theta = np.array([[[sx, 0, 0], [0, sy, 0]] for sx, sy in zip(d["scale_x"], d["scale_y"])])
      x = _np_affine_sample(x, theta, params.align_corners)
    elif op == "rotate":
      theta = np.array([[[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0]] for a in d["angle"]])
      x = _np_affine_sample(x, theta, params.align_corners)
    elif op == "crop":
      out = np.zeros_like(x)
      for b in range(n):
        for i in range(h):
          for j in range(w):
            si, sj = i + d["translate_y"][b], j + d["translate_x"][b]
            if 0 <= si < h and 0 <= sj < w:
              out[b, i, j] = x[b, si, sj]
      x = out
    elif op == "cutout":
      size_y, size_x = int(h * params.cutout_ratio + 0.5), int(w * params.cutout_ratio + 0.5)
      out = x.copy()
      for b in range(n):
        top, left = d["cutout_y"][b] - size_y // 2, d["cutout_x"][b] - size_x // 2
        out[b, max(top, 0):max(top + size_y, 0), max(left, 0):max(left + size_x, 0)] = 0.0
      x = out
  return x


def test_defaults_are_the_reference_values():
  p = dsa.DSAParams()
  assert (p.scale, p.rotate_degrees, p.flip_prob, p.brightness, p.saturation, p.contrast, p.crop_ratio,
          p.cutout_ratio, p.align_corners) == (1.2, 15.0, 0.5, 1.0, 2.0, 0.5, 0.125, 0.5, False)
  assert dsa.strategy_families(dsa.DEFAULT_STRATEGY) == ("color", "crop", "cutout", "flip", "scale", "rotate")
  assert set(dsa.FAMILIES.names()) == set(ALL_FAMILIES)


def test_user_errors():
  with pytest.raises(ConfigError, match="scale >= 1"):
    dsa.DSAParams(scale=0.8)
  with pytest.raises(UnknownNameError, match="noise"):
    dsa.dsa_augment(jax.random.key(0), _images(), strategy="color_noise")
  with pytest.raises(ValueError, match="NHWC"):
    dsa.dsa_augment(jax.random.key(0), jnp.zeros((2, 8, 8)))
  for none in ("", "none", "None"):
    assert dsa.strategy_families(none) == ()
    np.testing.assert_array_equal(dsa.dsa_augment(jax.random.key(0), _images(), strategy=none), _images())


@pytest.mark.parametrize("family,align_corners",
                         [(f, False) for f in ALL_FAMILIES] + [("scale", True), ("rotate", True)])
def test_family_matches_numpy(family, align_corners):
  params = dsa.DSAParams(align_corners=align_corners)
  images = _images()
  key = jax.random.key(3)
  drawn = dsa.draw_params(key, family, images.shape, siamese=False, params=params)
  out = _apply(key, images, family, siamese=False, params=params)
  assert out.shape == images.shape and out.dtype == images.dtype
  np.testing.assert_allclose(out, _np_family(images, family, drawn, params), atol=2e-6)
  assert not np.allclose(out, images)


def test_crop_and_cutout_with_larger_ratios_match_numpy():
  params = dsa.DSAParams(crop_ratio=0.5, cutout_ratio=0.75)
  images = _images()
  for family in ("crop", "cutout"):
    key = jax.random.key(11)
    drawn = dsa.draw_params(key, family, images.shape, siamese=False, params=params)
    out = _apply(key, images, family, siamese=False, params=params)
    np.testing.assert_allclose(out, _np_family(images, family, drawn, params), atol=1e-6)


@pytest.mark.parametrize("size", [28, 32])
def test_draw_ranges_follow_the_reference(size):
  shape = (4000, size, size, 1)
  draw = lambda family: {k: np.asarray(v) for k, v in dsa.draw_params(  # noqa: E731
      jax.random.key(size), family, shape, siamese=False).items()}
  d = draw("scale")
  for values in (d["scale_x"], d["scale_y"]):
    assert 1 / 1.2 <= values.min() < 1 / 1.2 + 0.01 and 1.2 - 0.01 < values.max() <= 1.2
  assert abs(np.corrcoef(d["scale_x"], d["scale_y"])[0, 1]) < 0.1
  angle = np.degrees(draw("rotate")["angle"])
  assert -15 <= angle.min() < -14.9 and 14.9 < angle.max() <= 15
  assert 0.45 < draw("flip")["flip"].mean() < 0.55
  d = draw("color")
  assert -0.5 <= d["brightness_shift"].min() < -0.49 and 0.49 < d["brightness_shift"].max() <= 0.5
  assert 0 <= d["saturation_factor"].min() < 0.01 and 1.99 < d["saturation_factor"].max() <= 2
  assert 0.5 <= d["contrast_factor"].min() < 0.51 and 1.49 < d["contrast_factor"].max() <= 1.5
  d = draw("crop")
  # round(0.125 * 28) = round(0.125 * 32) = 4 pixels; every integer shift occurs.
  for values in (d["translate_y"], d["translate_x"]):
    np.testing.assert_array_equal(np.unique(values), np.arange(-4, 5))
  d = draw("cutout")
  # Even square sides (14, 16): centres 0..size inclusive.
  for values in (d["cutout_y"], d["cutout_x"]):
    np.testing.assert_array_equal(np.unique(values), np.arange(0, size + 1))


def test_cutout_square_side():
  images = jnp.ones((64, 28, 28, 1))
  key = jax.random.key(5)
  d = dsa.draw_params(key, "cutout", images.shape, siamese=False)
  zeros = np.asarray((_apply(key, images, "cutout", siamese=False) == 0).sum(axis=(1, 2, 3)))
  centre_y, centre_x = np.asarray(d["cutout_y"]), np.asarray(d["cutout_x"])
  inside = (centre_y >= 7) & (centre_y <= 21) & (centre_x >= 7) & (centre_x <= 21)  # 14 x 14 square fits
  assert inside.any() and (~inside).any()
  np.testing.assert_array_equal(zeros[inside], 14 * 14)
  assert (zeros[~inside] < 14 * 14).all() and (zeros > 0).all()


@pytest.mark.parametrize("align_corners", [False, True])
def test_zero_rotation_and_unit_scale_are_identity(align_corners):
  params = dsa.DSAParams(align_corners=align_corners)
  images = _images((3, 7, 5, 2))
  ones = jnp.ones((3,))
  rotate = dsa.FAMILIES.get("rotate").apply(images, {"angle": 0 * ones}, params=params)
  scale = dsa.FAMILIES.get("scale").apply(images, {"scale_x": ones, "scale_y": ones}, params=params)
  np.testing.assert_allclose(rotate, images, atol=1e-6)
  np.testing.assert_allclose(scale, images, atol=1e-6)


@pytest.mark.parametrize("align_corners", [False, True])
def test_sampler_rotates_by_90_degrees_onto_the_grid(align_corners):
  images = _images((2, 5, 5, 3))
  theta = jnp.asarray([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]] * 2)
  out = dsa.affine_sample(images, theta, align_corners=align_corners)
  # theta maps output (x, y) to input (-y, x): out[i, j] = in[j, W - 1 - i], numpy's counter-clockwise rot90.
  np.testing.assert_allclose(out, np.rot90(np.asarray(images), k=1, axes=(1, 2)), atol=1e-6)
  np.testing.assert_allclose(out[0, 0, 0], images[0, 0, 4], atol=1e-6)


@pytest.mark.parametrize("align_corners", [False, True])
def test_sampler_sub_pixel_shift_by_hand(align_corners):
  images = jnp.asarray(np.tile([1.0, 2.0, 3.0, 4.0], (1, 2, 1))[..., None])  # (1, 2, 4, 1)
  pixel = 2.0 / (4 - 1) if align_corners else 2.0 / 4  # normalised width of one pixel
  for shift, expected in ((0.25, [1.25, 2.25, 3.25, 3.0]), (-0.5, [0.5, 1.5, 2.5, 3.5])):
    theta = jnp.asarray([[[1.0, 0.0, shift * pixel], [0.0, 1.0, 0.0]]])
    out = dsa.affine_sample(images, theta, align_corners=align_corners)
    np.testing.assert_allclose(out[0, :, :, 0], [expected, expected], atol=1e-6)


def test_sampler_zoom_by_hand():
  # align_corners=True, width 5, x' = x / 2: output columns read input pixels 1, 1.5, 2, 2.5, 3.
  images = jnp.asarray([[[[0.0], [10.0], [20.0], [40.0], [80.0]]]])  # (1, 1, 5, 1)
  theta = jnp.asarray([[[0.5, 0.0, 0.0], [0.0, 1.0, 0.0]]])
  out = dsa.affine_sample(images, theta, align_corners=True)
  np.testing.assert_allclose(out[0, 0, :, 0], [10.0, 15.0, 20.0, 30.0, 40.0], atol=1e-5)


def test_flip_twice_is_identity():
  images = _images()
  key = jax.random.key(8)
  flip = dsa.draw_params(key, "flip", images.shape, siamese=False)["flip"]
  assert flip.any() and not flip.all()
  once = _apply(key, images, "flip", siamese=False)
  np.testing.assert_array_equal(_apply(key, once, "flip", siamese=False), images)
  np.testing.assert_array_equal(once[flip], images[flip][:, :, ::-1])


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_siamese_draw_is_shared_and_independent_of_batch_size(family):
  key = jax.random.key(21)
  big = dsa.draw_params(key, family, (9, 8, 6, 2), siamese=True)
  small = dsa.draw_params(key, family, (2, 8, 6, 2), siamese=True)
  for name in big:
    assert big[name].shape == (9,) and small[name].shape == (2,)
    np.testing.assert_array_equal(big[name], big[name][0])
    np.testing.assert_array_equal(small[name], big[name][0])


def test_siamese_augments_real_and_synthetic_batches_identically():
  real = _images((4, 8, 8, 3), seed=1)
  synthetic = _images((2, 8, 8, 3), seed=2).at[1].set(real[3])
  augment = lambda key, x: _augment(key, x, siamese=True)  # noqa: E731
  chosen = set()
  for seed in range(16):
    key = jax.random.key(seed)
    chosen.add(int(jax.random.randint(jax.random.split(key)[0], (), 0, 6)))  # the family dsa_augment picks
    np.testing.assert_allclose(augment(key, synthetic)[1], augment(key, real)[3], atol=1e-6)
    copies = augment(key, jnp.broadcast_to(real[0], real.shape))
    np.testing.assert_allclose(copies, jnp.broadcast_to(copies[0], copies.shape), atol=1e-6)
  assert chosen == set(range(6))


def test_non_siamese_draws_per_sample():
  shape = (16, 8, 8, 3)
  for family, name in (("scale", "scale_x"), ("rotate", "angle"), ("color", "contrast_factor")):
    values = dsa.draw_params(jax.random.key(4), family, shape, siamese=False)[name]
    assert len(np.unique(np.asarray(values))) == shape[0]
  copies = jnp.broadcast_to(_images((1, 8, 8, 3)), shape)
  out = _apply(jax.random.key(4), copies, "rotate", siamese=False)
  assert len({np.asarray(o).tobytes() for o in out}) == shape[0]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_gradients_wrt_images_are_finite_and_nonzero(family):
  images = _images((4, 8, 8, 3))
  weights = _images((4, 8, 8, 3), seed=9)

  def loss(x):
    return jnp.sum(_apply(jax.random.key(2), x, family, siamese=True) * weights)

  grad = jax.jit(jax.grad(loss))(images)
  assert np.isfinite(grad).all() and np.abs(grad).sum() > 0


def test_dsa_augment_is_deterministic_and_traces_once():
  images = _images((4, 8, 8, 3))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def augment(key, x):
    return dsa.dsa_augment(key, x, siamese=False)

  chex.clear_trace_counter()
  outputs = [augment(jax.random.key(seed), images) for seed in range(6)]
  np.testing.assert_array_equal(augment(jax.random.key(0), images), outputs[0])
  assert not np.array_equal(outputs[0], outputs[1])
  # Through lax.switch (two families keep the compile short).
  grad = jax.grad(lambda x: jnp.sum(dsa.dsa_augment(jax.random.key(1), x, strategy="crop_rotate") ** 2))(
      images)
  assert np.isfinite(grad).all() and np.abs(grad).sum() > 0


def test_family_choice_uses_the_documented_keys_and_is_uniform():
  images = _images((2, 8, 8, 3))
  key = jax.random.key(7)
  np.testing.assert_allclose(
      _augment(key, images, strategy="rotate"),
      _apply(jax.random.split(key)[1], images, "rotate", siamese=False), atol=1e-6)
  out = np.stack([_augment(jax.random.key(seed), images, strategy="brightness_flip") for seed in range(160)])
  x = np.asarray(images)[None]
  shift = out - x
  constant_shift = np.all(np.abs(shift - shift[..., :1, :1, :1]) < 1e-6, axis=(2, 3, 4))
  brightened = np.all(constant_shift & (np.abs(shift[..., 0, 0, 0]) > 1e-6), axis=1)
  kept_or_flipped = (np.all(np.abs(out - x) < 1e-6, axis=(2, 3, 4))
                     | np.all(np.abs(out - x[:, :, :, ::-1]) < 1e-6, axis=(2, 3, 4)))
  flipped = np.all(kept_or_flipped, axis=1)
  assert (brightened ^ flipped).all()
  assert 0.38 < brightened.mean() < 0.62


def test_vmap_over_keys_matches_a_loop():
  images = _images((4, 8, 8, 3))
  keys = jax.random.split(jax.random.key(1), 6)
  batched = jax.vmap(lambda k: _augment(k, images, siamese=True))(keys)
  for k, out in zip(keys, batched):
    np.testing.assert_allclose(out, _augment(k, images, siamese=True), atol=1e-6)


def test_dtype_is_preserved():
  images = _images((2, 8, 8, 3)).astype(jnp.bfloat16)
  for family in ("color", "crop", "rotate"):  # float32 parameters, one-hot and interpolation weights
    assert _apply(jax.random.key(0), images, family, siamese=False).dtype == jnp.bfloat16
