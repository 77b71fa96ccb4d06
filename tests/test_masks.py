"""Tests of the input-mask primitive shared by MTS and MDT (calibjax.masks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calibjax.masks import mask_inputs, sample_ratio
from calibjax.errors import ConfigError

KEY = jax.random.key(0)
# One shape and one jitted function for every test: each new shape or granularity is a compile.
X = np.asarray(jax.random.normal(jax.random.key(1), (64, 16, 16, 3)))
mask = jax.jit(mask_inputs, static_argnames=("granularity",))


def test_ratio_zero_is_identity_and_ratio_one_is_zeros():
  for granularity in ("element", "pixel"):
    np.testing.assert_array_equal(mask(KEY, X, 0.0, granularity=granularity), X)
    out = np.asarray(mask(KEY, X, 1.0, granularity=granularity))
    np.testing.assert_array_equal(out, np.zeros_like(X))
    assert not np.signbit(out).any()  # +0.0, not -0.0 from negative inputs


@pytest.mark.parametrize("granularity", ["element", "pixel"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.8])
def test_zero_fraction_matches_ratio(granularity, ratio):
  zero_fraction = np.mean(np.asarray(mask(KEY, X, ratio, granularity=granularity)) == 0)
  # 49k element draws / 16k pixel draws: binomial standard errors below 0.004.
  assert abs(zero_fraction - ratio) < 0.015


def test_kept_entries_unchanged_and_masks_nested_across_ratios():
  low, high = np.asarray(mask(KEY, X, 0.2)), np.asarray(mask(KEY, X, 0.6))
  kept = low != 0
  np.testing.assert_array_equal(low[kept], X[kept])
  # Same key, higher ratio: every entry masked at 0.2 is also masked at 0.6.
  assert np.all(high[~kept] == 0)


def test_element_masks_channels_independently_pixel_masks_share():
  element = np.asarray(mask(KEY, X, 0.5)) == 0
  pixel = np.asarray(mask(KEY, X, 0.5, granularity="pixel")) == 0
  assert np.all(pixel.min(-1) == pixel.max(-1))
  assert np.any(element.min(-1) != element.max(-1))


def test_gradients_flow_through_kept_entries():
  grad = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(mask_inputs(KEY, x, 0.5) ** 2)))(X))
  masked = np.asarray(mask(KEY, X, 0.5)) == 0
  np.testing.assert_allclose(grad[~masked], 2 * X[~masked], rtol=1e-6)
  np.testing.assert_array_equal(grad[masked], 0.0)


def test_vmap_over_traced_ratio():
  fractions = jax.jit(jax.vmap(lambda r: jnp.mean(mask_inputs(KEY, X, r) == 0)))(jnp.array([0.0, 0.5, 1.0]))
  np.testing.assert_allclose(fractions, [0.0, 0.5, 1.0], atol=0.015)
  # vmapped draws equal the unbatched ones (same key, same uniform draw).
  np.testing.assert_allclose(fractions[1], np.mean(np.asarray(mask(KEY, X, 0.5)) == 0))


def test_sample_ratio_uniform_in_range():
  ratios = np.asarray(jax.jit(jax.vmap(lambda k: sample_ratio(k, 0.1)))(jax.random.split(KEY, 4000)))
  assert ratios.min() >= 0.0 and ratios.max() < 0.1
  np.testing.assert_allclose(ratios.mean(), 0.05, atol=0.003)
  assert float(sample_ratio(KEY, 0.0)) == 0.0


def test_bad_arguments_raise():
  with pytest.raises(ConfigError):
    mask_inputs(KEY, X, 0.5, granularity="patch")
  with pytest.raises(ConfigError):
    mask_inputs(KEY, X, 1.5)
  with pytest.raises(ConfigError):
    mask_inputs(KEY, np.ones((5,)), 0.5, granularity="pixel")
  with pytest.raises(ConfigError):
    sample_ratio(KEY, -0.1)
