"""The `distill` and `evaluate` methods end to end (subprocess CLI runs on scikit-learn's digits), resume after
SIGKILL, herding by hand, and the K-network vmapped training against one network trained alone."""

import os

import jax
import numpy as np
import optax
import pytest

from calibjax import models
from calibjax.data.augment import augment_config, make_batch_transform
from calibjax.data.sampling import herding_indices
from calibjax.distill.synthetic import load_npz
from calibjax.train import schedules
from calibjax.train import step as step_lib
from calibjax.train.ensemble import epoch_batches, make_ensemble_step
from test_cli import assert_one_line_error, cli, cli_processes, kill_after_checkpoint, read_json, read_metrics


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
  """A finished smoke DSA + dynamic-MDT distillation, shared by the evaluate tests."""
  workdir = str(tmp_path_factory.mktemp("distill") / "dsa")
  result = cli("--config=configs/distill.py:method=dsa,ipc=2,mdt=dynamic,smoke", workdir=workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_distill_smoke_writes_the_set_and_its_config(distilled):
  for name in ("config.json", "metrics.jsonl", "results.json", "synthetic.npz", "plots/synthetic.png"):
    assert os.path.exists(os.path.join(distilled, name)), name
  synset, config_json, transforms = load_npz(os.path.join(distilled, "synthetic.npz"))
  assert synset.images.shape == (10 * 2, 8, 8, 1) and np.all(np.isfinite(synset.images))
  np.testing.assert_array_equal(synset.labels, np.repeat(np.arange(10), 2))
  assert '"mdt": "dynamic"' in config_json and "normalize" in transforms
  records = read_metrics(distilled)
  assert [r["iteration"] for r in records] == [1, 2, 3]
  assert all(0.0 <= r["mdt_ratio"] <= 0.1 for r in records) and len({r["mdt_ratio"] for r in records}) > 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dc", "dm"])
def test_distill_smoke_other_methods(tmp_path, method):
  workdir = str(tmp_path / method)
  result = cli(f"--config=configs/distill.py:method={method},ipc=1,mdt=fixed,smoke", workdir=workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert read_json(os.path.join(workdir, "results.json"))["method"] == method
  assert all(r["mdt_ratio"] == pytest.approx(0.1) for r in read_metrics(workdir))


@pytest.mark.slow
def test_two_processes_distil_the_one_process_set(distilled, tmp_path):
  workdir = str(tmp_path / "dsa")
  for result in cli_processes("--config=configs/distill.py:method=dsa,ipc=2,mdt=dynamic,smoke", workdir=workdir):
    assert result.returncode == 0, result.stderr[-3000:]
  expected, _, _ = load_npz(os.path.join(distilled, "synthetic.npz"))
  got, _, _ = load_npz(os.path.join(workdir, "synthetic.npz"))
  other, _, _ = load_npz(os.path.join(workdir, "process_1", "synthetic.npz"))
  np.testing.assert_array_equal(other.images, got.images)
  # Each process draws the same real batches and computes half of each; the gradient sums change order.
  np.testing.assert_allclose(got.images, expected.images, rtol=1e-5, atol=1e-5)
  assert read_json(os.path.join(workdir, "results.json"))["budget"]["devices"] == 2


@pytest.mark.slow
def test_killed_distillation_resumes_to_the_same_set(tmp_path):
  args = ["--config=configs/distill.py:method=dc,ipc=1,smoke,iterations=12"]
  reference = str(tmp_path / "uninterrupted")
  assert cli(*args, workdir=reference).returncode == 0

  resumed = str(tmp_path / "killed")
  kill_after_checkpoint(args, workdir=resumed, step=4)
  assert not os.path.exists(os.path.join(resumed, "synthetic.npz")), "the run finished before it was killed"

  result = cli(*args, workdir=resumed)
  assert result.returncode == 0, result.stderr[-3000:]
  expected, _, _ = load_npz(os.path.join(reference, "synthetic.npz"))
  got, _, _ = load_npz(os.path.join(resumed, "synthetic.npz"))
  np.testing.assert_array_equal(got.images, expected.images)
  strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
  assert strip(read_metrics(resumed)) == strip(read_metrics(reference))


def evaluate_distilled(distilled, workdir, devices=1):
  result = cli("--config=configs/evaluate.py:smoke", f"--config.evaluate.source={distilled}", workdir=workdir,
               devices=devices)
  assert result.returncode == 0, result.stderr[-3000:]
  return read_json(os.path.join(workdir, "results.json"))


@pytest.fixture(scope="module")
def evaluated(distilled, tmp_path_factory):
  """The smoke evaluation (2 networks) of the `distilled` set on one device."""
  return evaluate_distilled(distilled, str(tmp_path_factory.mktemp("evaluate") / "eval"))


@pytest.mark.slow
def test_evaluate_on_four_devices_splits_the_networks_and_reports_what_one_device_does(distilled, evaluated,
                                                                                      tmp_path):
  results = evaluate_distilled(distilled, str(tmp_path / "eval"), devices=4)
  assert results["budget"]["devices_training"] == 2 and evaluated["budget"]["devices_training"] == 1
  for got, expected in zip(results["per_network"], evaluated["per_network"], strict=True):
    for stage in ("raw", "ts", "mts"):
      assert got[stage]["accuracy"] == expected[stage]["accuracy"]
      assert got[stage]["ece"] == pytest.approx(expected[stage]["ece"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_evaluate_a_distilled_set(evaluated):
  results = evaluated
  assert results["training_set"]["method"] == "dsa" and results["training_set"]["mdt"] == "dynamic"
  assert len(results["per_network"]) == 2 and results["budget"]["epochs"] == 5
  # The two networks start from different seeds, so they differ.
  nets = results["per_network"]
  assert nets[0]["raw"]["nll"] != nets[1]["raw"]["nll"]
  summary = results["summary"]
  for stage in ("raw", "ts", "mts"):
    for metric in ("ece_10", "aurc", "set_size"):  # set_size: the conformal sets, fitted where TS is
      values = [n[stage][metric] for n in nets]
      assert summary[stage][metric]["mean"] == pytest.approx(np.mean(values))
      assert summary[stage][metric]["std"] == pytest.approx(np.std(values))
      # Two networks: a quarter of the resamples repeat each one, so the 95 % interval spans exactly both.
      assert summary[stage][metric]["ci95"] == [min(values), max(values)]
    assert summary[stage]["accuracy"]["mean"] == summary["raw"]["accuracy"]["mean"]
  for stage in ("ts", "mts"):
    expected = np.mean([n[stage]["over_calibrated"] for n in nets])
    assert summary[stage]["over_calibrated_fraction"] == pytest.approx(expected)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["baseline=random,fit_on=held_out_real",
                                    "baseline=random,loss=focal,mixing=mixup,dsa=False"])
def test_evaluate_baselines_and_train_time_calibration(tmp_path, preset, smoke_evaluation):
  workdir = str(tmp_path / "eval")
  result = cli(f"--config=configs/evaluate.py:smoke,{preset}", workdir=workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  results = read_json(os.path.join(workdir, "results.json"))
  assert results["training_set"]["method"] == "random" and results["budget"]["train_examples"] == 20
  if "fit_on=held_out_real" in preset:
    # The shared smoke evaluation is this run with fit_on=distilled_split and also_fit_on=held_out_real+...: its
    # held_out_real entry is this run's calibration, bit for bit, from networks it trained once.
    also = read_json(os.path.join(smoke_evaluation, "results.json"))["also_fitted_on"]["held_out_real"]
    for key in ("calibration_data", "summary", "per_network"):
      assert also[key] == results[key], key


@pytest.mark.parametrize("args, fragments", [
    (["--config=configs/evaluate.py:smoke"], ["exactly one of evaluate.source"]),
    (["--config=configs/evaluate.py:smoke", "--config.evaluate.source=/nonexistent"], ["no synthetic set"]),
    (["--config=configs/evaluate.py:smoke,baseline=herding"], ["herding needs evaluate.herding_model"]),
    (["--config=configs/evaluate.py:smoke,baseline=random,also_fit_on=held_out_real+distilled_split"],
     ["evaluate.also_fit_on repeats", "list each place"]),
    (["--config=configs/evaluate.py:smoke,baseline=random,also_fit_on=held_out_real",
      "--config.calibration.split_in_training=False"], ["different networks", "separate runs"]),
    (["--config=configs/evaluate.py:smoke,baseline=random,also_fit_on=validation"],
     ["evaluate.also_fit_on: 'validation' is not one of"]),
    (["--config=configs/evaluate.py:smoke,baseline=random,also_fit_on=distilled_split@test_reference@test"],
     ["evaluate.also_fit_on: 'distilled_split@test_reference@test' is not one of", "followed by @"]),
    (["--config=configs/distill.py:method=kip"], ["unknown distillation method 'kip'"]),
    (["--config=configs/distill.py:method=dc,ipc=7,budget=cpu"], ["no CPU budget"]),
])
def test_bad_distill_and_evaluate_input(tmp_path, args, fragments):
  assert_one_line_error(cli(*args, workdir=str(tmp_path / "run")), *fragments)


def test_herding_picks_the_running_mean_closest_to_the_class_mean():
  # Class 0 features 0, 10, 4, 6 (mean 5): first 4 (|4 - 5| = 1, ties go to the lower index), then 6 ((4 + 6) / 2
  # = 5). Class 1 features 1, 2, 3: first 2, then 1 and 3 tie at distance 0.5 and the lower index wins.
  features = np.array([[0.0], [10.0], [1.0], [4.0], [2.0], [6.0], [3.0]])
  labels = np.array([0, 0, 1, 0, 1, 0, 1])
  picks = herding_indices(features, labels, per_class=2, num_classes=2)
  np.testing.assert_array_equal(picks, [3, 5, 4, 2])


def test_vmapped_networks_train_as_if_alone():
  """Network k of a K-network evaluation equals the same network trained in a 1-network evaluation."""
  augment = augment_config()
  augment.dsa = True
  augment.dsa_strategy = "crop_flip"
  schedule = schedules.make_schedule("multistep", base_lr=0.05, epochs=5, steps_per_epoch=2, milestones=(3,))
  tx = schedules.make_optimizer(lr_schedule=schedule, momentum=0.9, weight_decay=5e-4)
  ce = step_lib.label_loss(lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
  net = models.build("convnet", num_classes=3, input_shape=(8, 8, 1), width=8, depth=1)
  images = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))
  labels = np.array([0, 0, 1, 1, 2, 2])
  init_keys, step_keys, perm_keys = (jax.random.split(jax.random.key(i), 2) for i in range(3))

  def train(sel):
    init, step = make_ensemble_step(net, ce, tx, batch_transform=make_batch_transform(augment, num_classes=3,
                                                                                       data_transforms={}))
    states = init(init_keys[sel])
    for epoch in range(5):
      for idx in epoch_batches(perm_keys[sel], epoch, 6, 4):
        states, _ = step(states, step_keys[sel], idx, images, labels)
    return states

  both, second = train(np.array([0, 1])), train(np.array([1]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[1], b[0], rtol=1e-5, atol=1e-6), both["params"],
               second["params"])
  assert not np.allclose(jax.tree.leaves(both["params"])[0][0], jax.tree.leaves(both["params"])[0][1])


@pytest.mark.slow
def test_buffer_then_mtt_then_evaluate_with_the_learned_lr(tmp_path):
  buffer_dir, distill_dir = str(tmp_path / "buffer"), str(tmp_path / "mtt")
  result = cli("--config=configs/buffer.py:smoke", workdir=buffer_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  result = cli("--config=configs/distill.py:method=mtt,ipc=1,mdt=fixed,smoke",
               f"--config.distill.mtt.buffer_dir={buffer_dir}", workdir=distill_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  learned = read_json(os.path.join(distill_dir, "results.json"))["learned_lr"]
  assert learned > 0 and learned != pytest.approx(0.01, rel=1e-9)
  result = cli("--config=configs/evaluate.py:smoke,learned_lr=True", f"--config.evaluate.source={distill_dir}",
               workdir=str(tmp_path / "eval"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert read_json(os.path.join(tmp_path, "eval", "results.json"))["budget"]["lr"] == pytest.approx(learned)


def test_evaluation_schedule_is_the_references_by_default():
  """evaluate_synset decays the lr once after its pass Epoch//2 + 1 (0-based) and builds a new SGD there."""
  from configs import evaluate as evaluate_config
  cpu = evaluate_config.get_config("budget=cpu").train
  assert (cpu.epochs, cpu.milestones, cpu.momentum_restarts, cpu.lr, cpu.momentum, cpu.weight_decay) == (
      301, (152,), True, 0.01, 0.9, 5e-4)
  previous = evaluate_config.get_config("budget=cpu,schedule=decay_at_half").train
  assert (previous.milestones, previous.momentum_restarts) == ((151,), False)
  assert evaluate_config.get_config("").train.milestones == (502,)
