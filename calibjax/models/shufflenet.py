"""ShuffleNetV1 and V2 of the RepDistiller / mdistiller zoo (the kuangliu/pytorch-cifar CIFAR variants).

Both replace the ImageNet stem by a 1x1 conv (24) -> BN -> ReLU with no downsampling, so a 32-px input is
16/8/4 px after the three stages; the head is global average pooling and a linear layer.

ShuffleNetV1 ("ShuffleV1": groups 3, stage outputs 240/480/960, 4/8/4 units). A unit is grouped 1x1 (to a
quarter of its output) -> BN -> ReLU -> channel shuffle -> depthwise 3x3 -> BN -> ReLU -> grouped 1x1 -> BN;
with stride 1 the input is added, with stride 2 (the first unit of a stage) the branch outputs (stage output -
input) channels and is concatenated with a 3x3/2 average pool of the input (zeros counted, PyTorch's default),
then ReLU. The very first 1x1 conv, on the 24 stem channels, is not grouped (the reference tests `in_planes ==
24`).

ShuffleNetV2 ("ShuffleV2": net size 1, stage outputs 116/232/464, 3/7/3 basic units after one down unit per
stage, a final 1x1 conv to 1024 -> BN -> ReLU). A basic unit splits the channels in halves, passes the second
half through 1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU, concatenates [first half, branch] and shuffles with 2
groups. A down unit concatenates two stride-2 branches (depthwise 3x3-BN then 1x1-BN-ReLU; and 1x1-BN-ReLU,
depthwise 3x3-BN, 1x1-BN-ReLU), each of half the stage output, and shuffles.

Initialisation: the references set none, so PyTorch's defaults (layers.py "torch") for convs and the head.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from calibjax.models.layers import ConvBN, avg_pool3x3_stride2, channel_shuffle, global_avg_pool, linear

_STEM = 24
_INIT = "torch"


class ShuffleUnitV1(nnx.Module):
  """ShuffleNetV1 bottleneck unit; `grouped_input` is False for the unit that reads the stem."""

  def __init__(self, in_features: int, out_features: int, stride: int, groups: int, grouped_input: bool, *,
               rngs: nnx.Rngs):
    self.stride = stride
    branch_out = out_features - in_features if stride == 2 else out_features
    mid = branch_out // 4
    self.first_groups = groups if grouped_input else 1
    self.conv1 = ConvBN(in_features, mid, 1, groups=self.first_groups, init=_INIT, rngs=rngs)
    self.conv2 = ConvBN(mid, mid, 3, stride=stride, groups=mid, init=_INIT, rngs=rngs)
    self.conv3 = ConvBN(mid, branch_out, 1, groups=groups, relu=False, init=_INIT, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    out = channel_shuffle(self.conv1(x, train=train), self.first_groups)
    out = self.conv3(self.conv2(out, train=train), train=train)
    if self.stride == 2:
      return jax.nn.relu(jnp.concatenate([out, avg_pool3x3_stride2(x)], axis=-1))
    return jax.nn.relu(out + x)


class ShuffleNetV1(nnx.Module):
  """ShuffleNetV1 for small images. Call with NHWC images; `train` selects batch statistics.

  Args:
    num_classes: output classes.
    input_shape: (H, W, C) of one image; any size works (global average pool before the head).
    out_channels: output channels of the three stages.
    blocks: units per stage.
    groups: groups of the pointwise convs.
    rngs: NNX random streams.
  """

  def __init__(self, num_classes: int, input_shape: tuple[int, int, int], *,
               out_channels: tuple[int, int, int] = (240, 480, 960), blocks: tuple[int, int, int] = (4, 8, 4),
               groups: int = 3, rngs: nnx.Rngs):
    self.stem = ConvBN(input_shape[2], _STEM, 1, init=_INIT, rngs=rngs)
    layers, in_features = [], _STEM
    for out_features, count in zip(out_channels, blocks):
      for index in range(count):
        layers.append(ShuffleUnitV1(in_features, out_features, 2 if index == 0 else 1, groups,
                                    grouped_input=bool(layers), rngs=rngs))
        in_features = out_features
    self.blocks = nnx.List(layers)
    self.feature_dim = in_features
    self.head = linear(in_features, num_classes, rngs=rngs)

  def embed(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Pooled features after the last stage, (N, out_channels[-1])."""
    x = self.stem(x, train=train)
    for block in self.blocks:
      x = block(x, train=train)
    return global_avg_pool(x)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.head(self.embed(x, train=train))


class DownUnitV2(nnx.Module):
  """ShuffleNetV2 spatial down-sampling unit: two stride-2 branches of out_features // 2 channels each."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    mid = out_features // 2
    self.left = nnx.List([ConvBN(in_features, in_features, 3, stride=2, groups=in_features, relu=False,
                                 init=_INIT, rngs=rngs),
                          ConvBN(in_features, mid, 1, init=_INIT, rngs=rngs)])
    self.right = nnx.List([ConvBN(in_features, mid, 1, init=_INIT, rngs=rngs),
                           ConvBN(mid, mid, 3, stride=2, groups=mid, relu=False, init=_INIT, rngs=rngs),
                           ConvBN(mid, mid, 1, init=_INIT, rngs=rngs)])

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    left, right = x, x
    for layer in self.left:
      left = layer(left, train=train)
    for layer in self.right:
      right = layer(right, train=train)
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class BasicUnitV2(nnx.Module):
  """ShuffleNetV2 basic unit: channel split, a branch on the second half, concatenation and shuffle."""

  def __init__(self, features: int, *, rngs: nnx.Rngs):
    self.split = features // 2
    half = features - self.split
    self.branch = nnx.List([ConvBN(half, half, 1, init=_INIT, rngs=rngs),
                            ConvBN(half, half, 3, groups=half, relu=False, init=_INIT, rngs=rngs),
                            ConvBN(half, half, 1, init=_INIT, rngs=rngs)])

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    kept, out = x[..., :self.split], x[..., self.split:]
    for layer in self.branch:
      out = layer(out, train=train)
    return channel_shuffle(jnp.concatenate([kept, out], axis=-1), 2)


class ShuffleNetV2(nnx.Module):
  """ShuffleNetV2 for small images. Call with NHWC images; `train` selects batch statistics.

  Args:
    num_classes: output classes.
    input_shape: (H, W, C) of one image; any size works (global average pool before the head).
    out_channels: output channels of the three stages and of the final 1x1 conv (net size 1).
    blocks: basic units per stage (after the down unit).
    rngs: NNX random streams.
  """

  def __init__(self, num_classes: int, input_shape: tuple[int, int, int], *,
               out_channels: tuple[int, int, int, int] = (116, 232, 464, 1024),
               blocks: tuple[int, int, int] = (3, 7, 3), rngs: nnx.Rngs):
    self.stem = ConvBN(input_shape[2], _STEM, 1, init=_INIT, rngs=rngs)
    layers, in_features = [], _STEM
    for out_features, count in zip(out_channels[:3], blocks):
      layers.append(DownUnitV2(in_features, out_features, rngs=rngs))
      layers.extend(BasicUnitV2(out_features, rngs=rngs) for _ in range(count))
      in_features = out_features
    self.blocks = nnx.List(layers)
    self.last = ConvBN(in_features, out_channels[3], 1, init=_INIT, rngs=rngs)
    self.feature_dim = out_channels[3]
    self.head = linear(out_channels[3], num_classes, rngs=rngs)

  def embed(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Pooled features after the final 1x1 conv, (N, out_channels[-1])."""
    x = self.stem(x, train=train)
    for block in self.blocks:
      x = block(x, train=train)
    return global_avg_pool(self.last(x, train=train))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.head(self.embed(x, train=train))


VARIANTS = {"shufflev1": ShuffleNetV1, "shufflev2": ShuffleNetV2}
