"""Method `calibrate`: every post-hoc calibrator on a trained network, fitted on held-out data, scored on test.

The source is the workdir of a finished `train` run (read-only). Calibrators are fitted on that run's held-out
validation split (the part of the training split it never trained on); MTS chooses its ratio on one half of that
split, as in `calibjax.calibration.report`. Every metric of `calibration_report` is reported before and after
each calibrator, with the over-calibration flag and a reliability diagram per calibrator.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from calibjax import parallel
from calibjax.calibration import metrics, plots, posthoc
from calibjax.calibration.report import calibrate_and_report
from calibjax.errors import ConfigError
from calibjax.train.run import make_logits_fn, restore_run
from calibjax.train.workdir import Workdir

# Probabilities from histogram binning or isotonic regression can be exactly 0; the NLL of such a calibrator is
# computed from probabilities clipped at this floor (and renormalised) instead of being infinite.
PROB_FLOOR = 1e-12


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  if not config.calibrate.source:
    raise ConfigError("calibrate needs the workdir of a finished train run: --config.calibrate.source=DIR")
  names = [name for name in config.calibrate.calibrators.split("+") if name]
  for name in names:
    if name != "mts":
      posthoc.CALIBRATORS.get(name)  # an unknown name fails before any work
  source_config, splits, net, state = restore_run(config.calibrate.source)
  run_dir = Workdir(workdir, config)
  mesh = parallel.make_mesh()
  logits_fn = make_logits_fn(net, state, mesh, config.eval_batch_size)
  # TS and MTS (and the uncalibrated reference) come from the same routine every training method uses.
  results = calibrate_and_report(
      logits_fn=logits_fn, val_images=splits.val_images, val_labels=splits.val_labels,
      test_images=splits.test_images, test_labels=splits.test_labels, cfg=config.calibration,
      key=jax.random.fold_in(jax.random.key(config.seed), 2))
  reported = {"uncalibrated": results["raw"]}
  if "mts" in names:
    reported["mts"] = results["mts"]
  val_logits, test_logits = logits_fn(splits.val_images), logits_fn(splits.test_images)
  panels = {"uncalibrated": (np.asarray(jax.nn.softmax(test_logits)), splits.test_labels)}
  for name in names:
    if name == "mts":
      panels["mts"] = (np.asarray(jax.nn.softmax(test_logits / results["mts"]["temperature"])), splits.test_labels)
      continue
    calibrator = posthoc.CALIBRATORS.get(name)
    params = calibrator.fit(logits=jnp.asarray(val_logits), labels=jnp.asarray(splits.val_labels))
    probs = np.asarray(calibrator.apply(params, jnp.asarray(test_logits)))
    floored = np.maximum(probs, PROB_FLOOR)
    report = metrics.calibration_report(logits=jnp.log(floored / floored.sum(-1, keepdims=True)),
                                        labels=jnp.asarray(splits.test_labels), n_bins=config.calibration.n_bins)
    report["over_calibrated"] = bool(results["raw"]["confidence_gap"] > 0 and report["confidence_gap"] < 0)
    if name.startswith("temperature"):
      report["temperature"] = float(params)
    reported[name] = report
    panels[name] = (probs, splits.test_labels)
  plots.plot_reliability_grid(os.path.join(run_dir.plots, "reliability.png"), panels,
                              n_bins=config.calibration.n_bins)
  reported["source"] = {"workdir": os.path.abspath(config.calibrate.source), "model": source_config.model.name,
                        "dataset": source_config.data.name, "val_examples": len(splits.val_labels),
                        "test_examples": len(splits.test_labels)}
  run_dir.write_results(reported)
  run_dir.close()
  return reported
