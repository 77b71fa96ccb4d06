"""Distillation methods behind one interface, so the `distill` method runs, checkpoints and resumes any of them.

A method is registered as a builder `build(net, cfg, splits, mesh) -> Distiller`:

- `net`: the network the set is distilled with (`calibjax.models.Network`);
- `cfg`: the run's `config.distill` block (method, ipc, iteration budget, the method's hyperparameters);
- `splits`: the prepared data (`calibjax.data.prepare.Splits`; images already normalised / whitened);
- `mesh`: the devices the iteration is split over (`calibjax.parallel`; each method's module says how).

Each builder returns a `calibjax.distill.interface.Distiller` (init, step, synset over one checkpointable carry).
"""

import importlib
from typing import Callable

import jax
from jax.sharding import Mesh
import ml_collections

from calibjax import parallel
from calibjax.data.prepare import Splits
from calibjax.distill import dm, gm, matching
from calibjax.distill.interface import Distiller
from calibjax.distill.synthetic import init_synthetic
from calibjax.models import Network
from calibjax.registry import Registry


DISTILLERS: Registry[Callable[[Network, ml_collections.ConfigDict, Splits, Mesh], Distiller]] = Registry(
    "distillation method")


def matching_options(cfg: ml_collections.ConfigDict) -> dict:
  """The `matching.MatchingConfig` fields shared by DC, DSA and DM, from a `config.distill` block."""
  return dict(ipc=cfg.ipc, lr_img=cfg.lr_img, momentum=cfg.momentum, batch_real=cfg.batch_real,
              dsa_strategy=cfg.dsa_strategy, dsa_params=matching.DSAParams(align_corners=cfg.dsa_align_corners),
              dsa_per_class_keys=cfg.dsa_per_class_keys, mdt=cfg.mdt, mdt_ratio=cfg.mdt_ratio,
              mdt_granularity=cfg.mdt_granularity, class_map=cfg.class_map,
              class_chunk=cfg.class_chunk or None)


def _image_distiller(iteration_fn: Callable, config: matching.MatchingConfig, cfg: ml_collections.ConfigDict,
                     splits: Splits, mesh: Mesh) -> Distiller:
  """A Distiller for methods that learn the images only (DC, DSA, DM): carry = {"synset", "opt_state"}; the
  real pool is replicated over the mesh (each device gathers its share of every real batch from it)."""
  pool = jax.device_put(matching.make_real_pool(splits.train_images, splits.train_labels,
                                                num_classes=splits.num_classes, batch_real=config.batch_real),
                        parallel.replicated(mesh))
  tx = matching.image_optimizer(config)

  def init(key):
    synset = init_synthetic(key, splits.train_images, splits.train_labels, ipc=cfg.ipc,
                            num_classes=splits.num_classes, init=cfg.init)
    return {"synset": synset, "opt_state": tx.init(synset.images)}

  def step(carry, key):
    images, opt_state, metrics = iteration_fn(carry["synset"].images, carry["opt_state"], key, pool)
    return {"synset": carry["synset"]._replace(images=images), "opt_state": opt_state}, metrics

  return Distiller(init=init, step=step, synset=lambda carry: carry["synset"])


def _gradient_matching(method: str) -> Callable[[Network, ml_collections.ConfigDict, Splits, Mesh], Distiller]:
  def build(net: Network, cfg: ml_collections.ConfigDict, splits: Splits, mesh: Mesh) -> Distiller:
    config = gm.GMConfig(method=method, lr_net=cfg.lr_net, batch_train=cfg.batch_train,
                         outer_loop=cfg.outer_loop or None, inner_loop=cfg.inner_loop or None,
                         metric=cfg.metric, mdt_inner=cfg.mdt_inner, loop_driver=cfg.loop_driver,
                         **matching_options(cfg))
    return _image_distiller(gm.make_gm_iteration(net, config, mesh=mesh), config, cfg, splits, mesh)

  return build


DISTILLERS.register("dc")(_gradient_matching("dc"))
DISTILLERS.register("dsa")(_gradient_matching("dsa"))


@DISTILLERS.register("dm")
def _distribution_matching(net: Network, cfg: ml_collections.ConfigDict, splits: Splits, mesh: Mesh) -> Distiller:
  config = dm.DMConfig(**matching_options(cfg))
  return _image_distiller(dm.make_dm_iteration(net, config, mesh=mesh), config, cfg, splits, mesh)


@DISTILLERS.register("mtt")
def _trajectory_matching(net: Network, cfg: ml_collections.ConfigDict, splits: Splits, mesh: Mesh) -> Distiller:
  # Imported on use: trajectory matching needs an expert buffer and its own modules.
  return importlib.import_module("calibjax.distill.mtt").build_distiller(net, cfg, splits, mesh)
