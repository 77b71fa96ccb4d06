"""Method `kd` end to end through the command line, and its batch transform / loss as units.

The CLI cases share the session's smoke teacher (conftest.py: configs/train.py:smoke, a width-16 ConvNet on
digits).
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from calibjax import models
from calibjax.data.augment import augment_config
from calibjax.errors import ConfigError
from calibjax.build import check_input_space
from calibjax.kd import losses as kd_losses
from calibjax.kd.objective import logit_loss, make_kd_batch_transform, make_kd_objective, make_teacher_apply
from calibjax.runs.kd import teacher_temperature

from test_cli import cli, read_json


def check_results(workdir, teacher_dir):
  results = read_json(os.path.join(workdir, "results.json"))
  for name in ("raw", "ts", "mts"):
    assert 0.0 <= results[name]["ece"] <= 1.0 and results[name]["nll"] > 0
  assert results["raw"]["accuracy"] == results["ts"]["accuracy"] == results["mts"]["accuracy"]
  assert results["raw"]["accuracy"] > 0.2  # well above chance (0.1) on digits after 2 epochs
  best = results["best_epoch"]
  assert best["headline"] == "last_epoch" and best["last_epoch"] == 2 and best["epoch"] in (1, 2)
  assert best["val_accuracy"] >= best["last_val_accuracy"]
  assert results["teacher"]["workdir"] == os.path.abspath(teacher_dir)
  assert results["budget"]["epochs"] == 2
  return results


@pytest.mark.slow
def test_kd_then_scaled_kd_mixup_from_the_kd_student(tmp_path, smoke_teacher):
  teacher = smoke_teacher
  gen1 = str(tmp_path / "gen1")
  # KD(C) from a temperature-scaled teacher: its logits are divided by the T its own run fitted.
  result = cli(f"--config=configs/kd.py:smoke,recipe=self,loss=kd,teacher_cal=ts,teacher={teacher}",
               workdir=gen1)
  assert result.returncode == 0, result.stderr[-3000:]
  recorded = check_results(gen1, teacher)["teacher"]
  assert recorded["method"] == "train" and recorded["calibration"] == "ts"
  assert recorded["calibration_temperature"] == read_json(os.path.join(teacher, "results.json"))["ts"]["temperature"]

  # A kd run as teacher (generation 2 of iterative self-distillation): the batch-norm resnet8 above teaches,
  # here with paper 004's recipe (scaled KD on originals + mixup on the student); a ConvNet student compiles
  # faster.
  gen2 = str(tmp_path / "gen2")
  result = cli(f"--config=configs/kd.py:smoke,recipe=aug,mixing=mixup,student=convnet,teacher={gen1}",
               workdir=gen2)
  assert result.returncode == 0, result.stderr[-3000:]
  results = check_results(gen2, gen1)
  assert results["teacher"]["method"] == "kd" and results["teacher"]["model"] == "resnet8"
  config = read_json(os.path.join(gen2, "config.json"))
  assert config["kd"]["loss"] == "scaled_kd" and config["kd"]["temperature"] == 50.0
  assert config["augment"]["mixing"] == "mixup" and config["augment"]["mixup_alpha"] == 0.4


@pytest.mark.slow
@pytest.mark.parametrize("presets, flags, loss, mixing", [
    ("recipe=kd_c,teacher_cal=mts", (), "cxkd", "none"),
    ("recipe=reverse", (), "kd", "none"),
    ("recipe=aug,mixing=cutout", ("--config.augment.crop_flip=True", "--config.augment.crop_padding=1"), "scaled_kd",
     "cutout"),
    ("recipe=kd_uc,loss=rkd", (), "rkd", "none"),
])
def test_every_recipe_runs_from_the_cli(tmp_path, smoke_teacher, presets, flags, loss, mixing):
  """The recipes not run above, each with its own loss and mixing (a ConvNet student: the fastest compile).
  kd_uc is kd_c's code path with another teacher; CutMix's soft targets take mixup's path (run above), cutout's
  integer labels their own; paper 004's cutout recipe also with crop + flip (1 pixel of padding on 8-pixel digits,
  as 4 on 32-pixel CIFAR)."""
  teacher = smoke_teacher
  workdir = str(tmp_path / "student")
  result = cli(f"--config=configs/kd.py:smoke,student=convnet,{presets},teacher={teacher}", *flags,
               workdir=workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  results = check_results(workdir, teacher)
  config = read_json(os.path.join(workdir, "config.json"))
  assert (config["kd"]["loss"], config["augment"]["mixing"]) == (loss, mixing)
  assert config["augment"]["crop_flip"] == bool(flags)
  if "teacher_cal=mts" in presets:
    assert results["teacher"]["calibration_temperature"] == read_json(
        os.path.join(teacher, "results.json"))["mts"]["temperature"]


@pytest.mark.parametrize("teacher_arg", ["does/not/exist", ""])
def test_bad_teacher_path_is_one_line_error(tmp_path, teacher_arg):
  result = cli(f"--config=configs/kd.py:smoke,teacher={teacher_arg}", workdir=str(tmp_path / "bad"))
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and "kd.teacher" in lines[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_teacher_calibration_errors_are_one_line():
  with pytest.raises(ConfigError, match="kd.teacher_calibration must be"):
    teacher_temperature({"ts": {"temperature": 2.0}}, "platt")
  with pytest.raises(ConfigError, match="results.json"):
    teacher_temperature(None, "mts")  # a teacher without results.json
  assert teacher_temperature(None, "none") == 1.0
  assert teacher_temperature({"ts": {"temperature": 2.0}}, "ts") == 2.0


def test_teacher_apply_divides_by_the_calibration_temperature():
  net = models.build("convnet", num_classes=3, input_shape=(8, 8, 1), width=4, depth=1)
  variables = net.init(jax.random.key(0))
  state = {"params": variables[0], "model_state": variables[1]}
  images = jax.random.normal(jax.random.key(1), (5, 8, 8, 1))
  plain = make_teacher_apply(net, state, temperature=1.0)(images)
  np.testing.assert_allclose(make_teacher_apply(net, state, temperature=2.5)(images), plain / 2.5, rtol=1e-6)


def _linear_teacher(key, num_classes):
  weights = jax.random.normal(key, (8 * 8 * 1, num_classes))
  return lambda images: images.reshape(images.shape[0], -1) @ weights


@pytest.mark.parametrize("mixing", ["cutout", "mixup"])
def test_teacher_sees_original_images(mixing):
  num_classes, batch = 10, 8
  key_t, key_x, key_y, key_step = jax.random.split(jax.random.key(0), 4)
  teacher = _linear_teacher(key_t, num_classes)
  images = jax.random.uniform(key_x, (batch, 8, 8, 1)) + 0.5  # no zeros, so a cutout hole is visible
  labels = jax.random.randint(key_y, (batch,), 0, num_classes)
  cfg = augment_config()
  cfg.mixing, cfg.cutout_size = mixing, 4
  out = jax.jit(make_kd_batch_transform(teacher, cfg, num_classes=num_classes, data_transforms={}))(
      key_step, {"images": images, "labels": labels})

  assert out["images"].shape == (2 * batch, 8, 8, 1) and out["labels"].shape == (2 * batch, num_classes)
  np.testing.assert_array_equal(out["images"][:batch], images)
  assert not np.allclose(out["images"][batch:], images)  # the student's second half is augmented
  # The teacher's outputs are a field of their own, of the original images only; the labels are targets.
  np.testing.assert_allclose(out["teacher_log_probs"], jax.nn.log_softmax(teacher(images), -1), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(out["labels"][:batch], jax.nn.one_hot(labels, num_classes))
  np.testing.assert_allclose(out["labels"].sum(-1), 1.0, rtol=1e-6)


def test_teacher_and_student_see_the_same_crop_and_flip():
  """With crop + flip and mixup, the originals both networks see are the cropped / flipped images; the student's
  mixed copy mixes those, not the raw ones."""
  num_classes, batch = 10, 8
  key_t, key_x, key_y, key_step = jax.random.split(jax.random.key(3), 4)
  teacher = _linear_teacher(key_t, num_classes)
  images = jax.random.uniform(key_x, (batch, 8, 8, 1)) + 0.5
  labels = jax.random.randint(key_y, (batch,), 0, num_classes)
  cfg = augment_config()
  cfg.mixing, cfg.crop_flip, cfg.crop_padding, cfg.mixup_alpha = "mixup", True, 2, 0.4
  out = jax.jit(make_kd_batch_transform(teacher, cfg, num_classes=num_classes, data_transforms={}))(
      key_step, {"images": images, "labels": labels})
  originals = out["images"][:batch]
  assert not np.allclose(originals, images)
  assert np.all((np.asarray(originals) == 0) | (np.asarray(originals) >= 0.5))  # pixels or black padding
  np.testing.assert_allclose(out["teacher_log_probs"], jax.nn.log_softmax(teacher(originals), -1), rtol=1e-5,
                             atol=1e-5)
  # Each mixed image is a convex combination of two originals: its padding (0) only where an original has it.
  assert np.all(np.asarray(out["images"][batch:]) >= 0) and not np.allclose(out["images"][batch:], originals)


def test_kd_loss_split_matches_hand_formula():
  num_classes, batch = 5, 4
  key_s, key_t = jax.random.split(jax.random.key(1))
  student = jax.random.normal(key_s, (2 * batch, num_classes))
  teacher = jax.nn.log_softmax(3.0 * jax.random.normal(key_t, (batch, num_classes)), -1)
  onehot = jax.nn.one_hot(jnp.arange(batch) % num_classes, num_classes)
  soft = 0.7 * onehot + 0.3 * jnp.roll(onehot, 1, axis=0)
  batch_fields = {"labels": jnp.concatenate([onehot, soft]), "teacher_log_probs": teacher}
  cfg = ml_collections.ConfigDict({"loss": "scaled_kd", "alpha": 0.5, "temperature": 50.0})
  value = logit_loss(cfg, mixing="mixup")(student, batch_fields)

  def kl(s, t, temp):  # numpy reference: per-sample KL(softmax(t/T) || softmax(s/T))
    log_s = np.asarray(jax.nn.log_softmax(s / temp, -1), np.float64)
    log_t = np.asarray(jax.nn.log_softmax(t / temp, -1), np.float64)
    return np.sum(np.exp(log_t) * (log_t - log_s), -1)

  distill = 2 * 50.0**2 * np.mean(kl(student[:batch], teacher, 50.0)) / num_classes  # Eq. 12: both sources
  log_p = np.asarray(jax.nn.log_softmax(student[batch:], -1), np.float64)
  task = -np.mean(np.sum(np.asarray(soft) * log_p, -1))
  np.testing.assert_allclose(value, 0.5 * distill + 0.5 * task, rtol=1e-5)

  # Student = teacher (as logits) and alpha = 1: zero loss; no mixing uses every row for both terms.
  same = {"labels": onehot, "teacher_log_probs": teacher}
  for loss in ("kd", "scaled_kd", "cxkd"):
    cfg = ml_collections.ConfigDict({"loss": loss, "alpha": 1.0, "temperature": 4.0})
    assert abs(float(logit_loss(cfg, mixing="none")(teacher + 7.0, same))) < 1e-5


def test_teacher_with_other_data_settings_is_refused():
  student = ml_collections.ConfigDict({"name": "digits", "normalize": "dataset", "zca": False, "zca_eps": 0.1})
  check_input_space(student, ml_collections.ConfigDict(dict(student)), role="the teacher")
  with pytest.raises(ConfigError, match="data.zca=True"):
    check_input_space(student, ml_collections.ConfigDict(dict(student, zca=True)), role="the teacher")


def test_train_protocol_kd_matches_the_kd_students_protocol():
  """Teachers and directly trained students (configs/train.py protocol=kd) get the KD student's recipe."""
  from configs import kd as kd_config
  from configs import train as train_config
  for dataset, model in (("fashion_mnist", "wrn_16_2"), ("cifar100", "resnet8x4"), ("cifar100", "shufflev1")):
    student = kd_config.get_config(f"teacher=t,dataset={dataset},student={model},epochs=24")
    direct = train_config.get_config(f"protocol=kd,dataset={dataset},model={model},epochs=24")
    assert direct.train.to_dict() == student.train.to_dict()
    assert direct.data.to_dict() == student.data.to_dict()
  assert direct.train.lr == 0.01 and direct.train.milestones == (15, 18, 21)  # shufflev1: RepDistiller's lr
  fmnist = train_config.get_config("protocol=kd,model=wrn_40_2")
  assert (fmnist.train.epochs, fmnist.train.batch_size, fmnist.data.train_per_class) == (15, 128, 1000)
  # A few epochs: the scaled milestones that round onto the last epoch are dropped (a valid schedule).
  assert [train_config.get_config(f"protocol=kd,epochs={e}").train.milestones for e in (1, 3, 4, 5)] == [
      (), (2, 2), (2, 3), (3, 4, 4)]
  assert train_config.get_config("").train.to_dict() == {  # protocol=dd, the default, is unchanged
      "epochs": 20, "batch_size": 256, "lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4,
      "schedule": "half", "milestones": (), "checkpoint_every_epochs": 1, "validate_each_epoch": True}
  with pytest.raises(ConfigError, match="protocol"):
    train_config.get_config("protocol=repdistiller")


def test_rkd_objective_is_ce_plus_weighted_relational_distillation():
  """kd.loss=rkd (RepDistiller's -r 1 -a 0 -b 1): CE + weight · RKD(student features, teacher features) on the
  original rows, through the objective a kd run trains with."""
  student = models.build("convnet", num_classes=3, input_shape=(8, 8, 1), width=4, depth=1)
  images = np.asarray(jax.random.normal(jax.random.key(2), (6, 8, 8, 1)), np.float32)
  labels = np.arange(6) % 3
  cfg = ml_collections.ConfigDict({"loss": "rkd", "alpha": 0.0, "temperature": 4.0, "rkd": {
      "weight": 2.0, "distance_weight": 25.0, "angle_weight": 50.0}})
  objective = make_kd_objective(cfg, mixing="none", key=jax.random.key(0), net=student,
                                teacher_apply=None, train_images=images, train_labels=labels)
  assert objective.uses_features and not objective.uses_indices and not jax.tree.leaves(objective.params)
  logits, features = jax.random.normal(jax.random.key(3), (6, 3)), jax.random.normal(jax.random.key(4), (6, 5))
  teacher_features = jax.random.normal(jax.random.key(5), (6, 7))
  batch = {"labels": jax.nn.one_hot(labels, 3), "teacher_log_probs": jax.nn.log_softmax(logits + 1.0, -1),
           "teacher_features": teacher_features}
  loss, state = objective.fn(objective.params, objective.state, logits=logits, features=features, batch=batch,
                             key=jax.random.key(6))
  ce = -np.mean(np.sum(np.asarray(batch["labels"]) * np.asarray(jax.nn.log_softmax(logits, -1)), -1))
  relational = kd_losses.rkd_loss(student_embeddings=features, teacher_embeddings=teacher_features)
  np.testing.assert_allclose(loss, ce + 2.0 * relational, rtol=1e-5)
  assert state == {}
