"""ResNets with a 3x3 stride-1 stem and no max pooling: ResNet-18/34/50 for 32-64 px inputs.

The architecture of RepDistiller's `resnetv2.py` (the `ResNet50` teacher of its cross-architecture pairs):
conv 3x3 (64) -> BN -> ReLU, four stages of widths 64/128/256/512 with strides 1/2/2/2, global average pooling
and a linear head. The same stem and stages are the Tiny-ImageNet (64 px) ResNets of
torrvision/focal_calibration and CalibrationXferViaKD, whose head differs (2x2 adaptive pooling, a 4x wider
linear layer). Basic blocks are
conv3x3-BN-ReLU-conv3x3-BN; bottlenecks are 1x1-3x3-1x1 with expansion 4 and the stride on the 3x3 conv; a
1x1 conv + BN projection shortcut is used when the stride or the width changes.

`ResNet` also builds the CIFAR ResNets of `resnet_cifar.py`, which differ only in the stem width and stages.
Initialisation (layers.py): Kaiming-normal fan_out convs, PyTorch-default head (both references).
"""

import functools

from flax import nnx
import jax

from calibjax.models.layers import ConvBN, global_avg_pool, linear


class BasicBlock(nnx.Module):
  """Two 3x3 conv-BN layers and a residual connection; ReLU after the sum."""

  def __init__(self, in_features: int, width: int, stride: int, *, rngs: nnx.Rngs):
    self.out_features = width
    self.conv1 = ConvBN(in_features, width, 3, stride=stride, rngs=rngs)
    self.conv2 = ConvBN(width, width, 3, relu=False, rngs=rngs)
    self.shortcut = _shortcut(in_features, width, stride, rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    out = self.conv2(self.conv1(x, train=train), train=train)
    return jax.nn.relu(out + _residual(self.shortcut, x, train))


class Bottleneck(nnx.Module):
  """1x1 (width) -> 3x3 (width, stride) -> 1x1 (4 * width) conv-BN layers and a residual connection."""

  def __init__(self, in_features: int, width: int, stride: int, *, rngs: nnx.Rngs):
    self.out_features = 4 * width
    self.conv1 = ConvBN(in_features, width, 1, rngs=rngs)
    self.conv2 = ConvBN(width, width, 3, stride=stride, rngs=rngs)
    self.conv3 = ConvBN(width, self.out_features, 1, relu=False, rngs=rngs)
    self.shortcut = _shortcut(in_features, self.out_features, stride, rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    out = self.conv3(self.conv2(self.conv1(x, train=train), train=train), train=train)
    return jax.nn.relu(out + _residual(self.shortcut, x, train))


def _shortcut(in_features: int, out_features: int, stride: int, rngs: nnx.Rngs) -> ConvBN | None:
  if stride == 1 and in_features == out_features:
    return None
  return ConvBN(in_features, out_features, 1, stride=stride, relu=False, rngs=rngs)


def _residual(shortcut: ConvBN | None, x: jax.Array, train: bool) -> jax.Array:
  return x if shortcut is None else shortcut(x, train=train)


class ResNet(nnx.Module):
  """Stem conv-BN-ReLU, stages of residual blocks (the first block of every stage but the first has stride 2),
  global average pooling and a linear head. Call with NHWC images; `train` selects batch statistics.

  Args:
    num_classes: output classes.
    input_shape: (H, W, C) of one image; any size works (the head follows a global average pool).
    stem_width: channels of the stem conv.
    widths: block width of every stage (the bottleneck output is 4x the width).
    blocks: number of blocks in every stage.
    bottleneck: bottleneck blocks instead of basic blocks.
    rngs: NNX random streams; `params` is used.
  """

  def __init__(self, num_classes: int, input_shape: tuple[int, int, int], *, stem_width: int,
               widths: tuple[int, ...], blocks: tuple[int, ...], bottleneck: bool = False, rngs: nnx.Rngs):
    block_type = Bottleneck if bottleneck else BasicBlock
    self.stem = ConvBN(input_shape[2], stem_width, 3, rngs=rngs)
    layers, in_features = [], stem_width
    for stage, (width, count) in enumerate(zip(widths, blocks)):
      for index in range(count):
        stride = 2 if stage > 0 and index == 0 else 1
        layers.append(block_type(in_features, width, stride, rngs=rngs))
        in_features = layers[-1].out_features
    self.blocks = nnx.List(layers)
    self.feature_dim = in_features
    self.head = linear(in_features, num_classes, rngs=rngs)

  def embed(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Globally pooled features after the last stage, (N, feature_dim)."""
    x = self.stem(x, train=train)
    for block in self.blocks:
      x = block(x, train=train)
    return global_avg_pool(x)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.head(self.embed(x, train=train))


_IMAGENET_STYLE = dict(stem_width=64, widths=(64, 128, 256, 512))
VARIANTS = {
    "resnet18": functools.partial(ResNet, blocks=(2, 2, 2, 2), **_IMAGENET_STYLE),
    "resnet34": functools.partial(ResNet, blocks=(3, 4, 6, 3), **_IMAGENET_STYLE),
    "resnet50": functools.partial(ResNet, blocks=(3, 4, 6, 3), bottleneck=True, **_IMAGENET_STYLE),
}
