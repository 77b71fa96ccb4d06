"""Raw, temperature-scaled and masked-temperature-scaled results of one trained network.

Every method that ends with a trained classifier (train, evaluate, kd, calibrate) calls `calibrate_and_report`:
temperature scaling (TS) and Masked Temperature Scaling (MTS) are fitted on calibration data (held-out real
images, or the distilled set itself: the caller chooses), the MTS mask ratio is chosen on that calibration data,
and everything is scored on the test split.

Where the MTS ratio is chosen (`calibration.mts_selection`):
  * "calibration_data" (default): T is fitted on one half of each class's calibration images and the ratio scored
    on the other half; a class with fewer than two calibration images (a 10 % split of an IPC 10 set, an IPC 1
    set) leaves no half, and then T is fitted and the ratio scored on the same images. The test split is never
    seen.
  * "test_reference": the MTS reference code's choice, scored on the test split (ECE with `n_bins` bins). A
    reproduction mode only: its test numbers are optimistic, and results.json says that the ratio saw the test
    split.
"""

import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from calibjax.calibration import conformal, metrics, plots, posthoc, selective
from calibjax.data import split_per_class
from calibjax.errors import ConfigError

# Metrics summarised as mean ± std and a bootstrap 95 % interval over networks, for the raw network and after each
# calibrator.
SUMMARY_METRICS = ("accuracy", "nll", "ece", "ece_10", "sce", "ace", "oe", "mce", "brier", "mean_confidence",
                   "confidence_gap", "aurc", "e_aurc", "augrc", "set_size", "set_coverage")
# The conformal sets' uniform draws: the report's key with this folded in, not a further split, so the MTS masks
# drawn from that key are what they were before the sets existed. (fold_in(key, 1) would be split(key)[1].)
_CONFORMAL_FOLD = 0x636F6E66  # "conf"
LogitsFn = Callable[[np.ndarray], np.ndarray]
# Probabilities from histogram binning or isotonic regression can be exactly 0; the NLL of such a calibrator is
# computed from probabilities clipped at this floor (and renormalised) instead of being infinite.
PROB_FLOOR = 1e-12


def calibrate_and_report(*, logits_fn: LogitsFn, val_images: np.ndarray, val_labels: np.ndarray,
                         test_images: np.ndarray, test_labels: np.ndarray, cfg: ml_collections.ConfigDict,
                         key: jax.Array, plot_path: str | None = None) -> dict:
  """Fits TS and MTS on validation data and reports test metrics raw / after TS / after MTS.

  Args:
    logits_fn: maps a batch of (normalised) images to logits; MTS calls it on masked images.
    val_images, val_labels: held-out data for fitting the calibrators (never the test split).
    test_images, test_labels: where every reported metric is measured.
    cfg: the `calibration` config (n_bins, ts_method, mts_ratios, mts_granularity, mts_target).
    key: PRNG key of the MTS masks.
    plot_path: where to write the reliability diagrams (raw | TS | MTS), if given.

  Returns:
    {"raw"|"ts"|"mts": calibration_report dict (plus "over_calibrated" for ts/mts: the calibrator turned an
    over-confident network under-confident, the paper's Table 1 last row) and `uncertainty_report`'s selective
    prediction and conformal sets. "ts" also holds "temperature"; "mts" holds "temperature", "ratio" and
    "ratio_selection" (the validation score of every ratio tried).
  """
  val_logits = np.asarray(logits_fn(val_images))
  test_logits = np.asarray(logits_fn(test_images))
  temperature = float(posthoc.fit_temperature(logits=val_logits, labels=val_labels, method=cfg.ts_method))

  # The final T is refitted on all calibration data at the chosen ratio, as the reference refits after its sweep.
  (fit_images, fit_labels), (select_images, select_labels), selected_on = _mts_selection_data(
      cfg.mts_selection, val_images=val_images, val_labels=val_labels, test_images=test_images,
      test_labels=test_labels)
  select_key, fit_key = jax.random.split(key)
  mts_options = dict(method=cfg.ts_method, mask_target=cfg.mts_target, granularity=cfg.mts_granularity)
  selection = posthoc.select_mts_ratio(
      logits_fn=logits_fn, fit_inputs=fit_images, fit_labels=fit_labels, select_inputs=select_images,
      select_labels=select_labels, key=select_key, ratios=tuple(cfg.mts_ratios), n_bins=cfg.n_bins,
      **mts_options)
  mts_temperature = float(posthoc.fit_masked_temperature(
      logits_fn=logits_fn, inputs=val_images, labels=val_labels, ratio=selection["ratio"], key=fit_key,
      **mts_options))

  scaled = {"raw": test_logits, "ts": test_logits / temperature, "mts": test_logits / mts_temperature}
  results = {name: metrics.calibration_report(logits=jnp.asarray(logits), labels=jnp.asarray(test_labels),
                                              n_bins=cfg.n_bins) for name, logits in scaled.items()}
  for name in ("ts", "mts"):
    results[name]["over_calibrated"] = bool(results["raw"]["confidence_gap"] > 0
                                            and results[name]["confidence_gap"] < 0)
  results["ts"]["temperature"] = temperature
  results["mts"].update(temperature=mts_temperature, ratio=float(selection["ratio"]),
                        ratio_selection=_jsonable(selection["table"]), ratio_selected_on=selected_on)
  temperatures = {"raw": 1.0, "ts": temperature, "mts": mts_temperature}
  test_probs = {name: np.asarray(jax.nn.softmax(logits)) for name, logits in scaled.items()}
  for name, t in temperatures.items():
    results[name].update(uncertainty_report(
        val_probs=jax.nn.softmax(val_logits / t), val_labels=val_labels, test_probs=test_probs[name],
        test_labels=test_labels, test_logits=test_logits, cfg=cfg, key=key))
  if plot_path is not None:
    panels = {f"{name} (T={t:.2f})": (test_probs[name], test_labels) for name, t in temperatures.items()}
    plots.plot_reliability_grid(plot_path, panels, n_bins=cfg.n_bins)
    correct = np.argmax(test_logits, -1) == test_labels
    curves = {}
    for name, probs in test_probs.items():
      coverage, risk = selective.risk_coverage(scores=np.max(probs, -1), correct=correct)
      curves[f"{name} (MSP, AURC {100 * results[name]['aurc']:.2f} %)"] = (100 * np.asarray(coverage),
                                                                             100 * np.asarray(risk))
    plots.plot_curves(risk_coverage_path(plot_path), curves, xlabel="coverage %", ylabel="selective risk %")
  return results


def risk_coverage_path(reliability_path: str) -> str:
  """Where the risk-coverage plot of a report goes: next to its reliability diagram, "reliability" in the file
  name replaced by "risk_coverage" (plots/reliability_net0.png -> plots/risk_coverage_net0.png)."""
  directory, name = os.path.split(reliability_path)
  return os.path.join(directory, name.replace("reliability", "risk_coverage", 1))


def uncertainty_report(*, val_probs, val_labels, test_probs, test_labels, cfg: ml_collections.ConfigDict,
                       key: jax.Array, test_logits=None) -> dict:
  """Selective prediction on the test split (`calibjax.calibration.selective.selective_report`: MSP and negative
  entropy of `test_probs`, max logit of `test_logits`) and conformal sets of every method calibrated on
  (val_probs, val_labels) at `cfg.conformal_alpha` (`calibjax.calibration.conformal`). Flat entries for the
  summaries: "aurc", "e_aurc", "augrc" (MSP) and "set_size", "set_coverage" (`cfg.conformal_method`); the details
  under "selective" and "conformal"."""
  report = selective.selective_report(probs=test_probs, labels=test_labels, logits=test_logits)
  conformal_key = jax.random.fold_in(key, _CONFORMAL_FOLD)
  sets = {}
  for method in conformal.METHODS:
    _, predicted = conformal.calibrate_and_predict(cal_probs=val_probs, cal_labels=val_labels, test_probs=test_probs,
                                                   method=method, alpha=cfg.conformal_alpha, key=conformal_key)
    sets[method] = conformal.set_report(sets=predicted, labels=test_labels)
  chosen = sets[cfg.conformal_method]
  return {"aurc": report["msp"]["aurc"], "e_aurc": report["msp"]["e_aurc"], "augrc": report["msp"]["augrc"],
          "set_size": chosen["mean_size"], "set_coverage": chosen["coverage"], "selective": report,
          "conformal": {"alpha": cfg.conformal_alpha, **sets}}


MTS_SELECTIONS = ("calibration_data", "test_reference")


def reusing_logits(logits_fn: LogitsFn, images: np.ndarray) -> LogitsFn:
  """`logits_fn` that computes the logits of the array `images` once and returns them again whenever it is called
  with that same array object (one network reported with several sets of calibration data, or with the ratio
  chosen on test, evaluates its test split once); any other input is passed through."""
  known = np.asarray(logits_fn(images))
  return lambda x: known if x is images else logits_fn(x)


def _mts_selection_data(mode: str, *, val_images, val_labels, test_images, test_labels):
  """((fit images, labels), (selection images, labels), what the ratio was chosen on) of `mode` (module doc)."""
  if mode not in MTS_SELECTIONS:
    raise ConfigError(f"calibration.mts_selection must be one of {', '.join(MTS_SELECTIONS)}; got '{mode}'")
  if mode == "test_reference":
    return (val_images, val_labels), (test_images, test_labels), "test split (test_reference reproduction mode)"
  if np.bincount(val_labels).min() < 2:
    same = (val_images, val_labels)
    return same, same, "calibration data (fit and scored on the same images: fewer than 2 per class)"
  fit_idx, select_idx = split_per_class(val_labels, val_fraction=0.5, seed=0)
  return ((val_images[fit_idx], val_labels[fit_idx]), (val_images[select_idx], val_labels[select_idx]),
          "calibration data (fit on one half per class, scored on the other)")


def _jsonable(table):
  return jax.tree.map(lambda v: v.item() if hasattr(v, "item") else v, table)


def posthoc_report(name: str, *, val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray,
                   test_labels: np.ndarray, cfg: ml_collections.ConfigDict, key: jax.Array,
                   raw_confidence_gap: float) -> tuple[dict, np.ndarray]:
  """Fits the calibrator `name` of `posthoc.CALIBRATORS` on validation logits and reports it on test logits.

  Returns:
    (calibration_report of the calibrated test probabilities (NLL from probabilities floored at `PROB_FLOOR`)
    with "over_calibrated", `uncertainty_report`'s selective prediction (on the calibrated probabilities) and
    conformal sets (calibrated on the calibrated validation probabilities), and "temperature" for the temperature
    calibrators; the calibrated test probabilities (N, K)).
  """
  calibrator = posthoc.CALIBRATORS.get(name)
  params = calibrator.fit(logits=jnp.asarray(val_logits), labels=jnp.asarray(val_labels))
  probs = np.asarray(calibrator.apply(params, jnp.asarray(test_logits)))
  floored = np.maximum(probs, PROB_FLOOR)
  report = metrics.calibration_report(logits=jnp.log(floored / floored.sum(-1, keepdims=True)),
                                      labels=jnp.asarray(test_labels), n_bins=cfg.n_bins)
  report["over_calibrated"] = bool(raw_confidence_gap > 0 and report["confidence_gap"] < 0)
  report.update(uncertainty_report(val_probs=calibrator.apply(params, jnp.asarray(val_logits)), val_labels=val_labels,
                                   test_probs=probs, test_labels=test_labels, test_logits=test_logits, cfg=cfg,
                                   key=key))
  if name.startswith("temperature"):
    report["temperature"] = float(params)
  return report, probs


BOOTSTRAP_RESAMPLES = 10_000


def bootstrap_interval(values, *, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
  """Percentile-bootstrap confidence interval of the mean of `values` (one value per evaluation network).

  `resamples` samples of len(values) values drawn with replacement (numpy's PCG64 from `seed`, so a summary is
  reproducible); the interval is the (1 - level) / 2 and (1 + level) / 2 quantiles of their means
  (`metrics.bootstrap_ci` is the same interval over the examples of one network).
  It describes the spread over networks trained on one set with one seed stream, not over distillation runs; with
  few networks (5) it is narrower than a Student-t interval, the percentile bootstrap's known small-sample bias.
  """
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or not len(values):
    raise metrics.InvalidInputError("bootstrap_interval takes a non-empty 1-D sequence of values; got shape "
                                    f"{values.shape}")
  if not 0 < level < 1:
    raise metrics.InvalidInputError(f"level must lie in (0, 1); got {level}")
  draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
  low, high = np.quantile(values[draws].mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
  return float(low), float(high)


def summarize_networks(per_network: list[dict]) -> dict:
  """{stage: {metric: {"mean", "std", "ci95"}}} over networks (std with ddof=0, as numpy and the references;
  ci95: `bootstrap_interval`'s [low, high]), plus the fraction of networks each calibrator over-calibrated."""
  summary = {}
  for stage in ("raw", "ts", "mts"):
    summary[stage] = {}
    for m in SUMMARY_METRICS:
      values = [r[stage][m] for r in per_network]
      summary[stage][m] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                           "ci95": list(bootstrap_interval(values))}
    if stage != "raw":
      summary[stage]["over_calibrated_fraction"] = float(np.mean([r[stage]["over_calibrated"]
                                                                  for r in per_network]))
  return summary
