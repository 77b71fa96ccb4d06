"""Distribution matching (DM, Zhao & Bilen WACV 2023), with optional Masked Distillation Training.
docs/protocols.md §3.4.

One ITERATION (the reference's main_DM.py loop body), `make_dm_iteration(net, config)(images, opt_state, key,
real)`, is one jitted function:

1. a freshly initialised network whose parameters are never trained (a random feature extractor);
2. per class c, Siamese DSA on the real batch (batch_real = 256) and on the ipc synthetic images with a shared
   key, then the MDT mask on the synthetic view only (`calibjax.distill.matching`), mapped over classes with
   `jax.vmap`;
3. loss = Σ_c ‖mean_i embed(real_c,i) − mean_j embed(syn_c,j)‖² (real embeddings are constants), with `embed`
   the network's flattened penultimate features;
4. one SGD step on the images (lr_img 1.0, momentum 0.5).

Keys: `net_key, real_key, match_key, ratio_key = split(key, 4)`. Batch norm is rejected (the reference's BN
variant embeds all classes in one concatenated batch, which is not implemented).
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from calibjax import parallel
from calibjax.distill import matching
from calibjax.models import Network


@dataclasses.dataclass(frozen=True, kw_only=True)
class DMConfig(matching.MatchingConfig):
  """DM settings; the reference's defaults (lr_img 1.0 for IPC <= 50, the full DSA strategy). 'none' as
  `dsa_strategy` turns augmentation off, as in the reference. See `matching.MatchingConfig` for all fields."""

  lr_img: float = 1.0


def matching_loss(net: Network, config: DMConfig, images: jax.Array, params: Any, real: jax.Array,
                  key: jax.Array, ratio: jax.typing.ArrayLike = 0.0) -> tuple[jax.Array, jax.Array]:
  """The DM objective at fixed network parameters.

  Args:
    net: a stateless network with `embed`.
    config: DM settings.
    images: (C * ipc, H, W, ch) synthetic images, class-major.
    params: network parameters.
    real: (C, B, H, W, ch) real batches.
    key: the step's matching key (DSA draw and MDT masks).
    ratio: MDT ratio (used unless `config.mdt == "off"`).

  Returns:
    (Σ_c ‖mean embed(real_c) − mean embed(syn_c)‖², per-class terms (C,)); differentiable w.r.t. `images`.
  """
  state = matching.require_stateless(net)

  def criterion(real_c, syn_c, label):
    del label
    real_mean = jax.lax.stop_gradient(jnp.mean(net.embed(params, state, real_c, train=True), axis=0))
    syn_mean = jnp.mean(net.embed(params, state, syn_c, train=True), axis=0)
    return jnp.sum((real_mean - syn_mean) ** 2)

  return matching.classwise_loss(criterion, config, images, real, key, jnp.asarray(ratio, jnp.float32))


def make_dm_iteration(net: Network, config: DMConfig, *, mesh: Mesh | None = None
                      ) -> Callable[..., tuple[jax.Array, Any, dict]]:
  """Builds the jitted DM iteration.

  Args:
    net: a stateless network with `embed` (the ConvNet).
    config: DM settings; `class_map="loop"` maps classes with a Python loop instead of vmap.
    mesh: the devices (default: all): the real batches are split along their batch axis over them, as in
      `calibjax.distill.gm` (the mean real embedding becomes an all-reduce), the rest replicated.

  Returns:
    `iteration(images, opt_state, key, real) -> (images, opt_state, metrics)`: images (C * ipc, H, W, ch)
    class-major, opt_state from `matching.image_optimizer(config).init(images)`, real a `matching.RealPool`;
    metrics = {"loss": loss / C (the reference's loss_avg), "mdt_ratio": the ratio used}. `images` and
    `opt_state` are donated.

  Raises:
    ConfigError: the network has batch statistics.
  """
  matching.require_stateless(net)
  tx = matching.image_optimizer(config)
  mesh = parallel.make_mesh() if mesh is None else mesh

  def iteration(images, opt_state, key, real: matching.RealPool):
    net_key, real_key, match_key, ratio_key = jax.random.split(key, 4)
    params, _ = net.init(net_key)
    ratio = matching.mdt_ratio(ratio_key, config)
    batch = parallel.split_along(matching.sample_real(real_key, real, config.batch_real), mesh, axis=1)
    images, opt_state, loss = matching.image_step(
        lambda x: matching_loss(net, config, x, params, batch, match_key, ratio), tx, images, opt_state)
    return images, opt_state, {"loss": loss / real.images.shape[0], "mdt_ratio": ratio}

  repl = parallel.replicated(mesh)
  return jax.jit(iteration, in_shardings=repl, out_shardings=repl, donate_argnums=(0, 1))
