"""Fast paths for the ConvNet's layers on XLA:CPU. Each computes what the plain layer computes (values, first and
second derivatives agree within float tolerance; tests/test_fast_paths.py) and exists because XLA:CPU runs the
plain form markedly slower; docs/jax.md §9.4 has the measurements.

  * `conv_as_matmul`: a convolution as a product of im2col patches with the kernel, with its own VJP. XLA's CPU
    kernel gradient of a convolution with few input channels is ~20x slower than its forward pass, and of a
    vmapped (grouped) convolution ~7x slower than the patch product. In the VJP the kernel gradient is a product
    batched over row chunks: as one product XLA:CPU first copies the output gradient into a transposed layout
    (0.22 s of a 1.6 s ConvNet step at batch 256), as a batched one it reads it where it is.
  * `instance_norm`: per-sample, per-channel normalisation with the textbook backward pass (one reduction pass
    for both statistics of the gradient) instead of the autodiff of GroupNorm's centred variance.
  * `pool2x2`: 2x2 pooling as a reshape and a reduction; XLA's CPU gradient of `reduce_window` is 3x slower.

Every backward pass here is made of differentiable operations, so gradient matching (which differentiates
through network gradients) gets exact second derivatives.
"""

import functools

from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp

# Convolutions with at most this many input channels always use the patch product (every backend): XLA's kernel
# gradient for them is slow everywhere; wider ones only on the CPU backend (GPU / TPU kernels win there).
_MATMUL_MAX_IN_CHANNELS = 4
# Row chunks of the kernel-gradient product (the largest of these dividing the rows is used).
_KERNEL_GRAD_CHUNKS = (16, 8, 4, 2, 1)


def use_matmul(conv: nnx.Conv) -> bool:
  """Whether `conv_as_matmul` should compute `conv`: a square-stride, ungrouped conv with integer padding, with
  few input channels on any backend and any width on the CPU backend."""
  if _square_stride(conv) is None or conv.feature_group_count != 1 or not isinstance(conv.padding, int):
    return False
  return conv.in_features <= _MATMUL_MAX_IN_CHANNELS or jax.default_backend() == "cpu"


def conv_as_matmul(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """`conv(x)` (NHWC) for a conv that `use_matmul` accepts, as a product of its input's patches and its kernel."""
  y = patch_conv(x, conv.kernel[...], conv.padding, _square_stride(conv))
  return y + conv.bias[...] if conv.bias is not None else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def patch_conv(x: jax.Array, kernel: jax.Array, padding: int, stride: int) -> jax.Array:
  """Cross-correlation of NHWC `x` with an HWIO `kernel`, symmetric zero `padding`, equal `stride` on both axes."""
  return _patches(x, kernel.shape[:2], padding, stride) @ kernel.reshape(-1, kernel.shape[-1])


def _patches(x: jax.Array, kernel_hw: tuple[int, int], padding: int, stride: int) -> jax.Array:
  """(N, H_out, W_out, kh * kw * C) patches, features ordered (kh, kw, C) like the HWIO kernel's rows."""
  kh, kw = kernel_hw
  x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
  return jnp.concatenate([x[:, i:i + span_h:stride, j:j + span_w:stride, :]
                          for i in range(kh) for j in range(kw)], axis=-1)


def _patch_conv_fwd(x, kernel, padding, stride):
  return patch_conv(x, kernel, padding, stride), (x, kernel)


def _patch_conv_bwd(padding, stride, residuals, grad):
  x, kernel = residuals
  out_features = kernel.shape[-1]
  patches, patches_vjp = jax.vjp(lambda x: _patches(x, kernel.shape[:2], padding, stride), x)
  rows = grad.size // out_features
  chunks = next(c for c in _KERNEL_GRAD_CHUNKS if rows % c == 0)
  kernel_grad = lax.dot_general(patches.reshape(chunks, rows // chunks, -1),
                                grad.reshape(chunks, rows // chunks, out_features),
                                (((1,), (1,)), ((0,), (0,)))).sum(axis=0)
  x_grad, = patches_vjp(grad @ kernel.reshape(-1, out_features).T)
  return x_grad, kernel_grad.reshape(kernel.shape)


patch_conv.defvjp(_patch_conv_fwd, _patch_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def instance_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """Normalise NHWC `x` over H and W per sample and channel (biased variance), then `* scale + bias` per channel:
  nnx.GroupNorm with one group per channel."""
  return _instance_norm_fwd(x, scale, bias, epsilon)[0]


def _instance_norm_fwd(x, scale, bias, epsilon):
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  inv_std = lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True) + epsilon)
  return (x - mean) * (inv_std * scale) + bias, (x, mean, inv_std, scale)


def _instance_norm_bwd(epsilon, residuals, grad):
  del epsilon  # inside inv_std
  x, mean, inv_std, scale = residuals
  normalised = (x - mean) * inv_std
  scaled_grad = grad * scale
  x_grad = inv_std * (scaled_grad - jnp.mean(scaled_grad, axis=(1, 2), keepdims=True)
                      - normalised * jnp.mean(scaled_grad * normalised, axis=(1, 2), keepdims=True))
  return x_grad, jnp.sum(grad * normalised, axis=(0, 1, 2)), jnp.sum(grad, axis=(0, 1, 2))


instance_norm.defvjp(_instance_norm_fwd, _instance_norm_bwd)


def pool2x2(x: jax.Array, kind: str) -> jax.Array:
  """2x2 pooling with stride 2 (an odd last row/column is dropped, as PyTorch's pooling does)."""
  n, h, w, c = x.shape
  blocks = x[:, :h - h % 2, :w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c)
  return blocks.mean(axis=(2, 4)) if kind == "avg" else blocks.max(axis=(2, 4))


def _square_stride(conv: nnx.Conv) -> int | None:
  """The conv's stride if it is the same along both axes, else None."""
  strides = conv.strides
  if isinstance(strides, int):
    return strides
  return strides[0] if len(set(strides)) == 1 else None
