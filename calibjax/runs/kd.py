"""Method `kd`: train a student from a frozen teacher (a finished `train` or `kd` run); calibrate and report.

The teacher runs inside the student's train step (`calibjax.kd.objective`, which also documents every loss).
The student's validation split comes from its own config and seed; if the teacher was trained with another seed,
its training split may overlap the student's validation split (use the same seed to avoid that).

Results (results.json): raw / ts / mts from `calibrate_and_report` on the LAST epoch's student (the headline, as
RepDistiller reports), "best_epoch" (the epoch of highest validation accuracy and that accuracy, next to the last
epoch's), "teacher" (its workdir, method, model, calibration and its own raw / ts / mts results), "budget".
"""

import os

import ml_collections

from calibjax import build, keys, models, parallel
from calibjax.calibration.report import calibrate_and_report
from calibjax.data.prepare import prepare
from calibjax.errors import ConfigError
from calibjax.kd import objective as kd_objective
from calibjax.runs import core
from calibjax.runs.fit import fit, validation
from calibjax.runs.train import training_budget, training_protocol


def teacher_temperature(teacher_results: dict | None, calibration: str) -> float:
  """The post-hoc temperature that calibrates the teacher's logits before distillation (KD(C) with a TS or MTS
  teacher, paper 003): 1 for "none", else the temperature the teacher's own run fitted on its validation split.
  Dividing the logits by it is what the teacher's calibrated predictions are; the KD temperature then applies on
  top (softmax(logits / (T_cal * T_kd)))."""
  if calibration == "none":
    return 1.0
  if calibration not in ("ts", "mts"):
    raise ConfigError(f"kd.teacher_calibration must be none, ts or mts; got '{calibration}'")
  if teacher_results is None:
    raise ConfigError(f"kd.teacher_calibration={calibration} needs the teacher's fitted temperature but its "
                      "results.json does not exist; finish the teacher run or set kd.teacher_calibration=none")
  return float(teacher_results[calibration]["temperature"])


def best_epoch(records: list[dict]) -> dict:
  """The epoch of highest validation accuracy (first on ties) and the last epoch's, from the log records."""
  best = max(records, key=lambda r: (r["val_accuracy"], -r["epoch"]))
  return {"epoch": best["epoch"], "val_accuracy": best["val_accuracy"], "last_epoch": records[-1]["epoch"],
          "last_val_accuracy": records[-1]["val_accuracy"], "headline": "last_epoch"}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.model` from the teacher at `config.kd.teacher`; writes results.json (module docstring)."""
  kd = config.kd
  if not config.train.validate_each_epoch:  # the shared train block has the switch; kd cannot honour it
    raise ConfigError("kd runs validate after every epoch to report their best epoch; drop "
                      "--config.train.validate_each_epoch=False")
  teacher_config, _, teacher_net, teacher_state, _ = build.restore_run(kd.teacher, methods=("train", "kd"),
                                                                       role="kd.teacher")
  build.check_input_space(config.data, teacher_config.data, role="the teacher")
  teacher_results = build.results_of(kd.teacher)
  calibration_temperature = teacher_temperature(teacher_results, kd.teacher_calibration)
  splits = prepare(config.data, seed=config.seed)
  calibration_images, calibration_labels, _, calibration = build.calibration_data(config.calibration, splits=splits,
                                                                                  seed=config.seed)
  mesh = parallel.make_mesh()
  net = build.network(config.model, splits)
  tx = build.optimizer(config.train, steps_per_epoch=build.steps_per_epoch(config.train, len(splits.train_images)))
  run_dir = core.Workdir(workdir, config)
  uses_features = kd_objective.KD_LOSSES.get(kd.loss).relation is not None
  teacher_apply = kd_objective.make_teacher_apply(
      teacher_net, parallel.replicate({k: teacher_state[k] for k in ("params", "model_state")}, mesh),
      temperature=calibration_temperature, features=uses_features)
  objective = kd_objective.make_kd_objective(kd, mixing=config.augment.mixing, key=keys.stream(config.seed,
                                                                                                "objective"),
                                             net=net, teacher_apply=teacher_apply, train_images=splits.train_images,
                                             train_labels=splits.train_labels)
  state = fit(run_dir, net=net, objective=objective, tx=tx, images=splits.train_images, labels=splits.train_labels,
              epochs=config.train.epochs, batch_size=config.train.batch_size, seed=config.seed, mesh=mesh,
              cadence=core.Cadence.from_config(config.train, "epoch"),
              description=f"kd {teacher_config.model.name} -> {config.model.name}",
              batch_transform=kd_objective.make_kd_batch_transform(
                  teacher_apply, config.augment, num_classes=splits.num_classes, data_transforms=splits.transforms,
                  teacher_features=uses_features),
              end_of_epoch=validation(net, splits, mesh=mesh, batch_size=config.eval_batch_size))
  results = calibrate_and_report(
      logits_fn=build.logits_fn(net, state, mesh, config.eval_batch_size), val_images=calibration_images,
      val_labels=calibration_labels, test_images=splits.test_images, test_labels=splits.test_labels,
      cfg=config.calibration, key=keys.stream(config.seed, "calibration"),
      plot_path=os.path.join(run_dir.plots, "reliability.png"))
  results["best_epoch"] = best_epoch(run_dir.records())
  results["teacher"] = {"workdir": os.path.abspath(kd.teacher), "method": teacher_config.method,
                        "model": teacher_config.model.name, "calibration": kd.teacher_calibration,
                        "calibration_temperature": calibration_temperature,
                        "results": {k: teacher_results[k] for k in ("raw", "ts", "mts")} if teacher_results else None}
  if (drawn := kd_objective.negatives_drawn(kd, splits.train_labels)) is not None:
    results["crd"] = drawn
  budget = dict(training_budget(config, splits, mesh), student_params=models.count_params(state["params"]))
  protocol = dict(training_protocol(config, calibration), kd_loss=kd.loss, alpha=kd.alpha, temperature=kd.temperature,
                  teacher_calibration=kd.teacher_calibration)
  return core.finish(run_dir, results, config=config, budget=budget, protocol=protocol)
