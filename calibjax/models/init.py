"""PyTorch-default initialisers.

The dataset-distillation references (DC, DSA, DM, MTT) and their evaluation protocol use PyTorch's default
initialisation, and published accuracies depend on it (docs/protocols.md §7, row 1): conv and linear weights are
Kaiming-uniform with a = sqrt(5), i.e. U(-b, b) with b = 1 / sqrt(fan_in), and biases U(-1/sqrt(fan_in),
1/sqrt(fan_in)). Flax's defaults (LeCun-normal weights, zero biases) are kept as the alternative.
"""

import math

import jax
import jax.numpy as jnp


def _fan_in(shape) -> int:
  # Flax kernels are (..., in, out): conv (kh, kw, in, out), dense (in, out).
  return math.prod(shape[:-1])


def torch_kernel_init(key, shape, dtype=jnp.float32):
  bound = 1.0 / math.sqrt(_fan_in(shape))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_bias_init(fan_in: int):
  """Bias initialiser U(-1/sqrt(fan_in), 1/sqrt(fan_in)); `fan_in` comes from the layer's kernel."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init
