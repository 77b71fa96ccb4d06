"""VGG with batch norm of the RepDistiller / mdistiller zoo (the CIFAR version without FC layers): vgg8/11/13.

Five stages of conv3x3 (with bias) -> BN -> ReLU; configurations (channels per stage) "S" = vgg8, "A" = vgg11,
"B" = vgg13. 2x2 max pooling follows stages 1-3 (and stage 4 only for inputs of 64 px or more: the reference
pools there only when the input height is 64), then global average pooling and Linear(512, classes).

Initialisation as RepDistiller's vgg.py: Kaiming-normal fan_out convs with zero bias, head weights N(0, 0.01)
and zero bias.
"""

import functools

from flax import nnx
import jax

from calibjax.errors import ConfigError
from calibjax.models.layers import ConvBN, global_avg_pool, linear, max_pool2x2

CONFIGS = {
    "S": ((64,), (128,), (256,), (512,), (512,)),
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}
# The stage-4 pool is skipped below this input height, so 32-px inputs end at 4x4 (the reference at 32 px).
_STAGE4_POOL_MIN_SIZE = 64


class VGG(nnx.Module):
  """VGG-BN for small images. Call with NHWC images; `train` selects batch statistics.

  Args:
    num_classes: output classes.
    input_shape: (H, W, C) of one image; any size of at least 8 px works.
    config: "S" (vgg8), "A" (vgg11) or "B" (vgg13).
    rngs: NNX random streams.
  """

  def __init__(self, num_classes: int, input_shape: tuple[int, int, int], *, config: str, rngs: nnx.Rngs):
    if config not in CONFIGS:
      raise ConfigError(f"VGG config must be one of {sorted(CONFIGS)}, got {config!r}")
    stages, in_features = [], input_shape[2]
    for widths in CONFIGS[config]:
      layers = []
      for width in widths:
        layers.append(ConvBN(in_features, width, 3, bias=True, rngs=rngs))
        in_features = width
      stages.append(nnx.List(layers))
    self.stages = nnx.List(stages)
    self.pool_after = (0, 1, 2, 3) if input_shape[0] >= _STAGE4_POOL_MIN_SIZE else (0, 1, 2)
    self.feature_dim = in_features
    self.head = linear(in_features, num_classes, weight="normal", bias="zeros", rngs=rngs)

  def embed(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Globally pooled features of the last stage, (N, 512)."""
    for index, stage in enumerate(self.stages):
      for layer in stage:
        x = layer(x, train=train)
      if index in self.pool_after:
        x = max_pool2x2(x)
    return global_avg_pool(x)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.head(self.embed(x, train=train))


VARIANTS = {name: functools.partial(VGG, config=config) for name, config in
            (("vgg8", "S"), ("vgg11", "A"), ("vgg13", "B"))}
