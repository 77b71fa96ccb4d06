"""Tests of calibjax.runs.summary (the end-of-run tables) and calibjax.runs.manifest (the results.json manifest).

The fake results dicts mirror what each method of calibjax/runs/ writes to results.json (train and kd with
calibration/report.py, evaluate, calibrate, distill, buffer), so a change of formatting or of a lookup key shows
up here.
"""

import importlib.metadata
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

import calibjax
from calibjax.runs import manifest, summary
from calibjax.runs.summary import format_results

WORKDIR = "/tmp/runs/example"


def _report(*, accuracy, nll, ece, confidence, **extra):
  """The part of a `calibration_report` dict the tables read (real reports hold more keys)."""
  return {"accuracy": accuracy, "nll": nll, "ece": ece, "mean_confidence": confidence, "ece_10": 0.5,
          "confidence_gap": confidence - accuracy, "n": 1000, "over_confident": confidence > accuracy,
          "aurc": 0.03214, "set_size": 1.2345, **extra}


def _calibrated(*, accuracy=0.8095, ts_temperature=1.52349, mts_temperature=1.41, ratio=0.3):
  """A `calibrate_and_report` result."""
  return {"raw": _report(accuracy=accuracy, nll=0.61234, ece=0.05123, confidence=0.86),
          "ts": _report(accuracy=accuracy, nll=0.55, ece=0.0201, confidence=0.81, over_calibrated=False,
                        temperature=ts_temperature),
          "mts": _report(accuracy=accuracy, nll=0.56, ece=0.03, confidence=0.79, over_calibrated=True,
                         temperature=mts_temperature, ratio=ratio,
                         ratio_selection={"0.1": {"ece": 0.02}, "0.3": {"ece": 0.01}})}


def _cells(text: str, label: str) -> list[str]:
  """The cells of the table row whose first cell is `label` (columns are at least two spaces apart)."""
  for line in text.splitlines():
    cells = re.split(r"\s{2,}", line.strip())
    if cells[0] == label:
      return cells
  raise AssertionError(f"no row '{label}' in:\n{text}")


def _labels(text: str) -> list[str]:
  return [re.split(r"\s{2,}", line.strip())[0] for line in text.splitlines()]


def test_train_rows_in_percent_with_temperatures_and_paths():
  results = {**_calibrated(), "budget": {"epochs": 2, "seed": 0}}
  text = format_results("train", results, workdir=WORKDIR)
  assert _cells(text, "accuracy %") == ["accuracy %", "NLL", "ECE %", "confidence %", "AURC %", "set size",
                                        "temperature", "MTS ratio"]
  assert _cells(text, "raw") == ["raw", "80.95", "0.6123", "5.12", "86.00", "3.21", "1.23"]
  assert _cells(text, "TS") == ["TS", "80.95", "0.5500", "2.01", "81.00", "3.21", "1.23", "1.523"]
  assert _cells(text, "MTS") == ["MTS", "80.95", "0.5600", "3.00", "79.00", "3.21", "1.23", "1.410", "0.3"]
  assert f"plots: {WORKDIR}/plots/reliability.png, {WORKDIR}/plots/risk_coverage.png" in text.splitlines()
  assert f"results: {WORKDIR}/results.json" in text.splitlines()


def test_columns_are_fixed_width():
  text = format_results("train", _calibrated(accuracy=0.05), workdir=WORKDIR)
  table = text.splitlines()[1:5]
  assert _labels("\n".join(table)) == ["accuracy %", "raw", "TS", "MTS"]
  # Right-aligned numbers: each column ends at the same character in the header and in every row.
  header = table[0]
  for column in ("accuracy %", "NLL", "ECE %"):
    end = header.index(column) + len(column)
    assert all(row[end - 1] != " " and (len(row) == end or row[end] == " ") for row in table[1:]), text


def test_missing_metrics_print_a_dash():
  results = _calibrated()
  del results["raw"]["nll"], results["ts"]["temperature"], results["mts"]
  text = format_results("train", results, workdir=WORKDIR)
  assert _cells(text, "raw") == ["raw", "80.95", "—", "5.12", "86.00", "3.21", "1.23"]
  assert _cells(text, "TS")[-1] == "—"
  assert _cells(text, "MTS") == ["MTS", "—", "—", "—", "—", "—", "—", "—", "—"]


def _kd_results(*, teacher_results=None):
  teacher = {"workdir": "/tmp/runs/teacher", "method": "train", "model": "resnet8", "calibration": "ts",
             "calibration_temperature": 1.7}
  if teacher_results is not None:
    teacher["results"] = teacher_results
  return {**_calibrated(), "teacher": teacher,
          "best_epoch": {"epoch": 12, "val_accuracy": 0.812, "last_epoch": 15, "last_val_accuracy": 0.8095,
                         "headline": "last_epoch"},
          "budget": {"epochs": 15, "student_params": 1234}}


def test_kd_student_rows_teacher_rows_and_best_epoch():
  text = format_results("kd", _kd_results(teacher_results=_calibrated(accuracy=0.9312, ts_temperature=2.25)),
                        workdir=WORKDIR)
  assert _cells(text, "student raw")[:2] == ["student raw", "80.95"]
  assert _cells(text, "teacher raw")[:2] == ["teacher raw", "93.12"]
  assert _cells(text, "teacher TS")[-1] == "2.250"
  assert _cells(text, "teacher MTS")[-1] == "0.3"
  assert "resnet8" in text.splitlines()[0]
  assert "best epoch: 12 (val accuracy 81.20%)" in text
  assert "last epoch 15 (val accuracy 80.95%)" in text
  assert f"plots: {WORKDIR}/plots/reliability.png, {WORKDIR}/plots/risk_coverage.png" in text.splitlines()


def test_kd_without_teacher_results_has_only_student_rows():
  results = _kd_results()
  del results["best_epoch"]["val_accuracy"]
  text = format_results("kd", results, workdir=WORKDIR)
  labels = _labels(text)
  assert {"student raw", "student TS", "student MTS"} <= set(labels)
  assert not any(label.startswith("teacher ") for label in labels)
  assert "best epoch: 12 (val accuracy —)" in text


def _stage_summary(*, accuracy, nll, ece, over_calibrated_fraction=None):
  stage = {"accuracy": accuracy, "nll": nll, "ece": ece, "sce": {"mean": 0.01, "std": 0.0},
           "aurc": {"mean": 0.0321, "std": 0.0012}, "set_size": {"mean": 1.5, "std": 0.25}}
  if over_calibrated_fraction is not None:
    stage["over_calibrated_fraction"] = over_calibrated_fraction
  return stage


def _evaluate_results():
  return {"training_set": {"source": "/tmp/runs/dsa/synthetic.npz", "method": "dsa", "mdt": "fixed", "ipc": 10,
                           "distill_iterations": 1000},
          "summary": {"raw": _stage_summary(accuracy={"mean": 0.8095, "std": 0.0123},
                                            nll={"mean": 0.5, "std": 0.01}, ece={"mean": 0.0456, "std": 0.002}),
                      "ts": _stage_summary(accuracy={"mean": 0.8095, "std": 0.0123}, nll={"mean": 0.45, "std": 0.02},
                                           ece={"mean": 0.021, "std": 0.001}, over_calibrated_fraction=0.4),
                      "mts": _stage_summary(accuracy={"mean": 0.8095, "std": 0.0123}, nll={"mean": 0.46, "std": 0.0},
                                            ece={"mean": 0.03, "std": 0.004}, over_calibrated_fraction=0.0)},
          "per_network": [],
          "calibration_data": {"fit_on": "distilled_split", "images": 10, "per_class": [1] * 10, "in_training": True,
                               "mts_ratio_selected_on": "calibration data (fit and scored on the same images)"},
          "budget": {"networks": 5, "epochs": 301, "lr": 0.01}}


def test_evaluate_mean_std_and_over_calibration_share():
  text = format_results("evaluate", _evaluate_results(), workdir=WORKDIR)
  title = text.splitlines()[0]
  assert "dsa" in title and "ipc 10" in title
  assert _cells(text, "raw") == ["raw", "80.95 ± 1.23", "0.5000 ± 0.0100", "4.56 ± 0.20", "3.21 ± 0.12",
                                 "1.5000 ± 0.2500"]
  assert _cells(text, "TS") == ["TS", "80.95 ± 1.23", "0.4500 ± 0.0200", "2.10 ± 0.10", "3.21 ± 0.12",
                                "1.5000 ± 0.2500", "2/5 networks"]
  assert _cells(text, "MTS")[-1] == "0/5 networks"
  assert ("TS / MTS fitted on: distilled_split (10 images, also training images); MTS ratio chosen on calibration "
          "data (fit and scored on the same images)") in text.splitlines()


def test_evaluate_rows_of_calibrators_fitted_elsewhere():
  results = _evaluate_results()
  results["also_fitted_on"] = {"held_out_real": {
      "summary": {"ts": _stage_summary(accuracy={"mean": 0.8095, "std": 0.0123}, nll={"mean": 0.4, "std": 0.0},
                                       ece={"mean": 0.012, "std": 0.003}, over_calibrated_fraction=0.2),
                  "mts": _stage_summary(accuracy={"mean": 0.8095, "std": 0.0123}, nll={"mean": 0.41, "std": 0.0},
                                        ece={"mean": 0.015, "std": 0.001}, over_calibrated_fraction=0.6)},
      "calibration_data": {
          "fit_on": "held_out_real", "images": 1000, "in_training": False,
          "mts_ratio_selected_on": "calibration data (fit on one half per class, scored on the other)"}}}
  text = format_results("evaluate", results, workdir=WORKDIR)
  assert _cells(text, "TS")[-1] == "2/5 networks"  # the primary fit is unchanged
  assert _cells(text, "TS [held_out_real]") == ["TS [held_out_real]", "80.95 ± 1.23", "0.4000 ± 0.0000",
                                                "1.20 ± 0.30", "3.21 ± 0.12", "1.5000 ± 0.2500", "1/5 networks"]
  assert _cells(text, "MTS [held_out_real]")[-1] == "3/5 networks"
  assert ("TS / MTS [held_out_real] fitted on: held_out_real (1000 images); MTS ratio chosen on calibration data "
          "(fit on one half per class, scored on the other)") in text.splitlines()
  assert not any(line.startswith("raw [") for line in text.splitlines())


def test_evaluate_missing_metric_and_share():
  results = _evaluate_results()
  del results["summary"]["raw"]["nll"], results["summary"]["ts"]["over_calibrated_fraction"]
  text = format_results("evaluate", results, workdir=WORKDIR)
  assert _cells(text, "raw")[2] == "—"
  assert _cells(text, "TS")[-1] == "—"


def test_calibrate_rows_per_calibrator_and_ood_auroc():
  calibrated = _calibrated()
  ood = {score: {"auroc": auroc, "aupr_in": 0.5, "aupr_out": 0.5, "fpr95": 0.5}
         for score, auroc in (("max_logit", 0.91234), ("msp_raw", 0.8), ("energy_raw", 0.7), ("msp_ts", 0.85),
                              ("energy_ts", 0.7), ("msp_mts", 0.86), ("energy_mts", 0.7))}
  results = {"uncalibrated": calibrated["raw"], "mts": calibrated["mts"],
             "temperature": {**calibrated["ts"], "over_calibrated": False},
             "histogram_binning": {"accuracy": 0.8, "ece": 0.01},
             "ood": {"gaussian_noise_0.5": ood}, "source": {"model": "convnet", "dataset": "digits"},
             "budget": {"seed": 0}, "manifest": {"python": "3.11.7"}}
  text = format_results("calibrate", results, workdir=WORKDIR)
  assert _cells(text, "uncalibrated") == ["uncalibrated", "80.95", "0.6123", "5.12", "3.21", "1.23"]
  assert _cells(text, "mts") == ["mts", "80.95", "0.5600", "3.00", "3.21", "1.23", "yes"]
  assert _cells(text, "temperature") == ["temperature", "80.95", "0.5500", "2.01", "3.21", "1.23", "no"]
  assert _cells(text, "histogram_binning") == ["histogram_binning", "80.00", "—", "1.00", "—", "—", "—"]
  assert _cells(text, "gaussian_noise_0.5") == ["gaussian_noise_0.5", "0.9123", "0.8000", "0.8500"]
  assert not {"ood", "source", "budget", "manifest"} & set(_labels(text))
  assert "convnet" in text.splitlines()[0]


def test_distill_settings_and_paths():
  results = {"method": "mtt", "ipc": 10, "mdt": "fixed", "mdt_ratio": 0.1, "iterations": 5000,
             "synthetic_set": "synthetic.npz", "learned_lr": 0.0123456, "seconds_first_iteration_this_process": 9.0,
             "seconds_per_iteration_median": 0.51234, "budget": {"iterations": 5000}}
  text = format_results("distill", results, workdir=WORKDIR)
  assert _cells(text, "method") == ["method", "mtt"]
  assert _cells(text, "ipc") == ["ipc", "10"]
  assert _cells(text, "mdt") == ["mdt", "fixed, ratio 0.1"]
  assert _cells(text, "iterations") == ["iterations", "5000"]
  assert _cells(text, "learned lr") == ["learned lr", "0.012346"]
  assert _cells(text, "median s / iteration") == ["median s / iteration", "0.512"]
  assert _cells(text, "synthetic set") == ["synthetic set", f"{WORKDIR}/synthetic.npz"]
  assert _cells(text, "plot") == ["plot", f"{WORKDIR}/plots/synthetic.png"]
  # A one-iteration run has no steady-state time.
  text = format_results("distill", {**results, "seconds_per_iteration_median": None}, workdir=WORKDIR)
  assert _cells(text, "median s / iteration") == ["median s / iteration", "—"]


def test_buffer_experts_and_accuracy():
  results = {"experts": 4, "epochs": 50, "test_accuracy": {"mean": 0.8095, "std": 0.0123, "per_expert": [0.8] * 4},
             "budget": {"seed": 0}}
  text = format_results("buffer", results, workdir=WORKDIR)
  assert _cells(text, "experts") == ["experts", "4"]
  assert _cells(text, "epochs") == ["epochs", "50"]
  assert _cells(text, "test accuracy %") == ["test accuracy %", "80.95 ± 1.23"]
  assert _cells(format_results("buffer", {"experts": 4}, workdir=WORKDIR), "test accuracy %")[1] == "—"


def test_every_method_has_a_formatter_and_unknown_ones_get_a_line():
  from calibjax.main import METHODS
  assert set(summary.FORMATTERS) == set(METHODS)
  assert format_results("sweep", {"anything": 1}, workdir=WORKDIR) == f"sweep: results in {WORKDIR}/results.json"


def test_empty_results_do_not_raise():
  for method in summary.FORMATTERS:
    assert "—" in format_results(method, {}, workdir=WORKDIR)


def _git_head(directory) -> str | None:
  try:
    completed = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True,
                               timeout=10)
  except OSError:
    return None
  return completed.stdout.strip() if completed.returncode == 0 else None


def test_manifest_contents_and_json():
  seeds = {"seed": 3, "networks": [0, 1]}
  protocol = {"epochs": 2, "mts_ratios": [0.1, 0.3], "loss": "ce"}
  record = manifest.build_manifest(seeds=seeds, protocol=protocol)
  assert set(record) == {"packages", "python", "git", "devices", "processes", "seeds", "protocol"}
  assert set(record["packages"]) == set(manifest.PACKAGES)
  assert isinstance(record["packages"]["jax"], str) and record["packages"]["jax"] == importlib.metadata.version("jax")
  assert record["packages"]["numpy"] == np.__version__
  assert record["seeds"] == seeds and record["protocol"] == protocol
  assert set(record["devices"]) == {"platform", "kind", "count", "local_count"}
  assert record["devices"]["count"] >= record["devices"]["local_count"] >= 1
  assert record["processes"] == {"count": 1, "index": 0}
  assert json.loads(json.dumps(record)) == record
  head = _git_head(calibjax.__path__[0])
  if head is None:
    pytest.skip("this copy of calibjax is not a git checkout")
  assert re.fullmatch(r"[0-9a-f]{40}", record["git"]["commit"]) and record["git"]["commit"] == head
  assert isinstance(record["git"]["dirty"], bool)


def test_missing_package_and_no_git_checkout_read_none(tmp_path):
  assert manifest.package_versions(names=("calibjax-no-such-distribution", "numpy")) == {
      "calibjax-no-such-distribution": None, "numpy": np.__version__}
  (tmp_path / "__init__.py").write_text("")
  assert manifest.git_state(directory=str(tmp_path)) is None
  assert manifest.git_state(directory=str(tmp_path / "does-not-exist")) is None


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_dirty_only_for_changed_tracked_files(tmp_path):
  package = tmp_path / "package"
  package.mkdir()
  (package / "__init__.py").write_text("x = 1\n")

  def git(*args):
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=test", "-c", "user.email=test@example.com",
                    "-c", "commit.gpgsign=false", *args], check=True, capture_output=True, timeout=30)

  git("init", "-q")
  git("add", "package/__init__.py")
  git("commit", "-q", "-m", "first")
  state = manifest.git_state(directory=str(package))
  assert state == {"commit": _git_head(tmp_path), "dirty": False}
  (package / "untracked.py").write_text("")
  assert manifest.git_state(directory=str(package))["dirty"] is False
  (package / "__init__.py").write_text("x = 2\n")
  assert manifest.git_state(directory=str(package))["dirty"] is True
  # A directory git does not track (a virtual environment inside a checkout) is not attributed to HEAD.
  (tmp_path / "venv").mkdir()
  (tmp_path / "venv" / "__init__.py").write_text("")
  assert manifest.git_state(directory=str(tmp_path / "venv")) is None


def test_analyze_tables_per_study():
  sweep = {"study": "mts_ratio", "sweep": [{"ratio": 0.1, "temperature": 1.2, "ece": 0.0321}],
           "ts": {"ece": 0.0196}, "raw": {"ece": 0.0663}}
  text = format_results("analyze", sweep, workdir=WORKDIR)
  assert _cells(text, "MTS r=0.1") == ["MTS r=0.1", "3.21"] and _cells(text, "uncalibrated")[-1] == "6.63"
  assert f"plots: {WORKDIR}/plots/mts_ratio.png" in text.splitlines()
  spectrum = {"study": "svd_spectrum", "explained_variance": {"distilled": [0.863, 1.0]}}
  assert _cells(format_results("analyze", spectrum, workdir=WORKDIR), "distilled") == ["distilled", "86.3",
                                                                                         "100.0", "—"]
