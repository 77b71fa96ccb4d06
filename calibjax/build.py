"""Builders the methods share: the network, the optimiser, the training objective, and finished runs restored
from their workdirs (a teacher, a calibration source, a herding embedding, a distilled set).

This module sits between the libraries and `calibjax.runs`: the methods import it, no library does.
"""

import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from calibjax import models
from calibjax.calibration import losses
from calibjax.data.prepare import Splits, prepare
from calibjax.data.sampling import class_balanced_indices, herding_indices
from calibjax.distill.synthetic import SyntheticSet, class_major_labels, load_npz
from calibjax.errors import CheckpointError, ConfigError
from calibjax.train import per_example, schedules
from calibjax.train import step as step_lib
from calibjax.train.checkpoint import Checkpointer
from calibjax.train.ensemble import make_ensemble_step

SYNTHETIC_FILE = "synthetic.npz"
# The data settings that define the input space a network was trained in: a run that reuses another run's
# network (a teacher, a herding embedding) must share them.
INPUT_SPACE_KEYS = ("name", "normalize", "zca", "zca_eps")


def network(model_cfg: ml_collections.ConfigDict, splits: Splits) -> models.Network:
  options = {k: v for k, v in model_cfg.items() if k != "name"}
  return models.build(model_cfg.name, num_classes=splits.num_classes, input_shape=splits.input_shape, **options)


def optimizer(train_cfg: ml_collections.ConfigDict, *, steps_per_epoch: int, lr: float | None = None):
  """SGD of a `train` block; `lr` overrides the block's (an MTT set's learned lr). A block with
  `momentum_restarts` (evaluate's) restarts the momentum at each lr milestone, as the DD references do."""
  schedule = schedules.make_schedule(train_cfg.schedule, base_lr=train_cfg.lr if lr is None else lr,
                                     epochs=train_cfg.epochs,
                                     steps_per_epoch=steps_per_epoch, milestones=train_cfg.milestones)
  restarts = tuple(m * steps_per_epoch for m in train_cfg.milestones) if train_cfg.get("momentum_restarts") else ()
  return schedules.make_optimizer(lr_schedule=schedule, momentum=train_cfg.momentum,
                                  nesterov=train_cfg.nesterov, weight_decay=train_cfg.weight_decay,
                                  momentum_restarts=restarts)


def objective(loss_cfg: ml_collections.ConfigDict, *, training: per_example.TrainingData | None = None):
  """The `step.Objective` of a calibration loss, and its end-of-epoch state update (None when stateless).

  AdaFocal's state (per-bin gammas) is updated from validation logits after every epoch, as the official
  AdaFocal does: `update(state, val_logits=..., val_labels=...) -> state`. The losses with a memory of every
  training example (`calibjax.train.per_example`: pskd, crl) need the `training` data of the one network the
  `train` method fits.
  """
  if loss_cfg.name in per_example.OBJECTIVES:
    if training is None:
      raise ConfigError(f"loss {loss_cfg.name} remembers every training example of one network; use it with the "
                        "train method")
    return per_example.OBJECTIVES[loss_cfg.name][0](training, **loss_cfg.hparams), None
  loss = losses.make_loss(loss_cfg.name, **loss_cfg.hparams)
  if not losses.LOSSES.get(loss_cfg.name).stateful:
    return step_lib.label_loss(loss), None

  def fn(params, state, *, logits, features, batch, key):
    return loss(logits, batch["labels"], state), state

  return step_lib.Objective(fn, state=losses.adafocal_init()), losses.adafocal_update


def steps_per_epoch(train: ml_collections.ConfigDict, num_images: int) -> int:
  """Optimiser steps per epoch of `train.batch_size` batches over `num_images` (the last partial batch dropped);
  a batch larger than the data is refused as soon as the data is known."""
  if train.batch_size > num_images:
    raise ConfigError(f"train.batch_size {train.batch_size} is larger than the {num_images} training images; lower "
                      "--config.train.batch_size or train on more images")
  return num_images // train.batch_size


def logits_fn(net: models.Network, state: step_lib.TrainState, mesh, batch_size: int, *, predict_fn=None):
  """`images (host) -> logits (host)` of a trained network in inference mode; pass the `predict_fn` of
  `step.make_predict_fn` to reuse one compiled function across networks of the same architecture."""
  predict_fn = predict_fn or step_lib.make_predict_fn(net, mesh)
  return lambda images: step_lib.predict(predict_fn, state["params"], state["model_state"], images,
                                         batch_size=batch_size, mesh=mesh)


def run_config(workdir: str, *, methods: tuple[str, ...], role: str) -> ml_collections.ConfigDict:
  """The config of the run in `workdir`, which must be a run of one of `methods`; `role` names the config key
  that pointed there (for the error message)."""
  config_path = os.path.join(workdir, "config.json") if workdir else ""
  if not workdir or not os.path.exists(config_path):
    raise CheckpointError(f"{role} '{workdir}' is not a calibjax run (no config.json); set it to the --workdir "
                          f"of a finished {' or '.join(methods)} run")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.method not in methods:
    raise CheckpointError(f"{role} {workdir} holds a '{config.method}' run; it must be a {' or '.join(methods)} "
                          "run")
  return config


class Restored(NamedTuple):
  """A finished run's trained network, read-only (`restore_run`).

  Attributes:
    config: the run's config.
    splits: its data splits, recomputed from its own config and seed (the held-out validation split is exactly
      the one the run did not train on).
    net, state: the network and its train state (without the objective it trained with).
    training_set: (images, int labels) of the small set an `evaluate` run trained on; None for train / kd.
  """

  config: ml_collections.ConfigDict
  splits: Splits
  net: models.Network
  state: Any
  training_set: tuple | None = None


def restore_run(workdir: str, *, methods: tuple[str, ...] = ("train",), role: str = "the source",
                network_index: int = 0) -> Restored:
  """A finished `train` or `kd` run, or network `network_index` of the K networks of an `evaluate` run (where
  `methods` allows it)."""
  config = run_config(workdir, methods=methods, role=role)
  labels = None
  if config.method == "evaluate":
    if not 0 <= network_index < config.evaluate.num_nets:
      raise ConfigError(f"{role} {workdir} trained {config.evaluate.num_nets} networks; choose a network index "
                        f"from 0 to {config.evaluate.num_nets - 1}")
    synset, splits, _ = training_set(config)
    labels = np.asarray(synset.labels)
    net = network(config.model, splits)
    steps_per_epoch = -(-len(labels) // min(config.train.batch_size, len(labels)))
    init, _ = make_ensemble_step(net, objective(config.loss)[0], optimizer(config.train,
                                                                           steps_per_epoch=steps_per_epoch))
    like = init(jax.random.split(jax.random.key(0), config.evaluate.num_nets))
  else:
    splits = prepare(config.data, seed=config.seed)
    net = network(config.model, splits)
    tx = optimizer(config.train, steps_per_epoch=len(splits.train_images) // config.train.batch_size)
    like = step_lib.init_train_state(net, tx, jax.random.key(0))
  with Checkpointer(os.path.join(workdir, "checkpoints")) as checkpoints:
    step = checkpoints.latest_step()
    if step != config.train.epochs:
      raise CheckpointError(f"{workdir} has no final checkpoint (latest epoch {step} of {config.train.epochs}); "
                            f"finish that run first by running its command again")
    state, _ = checkpoints.restore(step, like)
  if labels is None:
    return Restored(config, splits, net, state)
  return Restored(config, splits, net, jax.tree.map(lambda leaf: leaf[network_index], state),
                  (np.asarray(synset.images), labels))


BASELINES = ("random", "herding")


def training_set(config: ml_collections.ConfigDict):
  """The set an `evaluate` run trains on (a distilled set, or a random / herding baseline at the same IPC), the
  data splits to calibrate and test on, and a description for results.json."""
  ev = config.evaluate
  if bool(ev.source) == bool(ev.baseline):
    raise ConfigError("set exactly one of evaluate.source (a distill workdir or .npz) and evaluate.baseline "
                      f"({' | '.join(BASELINES)})")
  if ev.source:
    synset, splits, source_config, path = synthetic_set(ev.source)
    d = source_config.distill
    return synset, splits, {"source": path, "method": d.method, "mdt": d.mdt, "ipc": int(d.ipc),
                            "distill_iterations": int(d.iterations)}
  if ev.baseline not in BASELINES:
    raise ConfigError(f"unknown evaluate.baseline '{ev.baseline}'; choose one of: {', '.join(BASELINES)}")
  splits = prepare(config.data, seed=config.seed)
  if ev.baseline == "random":
    idx = class_balanced_indices(splits.train_labels, ev.ipc, seed=config.seed, num_classes=splits.num_classes)
  else:
    if not ev.herding_model:
      raise ConfigError("herding needs evaluate.herding_model, the workdir of a finished train run on the same "
                        "data (e.g. `make quickstart` writes runs/quickstart)")
    model = restore_run(ev.herding_model, role="evaluate.herding_model")
    check_input_space(config.data, model.config.data, role="the herding model")
    features = embed_fn(model.net, model.state)(splits.train_images)
    idx = herding_indices(features, splits.train_labels, per_class=ev.ipc, num_classes=splits.num_classes)
  # Both selections are class-major, the synthetic sets' order.
  synset = SyntheticSet(images=splits.train_images[idx], labels=class_major_labels(splits.num_classes, ev.ipc),
                        log_lr=np.log(np.float32(config.train.lr)))
  return synset, splits, {"source": ev.baseline, "method": ev.baseline, "mdt": "off", "ipc": int(ev.ipc)}


def check_input_space(ours: ml_collections.ConfigDict, theirs: ml_collections.ConfigDict, *, role: str) -> None:
  """Refuses, in one line, a network trained on differently prepared inputs (`INPUT_SPACE_KEYS`)."""
  for key in INPUT_SPACE_KEYS:
    if ours.get(key) != theirs.get(key):
      raise ConfigError(f"{role} was trained with data.{key}={theirs.get(key)!r} but this run uses "
                        f"{ours.get(key)!r}; set --config.data.{key}={theirs.get(key)!r} or pick another {role}")


def results_of(workdir: str) -> dict | None:
  """The results.json of a finished run (None if it has none)."""
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def synthetic_set(source: str):
  """A distilled set (a `distill` workdir or its .npz) with the splits of the run that distilled it.

  Returns:
    (synthetic set, splits, source config, path): validation and test data come from the distillation run's own
    data config and seed, so the held-out validation split is exactly the one distillation never saw, in the
    same input space as the images.
  """
  path = os.path.join(source, SYNTHETIC_FILE) if os.path.isdir(source) else source
  if not os.path.isfile(path):
    raise CheckpointError(f"no synthetic set at {path}; run the distill method first (its workdir holds "
                          f"{SYNTHETIC_FILE} when it has finished)")
  synset, config_json, _ = load_npz(path)
  source_config = ml_collections.ConfigDict(json.loads(config_json))
  return synset, prepare(source_config.data, seed=source_config.seed), source_config, os.path.abspath(path)


FIT_ON = ("held_out_real", "distilled_split", "distilled_full")


def calibration_data(cfg: ml_collections.ConfigDict, *, splits: Splits, training_set=None, seed: int):
  """The images TS and MTS are fitted on (`calibration.fit_on`), and which training images the networks train on.

  Args:
    cfg: the `calibration` block (fit_on, split_fraction, split_in_training).
    splits: the prepared data; "held_out_real" returns its validation split (images of the training split that
      nothing trained on).
    training_set: (images (N, ...), int labels (N,)) of a small training set (a distilled set, a baseline at
      the same IPC), for "distilled_split" (a seeded `split_fraction` of each class, at least one image) and
      "distilled_full" (all of it); None for a method that trains on the real training split.
    seed: seeds the split.

  Returns:
    (images, labels, train_keep, described): the calibration data, the indices of `training_set` to train on
    (None: all of it, or no training set), and {"fit_on", "images", "per_class", "in_training"} for results.json.
  """
  if cfg.fit_on not in FIT_ON:
    raise ConfigError(f"calibration.fit_on must be one of {', '.join(FIT_ON)}; got '{cfg.fit_on}'")
  if cfg.fit_on == "held_out_real":
    return splits.val_images, splits.val_labels, None, {
        "fit_on": cfg.fit_on, "images": len(splits.val_labels),
        "per_class": np.bincount(splits.val_labels, minlength=splits.num_classes).tolist(), "in_training": False}
  if training_set is None:
    raise ConfigError(f"calibration.fit_on={cfg.fit_on} needs a distilled set, which only the evaluate method "
                      "trains on; use --config.calibration.fit_on=held_out_real")
  images, labels = training_set
  chosen, train_keep = np.arange(len(labels)), None
  if cfg.fit_on == "distilled_split":
    if not 0 < cfg.split_fraction <= 1:
      raise ConfigError(f"calibration.split_fraction must lie in (0, 1]; got {cfg.split_fraction}")
    counts = np.bincount(labels, minlength=splits.num_classes)
    per_class = max(1, int(round(cfg.split_fraction * counts.min())))
    chosen = np.sort(class_balanced_indices(labels, per_class, seed=seed, num_classes=splits.num_classes))
    if not cfg.split_in_training:
      train_keep = np.setdiff1d(np.arange(len(labels)), chosen)
      if np.bincount(labels[train_keep], minlength=splits.num_classes).min() == 0:
        raise ConfigError(f"holding out {per_class} image(s) per class leaves a class with no training image "
                          f"(the set has {counts.min()} per class); keep calibration.split_in_training=True or "
                          "use fit_on=held_out_real")
  described = {"fit_on": cfg.fit_on, "images": len(chosen),
               "per_class": np.bincount(labels[chosen], minlength=splits.num_classes).tolist(),
               "in_training": train_keep is None}
  return np.asarray(images)[chosen], labels[chosen], train_keep, described


def embed_fn(net: models.Network, state: step_lib.TrainState, *, batch_size: int = 1000):
  """`images (host) -> penultimate features (host)` of a trained network, in batches."""
  embed = jax.jit(lambda x: net.embed(state["params"], state["model_state"], x, train=False))
  return lambda images: np.concatenate([np.asarray(embed(images[i:i + batch_size]))
                                        for i in range(0, len(images), batch_size)])
