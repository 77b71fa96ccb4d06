"""The ConvNet of the dataset-distillation literature (DC/DSA/DM/MTT; docs/protocols.md §3.1).

Each of `depth` blocks is conv 3x3 (width channels, with bias) -> norm -> ReLU -> 2x2 pooling; then flatten and
a linear head. With 1-channel inputs the first conv pads by 3 instead of 1, so 28-px (Fashion-)MNIST behaves like
32 px and the feature map is 128·4·4 = 2048 at depth 3, as in the reference. Instance norm is GroupNorm with one
group per channel, affine, epsilon 1e-5 (PyTorch's, not Flax's 1e-6). The flatten order is NHWC, which only
matters when porting PyTorch weights.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from calibjax.models.init import torch_bias_init, torch_kernel_init

NORMS = ("instance", "batch", "group", "none")
POOLINGS = ("avg", "max", "none")


class ConvNet(nnx.Module):
  """DD ConvNet. Call with NHWC images; `train` switches batch norm to batch statistics.

  Args:
    num_classes: output classes.
    input_shape: (H, W, C) of one image.
    width: channels of every conv (128 in the references).
    depth: number of conv blocks (3; 4 for 64 px, 5 for 128 px).
    norm: instance | batch | group (4 groups, as the references' 'groupnorm') | none.
    pooling: avg | max | none.
    init: "torch" (PyTorch defaults, for parity with the references) or "flax".
    rngs: NNX random streams; `params` is used.
  """

  def __init__(self, num_classes: int, input_shape: tuple[int, int, int], *, width: int = 128, depth: int = 3,
               norm: str = "instance", pooling: str = "avg", init: str = "torch", rngs: nnx.Rngs):
    if norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    height, wid, channels = input_shape
    self.pooling = pooling
    convs, norms = [], []
    in_ch = channels
    for layer in range(depth):
      pad = 3 if (layer == 0 and channels == 1) else 1
      convs.append(nnx.Conv(in_ch, width, (3, 3), padding=pad, rngs=rngs,
                                 **_init_kwargs(init, fan_in=in_ch * 9)))
      height, wid = height + 2 * pad - 2, wid + 2 * pad - 2
      norms.append(_make_norm(norm, width, rngs))
      if pooling != "none":
        height, wid = height // 2, wid // 2
      in_ch = width
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    self.feature_dim = height * wid * width
    self.head = nnx.Linear(self.feature_dim, num_classes, rngs=rngs,
                           **_init_kwargs(init, fan_in=self.feature_dim))

  def blocks(self, x: jax.Array, *, train: bool = False) -> list[jax.Array]:
    """The output of every conv block (conv, norm, ReLU, pooling), (N, H_l, W_l, width) each, in order."""
    outputs = []
    for conv, norm in zip(self.convs, self.norms):
      x = conv_as_matmul(conv, x) if use_matmul(conv) else conv(x)
      if isinstance(norm, nnx.BatchNorm):
        x = norm(x, use_running_average=not train)
      elif norm is not None:
        x = norm(x)
      x = jax.nn.relu(x)
      if self.pooling != "none":
        x = pool2x2(x, self.pooling)
      outputs.append(x)
    return outputs

  def embed(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Flattened features before the head, (N, feature_dim); DM matches their class means."""
    x = self.blocks(x, train=train)[-1]
    return x.reshape(x.shape[0], -1)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.head(self.embed(x, train=train))


# XLA's CPU convolution computes the kernel gradient of a conv with very few input channels (the first layer on
# grayscale images) about 20x slower than its forward pass: 1.4 s vs 0.08 s for 256 Fashion-MNIST images on 2
# cores, more than the whole rest of a training step. As a matmul over 3x3 patches, the same conv and both of its
# gradients are plain matrix products (patches are only 9 * C_in wide, so they cost little memory).
_MATMUL_MAX_IN_CHANNELS = 4


def use_matmul(conv: nnx.Conv) -> bool:
  """Whether `conv_as_matmul` should compute `conv` (square stride, ungrouped, integer padding): for few input
  channels always, and for every such conv on the CPU backend; XLA's convolution elsewhere (GPU/TPU kernels
  win there).

  On XLA:CPU the 128 -> 128 3x3 conv of the ConvNet (batch 256, 16 x 16, value and both gradients) takes 2.1 s as
  a patch matmul vs 8.3 s as a convolution, and 18 s vs 124 s when vmapped over 10 weight-sharing batches (the
  per-class gradients of gradient matching, where the convolution becomes a grouped one); measured on 2 busy
  cores. The patches cost 9x the input's memory.
  """
  if _square_stride(conv) is None or conv.feature_group_count != 1 or not isinstance(conv.padding, int):
    return False
  return conv.in_features <= _MATMUL_MAX_IN_CHANNELS or jax.default_backend() == "cpu"


def _square_stride(conv: nnx.Conv) -> int | None:
  """The conv's stride if it is the same along both axes, else None."""
  strides = conv.strides
  if isinstance(strides, int):
    return strides
  return strides[0] if len(set(strides)) == 1 else None


def conv_as_matmul(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """`conv(x)` for a square-stride conv with explicit symmetric integer padding, computed on im2col patches."""
  kh, kw = conv.kernel_size
  pad, stride = conv.padding, _square_stride(conv)
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
  # Patch features ordered (kh, kw, c_in), matching the (kh, kw, c_in, c_out) kernel layout.
  patches = jnp.concatenate([x[:, i:i + span_h:stride, j:j + span_w:stride, :]
                             for i in range(kh) for j in range(kw)], axis=-1)
  y = patches @ conv.kernel.value.reshape(-1, conv.out_features)
  return y + conv.bias.value if conv.bias is not None else y


def pool2x2(x: jax.Array, kind: str) -> jax.Array:
  """2x2 pooling with stride 2 (an odd last row/column is dropped, as PyTorch's pooling does).

  Written as a reshape and reduction: XLA's CPU gradient of `reduce_window` is three times slower.
  """
  n, h, w, c = x.shape
  blocks = x[:, :h - h % 2, :w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c)
  return blocks.mean(axis=(2, 4)) if kind == "avg" else blocks.max(axis=(2, 4))


def _init_kwargs(init: str, *, fan_in: int) -> dict:
  if init == "torch":
    return dict(kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in))
  if init == "flax":
    return {}
  raise ValueError(f"init must be 'torch' or 'flax', got {init!r}")


def _make_norm(norm: str, width: int, rngs: nnx.Rngs):
  if norm == "instance":
    return nnx.GroupNorm(width, num_groups=width, epsilon=1e-5, rngs=rngs)
  if norm == "group":
    return nnx.GroupNorm(width, num_groups=4, epsilon=1e-5, rngs=rngs)
  if norm == "batch":
    return nnx.BatchNorm(width, momentum=0.9, epsilon=1e-5, rngs=rngs)
  return None
