"""MobileNetV2 of the RepDistiller / mdistiller zoo (`mobile_half`: expansion 6, width multiplier 0.5).

The CIFAR variant from "Knowledge Distillation via Route Constrained Optimization": stem conv3x3 stride 2 ->
BN -> ReLU, seven groups of inverted residual blocks
(t, c, n, s) = (1, 16, 1, 1), (T, 24, 2, 1), (T, 32, 3, 2), (T, 64, 4, 2), (T, 96, 3, 1), (T, 160, 3, 2),
(T, 320, 1, 1) with channels c scaled by the width multiplier, then conv1x1 -> 1280 (not scaled for
multipliers <= 1) -> BN -> ReLU, global average pooling and a linear head. Every inverted residual has its
1x1 expansion conv, also for t = 1 (unlike torchvision's MobileNetV2); the residual is added when the stride
is 1 and the widths match. A 32-px input ends at 2x2. This is not the full-width MobileNetV2 of
CalibrationXferViaKD (docs/protocols.md §4.4): use `width=1.0` for RepDistiller's `mobile_full`.

Initialisation as the reference: Kaiming-normal fan_out convs (depthwise included: fan_out = 9 * channels),
head weights N(0, 0.01) and zero bias.
"""

from flax import nnx
import jax

from calibjax.errors import ConfigError
from calibjax.models.layers import ConvBN, global_avg_pool, linear

# Channels and first-block stride of the seven groups; the first group expands by 1, the others by T.
_CHANNELS = (16, 24, 32, 64, 96, 160, 320)
_STRIDES = (1, 1, 2, 2, 1, 2, 1)
_LAST_CHANNELS = 1280


class InvertedResidual(nnx.Module):
  """1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear projection, residual when shapes allow."""

  def __init__(self, in_features: int, out_features: int, stride: int, expansion: int, *, rngs: nnx.Rngs):
    hidden = in_features * expansion
    self.expand = ConvBN(in_features, hidden, 1, rngs=rngs)
    self.depthwise = ConvBN(hidden, hidden, 3, stride=stride, groups=hidden, rngs=rngs)
    self.project = ConvBN(hidden, out_features, 1, relu=False, rngs=rngs)
    self.residual = stride == 1 and in_features == out_features

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    out = self.project(self.depthwise(self.expand(x, train=train), train=train), train=train)
    return x + out if self.residual else out


class MobileNetV2(nnx.Module):
  """MobileNetV2 for small images. Call with NHWC images; `train` selects batch statistics.

  Args:
    num_classes: output classes.
    input_shape: (H, W, C) of one image; any size works (global average pool before the head).
    expansion: expansion factor T of the inverted residuals (6).
    width: width multiplier (0.5: RepDistiller's `mobile_half`, the zoo's "MobileNetV2").
    blocks: inverted residuals in each of the seven groups.
    rngs: NNX random streams.
  """

  def __init__(self, num_classes: int, input_shape: tuple[int, int, int], *, expansion: int = 6,
               width: float = 0.5, blocks: tuple[int, ...] = (1, 2, 3, 4, 3, 3, 1), rngs: nnx.Rngs):
    if len(blocks) != len(_CHANNELS):
      raise ConfigError(f"MobileNetV2 blocks must give {len(_CHANNELS)} group sizes, got {blocks}")
    in_features = int(32 * width)
    self.stem = ConvBN(input_shape[2], in_features, 3, stride=2, rngs=rngs)
    layers = []
    for group, (channels, count, first_stride) in enumerate(zip(_CHANNELS, blocks, _STRIDES)):
      out_features = int(channels * width)
      for index in range(count):
        layers.append(InvertedResidual(in_features, out_features, first_stride if index == 0 else 1,
                                       expansion if group else 1, rngs=rngs))
        in_features = out_features
    self.blocks = nnx.List(layers)
    last = int(_LAST_CHANNELS * width) if width > 1.0 else _LAST_CHANNELS
    self.last = ConvBN(in_features, last, 1, rngs=rngs)
    self.feature_dim = last
    self.head = linear(last, num_classes, weight="normal", bias="zeros", rngs=rngs)

  def embed(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Pooled features after the last 1x1 conv, (N, 1280)."""
    x = self.stem(x, train=train)
    for block in self.blocks:
      x = block(x, train=train)
    return global_avg_pool(self.last(x, train=train))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.head(self.embed(x, train=train))


VARIANTS = {"mobilenetv2": MobileNetV2}
