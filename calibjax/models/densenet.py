"""DenseNet-BC for CIFAR as seed 003's KD code builds it (densenet121 / 169 / 201 / 161 of the pytorch-cifar100
family): densenet121 is growth k = 32 and dense blocks of 6, 12, 24, 16 bottleneck layers.

  * stem: a 3x3 conv (no bias) to 2k channels, stride 1 (CIFAR: no 7x7 conv, no max pool);
  * bottleneck layer: BN-ReLU-conv1x1 (4k) -BN-ReLU-conv3x3 (k), then dropout 0.2 (as the reference), its k
    channels concatenated to the input;
  * transition after every block but the last: BN, conv1x1 to floor(0.5 · channels) (compression 0.5), 2x2
    average pooling (no ReLU, as the reference);
  * head: BN-ReLU, global average pooling, linear.

Initialisation: PyTorch's defaults (the reference sets none): "torch" convs and head (`calibjax.models.layers`).
Dropout draws from a stream seeded at initialisation and kept in the model state (`nnx.Dropout`'s RNG count), so
a train step's masks follow from the state it is given and a resumed run draws what an uninterrupted one draws.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp

from calibjax.models.layers import apply_conv, batch_norm, conv, global_avg_pool, linear
from calibjax.models.fast_paths import pool2x2

DROPOUT = 0.2


class Bottleneck(nnx.Module):
  def __init__(self, in_features: int, growth: int, *, rngs: nnx.Rngs):
    self.norm1 = batch_norm(in_features, rngs=rngs)
    self.conv1 = conv(in_features, 4 * growth, 1, init="torch", rngs=rngs)
    self.norm2 = batch_norm(4 * growth, rngs=rngs)
    self.conv2 = conv(4 * growth, growth, 3, init="torch", rngs=rngs)
    self.dropout = nnx.Dropout(DROPOUT, rngs=nnx.Rngs(dropout=rngs.params()))

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    out = apply_conv(self.conv1, jax.nn.relu(self.norm1(x, use_running_average=not train)))
    out = apply_conv(self.conv2, jax.nn.relu(self.norm2(out, use_running_average=not train)))
    return jnp.concatenate([x, self.dropout(out, deterministic=not train)], axis=-1)


class Transition(nnx.Module):
  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.norm = batch_norm(in_features, rngs=rngs)
    self.conv = conv(in_features, out_features, 1, init="torch", rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return pool2x2(apply_conv(self.conv, self.norm(x, use_running_average=not train)), "avg")


class DenseNet(nnx.Module):
  """DenseNet-BC. Call with NHWC images; `train` selects batch statistics and turns dropout on.

  Args:
    num_classes: output classes.
    input_shape: (H, W, C) of one image (global average pool before the head: any size).
    blocks: bottleneck layers per dense block.
    growth: growth rate k.
    rngs: NNX random streams (params; dropout is seeded from them).
  """

  def __init__(self, num_classes: int, input_shape: tuple[int, int, int], *, blocks: tuple[int, ...],
               growth: int, rngs: nnx.Rngs):
    features = 2 * growth
    self.stem = conv(input_shape[2], features, 3, init="torch", rngs=rngs)
    layers = []
    for index, count in enumerate(blocks):
      for _ in range(count):
        layers.append(Bottleneck(features, growth, rngs=rngs))
        features += growth
      if index < len(blocks) - 1:
        layers.append(Transition(features, features // 2, rngs=rngs))
        features //= 2
    self.layers = nnx.List(layers)
    self.norm = batch_norm(features, rngs=rngs)
    self.feature_dim = features
    self.head = linear(features, num_classes, rngs=rngs)

  def embed(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Pooled features after the final BN-ReLU."""
    x = apply_conv(self.stem, x)
    for layer in self.layers:
      x = layer(x, train=train)
    return global_avg_pool(jax.nn.relu(self.norm(x, use_running_average=not train)))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.head(self.embed(x, train=train))


VARIANTS = {f"densenet{depth}": functools.partial(DenseNet, blocks=blocks, growth=growth)
            for depth, blocks, growth in ((121, (6, 12, 24, 16), 32), (169, (6, 12, 32, 32), 32),
                                          (201, (6, 12, 48, 32), 32), (161, (6, 12, 36, 24), 48))}
