"""Wide ResNets of the RepDistiller / mdistiller zoo: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

WRN-d-k (Zagoruyko & Komodakis 2016), depth d = 6n + 4, widen factor k, dropout 0: a 3x3 stem conv (16), three
stages of n pre-activation blocks with widths 16k/32k/64k and strides 1/2/2, then BN -> ReLU -> global average
pooling -> linear. A block is BN-ReLU-conv3x3-BN-ReLU-conv3x3; when the width changes, the shortcut is a 1x1
conv applied to the *activated* input (BN-ReLU), otherwise the raw input is added.

Initialisation as RepDistiller's wrn.py: Kaiming-normal fan_out convs, PyTorch-default head weights, zero head
bias.
"""

import functools

from flax import nnx
import jax

from calibjax.errors import ConfigError
from calibjax.models.layers import apply_conv, batch_norm, conv, global_avg_pool, linear


class WideBlock(nnx.Module):
  """Pre-activation basic block with a 1x1 projection shortcut when the width changes."""

  def __init__(self, in_features: int, out_features: int, stride: int, *, rngs: nnx.Rngs):
    self.norm1 = batch_norm(in_features, rngs=rngs)
    self.conv1 = conv(in_features, out_features, 3, stride=stride, rngs=rngs)
    self.norm2 = batch_norm(out_features, rngs=rngs)
    self.conv2 = conv(out_features, out_features, 3, rngs=rngs)
    self.shortcut = (None if in_features == out_features
                     else conv(in_features, out_features, 1, stride=stride, rngs=rngs))

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    act = jax.nn.relu(self.norm1(x, use_running_average=not train))
    out = jax.nn.relu(self.norm2(self.conv1(act), use_running_average=not train))
    out = self.conv2(out)
    return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nnx.Module):
  """WRN-depth-widen. Call with NHWC images; `train` selects batch statistics.

  Args:
    num_classes: output classes.
    input_shape: (H, W, C) of one image; any size works (global average pool before the head).
    depth: 6n + 4 (16, 40, ...).
    widen: widen factor k.
    rngs: NNX random streams.
  """

  def __init__(self, num_classes: int, input_shape: tuple[int, int, int], *, depth: int, widen: int,
               rngs: nnx.Rngs):
    if depth < 10 or (depth - 4) % 6:
      raise ConfigError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    n = (depth - 4) // 6
    self.stem = conv(input_shape[2], 16, 3, rngs=rngs)
    layers, in_features = [], 16
    for stage, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
      for index in range(n):
        stride = 2 if stage > 0 and index == 0 else 1
        layers.append(WideBlock(in_features, width, stride, rngs=rngs))
        in_features = width
    self.blocks = nnx.List(layers)
    self.norm = batch_norm(in_features, rngs=rngs)
    self.feature_dim = in_features
    self.head = linear(in_features, num_classes, bias="zeros", rngs=rngs)

  def embed(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Pooled features after the final BN-ReLU, (N, 64 * widen)."""
    x = apply_conv(self.stem, x)
    for block in self.blocks:
      x = block(x, train=train)
    return global_avg_pool(jax.nn.relu(self.norm(x, use_running_average=not train)))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.head(self.embed(x, train=train))


VARIANTS = {f"wrn_{depth}_{widen}": functools.partial(WideResNet, depth=depth, widen=widen)
            for depth, widen in ((16, 1), (16, 2), (40, 1), (40, 2))}
