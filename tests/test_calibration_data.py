"""Where TS and MTS are fitted (calibration.fit_on) and where the MTS ratio is chosen (calibration.mts_selection)."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from calibjax import build, config_lib
from calibjax.calibration import posthoc
from calibjax.calibration import report as report_lib
from calibjax.data.prepare import Splits
from calibjax.errors import ConfigError
from test_cli import cli, read_json

NUM_CLASSES = 3


def _splits():
  rng = np.random.default_rng(0)
  images = lambda n: rng.normal(size=(n, 4, 4, 1)).astype(np.float32)
  labels = lambda n: (np.arange(n) % NUM_CLASSES).astype(np.int32)
  return Splits(images(12), labels(12), images(9), labels(9), images(15), labels(15), NUM_CLASSES,
                ("a", "b", "c"), {})


def _distilled(ipc):
  images = np.arange(NUM_CLASSES * ipc * 16, dtype=np.float32).reshape(NUM_CLASSES * ipc, 4, 4, 1)
  return images, np.repeat(np.arange(NUM_CLASSES), ipc).astype(np.int32)


def _cfg(**overrides):
  cfg = config_lib.calibration_config()
  cfg.update(overrides)
  return cfg


def test_held_out_real_is_the_validation_split_unchanged():
  splits = _splits()
  images, labels, keep, described = build.calibration_data(_cfg(), splits=splits, training_set=_distilled(10),
                                                           seed=0)
  assert images is splits.val_images and labels is splits.val_labels and keep is None
  assert described == {"fit_on": "held_out_real", "images": 9, "per_class": [3, 3, 3], "in_training": False}


@pytest.mark.parametrize("ipc, per_class", [(10, 1), (50, 5), (1, 1)])
def test_distilled_split_takes_ten_percent_of_each_class_of_the_set(ipc, per_class):
  splits, (set_images, set_labels) = _splits(), _distilled(ipc)
  images, labels, keep, described = build.calibration_data(_cfg(fit_on="distilled_split"), splits=splits,
                                                           training_set=(set_images, set_labels), seed=0)
  assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == [per_class] * NUM_CLASSES
  # The calibration images are images of the set, with their own labels (the reference's quirk: they also train).
  rows = [int(np.flatnonzero((set_images == image).all(axis=(1, 2, 3)))[0]) for image in images]
  np.testing.assert_array_equal(set_labels[rows], labels)
  assert keep is None and described["in_training"] and described["per_class"] == [per_class] * NUM_CLASSES


def test_distilled_split_held_out_of_training_and_distilled_full():
  splits, (set_images, set_labels) = _splits(), _distilled(10)
  images, labels, keep, described = build.calibration_data(
      _cfg(fit_on="distilled_split", split_in_training=False), splits=splits, training_set=(set_images, set_labels),
      seed=0)
  assert len(keep) == 27 and not described["in_training"]
  assert not np.isin(set_images[keep].reshape(27, -1)[:, 0], images.reshape(3, -1)[:, 0]).any()
  with pytest.raises(ConfigError, match="leaves a class with no training image"):
    build.calibration_data(_cfg(fit_on="distilled_split", split_in_training=False), splits=splits,
                           training_set=_distilled(1), seed=0)
  images, labels, keep, described = build.calibration_data(_cfg(fit_on="distilled_full"), splits=splits,
                                                           training_set=(set_images, set_labels), seed=0)
  np.testing.assert_array_equal(images, set_images)
  np.testing.assert_array_equal(labels, set_labels)
  assert keep is None and described["images"] == 30


def test_a_method_without_a_distilled_set_refuses_the_distilled_options():
  for fit_on in ("distilled_split", "distilled_full"):
    with pytest.raises(ConfigError, match="needs a distilled set"):
      build.calibration_data(_cfg(fit_on=fit_on), splits=_splits(), seed=0)
  with pytest.raises(ConfigError, match="calibration.fit_on must be one of"):
    build.calibration_data(_cfg(fit_on="test"), splits=_splits(), seed=0)


@pytest.mark.parametrize("val_per_class, mode", [(4, "calibration_data"), (1, "calibration_data"),
                                                 (4, "test_reference")])
def test_the_mts_ratio_sees_the_test_split_only_in_the_reproduction_mode(monkeypatch, val_per_class, mode):
  rng = np.random.default_rng(1)
  val_labels = np.repeat(np.arange(NUM_CLASSES), val_per_class).astype(np.int32)
  val_images = rng.normal(size=(len(val_labels), 2, 2, 1)).astype(np.float32)
  test_labels = (np.arange(30) % NUM_CLASSES).astype(np.int32)
  test_images = rng.normal(size=(30, 2, 2, 1)).astype(np.float32) + 100.0  # recognisable by their values
  weights = jnp.asarray(rng.normal(size=(4, NUM_CLASSES)), jnp.float32)
  seen = {}
  select = posthoc.select_mts_ratio

  def spy(**kwargs):
    seen.update(fit=np.asarray(kwargs["fit_inputs"]), select=np.asarray(kwargs["select_inputs"]))
    return select(**kwargs)

  monkeypatch.setattr(posthoc, "select_mts_ratio", spy)
  cfg = _cfg(mts_selection=mode, mts_ratios=(0.1, 0.5))
  results = report_lib.calibrate_and_report(
      logits_fn=lambda x: jnp.asarray(x).reshape(len(x), -1) @ weights, val_images=val_images,
      val_labels=val_labels, test_images=test_images, test_labels=test_labels, cfg=cfg,
      key=jax.random.key(0))
  touches_test = bool((seen["select"] > 50).any()) or bool((seen["fit"] > 50).any())
  assert touches_test == (mode == "test_reference")
  selected_on = results["mts"]["ratio_selected_on"]
  if mode == "test_reference":
    assert "test split" in selected_on and seen["select"].shape == test_images.shape
  elif val_per_class == 1:  # no half to hold out: fitted and scored on the same calibration images
    assert "same images" in selected_on and np.array_equal(seen["fit"], seen["select"])
  else:  # one half per class fits T, the other scores the ratio
    assert "one half" in selected_on and len(seen["fit"]) == len(seen["select"]) == 2 * NUM_CLASSES
  with pytest.raises(ConfigError, match="mts_selection must be one of"):
    report_lib.calibrate_and_report(
        logits_fn=lambda x: jnp.asarray(x).reshape(len(x), -1) @ weights, val_images=val_images,
        val_labels=val_labels, test_images=test_images, test_labels=test_labels,
        cfg=_cfg(mts_selection="test"), key=jax.random.key(0))


@pytest.mark.slow
def test_evaluate_fits_on_the_distilled_split_by_default_and_says_so(smoke_evaluation):
  workdir = smoke_evaluation
  results = read_json(os.path.join(workdir, "results.json"))
  described = results["calibration_data"]
  assert (described["fit_on"], described["images"], described["in_training"]) == ("distilled_split", 10, True)
  assert described["per_class"] == [1] * 10 and "same images" in described["mts_ratio_selected_on"]
  assert results["manifest"]["protocol"]["calibrators_fitted_on"]["fit_on"] == "distilled_split"
  assert ml_collections.ConfigDict(read_json(os.path.join(workdir, "config.json"))).calibration.fit_on == \
      "distilled_split"
  # also_fit_on: the same networks (the same raw numbers) with TS / MTS fitted on other data, each saying which.
  also = results["also_fitted_on"]
  assert sorted(also) == ["distilled_full", "distilled_split@test_reference@lbfgs_reference", "held_out_real"]
  full = also["distilled_full"]["calibration_data"]
  assert (full["images"], full["in_training"]) == (20, True)
  assert not also["held_out_real"]["calibration_data"]["in_training"]
  # The raw network's numbers are those of the same networks, except its conformal sets: they are calibrated on
  # each entry's own calibration data.
  network_only = lambda summary: {k: v for k, v in summary.items() if k not in ("set_size", "set_coverage")}
  for entry in also.values():
    assert network_only(entry["summary"]["raw"]) == network_only(results["summary"]["raw"])
  assert [entry["fit_on"] for entry in results["manifest"]["protocol"]["also_fitted_on"]] == \
      ["held_out_real", "distilled_full", "distilled_split"]
  # The reference's protocol: the MTS ratio chosen on test, T from its LBFGS port (which barely leaves 1.5 on a
  # network's own training images); the primary fit chose on the calibration data and converged.
  reference = also["distilled_split@test_reference@lbfgs_reference"]
  assert (reference["calibration_data"]["mts_selection"], reference["calibration_data"]["ts_method"]) == \
      ("test_reference", "lbfgs_reference")
  assert (results["calibration_data"]["mts_selection"], results["calibration_data"]["ts_method"]) == \
      ("calibration_data", "converged")
  assert "test split" in reference["calibration_data"]["mts_ratio_selected_on"]
  assert all(1.0 < net["ts"]["temperature"] < 2.0 for net in reference["per_network"])


@pytest.mark.slow
def test_calibrate_one_network_of_an_evaluate_run_on_its_distilled_split(tmp_path, smoke_evaluation, smoke_teacher):
  workdir = str(tmp_path / "calibrate")
  result = cli("--config=configs/calibrate.py:smoke,fit_on=distilled_split,network=1",
               f"--config.calibrate.source={smoke_evaluation}", "--config.calibrate.calibrators=temperature+mts",
               workdir=workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  results = read_json(os.path.join(workdir, "results.json"))
  assert (results["source"]["method"], results["source"]["network"]) == ("evaluate", 1)
  fitted = results["manifest"]["protocol"]["calibrators_fitted_on"]
  assert (fitted["fit_on"], fitted["images"], fitted["in_training"]) == ("distilled_split", 10, True)
  # The network is the evaluate run's network 1: its uncalibrated test accuracy is that run's.
  evaluation = read_json(os.path.join(smoke_evaluation, "results.json"))
  assert results["uncalibrated"]["accuracy"] == evaluation["per_network"][1]["raw"]["accuracy"]
  assert os.path.exists(os.path.join(workdir, "plots", "max_logit.png"))
  # A train run has no distilled set: the distilled options are refused in one line, before any work.
  refused = cli("--config=configs/calibrate.py:smoke,fit_on=distilled_split",
                f"--config.calibrate.source={smoke_teacher}", workdir=str(tmp_path / "refused"))
  assert refused.returncode == 2 and "needs a distilled set" in refused.stderr
