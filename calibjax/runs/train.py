"""Method `train`: a classifier on real data with any calibration loss, then TS / MTS and a calibration report.

Used for full-data networks, KD teachers and the quickstart. Calibrators are fitted on the held-out validation
split of the training data; every metric is measured on the test split.
"""

import os

import ml_collections

from calibjax import build, keys, parallel
from calibjax.calibration.report import calibrate_and_report
from calibjax.data.augment import make_batch_transform
from calibjax.data.prepare import prepare
from calibjax.errors import ConfigError
from calibjax.runs import core
from calibjax.runs.fit import fit, validation
from calibjax.train import per_example


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  if config.loss.name in per_example.OBJECTIVES and config.augment.mixing != "none":
    raise ConfigError(f"loss {config.loss.name} trains on integer labels; it does not take "
                      f"augment.mixing={config.augment.mixing} (soft mixed targets): use mixing=none")
  splits = prepare(config.data, seed=config.seed)
  calibration_images, calibration_labels, _, calibration = build.calibration_data(config.calibration, splits=splits,
                                                                                  seed=config.seed)
  mesh = parallel.make_mesh()
  net = build.network(config.model, splits)
  steps_per_epoch = build.steps_per_epoch(config.train, len(splits.train_images))
  objective, update = build.objective(config.loss, training=per_example.TrainingData(
      splits.train_labels, splits.num_classes, steps_per_epoch, config.train.epochs))
  tx = build.optimizer(config.train, steps_per_epoch=steps_per_epoch)
  if update is not None and not config.train.validate_each_epoch:
    raise ConfigError(f"loss {config.loss.name} updates its state from validation logits after every epoch; "
                      "keep --config.train.validate_each_epoch=True")
  run_dir = core.Workdir(workdir, config)
  state = fit(run_dir, net=net, objective=objective, tx=tx, images=splits.train_images, labels=splits.train_labels,
              epochs=config.train.epochs, batch_size=config.train.batch_size, seed=config.seed, mesh=mesh,
              cadence=core.Cadence.from_config(config.train, "epoch"), description=f"train {config.model.name}",
              batch_transform=make_batch_transform(config.augment, num_classes=splits.num_classes,
                                                   data_transforms=splits.transforms),
              end_of_epoch=validation(net, splits, mesh=mesh, batch_size=config.eval_batch_size, update=update)
              if config.train.validate_each_epoch else None)
  results = calibrate_and_report(
      logits_fn=build.logits_fn(net, state, mesh, config.eval_batch_size), val_images=calibration_images,
      val_labels=calibration_labels, test_images=splits.test_images, test_labels=splits.test_labels,
      cfg=config.calibration, key=keys.stream(config.seed, "calibration"),
      plot_path=os.path.join(run_dir.plots, "reliability.png"))
  return core.finish(run_dir, results, config=config, budget=training_budget(config, splits, mesh),
                     protocol=training_protocol(config, calibration))


def training_budget(config: ml_collections.ConfigDict, splits, mesh) -> dict:
  """The budget of a run that trains one network (train, kd)."""
  return {"epochs": config.train.epochs, "train_examples": len(splits.train_images),
          "val_examples": len(splits.val_images), "test_examples": len(splits.test_images), "seed": config.seed,
          "devices": mesh.size}


def training_protocol(config: ml_collections.ConfigDict, calibration: dict) -> dict:
  """The settings that decide a trained network's numbers, for the manifest."""
  return {"model": config.model.name, "loss": config.loss.name if "loss" in config else None,
          "epochs": config.train.epochs, "batch_size": config.train.batch_size, "lr": config.train.lr,
          "schedule": config.train.schedule, "augment": config.augment.to_dict(),
          "calibrators_fitted_on": calibration, "mts_selection": config.calibration.mts_selection}
