"""Method `calibrate`: every post-hoc calibrator on a trained network, fitted on calibration data, scored on test.

The source is the workdir of a finished `train` or `kd` run, or one network (`calibrate.network`) of a finished
`evaluate` run (read-only). Calibrators are fitted where `calibration.fit_on` says
(`calibjax.build.calibration_data`): the source run's held-out validation split (the part of the training split
it never trained on), or for an evaluate source the distilled set its networks trained on (a per-class split of
it, or all of it); MTS chooses its ratio on that calibration data, as in `calibjax.calibration.report`. Every
metric of `calibration_report` is reported before and after each calibrator, with the over-calibration flag and a
reliability diagram per calibrator. Also reported: max-logit histograms of clean and masked test inputs (the MTS
paper's Figs. 2 and 7), and out-of-distribution separation (AUROC, AUPR, FPR95 by max softmax probability, max
logit and energy, raw and temperature-scaled) between the test split and shifted sets
(`calibjax.analysis.ood.shifted_sets`).
"""

import os

import jax
import ml_collections
import numpy as np

from calibjax import build, keys, parallel
from calibjax.analysis import ood
from calibjax.calibration import plots, posthoc
from calibjax.calibration.report import calibrate_and_report, posthoc_report
from calibjax.errors import ConfigError
from calibjax.masks import mask_inputs
from calibjax.runs import core


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  cfg = config.calibrate
  if not cfg.source:
    raise ConfigError("calibrate needs the workdir of a finished train, kd or evaluate run: "
                      "--config.calibrate.source=DIR")
  names = [name for name in cfg.calibrators.split("+") if name]
  for name in names:
    if name != "mts":
      posthoc.CALIBRATORS.get(name)  # an unknown name fails before any work
  source_config, splits, net, state, source_set = build.restore_run(
      cfg.source, methods=("train", "kd", "evaluate"), role="calibrate.source", network_index=cfg.network)
  # The source's seed: an evaluate source's distilled split is then the one its own run fitted on.
  calibration_images, calibration_labels, _, calibration = build.calibration_data(
      config.calibration, splits=splits, training_set=source_set, seed=source_config.seed)
  run_dir = core.Workdir(workdir, config)
  mesh = parallel.make_mesh()
  logits_fn = build.logits_fn(net, state, mesh, config.eval_batch_size)
  # TS and MTS (and the uncalibrated reference) come from the same routine every training method uses.
  results = calibrate_and_report(
      logits_fn=logits_fn, val_images=calibration_images, val_labels=calibration_labels,
      test_images=splits.test_images, test_labels=splits.test_labels, cfg=config.calibration,
      key=keys.stream(config.seed, "calibration"))
  reported = {"uncalibrated": results["raw"]}
  val_logits, test_logits = logits_fn(calibration_images), logits_fn(splits.test_images)
  panels = {"uncalibrated": (np.asarray(jax.nn.softmax(test_logits)), splits.test_labels)}
  for name in names:
    if name == "mts":
      reported["mts"] = results["mts"]
      panels["mts"] = (np.asarray(jax.nn.softmax(test_logits / results["mts"]["temperature"])), splits.test_labels)
    else:
      reported[name], probs = posthoc_report(name, val_logits=val_logits, val_labels=calibration_labels,
                                             test_logits=test_logits, test_labels=splits.test_labels,
                                             cfg=config.calibration, key=keys.stream(config.seed, "calibration"),
                                             raw_confidence_gap=results["raw"]["confidence_gap"])
      panels[name] = (probs, splits.test_labels)
  plots.plot_reliability_grid(os.path.join(run_dir.plots, "reliability.png"), panels,
                              n_bins=config.calibration.n_bins)
  mask_key, noise_key = jax.random.split(keys.stream(config.seed, "analysis"))
  ratio = results["mts"]["ratio"]
  masked_logits = logits_fn(np.asarray(mask_inputs(mask_key, splits.test_images, ratio)))
  plots.plot_max_logit_histograms(os.path.join(run_dir.plots, "max_logit.png"), {
      "clean test inputs": test_logits, f"masked, r={ratio:g}": masked_logits})
  temperatures = {"raw": 1.0, "ts": results["ts"]["temperature"], "mts": results["mts"]["temperature"]}
  shifted = ood.shifted_sets(noise_sigmas=cfg.ood_noise_sigmas, dataset=cfg.ood_dataset, splits=splits,
                             data_dir=source_config.data.data_dir or None, key=noise_key)
  reported["ood"] = {name: ood.out_of_distribution(in_logits=test_logits, out_logits=logits_fn(images),
                                                   temperatures=temperatures) for name, images in shifted.items()}
  reported["source"] = {"workdir": os.path.abspath(cfg.source), "method": source_config.method,
                        "model": source_config.model.name, "dataset": source_config.data.name,
                        "network": cfg.network if source_config.method == "evaluate" else None}
  budget = {"val_examples": len(calibration_labels), "test_examples": len(splits.test_labels), "seed": config.seed}
  return core.finish(run_dir, reported, config=config, budget=budget, protocol={
      "calibrators": names, "calibrators_fitted_on": calibration, "mts_selection": config.calibration.mts_selection,
      "mts_ratios": list(config.calibration.mts_ratios), "ood_sets": sorted(shifted)})
