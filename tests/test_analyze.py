"""Method `analyze` end to end through the CLI: every study on smoke runs writes its figure and its data."""

import os

import numpy as np
import pytest

from test_cli import assert_one_line_error, cli, read_json


def analyze(tmp_path, study, *flags):
  workdir = str(tmp_path / study)
  result = cli(f"--config=configs/analyze.py:smoke,study={study}", *flags, workdir=workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"analyze: {study}" in result.stdout
  return workdir, read_json(os.path.join(workdir, "results.json"))


@pytest.mark.slow
def test_max_logit_histograms_of_models_masks_and_shifted_inputs(tmp_path, smoke_evaluation, smoke_teacher):
  workdir, results = analyze(tmp_path, "max_logit", f"--config.analyze.source={smoke_evaluation}",
                             f"--config.analyze.reference={smoke_teacher}")
  assert set(results["max_logit_models"]) == {"trained on distilled data", "trained on full data"}
  assert set(results["max_logit_masked"]) == {"clean", "masked r=0.1", "masked r=0.2", "masked r=0.3"}
  assert set(results["max_probability_ood"]) == {"test split", "gaussian_noise_0.5", "gaussian_noise_1"}
  assert all(0 < stats["mean"] <= 1 for stats in results["max_probability_ood"].values())
  assert results["calibration_data"]["fit_on"] == "distilled_split"
  for name in ("max_logit_models", "max_logit_masked", "max_probability_ood"):
    assert os.path.exists(os.path.join(workdir, "plots", f"{name}.png"))


@pytest.mark.slow
def test_mts_ratio_sweep_and_calibration_size(tmp_path, smoke_evaluation):
  _, sweep = analyze(tmp_path, "mts_ratio", f"--config.analyze.source={smoke_evaluation}")
  assert [row["ratio"] for row in sweep["sweep"]] == [0.1, 0.5]
  assert all(row["temperature"] > 0 and 0 <= row["ece"] <= 1 for row in sweep["sweep"])
  # TS on the same calibration data as the evaluate run (its distilled split, its seed) gives its TS result.
  evaluated = read_json(os.path.join(smoke_evaluation, "results.json"))["per_network"][0]
  assert sweep["ts"]["ece"] == pytest.approx(evaluated["ts"]["ece"], abs=1e-6)
  assert sweep["raw"]["ece"] == pytest.approx(evaluated["raw"]["ece"], abs=1e-6)
  _, sizes = analyze(tmp_path, "calibration_size", f"--config.analyze.source={smoke_evaluation}")
  assert [row["fraction"] for row in sizes["sizes"]] == [0.1, 0.2, 0.3, 0.4, 0.5]
  assert all(row["images"] == 10 for row in sizes["sizes"])  # 2 images per class: one each at every share


@pytest.mark.slow
def test_svd_spectrum_of_a_distilled_set(tmp_path):
  distilled = str(tmp_path / "distill")
  assert cli("--config=configs/distill.py:method=dm,ipc=2,smoke", workdir=distilled).returncode == 0
  _, results = analyze(tmp_path, "svd_spectrum", f"--config.analyze.source={distilled}")
  curves = results["explained_variance"]
  assert len(curves) == 3 and results["images_per_class"] == 2
  for curve in curves.values():
    assert np.all(np.diff(curve) >= -1e-12) and 0 < curve[0] <= 1 and curve[-1] <= 1 + 1e-9
  assert curves["distilled"][-1] == pytest.approx(1.0)  # 2 images per class: 2 components hold everything


def test_bad_study_and_missing_source_are_one_line(tmp_path):
  assert_one_line_error(cli("--config=configs/analyze.py:smoke,study=umap", "--config.analyze.source=x",
                            workdir=str(tmp_path / "a")), "unknown analyze.study 'umap'")
  assert_one_line_error(cli("--config=configs/analyze.py:smoke", workdir=str(tmp_path / "b")),
                        "analyze needs --config.analyze.source")
  assert not os.path.exists(os.path.join(tmp_path, "b", "config.json"))


@pytest.mark.slow
def test_svd_truncation_retrains_the_evaluate_protocol_and_k0_is_the_evaluation(tmp_path, smoke_evaluation):
  # The same source twice: two curves, each retrained in its own sub-workdirs, identical.
  workdir, results = analyze(tmp_path, "svd_truncation",
                             f"--config.analyze.source={smoke_evaluation}+{smoke_evaluation}",
                             "--config.analyze.truncation_ks=(0,2)")
  first, second = results["sources"]
  assert first["truncation"] == second["truncation"]
  rows = first["truncation"]
  assert [row["k"] for row in rows] == [0, 2] and first["networks"] == 2
  # k = 0 retrains the untouched set with the evaluate run's own protocol and keys: its networks, bit for bit.
  evaluated = read_json(os.path.join(smoke_evaluation, "results.json"))["per_network"]
  np.testing.assert_allclose(rows[0]["per_network"], [n["raw"]["accuracy"] for n in evaluated], rtol=1e-6)
  # k = 2 removes both components of every class (2 images per class): all images are zero.
  assert rows[1]["accuracy"]["mean"] <= 0.2
  assert os.path.isdir(os.path.join(workdir, "truncated_1_k2", "checkpoints"))


@pytest.mark.slow
def test_tsne_of_every_layer_for_both_networks(tmp_path, smoke_evaluation, smoke_teacher):
  workdir, results = analyze(tmp_path, "tsne", f"--config.analyze.source={smoke_evaluation}",
                             f"--config.analyze.reference={smoke_teacher}")
  titles = [f"{model}, {layer}" for model in ("trained on distilled data", "trained on full data")
            for layer in ("block 1", "block 2", "logits")]  # the smoke ConvNet has 2 blocks
  assert list(results["silhouette"]) == titles and all(-1 <= s <= 1 for s in results["silhouette"].values())
  assert results["images"] == 100 and len(results["labels"]) == 100
  assert all(np.asarray(points).shape == (100, 2) for points in results["embeddings"].values())
  assert os.path.exists(os.path.join(workdir, "plots", "tsne.png"))


@pytest.mark.slow
def test_corruption_study_of_a_trained_network(tmp_path, smoke_teacher):
  _, results = analyze(tmp_path, "corruption", f"--config.analyze.source={smoke_teacher}")
  source = read_json(os.path.join(smoke_teacher, "results.json"))
  # Clean: the source run's own test numbers, with the temperatures it fitted.
  assert results["temperatures"]["ts"] == source["ts"]["temperature"]
  assert results["clean"]["raw"]["accuracy"] == pytest.approx(source["raw"]["accuracy"], abs=1e-6)
  assert results["clean"]["ts"]["ece"] == pytest.approx(source["ts"]["ece"], abs=1e-6)
  assert [(r["corruption"], r["severity"]) for r in results["corrupted"]] == [
      ("gaussian_noise", 1), ("gaussian_noise", 5), ("contrast", 1), ("contrast", 5)]
  contrast5 = results["corrupted"][3]
  assert contrast5["raw"]["accuracy"] < results["clean"]["raw"]["accuracy"]  # 15 % contrast hurts
  assert [row["severity"] for row in results["mean_by_severity"]] == [1, 5]
  assert results["mean_by_severity"][1]["mts"]["ece"] == pytest.approx(
      (results["corrupted"][1]["mts"]["ece"] + contrast5["mts"]["ece"]) / 2)
  assert results["test_images"] == source["budget"]["test_examples"]


@pytest.mark.slow
def test_corruption_study_on_a_class_balanced_test_subset(tmp_path, smoke_teacher):
  from calibjax.main import run
  results = run("configs/analyze.py:smoke,study=corruption", str(tmp_path / "subset"),
                {"analyze.source": smoke_teacher, "analyze.corruption_test_images": 20,
                 "analyze.corruptions": ("contrast",), "analyze.severities": (5,)}, quiet=True)
  assert results["test_images"] == 20  # 2 per digit class
  for scored in (results["clean"], results["corrupted"][0]):
    assert 20 * scored["raw"]["accuracy"] == pytest.approx(round(20 * scored["raw"]["accuracy"]), abs=1e-5)


@pytest.mark.slow
def test_corruption_settings_the_data_lack_are_refused_before_any_work(tmp_path, smoke_teacher):
  # The command line as a function: the same checks, the error the CLI prints as its one line.
  from calibjax.errors import ConfigError
  from calibjax.main import run
  for override, message in (({"analyze.corruption_data": "official"}, "official corrupted arrays exist for cifar10 "
                                                                      "and cifar100, not digits"),
                            ({"analyze.corruptions": ("frost",)}, "analyze.corruptions has frost"),
                            ({"analyze.severities": (6,)}, "analyze.severities")):
    with pytest.raises(ConfigError, match=message):
      run("configs/analyze.py:smoke,study=corruption", str(tmp_path / next(iter(override))),
          {"analyze.source": smoke_teacher, **override}, quiet=True)
