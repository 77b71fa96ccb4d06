"""The ConvNet of the dataset-distillation literature (DC/DSA/DM/MTT; docs/protocols.md §3.1).

Each of `depth` blocks is conv 3x3 (width channels, with bias) -> norm -> ReLU -> 2x2 pooling; then flatten and
a linear head. With 1-channel inputs the first conv pads by 3 instead of 1, so 28-px (Fashion-)MNIST behaves like
32 px and the feature map is 128·4·4 = 2048 at depth 3, as in the reference. Instance norm is GroupNorm with one
group per channel, affine, epsilon 1e-5 (PyTorch's, not Flax's 1e-6). The flatten order is NHWC, which only
matters when porting PyTorch weights.
"""

from flax import nnx
import jax

from calibjax.models.fast_paths import conv_as_matmul, instance_norm, pool2x2, use_matmul
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
    self.pooling, self.norm_kind = pooling, norm
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
      elif self.norm_kind == "instance":
        x = instance_norm(x, norm.scale[...], norm.bias[...], norm.epsilon)
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
