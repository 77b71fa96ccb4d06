"""Binary input masks: the primitive shared by Masked Temperature Scaling and Masked Distillation Training.

Convention (the one backed by code: the MTS development fork, `temperature.py`, which multiplies each input
by `rand_like(input) > threshold`): every masked entry is set to **zero in the network's input space**, i.e.
after mean/std normalisation or ZCA whitening, and kept with probability `1 - ratio`. Two granularities:

- `"element"` (default, the reference): one independent draw per array element, so the channels of a pixel
  are masked independently;
- `"pixel"`: one draw per spatial location shared by all channels of that location (inputs are NHWC, so the
  draw has shape `x.shape[:-1] + (1,)`); not in any reference code, offered because the paper does not say
  which form MDT uses.

A uniform draw `u ~ U[0, 1)` keeps an entry where `u >= ratio`, so `ratio = 0` returns `x` unchanged and
`ratio = 1` returns zeros exactly (the reference's strict `>` differs only on a probability-zero event).
`ratio` may be a traced scalar, so the functions jit and vmap over it (the dynamic-ratio MDT variant draws a
new ratio per iteration with `sample_ratio`).
"""

import jax
import jax.numpy as jnp

from calibjax.errors import ConfigError

GRANULARITIES = ("element", "pixel")


def mask_inputs(key: jax.Array, x: jax.Array, ratio: jax.typing.ArrayLike, *,
                granularity: str = "element") -> jax.Array:
  """Zeroes entries of `x` independently with probability `ratio`.

  Args:
    key: PRNG key; the same key gives the same mask (nested across ratios: an entry masked at ratio r is also
      masked at every r' > r, because the same uniform draw is thresholded).
    x: inputs of any shape; for `granularity="pixel"` NHWC (or any shape whose last axis is channels).
    ratio: masking probability in [0, 1]; a Python float or a traced scalar.
    granularity: `"element"` (one draw per element, the MTS reference) or `"pixel"` (one draw per spatial
      location, shared across the last axis).

  Returns:
    An array with the shape and dtype of `x`: `x` where kept, exactly 0 where masked. Gradients with respect
    to `x` pass through kept entries (and are zero at masked ones); none flow to `ratio`.
  """
  if granularity not in GRANULARITIES:
    raise ConfigError(f"unknown mask granularity '{granularity}'; use one of {GRANULARITIES}")
  if isinstance(ratio, (int, float)) and not 0.0 <= ratio <= 1.0:
    raise ConfigError(f"mask ratio must be in [0, 1], got {ratio}")
  x = jnp.asarray(x)
  if granularity == "pixel" and x.ndim < 2:
    raise ConfigError(f"pixel masks need inputs with a channel axis (NHWC), got shape {x.shape}")
  shape = x.shape if granularity == "element" else x.shape[:-1] + (1,)
  keep = jax.random.uniform(key, shape) >= ratio
  # `where` rather than `x * keep`: masked entries become +0.0 even where x is negative or non-finite.
  return jnp.where(keep, x, jnp.zeros((), x.dtype))


def sample_ratio(key: jax.Array, r_max: jax.typing.ArrayLike) -> jax.Array:
  """Draws a masking ratio r ~ U[0, r_max] (the dynamic-ratio MDT variant; the paper uses r_max = 0.1).

  Args:
    key: PRNG key.
    r_max: upper end of the range, in [0, 1]; may be traced.

  Returns:
    A float32 scalar in [0, r_max).
  """
  if isinstance(r_max, (int, float)) and not 0.0 <= r_max <= 1.0:
    raise ConfigError(f"r_max must be in [0, 1], got {r_max}")
  return jax.random.uniform(key, (), minval=0.0, maxval=r_max)
