"""Building blocks of the CIFAR knowledge-distillation zoo (RepDistiller / mdistiller architectures).

Conventions shared by every zoo model:

  * Images are NHWC. Convolutions pad by kernel // 2 on both sides, so a stride-2 conv maps H to ceil(H / 2),
    as PyTorch's `padding=k // 2` does (Flax's "SAME" would pad asymmetrically).
  * Batch norm uses PyTorch's defaults: running averages updated with weight 0.1 (Flax momentum 0.9), epsilon
    1e-5, scale 1 and bias 0 at init. In train mode the batch statistics are used and the running averages
    updated; Flax updates the running variance with the biased batch variance where PyTorch uses the unbiased
    one (a factor B·H·W / (B·H·W − 1), negligible at CIFAR batch sizes).
  * Initialisation follows each reference model's own code, because published accuracies are tied to it:
    "fan_out" is Kaiming-normal with gain sqrt(2) over fan_out = kh·kw·out_channels (RepDistiller's ResNets,
    WRN, VGG and MobileNetV2; PyTorch `kaiming_normal_(mode='fan_out')` or `normal_(0, sqrt(2 / n))`, both
    untruncated), "torch" is PyTorch's default U(−1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases
    (ShuffleNetV1/V2, which set no init). Grouped convs count fan_in per group, as PyTorch does.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from calibjax.errors import ConfigError
from calibjax.models.fast_paths import conv_as_matmul, pool2x2, use_matmul
from calibjax.models.init import torch_bias_init, torch_kernel_init

KAIMING_FAN_OUT = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
CONV_INITS = ("fan_out", "torch")
# Linear-layer weight and bias initialisers of the references: PyTorch default, N(0, 0.01), zeros.
LINEAR_WEIGHT_INITS = ("torch", "normal")
LINEAR_BIAS_INITS = ("torch", "zeros")


def conv(in_features: int, out_features: int, kernel: int, *, stride: int = 1, groups: int = 1,
         bias: bool = False, init: str = "fan_out", rngs: nnx.Rngs) -> nnx.Conv:
  """A square conv padded by kernel // 2 (PyTorch semantics); `init` is "fan_out" or "torch" (module doc).

  With "fan_out" the bias, if any, starts at zero (RepDistiller's VGG); with "torch" it is U(±1/sqrt(fan_in)).
  """
  fan_in = in_features // groups * kernel * kernel
  if init == "fan_out":
    inits = dict(kernel_init=KAIMING_FAN_OUT, bias_init=jax.nn.initializers.zeros)
  elif init == "torch":
    inits = dict(kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in))
  else:
    raise ConfigError(f"conv init must be one of {CONV_INITS}, got {init!r}")
  return nnx.Conv(in_features, out_features, (kernel, kernel), strides=stride, padding=kernel // 2,
                  feature_group_count=groups, use_bias=bias, rngs=rngs, **inits)


def batch_norm(features: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """Batch norm with PyTorch's momentum 0.1 and epsilon 1e-5."""
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)


def linear(in_features: int, out_features: int, *, weight: str = "torch", bias: str = "torch",
           rngs: nnx.Rngs) -> nnx.Linear:
  """The classifier head; `weight` is "torch" or "normal" (N(0, 0.01)), `bias` "torch" or "zeros"."""
  if weight not in LINEAR_WEIGHT_INITS or bias not in LINEAR_BIAS_INITS:
    raise ConfigError(f"linear init must be weight in {LINEAR_WEIGHT_INITS} and bias in {LINEAR_BIAS_INITS}; "
                      f"got {weight!r}, {bias!r}")
  kernel_init = torch_kernel_init if weight == "torch" else jax.nn.initializers.normal(0.01)
  bias_init = torch_bias_init(in_features) if bias == "torch" else jax.nn.initializers.zeros
  return nnx.Linear(in_features, out_features, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)


def apply_conv(layer: nnx.Conv, x: jax.Array) -> jax.Array:
  """`layer(x)`; a patch product where `fast_paths.use_matmul` says XLA:CPU's convolution gradient is slow."""
  if use_matmul(layer):
    return conv_as_matmul(layer, x)
  return layer(x)


class ConvBN(nnx.Module):
  """conv -> batch norm -> optional ReLU; `__call__(x, *, train)` uses batch statistics when `train`."""

  def __init__(self, in_features: int, out_features: int, kernel: int, *, stride: int = 1, groups: int = 1,
               relu: bool = True, bias: bool = False, init: str = "fan_out", rngs: nnx.Rngs):
    self.conv = conv(in_features, out_features, kernel, stride=stride, groups=groups, bias=bias, init=init,
                     rngs=rngs)
    self.norm = batch_norm(out_features, rngs=rngs)
    self.relu = relu

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = self.norm(apply_conv(self.conv, x), use_running_average=not train)
    return jax.nn.relu(x) if self.relu else x


def global_avg_pool(x: jax.Array) -> jax.Array:
  """(N, H, W, C) -> (N, C). The references' fixed AvgPool2d(8) / avg_pool2d(4) are global at 32 px; a
  global mean keeps the head valid for any input size (28-px Fashion-MNIST, 64-px Tiny-ImageNet)."""
  return jnp.mean(x, axis=(1, 2))


def max_pool2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2, odd last row/column dropped (PyTorch MaxPool2d(2, 2))."""
  return pool2x2(x, "max")


def avg_pool3x3_stride2(x: jax.Array) -> jax.Array:
  """PyTorch AvgPool2d(3, stride=2, padding=1) with its default count_include_pad=True (padding counted)."""
  return nnx.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True)


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """ShuffleNet channel shuffle (NHWC): channel j of group i moves to j·groups + i (PyTorch view-permute)."""
  *lead, channels = x.shape
  return x.reshape(*lead, groups, channels // groups).swapaxes(-1, -2).reshape(*lead, channels)
