"""Every numeric config value's allowed range, and the names that can be known before a run starts, checked in
one place when the command line is parsed (`check_values`, called by `calibjax.main` before any data is loaded).

A rule is keyed by a dotted config path; cadences (`log_every_epochs`, `checkpoint_every_iterations`, ...) are
matched by their name in any block. A value outside its rule fails with one line naming the key, the value and
what is allowed. Every float anywhere in a config must also be finite. Values that depend on the data (a batch
larger than the training split) are checked as soon as the data is loaded (`calibjax.build.steps_per_epoch`).
"""

import importlib
import math
from typing import Any, Callable, NamedTuple

import ml_collections

from calibjax.errors import ConfigError


class Rule(NamedTuple):
  allowed: str  # what the error message says is allowed
  holds: Callable[[Any], bool]


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


POSITIVE_INT = Rule("a positive integer", lambda v: _int(v) and v >= 1)
NON_NEGATIVE_INT = Rule("an integer ≥ 0", lambda v: _int(v) and v >= 0)
POSITIVE = Rule("a number > 0", lambda v: _number(v) and v > 0)
NON_NEGATIVE = Rule("a number ≥ 0", lambda v: _number(v) and v >= 0)
UNIT_OPEN = Rule("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1)
UNIT_CLOSED = Rule("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1)
FRACTION = Rule("a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1)


def each(rule: Rule, *, non_empty: bool = True) -> Rule:
  """A rule for a tuple whose every entry obeys `rule`."""
  return Rule(f"a {'non-empty ' if non_empty else ''}tuple whose every entry is {rule.allowed}",
              lambda v: isinstance(v, (tuple, list)) and (len(v) > 0 or not non_empty)
              and all(rule.holds(x) for x in v))


def one_of(*names: str) -> Rule:
  return Rule(f"one of {', '.join(repr(n) for n in names)}", lambda v: v in names)


def _dataset_or_empty() -> Rule:
  from calibjax.data.sources import DATASETS  # Imported here: the registry loads the data modules.
  names = tuple(DATASETS.names())
  return Rule(f"'' (none) or a dataset: {', '.join(names)}", lambda v: v == "" or v in names)


def _names_of(module: str, attribute: str) -> Callable[[], Rule]:
  """A rule, built when first needed, that accepts the names in `module.attribute` (the tuple the code that reads
  the key checks against, so the two cannot drift apart)."""
  return lambda: one_of(*getattr(importlib.import_module(module), attribute))


RULES: dict[str, Rule | Callable[[], Rule]] = {
    "seed": NON_NEGATIVE_INT,
    "num_processes": NON_NEGATIVE_INT,
    "process_id": Rule("-1 (detected) or an integer ≥ 0", lambda v: _int(v) and v >= -1),
    "eval_batch_size": POSITIVE_INT,
    "data.train_per_class": NON_NEGATIVE_INT,
    "data.val_per_class": NON_NEGATIVE_INT,
    "data.zca_eps": POSITIVE,
    "model.width": POSITIVE_INT,
    "model.depth": POSITIVE_INT,
    "train.epochs": POSITIVE_INT,
    "train.batch_size": POSITIVE_INT,
    "train.lr": POSITIVE,
    "train.momentum": UNIT_OPEN,
    "train.weight_decay": NON_NEGATIVE,
    "train.milestones": each(POSITIVE_INT, non_empty=False),
    "augment.mixup_alpha": POSITIVE,
    "augment.cutmix_alpha": POSITIVE,
    "augment.cutmix_prob": UNIT_CLOSED,
    # A fraction of the image side, or (a whole number ≥ 1) pixels: augment_config's two meanings.
    "augment.cutout_size": Rule("a fraction of the image side in (0, 1] or a whole number of pixels",
                                lambda v: _number(v) and (0 < v <= 1 or float(v).is_integer() and v >= 1)),
    "augment.crop_padding": NON_NEGATIVE_INT,
    "calibration.n_bins": POSITIVE_INT,
    "calibration.mts_ratios": each(Rule("a number in (0, 1)", lambda v: _number(v) and 0 < v < 1)),
    "calibration.split_fraction": FRACTION,
    "calibration.ts_method": _names_of("calibjax.calibration.posthoc.temperature", "TS_METHODS"),
    "calibration.fit_on": _names_of("calibjax.build", "FIT_ON"),
    "calibration.mts_selection": _names_of("calibjax.calibration.report", "MTS_SELECTIONS"),
    "calibration.mts_target": _names_of("calibjax.calibration.posthoc.temperature", "MASK_TARGETS"),
    "calibration.mts_granularity": _names_of("calibjax.masks", "GRANULARITIES"),
    "calibration.conformal_alpha": Rule("a number in (0, 1)", lambda v: _number(v) and 0 < v < 1),
    "calibration.conformal_method": _names_of("calibjax.calibration.conformal", "METHODS"),
    "evaluate.num_nets": POSITIVE_INT,
    "evaluate.ipc": POSITIVE_INT,
    "evaluate.val_per_class": NON_NEGATIVE_INT,
    "distill.ipc": POSITIVE_INT,
    "distill.iterations": POSITIVE_INT,
    "distill.batch_real": POSITIVE_INT,
    "distill.batch_train": POSITIVE_INT,
    "distill.lr_img": POSITIVE,
    "distill.lr_net": POSITIVE,
    "distill.momentum": UNIT_OPEN,
    "distill.mdt_ratio": UNIT_OPEN,
    "distill.outer_loop": NON_NEGATIVE_INT,
    "distill.inner_loop": NON_NEGATIVE_INT,
    "distill.class_chunk": NON_NEGATIVE_INT,
    "distill.mtt.syn_steps": POSITIVE_INT,
    "distill.mtt.expert_epochs": POSITIVE_INT,
    "distill.mtt.max_start_epoch": POSITIVE_INT,
    "distill.mtt.lr_lr": NON_NEGATIVE,
    "distill.mtt.lr_teacher": POSITIVE,
    "distill.mtt.batch_syn": NON_NEGATIVE_INT,
    "distill.mtt.max_experts": NON_NEGATIVE_INT,
    "buffer.experts": POSITIVE_INT,
    "kd.temperature": POSITIVE,
    "kd.alpha": UNIT_CLOSED,
    "calibrate.network": NON_NEGATIVE_INT,
    "calibrate.ood_noise_sigmas": each(NON_NEGATIVE, non_empty=False),
    "calibrate.ood_dataset": _dataset_or_empty,
    "analyze.network": NON_NEGATIVE_INT,
    "analyze.mask_ratios": each(UNIT_OPEN),
    "analyze.ood_noise_sigmas": each(NON_NEGATIVE, non_empty=False),
    "analyze.ood_dataset": _dataset_or_empty,
    "analyze.split_fractions": each(FRACTION),
    "analyze.full_class_images": POSITIVE_INT,
    "analyze.truncation_ks": each(NON_NEGATIVE_INT),
    "analyze.tsne_images": Rule("an integer ≥ 4", lambda v: _int(v) and v >= 4),
    "analyze.severities": each(Rule("a severity 1 ... 5", lambda v: _int(v) and 1 <= v <= 5)),
    "analyze.corruption_test_images": NON_NEGATIVE_INT,
}
# Cadences (`log_every_epochs`, `checkpoint_every_iterations`, ...) in any block.
CADENCE_PREFIXES = ("log_every_", "checkpoint_every_")


def _rule(path: str) -> Rule | None:
  rule = RULES.get(path)
  if rule is None and path.rsplit(".", 1)[-1].startswith(CADENCE_PREFIXES):
    rule = POSITIVE_INT
  return rule() if callable(rule) and not isinstance(rule, Rule) else rule


def _leaves(tree: dict, prefix: str = ""):
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      yield from _leaves(value, path + ".")
    else:
      yield path, value


def check_values(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` (one line) for the first value outside its rule, or any non-finite float."""
  for path, value in _leaves(config):
    floats = value if isinstance(value, (tuple, list)) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in floats):
      raise ConfigError(f"{path} = {value!r} is not finite; give a finite number")
    rule = _rule(path)
    if rule is not None and not rule.holds(value):
      raise ConfigError(f"{path} = {value!r} is not allowed: it must be {rule.allowed}")
  train = config.get("train")
  if train is not None and train.get("schedule") == "multistep" and "epochs" in train:
    outside = [m for m in train.get("milestones", ()) if not 0 < m < train.epochs]
    if outside:  # the multistep schedule's own rule, known before any data is loaded
      raise ConfigError(f"train.milestones {tuple(train.milestones)} must lie strictly between 0 and train.epochs = "
                        f"{train.epochs}; change --config.train.milestones or --config.train.epochs")
