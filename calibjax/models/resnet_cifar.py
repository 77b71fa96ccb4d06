"""CIFAR ResNets of the RepDistiller / mdistiller zoo: resnet8 ... resnet110, resnet8x4, resnet32x4.

Depth 6n + 2 with basic blocks: a 3x3 stem conv, three stages of n blocks with strides 1/2/2, global average
pooling and a linear head. Widths (stem, stage 1-3) are 16/16/32/64, or 32/64/128/256 for the "x4" models.
These are RepDistiller's basic-block versions; CalibrationXferViaKD builds resnet56/110 from bottleneck blocks
instead (docs/protocols.md §4.4), which are different networks with the same names.

Initialisation: Kaiming-normal fan_out convs (RepDistiller `kaiming_normal_(mode='fan_out')`), PyTorch-default
linear head.
"""

import functools

from flax import nnx

from calibjax.errors import ConfigError
from calibjax.models.resnet import ResNet

NARROW = (16, 16, 32, 64)
WIDE = (32, 64, 128, 256)


def cifar_resnet(num_classes: int, input_shape: tuple[int, int, int], *, depth: int,
                 widths: tuple[int, int, int, int] = NARROW, rngs: nnx.Rngs) -> ResNet:
  """A CIFAR ResNet of `depth` = 6n + 2 layers.

  Args:
    num_classes: output classes.
    input_shape: (H, W, C) of one image; features are 8x8 at 32 px, 7x7 at 28 px before the global pool.
    depth: 6n + 2 (8, 14, 20, 32, 44, 56, 110).
    widths: channels of the stem and of the three stages.
    rngs: NNX random streams.

  Returns:
    The `ResNet` module; its `embed` gives the (N, widths[-1]) pooled features.
  """
  if depth < 8 or (depth - 2) % 6:
    raise ConfigError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), got {depth}")
  n = (depth - 2) // 6
  return ResNet(num_classes, input_shape, stem_width=widths[0], widths=tuple(widths[1:]), blocks=(n, n, n),
                rngs=rngs)


VARIANTS = {f"resnet{depth}": functools.partial(cifar_resnet, depth=depth)
            for depth in (8, 14, 20, 32, 44, 56, 110)}
VARIANTS["resnet8x4"] = functools.partial(cifar_resnet, depth=8, widths=WIDE)
VARIANTS["resnet32x4"] = functools.partial(cifar_resnet, depth=32, widths=WIDE)
