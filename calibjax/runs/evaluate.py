"""Method `evaluate`: train K networks on a small training set with the dataset-distillation protocol and report
accuracy and calibration for each network and as mean ± std.

The training set is a distilled set (`evaluate.source` = a `distill` workdir or its `synthetic.npz`) or a
baseline at the same IPC drawn from the real training split (`evaluate.baseline` = "random" or "herding").

Protocol (the DC/DSA/DM `evaluate_synset`, docs/protocols.md §3.5): a fresh network per seed, the `train` block's
SGD (momentum 0.9, coupled weight decay 5e-4, lr 0.01 or with `evaluate.learned_lr` an MTT set's learned lr),
batch 256 over a per-network shuffle without dropping the last partial batch, `train.epochs` passes (the
reference's `Epoch + 1`) with the lr ×0.1 from pass `Epoch // 2 + 1` on, DSA augmentation (per-sample
parameters) by default, test once at the end. The reference seeds its evaluation networks from the wall clock
(DC) or with one fixed seed (the MTS fork); here network k's keys are entry k of each named stream split K ways,
so every number is reproducible and the K networks differ. The K networks train together
(`calibjax.train.ensemble`), split over gcd(K, devices) devices (`parallel.mesh_dividing`).

Calibration (`calibration.fit_on`, `calibjax.build.calibration_data`): by default TS and MTS are fitted where
the MTS paper fits them for networks trained on distilled data, on a per-class 10 % split of the distilled set
itself ("distilled_split": IPC 10 -> 1 image per class, IPC 1 -> its single image; the split images also train
the networks, as the reference's, unless `calibration.split_in_training=False`); "distilled_full" fits on the
whole set; "held_out_real" on held-out real images of the training split that distillation never saw
(`evaluate.val_per_class` of them per class). The MTS ratio is chosen on the same calibration data
(`calibjax.calibration.report`); every metric is measured on the test split. results.json records which data
fitted the calibrators ("calibration_data"). `evaluate.also_fit_on` ('+'-separated fit_on options) fits TS and
MTS again on other calibration data for the same networks, with the same keys, reported under "also_fitted_on":
each entry equals what a run with that `fit_on` reports, without training the networks twice; suffixes change how
the calibrators are fitted there: `@test_reference` chooses the MTS ratio on the test split and `@lbfgs_reference`
fits T with the reference's LBFGS port (which stops near its start, T = 1.5), as the MTS reference code does
(reproduction modes, recorded as such). A calibrator
"over-calibrates" when it turns an over-confident network (mean confidence above accuracy) under-confident, as
the paper's Table 1 last row.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from calibjax import build, keys, parallel
from calibjax.calibration.posthoc.temperature import TS_METHODS
from calibjax.calibration.report import MTS_SELECTIONS, calibrate_and_report, reusing_logits, summarize_networks
from calibjax.data.augment import make_batch_transform
from calibjax.data.prepare import subsample_validation
from calibjax.distill.synthetic import SyntheticSet
from calibjax.errors import ConfigError
from calibjax.runs import core
from calibjax.train import step as step_lib
from calibjax.train.ensemble import epoch_batches, make_ensemble_step


def learning_rate(config: ml_collections.ConfigDict, synset: SyntheticSet) -> float:
  """`train.lr`, or the set's learned lr (MTT) with `evaluate.learned_lr`."""
  lr = float(np.exp(synset.log_lr)) if config.evaluate.learned_lr else float(config.train.lr)
  if not lr > 0:
    raise ConfigError(f"the evaluation lr must be positive, got {lr}; set train.lr or evaluate.learned_lr=False")
  return lr


def ensemble_objective(config: ml_collections.ConfigDict):
  """The training objective of the K networks; a loss updated from validation data between epochs is refused."""
  objective, update = build.objective(config.loss)
  if update is not None:
    raise ConfigError(f"loss '{config.loss.name}' updates its state from validation data every epoch, which "
                      "evaluate does not do; use it with the train method")
  return objective


def train_networks(run_dir: core.Workdir, config: ml_collections.ConfigDict, *, net, objective, images, targets,
                   lr: float, splits, mesh):
  """Trains `config.evaluate.num_nets` networks together on (images, targets) — images in the space of `splits`
  (its classes and transforms) — with the `train` block's protocol and `lr`, resuming from `run_dir`, split over
  `mesh` (`parallel.mesh_dividing`); returns their stacked train states."""
  ev, train = config.evaluate, config.train
  n, batch = len(images), min(train.batch_size, len(images))
  tx = build.optimizer(train, steps_per_epoch=-(-n // batch), lr=lr)
  init, ensemble_step = make_ensemble_step(
      net, objective, tx, batch_transform=make_batch_transform(config.augment, num_classes=splits.num_classes,
                                                           data_transforms=splits.transforms), mesh=mesh)
  steps_keys, order_keys = (keys.streams(config.seed, name, ev.num_nets) for name in ("steps", "order"))

  def epoch(states, index, tick):
    for idx in epoch_batches(order_keys, index, n, batch):
      states, metrics = ensemble_step(states, steps_keys, idx, images, targets)
    return states, lambda: {f"train_{k}_last_batch": [float(x) for x in v] for k, v in
                            jax.device_get(metrics).items()}

  return core.loop(run_dir, init(keys.streams(config.seed, "init", ev.num_nets)), epoch, total=train.epochs,
                   cadence=core.Cadence.from_config(train, "epoch"), description=f"evaluate {ev.num_nets} nets")


def calibration_sets(config: ml_collections.ConfigDict, *, splits,
                     training_set) -> tuple[list, np.ndarray | None]:
  """[(name, calibration config, images, labels, described)] for `calibration.fit_on` and then each entry of
  `evaluate.also_fit_on`, and the indices of the training set the networks train on (None: all of it).

  An entry is a fit_on option, optionally followed by `@<mts_selection>` and / or `@<ts_method>` to fit those
  calibrators otherwise than the `calibration` block says: `distilled_split@test_reference@lbfgs_reference` is the
  MTS reference code's protocol (T from its LBFGS port, the MTS ratio chosen on test). Every entry must train the
  same networks, which is checked here, before any training."""
  entries = [name for name in config.evaluate.also_fit_on.split("+") if name]
  names = [config.calibration.fit_on] + entries
  modes = {**{mode: "mts_selection" for mode in MTS_SELECTIONS}, **{mode: "ts_method" for mode in TS_METHODS}}
  parsed = [name.split("@") for name in names]
  for entry, (fit_on, *suffixes) in zip(entries, parsed[1:]):
    if fit_on not in build.FIT_ON or any(suffix not in modes for suffix in suffixes):
      raise ConfigError(f"evaluate.also_fit_on: '{entry}' is not one of {', '.join(build.FIT_ON)}, optionally "
                        f"followed by @ and one of {', '.join(modes)}; give a '+'-separated list of them")
  if len(set(names)) < len(names):
    raise ConfigError(f"evaluate.also_fit_on repeats an option or calibration.fit_on ({'+'.join(names)}); list "
                      "each place to fit the calibrators once")
  sets, keeps = [], []
  for name, (fit_on, *suffixes) in zip(names, parsed):
    cfg = ml_collections.ConfigDict(dict(config.calibration, fit_on=fit_on))
    cfg.update({modes[suffix]: suffix for suffix in suffixes})
    images, labels, keep, described = build.calibration_data(cfg, splits=splits, training_set=training_set,
                                                             seed=config.seed)
    described.update(mts_selection=cfg.mts_selection, ts_method=cfg.ts_method)
    sets.append((name, cfg, images, labels, described))
    keeps.append(keep)
  if any(keep is not None for keep in keeps) and len(names) > 1:
    raise ConfigError("calibration.split_in_training=False trains without the split images, so the fit_on options "
                      f"{'+'.join(names)} would need different networks; evaluate them in separate runs")
  return sets, keeps[0]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  ev, train = config.evaluate, config.train
  synset, splits, described = build.training_set(config)
  splits = subsample_validation(splits, ev.val_per_class, config.seed)
  labels = np.asarray(synset.labels)
  fits, train_keep = calibration_sets(config, splits=splits, training_set=(synset.images, labels))
  keep = slice(None) if train_keep is None else train_keep
  images = jnp.asarray(np.asarray(synset.images)[keep], jnp.float32)
  targets = jnp.asarray(np.asarray(synset.soft_labels if synset.soft_labels is not None else labels)[keep])
  lr = learning_rate(config, synset)
  net = build.network(config.model, splits)
  objective = ensemble_objective(config)
  networks_mesh = parallel.mesh_dividing(ev.num_nets, what="evaluate.num_nets")
  run_dir = core.Workdir(workdir, config)
  states = train_networks(run_dir, config, net=net, objective=objective, images=images, targets=targets, lr=lr,
                          splits=splits, mesh=networks_mesh)
  n, batch = len(images), min(train.batch_size, len(images))
  mesh = parallel.make_mesh()
  predict_fn = step_lib.make_predict_fn(net, mesh)
  calibration_keys = keys.streams(config.seed, "calibration", ev.num_nets)
  per_network = [[] for _ in fits]  # per calibration set, per network
  for k in range(ev.num_nets):
    logits_fn = reusing_logits(  # the test split is evaluated once for every set of calibration data
        build.logits_fn(net, jax.tree.map(lambda leaf: leaf[k], states), mesh, config.eval_batch_size,
                        predict_fn=predict_fn), splits.test_images)
    for i, (_, cfg, val_images, val_labels, _) in enumerate(fits):
      per_network[i].append(calibrate_and_report(
          logits_fn=logits_fn, val_images=val_images, val_labels=val_labels, test_images=splits.test_images,
          test_labels=splits.test_labels, cfg=cfg, key=calibration_keys[k],
          plot_path=os.path.join(run_dir.plots, "reliability_net0.png") if k == 0 and i == 0 else None))
  fitted = {}
  for (name, _, _, _, calibration), networks in zip(fits, per_network):
    calibration["mts_ratio_selected_on"] = networks[0]["mts"]["ratio_selected_on"]
    fitted[name] = {"calibration_data": calibration, "summary": summarize_networks(networks),
                    "per_network": networks}
  primary, *others = fitted
  results = {"training_set": described, **fitted[primary]}
  if others:
    results["also_fitted_on"] = {name: fitted[name] for name in others}
  calibration = fitted[primary]["calibration_data"]
  budget = {"networks": ev.num_nets, "epochs": train.epochs, "lr": lr, "batch_size": batch, "train_examples": n,
            "val_examples": len(fits[0][3]), "test_examples": len(splits.test_images),
            "devices_training": networks_mesh.size, "seed": config.seed, "dsa": config.augment.dsa,
            "loss": config.loss.name, "mixing": config.augment.mixing}
  protocol = {"training_set": described["method"], "ipc": described["ipc"], "epochs": train.epochs, "lr": lr,
              "augment": config.augment.to_dict(), "loss": config.loss.name, "calibrators_fitted_on": calibration,
              "also_fitted_on": [fitted[name]["calibration_data"] for name in others],
              "mts_selection": config.calibration.mts_selection}
  return core.finish(run_dir, results, config=config, budget=budget, protocol=protocol)
