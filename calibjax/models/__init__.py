"""Models as pure functions over pytrees.

`build(name, num_classes=..., input_shape=...)` returns a `Network`: NNX modules are split once into a static
graph definition, and `init`/`apply` are pure functions of plain pytrees (`params`, `state`), so they can be
jitted, vmapped over seeds and differentiated through (the MTT unroll does) without NNX's Python-side graph
traversal in hot loops (docs/jax.md §2.3).
"""

import dataclasses
from typing import Any, Callable

from flax import nnx
import jax

from calibjax.errors import ConfigError
from calibjax.models import densenet, mobilenetv2, resnet, resnet_cifar, shufflenet, vgg, wrn
from calibjax.models.convnet import ConvNet
from calibjax.registry import Registry

MODELS: Registry[Callable[..., nnx.Module]] = Registry("model")
MODELS.register("convnet")(ConvNet)
for _zoo in (resnet_cifar, resnet, wrn, vgg, mobilenetv2, shufflenet, densenet):
  for _name, _factory in _zoo.VARIANTS.items():
    MODELS.register(_name)(_factory)

Params = Any  # nnx.State of nnx.Param leaves
ModelState = Any  # nnx.State of everything else (batch-norm statistics); empty for most DD models


@dataclasses.dataclass(frozen=True)
class Network:
  """A model as two pure functions.

  Attributes:
    name: registry name.
    graphdef: NNX graph definition (static).
    make: builds the NNX module from an `nnx.Rngs`; `init` traces it, so keys may be traced (vmap over seeds).
  """

  name: str
  graphdef: Any
  make: Callable[[nnx.Rngs], nnx.Module]

  def init(self, key: jax.Array) -> tuple[Params, ModelState]:
    """Fresh parameters and model state from a PRNG key."""
    _, params, state = nnx.split(self.make(nnx.Rngs(params=key)), nnx.Param, ...)
    return params, state

  def apply(self, params: Params, state: ModelState, x: jax.Array, *, train: bool = False
            ) -> tuple[jax.Array, ModelState]:
    """Logits (N, num_classes) for NHWC inputs and the updated state (batch statistics in train mode)."""
    # copy=True: in eager calls the module's updates (batch statistics) must not write into the caller's state.
    model = nnx.merge(self.graphdef, params, state, copy=True)
    logits = model(x, train=train)
    _, _, new_state = nnx.split(model, nnx.Param, ...)
    return logits, new_state

  def embed(self, params: Params, state: ModelState, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Penultimate features (N, D) for models that define `embed` (the ConvNet does; DM uses it)."""
    return nnx.merge(self.graphdef, params, state).embed(x, train=train)

  def layer_features(self, params: Params, state: ModelState, x: jax.Array) -> list[jax.Array]:
    """Every conv block's output and the logits, flattened to (N, D_l), in inference mode: the ConvNet's layers
    (the MTS paper's per-layer t-SNE)."""
    model = nnx.merge(self.graphdef, params, state)
    if not isinstance(model, ConvNet):
      raise ConfigError(f"per-layer features are defined for the ConvNet only, not for model '{self.name}'")
    blocks = model.blocks(x, train=False)
    return [b.reshape(b.shape[0], -1) for b in blocks] + [model.head(blocks[-1].reshape(x.shape[0], -1))]


def build(name: str, *, num_classes: int, input_shape: tuple[int, int, int], **kwargs) -> Network:
  """Builds a registered model; `kwargs` go to its constructor (e.g. width, depth, norm for the ConvNet)."""
  factory = MODELS.get(name)

  def make(rngs: nnx.Rngs) -> nnx.Module:
    return factory(num_classes, tuple(input_shape), rngs=rngs, **kwargs)

  graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))), nnx.Param, ...)
  return Network(name=name, graphdef=graphdef, make=make)


def count_params(params: Params) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(params))
