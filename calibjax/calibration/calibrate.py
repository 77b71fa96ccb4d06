"""Method `calibrate`: every post-hoc calibrator on a trained network, fitted on held-out data, scored on test.

The source is the workdir of a finished `train` run (read-only). Calibrators are fitted on that run's held-out
validation split (the part of the training split it never trained on); MTS chooses its ratio on one half of that
split, as in `calibjax.calibration.report`. Every metric of `calibration_report` is reported before and after
each calibrator, with the over-calibration flag and a reliability diagram per calibrator. Also reported:
max-logit histograms of clean and masked test inputs (the MTS paper's Figs. 2 and 7), and out-of-distribution
separation (AUROC, AUPR, FPR95 by max softmax probability, max logit and energy, raw and temperature-scaled)
between the test split and shifted sets: Gaussian-noise corrupted copies of the test split and, optionally,
another dataset resized to the network's input.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from calibjax import data as data_lib
from calibjax import parallel
from calibjax.analysis import ood
from calibjax.calibration import metrics, plots, posthoc
from calibjax.calibration.report import calibrate_and_report
from calibjax.data.prepare import Splits
from calibjax.distill.masks import mask_inputs
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
  mask_key, noise_key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 3))
  masked_logits = logits_fn(np.asarray(mask_inputs(mask_key, splits.test_images, results["mts"]["ratio"])))
  plots.plot_max_logit_histograms(os.path.join(run_dir.plots, "max_logit.png"), {
      "clean test inputs": test_logits, f"masked, r={results['mts']['ratio']:g}": masked_logits})
  temperatures = {"raw": 1.0, "ts": results["ts"]["temperature"], "mts": results["mts"]["temperature"]}
  reported["ood"] = {
      name: out_of_distribution(in_logits=test_logits, out_logits=logits_fn(shifted), temperatures=temperatures)
      for name, shifted in shifted_sets(config.calibrate, splits, source_config, noise_key).items()}
  reported["source"] = {"workdir": os.path.abspath(config.calibrate.source), "model": source_config.model.name,
                        "dataset": source_config.data.name, "val_examples": len(splits.val_labels),
                        "test_examples": len(splits.test_labels)}
  run_dir.write_results(reported)
  run_dir.close()
  return reported


def shifted_sets(cfg: ml_collections.ConfigDict, splits: Splits, source_config, key: jax.Array) -> dict:
  """Shifted versions of the test inputs, in the network's (normalised) input space.

  "gaussian_noise_<sigma>": the test images plus N(0, sigma²) noise (sigma in normalised units);
  cfg.ood_dataset (optional): that dataset's test split, converted to the source's channels and size (bilinear)
  and passed through the source run's own normalisation / ZCA.
  """
  sets = {}
  for sigma in cfg.ood_noise_sigmas:
    noise = sigma * np.asarray(jax.random.normal(jax.random.fold_in(key, int(sigma * 1000)),
                                                 splits.test_images.shape))
    sets[f"gaussian_noise_{sigma:g}"] = (splits.test_images + noise).astype(np.float32)
  if cfg.ood_dataset:
    other = data_lib.load(cfg.ood_dataset, "test", data_dir=source_config.data.data_dir or None)
    images = np.asarray(jax.image.resize(other.images, (len(other.images), *splits.input_shape[:2],
                                                        other.images.shape[-1]), "bilinear"))
    channels = splits.input_shape[-1]
    if images.shape[-1] != channels:  # gray <-> colour: repeat or average the channels
      images = np.repeat(images, channels, -1) if images.shape[-1] == 1 else images.mean(-1, keepdims=True)
    transform_classes = {"normalize": data_lib.Normalize, "zca": data_lib.ZCA}
    for name, state in splits.transforms.items():
      images = np.asarray(transform_classes[name].from_dict(state).apply(images))
    sets[cfg.ood_dataset] = images.astype(np.float32)
  return sets


def out_of_distribution(*, in_logits: np.ndarray, out_logits: np.ndarray, temperatures: dict) -> dict:
  """OOD detection quality of each score, computed on logits / T for each temperature (max logit ignores T)."""
  report = {"max_logit": ood.ood_report(in_logits=in_logits, out_logits=out_logits, score="max_logit")}
  for name, t in temperatures.items():
    for score in ("msp", "energy"):
      report[f"{score}_{name}"] = ood.ood_report(in_logits=in_logits / t, out_logits=out_logits / t, score=score)
  return report
