"""Parse-time value rules (calibjax.config_check): every shipped config and preset obeys them; each kind of rule
refuses what it should, in one line naming the key, the value and what is allowed."""

import importlib.util
import os

import ml_collections
import pytest

from calibjax import config_check
from calibjax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {
    "train": ["", "smoke", "protocol=kd", "protocol=kd,smoke", "dataset=cifar10,model=resnet8x4"],
    "quickstart": ["", "smoke"], "evaluate": ["", "smoke", "budget=cpu", "budget=cpu,smoke"],
    "distill": [f"method={m},ipc={i},budget={b}{s}" for m in ("dc", "dsa", "dm", "mtt") for i in (1, 10)
                for b in ("cpu", "paper") for s in ("", ",smoke")],
    "kd": ["", "smoke", "dataset=fashion_mnist"], "buffer": ["", "smoke"], "calibrate": ["", "smoke"],
    "analyze": ["", "smoke"]}


def _config(name, arg):
  spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name, arg", [(n, a) for n, args in PRESETS.items() for a in args])
def test_every_shipped_config_obeys_the_rules(name, arg):
  config_check.check_values(_config(name, arg))


def test_every_value_the_code_accepts_passes():
  # the name rules are the tuples the reading code checks against: its non-default values pass too
  config_check.check_values(ml_collections.ConfigDict({"calibration": {
      "mts_target": "logits", "mts_granularity": "pixel", "ts_method": "lbfgs_reference",
      "mts_selection": "test_reference", "fit_on": "distilled_full"}}))
  for cutout_size in (0.5, 1, 16):  # a fraction of the side, or pixels
    config_check.check_values(ml_collections.ConfigDict({"augment": {"cutout_size": cutout_size}}))


@pytest.mark.parametrize("key, value, message", [
    ("train.epochs", 0, "train.epochs = 0 is not allowed: it must be a positive integer"),
    ("train.epochs", True, "train.epochs = True is not allowed"),
    ("train.lr", 0.0, "train.lr = 0.0 is not allowed: it must be a number > 0"),
    ("train.weight_decay", -1e-4, "it must be a number ≥ 0"),
    ("distill.mdt_ratio", 1.0, "it must be a number in [0, 1)"),
    ("calibration.split_fraction", 0.0, "it must be a number in (0, 1]"),
    ("calibration.mts_ratios", (), "a non-empty tuple whose every entry is a number in (0, 1)"),
    ("calibration.fit_on", "test", "one of 'held_out_real', 'distilled_split', 'distilled_full'"),
    ("calibration.mts_target", "logit", "one of 'input', 'logits'"),
    ("distill.checkpoint_every_iterations", 0, "distill.checkpoint_every_iterations = 0"),
    ("kd.temperature", float("inf"), "kd.temperature = inf is not finite"),
    ("analyze.ood_dataset", "svhn_typo", "'' (none) or a dataset"),
    ("augment.cutout_size", 2.5, "a fraction of the image side in (0, 1] or a whole number of pixels"),
    ("augment.crop_padding", -1, "augment.crop_padding = -1 is not allowed: it must be an integer ≥ 0"),
    ("analyze.corruption_test_images", -1, "it must be an integer ≥ 0"),
])
def test_a_value_outside_its_rule_is_refused_in_one_line(key, value, message):
  block, leaf = key.rsplit(".", 1)
  config = ml_collections.ConfigDict({block: {leaf: value}})
  with pytest.raises(ConfigError, match=None) as error:
    config_check.check_values(config)
  assert message in str(error.value) and "\n" not in str(error.value)


def test_multistep_milestones_outside_the_epochs_are_refused_before_any_data():
  train = {"epochs": 3, "schedule": "multistep", "milestones": (152,)}
  with pytest.raises(ConfigError, match=r"train.milestones \(152,\) must lie strictly between 0 and train.epochs = 3"):
    config_check.check_values(ml_collections.ConfigDict({"train": train}))
  config_check.check_values(ml_collections.ConfigDict({"train": {**train, "milestones": (2,)}}))
  config_check.check_values(ml_collections.ConfigDict({"train": {**train, "schedule": "half"}}))  # its own
