"""Method `train`: a classifier on real data with any calibration loss, then TS/MTS and a calibration report.

Used for full-data networks, KD teachers and the quickstart.
"""

import json
import os

import jax
import ml_collections
import numpy as np

from calibjax import models, parallel
from calibjax.calibration import losses
from calibjax.calibration.report import calibrate_and_report
from calibjax.data.augment import make_batch_transform
from calibjax.data.prepare import Splits, prepare
from calibjax.train import schedules
from calibjax.train import step as step_lib
from calibjax.train.loop import LoopSpec, fit
from calibjax.errors import CheckpointError, ConfigError
from calibjax.train.checkpoint import Checkpointer
from calibjax.train.workdir import Workdir


def build_network(model_cfg: ml_collections.ConfigDict, splits: Splits) -> models.Network:
  options = {k: v for k, v in model_cfg.items() if k != "name"}
  return models.build(model_cfg.name, num_classes=splits.num_classes, input_shape=splits.input_shape, **options)


def build_optimizer(train_cfg: ml_collections.ConfigDict, *, steps_per_epoch: int):
  schedule = schedules.make_schedule(train_cfg.schedule, base_lr=train_cfg.lr, epochs=train_cfg.epochs,
                                     steps_per_epoch=steps_per_epoch, milestones=train_cfg.milestones)
  return schedules.make_optimizer(lr_schedule=schedule, momentum=train_cfg.momentum,
                                  nesterov=train_cfg.nesterov, weight_decay=train_cfg.weight_decay)


def make_train_loss(loss_cfg: ml_collections.ConfigDict):
  """Returns (loss_fn(logits, labels, loss_state), initial loss state, end-of-epoch state update or None).

  Stateful losses (AdaFocal) keep their state in the train state; it is updated from validation logits after
  every epoch, as the official AdaFocal does.
  """
  loss = losses.make_loss(loss_cfg.name, **loss_cfg.hparams)
  if not losses.LOSSES.get(loss_cfg.name).stateful:
    return (lambda logits, labels, loss_state: loss(logits, labels)), None, None
  return loss, losses.adafocal_init(), losses.adafocal_update


def make_logits_fn(net: models.Network, state: step_lib.TrainState, mesh, batch_size: int):
  predict_fn = step_lib.make_predict_fn(net, mesh)
  return lambda images: step_lib.predict(predict_fn, state["params"], state["model_state"], images,
                                         batch_size=batch_size, mesh=mesh)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  splits = prepare(config.data, seed=config.seed)
  mesh = parallel.make_mesh()
  net = build_network(config.model, splits)
  loss_fn, loss_state, update_loss_state = make_train_loss(config.loss)
  steps_per_epoch = len(splits.train_images) // config.train.batch_size
  tx = build_optimizer(config.train, steps_per_epoch=steps_per_epoch)
  if update_loss_state is not None and not config.train.validate_each_epoch:
    raise ConfigError(f"loss {config.loss.name} updates its state from validation logits after every epoch; "
                      "keep --config.train.validate_each_epoch=True")
  run_dir = Workdir(workdir, config)
  predict_fn = step_lib.make_predict_fn(net, mesh)

  def validate(epoch, state):
    logits = step_lib.predict(predict_fn, state["params"], state["model_state"], splits.val_images,
                              batch_size=config.eval_batch_size, mesh=mesh)
    record = {"val_accuracy": float(np.mean(logits.argmax(-1) == splits.val_labels))}
    if update_loss_state is not None:
      record["loss_state"] = update_loss_state(jax.device_get(state["loss_state"]), val_logits=logits,
                                               val_labels=splits.val_labels)
    return record

  spec = LoopSpec(epochs=config.train.epochs, batch_size=config.train.batch_size, seed=config.seed,
                  checkpoint_every=config.train.checkpoint_every, description=f"train {config.model.name}")
  batch_transform = make_batch_transform(config.augment, num_classes=splits.num_classes)
  state = fit(net, loss_fn=loss_fn, tx=tx, images=splits.train_images, labels=splits.train_labels, spec=spec,
              mesh=mesh, workdir=run_dir, batch_transform=batch_transform,
              end_of_epoch=validate if config.train.validate_each_epoch else None,
              initial_loss_state=loss_state)
  logits_fn = make_logits_fn(net, state, mesh, config.eval_batch_size)
  results = calibrate_and_report(
      logits_fn=logits_fn, val_images=splits.val_images, val_labels=splits.val_labels,
      test_images=splits.test_images, test_labels=splits.test_labels, cfg=config.calibration,
      key=jax.random.fold_in(jax.random.key(config.seed), 2),
      plot_path=os.path.join(run_dir.plots, "reliability.png"))
  results["budget"] = {"epochs": config.train.epochs, "train_examples": len(splits.train_images),
                       "val_examples": len(splits.val_images), "test_examples": len(splits.test_images),
                       "seed": config.seed, "devices": mesh.size}
  run_dir.write_results(results)
  run_dir.close()
  return results


def restore_run(workdir: str, *, methods: tuple[str, ...] = ("train",)):
  """Rebuilds a finished run of one of `methods` (`train`, or `kd`, whose students have the same train state)
  from its workdir, read-only: (config, splits, network, train state).

  The data splits are recomputed from the run's own config and seed, so the held-out validation split is exactly
  the one the run did not train on.
  """
  config_path = os.path.join(workdir, "config.json")
  if not workdir or not os.path.exists(config_path):
    raise CheckpointError(f"'{workdir}' is not a calibjax run (no config.json); pass the --workdir of a finished "
                          f"{' or '.join(methods)} run")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.method not in methods:
    raise CheckpointError(f"{workdir} holds a '{config.method}' run; this needs a {' or '.join(methods)} run")
  splits = prepare(config.data, seed=config.seed)
  net = build_network(config.model, splits)
  tx = build_optimizer(config.train, steps_per_epoch=len(splits.train_images) // config.train.batch_size)
  loss_state = make_train_loss(config.loss)[1] if "loss" in config else None
  like = step_lib.init_train_state(net, tx, jax.random.key(0), loss_state=loss_state)
  with Checkpointer(os.path.join(workdir, "checkpoints")) as checkpoints:
    step = checkpoints.latest_step()
    if step != config.train.epochs:
      raise CheckpointError(f"{workdir} has no final checkpoint (latest epoch {step} of {config.train.epochs}); "
                            f"finish that run first by running its command again")
    state, _ = checkpoints.restore(step, like)
  return config, splits, net, state
