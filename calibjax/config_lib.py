"""Helpers for config files (configs/*.py): typed `:preset` arguments, the shared blocks and smoke settings.

Every method reads a fixed set of top-level blocks (`METHOD_BLOCKS`); its config has those and no others
(`check_blocks`, run before any work), so no setting sits in a config where nothing reads it. Cadences carry
their unit in the key's name (`checkpoint_every_epochs`, `log_every_iterations`).

A config file's `get_config(arg)` receives the text after ':' in `--config configs/x.py:arg`. `parse_arg` turns
`"dataset=cifar10,ipc=10,smoke"` into typed values: `key=value` pairs are converted to the type of the key's
default, and a bare word sets a boolean key to True. Unknown keys and values of the wrong type raise a
`ConfigError`, so a typo fails at once with one line instead of silently running the default.
"""

import importlib.util

import ml_collections

from calibjax.errors import ConfigError


def load(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The config of `spec` ("configs/x.py[:presets]", as `--config` takes it) with `overrides` ({"train.epochs":
  5}, as `--config.train.epochs=5`) applied, locked: what the command line builds, for notebooks and scripts.

  Raises:
    ConfigError: the file cannot be loaded or has no get_config, or an override names a key it lacks.
  """
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("calibjax_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  except (OSError, AttributeError) as error:
    raise ConfigError(f"cannot load the config file {path} ({error}); give configs/<file>.py[:presets]") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config(arg=None) function returning its ConfigDict; see configs/")
  config = module.get_config(arg or None)
  for key, value in (overrides or {}).items():
    parent, _, leaf = key.rpartition(".")
    block = config
    for part in filter(None, parent.split(".")):
      block = block.get(part) if isinstance(block, ml_collections.ConfigDict) else None
    if not isinstance(block, ml_collections.ConfigDict) or leaf not in block:
      raise ConfigError(f"unknown config key {key} in the overrides (the config file defines its keys)")
    block[leaf] = value
  config.lock()
  return config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a preset string against `defaults` (name -> default value, whose type is the expected type)."""
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"unknown preset '{key}' in ':{arg}'; known presets: {', '.join(sorted(defaults))}")
    kind = type(defaults[key])
    if not sep:
      if kind is not bool:
        raise ConfigError(f"preset '{key}' needs a value, e.g. {key}={defaults[key]}")
      values[key] = True
      continue
    values[key] = _convert(key, text.strip(), kind)
  return ml_collections.ConfigDict(values)


def _convert(key: str, text: str, kind: type):
  try:
    if kind is bool:
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
      return text.lower() in ("true", "1")
    return kind(text)
  except ValueError:
    raise ConfigError(f"preset '{key}={text}' is not a valid {kind.__name__}") from None


# The top-level config entries each method reads (besides COMMON_KEYS).
METHOD_BLOCKS = {
    "train": ("data", "model", "train", "loss", "augment", "calibration", "eval_batch_size"),
    "calibrate": ("calibrate", "calibration", "eval_batch_size"),
    "distill": ("data", "model", "distill"),
    "evaluate": ("data", "model", "evaluate", "train", "loss", "augment", "calibration", "eval_batch_size"),
    "buffer": ("data", "model", "buffer", "train", "augment", "eval_batch_size"),
    "kd": ("data", "model", "train", "kd", "augment", "calibration", "eval_batch_size"),
    "analyze": ("analyze", "calibration", "eval_batch_size"),
}
COMMON_KEYS = ("method", "seed", "distributed", "coordinator_address", "num_processes", "process_id")


def check_blocks(config: ml_collections.ConfigDict) -> None:
  """Refuses a config with an entry its method does not read, or without one it reads (one line each)."""
  if config.method not in METHOD_BLOCKS:
    return  # the dispatch refuses an unknown method with its own message
  expected = set(METHOD_BLOCKS[config.method]) | set(COMMON_KEYS)
  unread, missing = sorted(set(config) - expected), sorted(expected - set(config))
  if unread:
    raise ConfigError(f"method {config.method} does not read config entries {', '.join(unread)}; remove them "
                      "from the config file")
  if missing:
    raise ConfigError(f"method {config.method} needs config entries {', '.join(missing)}; the config file "
                      "lacks them")


def base_config(method: str) -> ml_collections.ConfigDict:
  """The entries `method` reads, with their defaults (`train` and `loss` are added by the config file)."""
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 0
  # Multi-process runs (calibjax.parallel.initialize_distributed): distributed=True calls
  # jax.distributed.initialize(), which detects the three below on Slurm, Open MPI, Kubernetes and TPU pods;
  # elsewhere give them: "host:port" of process 0, the process count, this process's index (0, -1: detected).
  c.distributed = False
  c.coordinator_address = ""
  c.num_processes = 0
  c.process_id = -1
  blocks = METHOD_BLOCKS[method]
  if "data" in blocks:
    c.data = data_config()
  if "model" in blocks:
    c.model = convnet_config()
  if "calibration" in blocks:
    c.calibration = calibration_config()
  if "augment" in blocks:
    from calibjax.data.augment import augment_config  # Imported here: see loss_config.
    c.augment = augment_config()
  if "eval_batch_size" in blocks:
    c.eval_batch_size = 1000
  return c


def data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "fashion_mnist"
  c.data_dir = ""  # "" = the documented search order of calibjax.data.load
  c.normalize = "dataset"  # dataset (the references' fixed statistics) | fit (from the train split) | none
  c.zca = False
  c.zca_eps = 0.1  # kornia's ZCAWhitening epsilon, as the MTT reference uses
  c.train_per_class = 0  # > 0: a class-balanced subset of the training split (CPU budgets)
  c.val_per_class = 500  # held out from the training split, per class, for fitting calibrators
  return c


def convnet_config() -> ml_collections.ConfigDict:
  """ConvNet-3 (width 128, instance norm, average pooling, PyTorch init): the dataset-distillation backbone."""
  c = ml_collections.ConfigDict()
  c.name = "convnet"
  c.width = 128
  c.depth = 3
  c.norm = "instance"
  c.pooling = "avg"
  c.init = "torch"
  return c


def calibration_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.n_bins = 15
  c.ts_method = "converged"  # converged | lbfgs_reference (the reference's under-converged fit)
  c.mts_ratios = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
  c.mts_granularity = "element"  # element (the reference) | pixel (one draw per pixel, all channels)
  c.mts_target = "input"  # input (the reference code) | logits (a reading of the paper's Eq. 4)
  c.mts_selection = "calibration_data"  # calibration_data | test_reference (the reference's choice on test)
  # Where TS and MTS are fitted (calibjax.build.calibration_data): held_out_real (images of the training split
  # that nothing trained on) | distilled_split (a per-class fraction of the set a network trained on: the MTS
  # paper's protocol for networks trained on distilled data; evaluate only) | distilled_full (all of that set).
  c.fit_on = "held_out_real"
  c.split_fraction = 0.1  # distilled_split: this fraction of each class's images, at least one
  c.split_in_training = True  # distilled_split: the split images also train the networks (the reference's way)
  # Conformal prediction sets, calibrated on the same calibration data as TS / MTS (calibjax.calibration.conformal):
  # every method is reported; this one gives the summary's set size and coverage.
  c.conformal_alpha = 0.1
  c.conformal_method = "aps"  # thr | aps | raps
  return c


def train_config(*, epochs: int, batch_size: int = 256, lr: float = 0.01, schedule: str = "half",
                 milestones: tuple = (), weight_decay: float = 5e-4, momentum: float = 0.9
                 ) -> ml_collections.ConfigDict:
  """SGD training settings; defaults are the dataset-distillation protocol (docs/protocols.md §3.5)."""
  c = ml_collections.ConfigDict()
  c.epochs = epochs
  c.batch_size = batch_size
  c.lr = lr
  c.momentum = momentum
  c.nesterov = False
  c.weight_decay = weight_decay
  c.schedule = schedule  # constant | half | multistep | cosine (calibjax.train.schedules)
  c.milestones = tuple(milestones)  # epochs after which the lr is ×0.1 (multistep)
  c.checkpoint_every_epochs = 1  # a killed run resumes from the last checkpoint
  # `train` runs: validation accuracy after every epoch (logged only; AdaFocal needs it for its state). Off saves
  # a forward pass over the validation split per epoch. `kd` runs always validate (their best epoch) and refuse False.
  c.validate_each_epoch = True
  return c


# The knowledge-distillation protocol per dataset: (epochs, train_per_class, val_per_class, batch, lr,
# (small, large) model of the teacher/student pair). CIFAR-100 is RepDistiller's recipe; Fashion-MNIST is the
# CPU budget (configs/kd.py says how long it takes).
KD_PROTOCOLS = {
    "cifar100": (240, 0, 50, 64, 0.05, ("resnet8x4", "resnet32x4")),
    "fashion_mnist": (15, 1000, 500, 128, 0.05, ("wrn_16_2", "wrn_40_2")),
}
# Where the KD protocol trains with random crop (4-pixel padding) + horizontal flip (augment.crop_flip), as both
# KD papers' CIFAR recipes. Fashion-MNIST's CPU-budget KD tables were measured without it (15 epochs on 1000
# images per class, where it would slow convergence and break comparability), so it stays off there unless asked.
KD_CROP_FLIP_DATASETS = ("cifar10", "cifar100")
# RepDistiller's lr for these students (0.01 instead of 0.05), and its decay epochs (of 240).
KD_SMALL_LR_MODELS = ("mobilenetv2", "shufflev1", "shufflev2")
REPDISTILLER_MILESTONES = (150, 180, 210)


def kd_protocol(dataset: str, *, model: str, epochs: int = 0) -> tuple[ml_collections.ConfigDict, int, int]:
  """The KD training protocol of `dataset` (Fashion-MNIST's for a dataset without one of its own).

  SGD momentum 0.9, wd 5e-4, the dataset's batch and lr (0.01 for `KD_SMALL_LR_MODELS`), lr ×0.1 at
  RepDistiller's epochs 150/180/210 of 240, scaled to `epochs`. Teachers, KD students and directly calibrated
  students share it, so a table compares losses, not recipes.

  Args:
    dataset: data.name.
    model: the network trained (its lr).
    epochs: 0 = the dataset's.

  Returns:
    (train config, data.train_per_class, data.val_per_class).
  """
  default_epochs, train_per_class, val_per_class, batch_size, lr, _ = KD_PROTOCOLS.get(
      dataset, KD_PROTOCOLS["fashion_mnist"])
  epochs = epochs or default_epochs
  # Milestones scaled to the epochs; at 4 epochs or fewer the late ones round onto the last epoch and are dropped.
  scaled = (max(1, round(m * epochs / 240)) for m in REPDISTILLER_MILESTONES)
  train = train_config(epochs=epochs, batch_size=batch_size, lr=0.01 if model in KD_SMALL_LR_MODELS else lr,
                       schedule="multistep", milestones=tuple(m for m in scaled if m < epochs))
  return train, train_per_class, val_per_class


def loss_config(name: str) -> ml_collections.ConfigDict:
  """`name` plus that loss's hyperparameters at their defaults, so `--config.loss.hparams.gamma=3` is typed.

  Choose the loss with the config file's `loss=` preset: the hyperparameter fields belong to the loss chosen
  there, and a hyperparameter the loss does not have is refused when the run starts.
  """
  from calibjax.calibration.losses import LOSSES  # Imported here: configs that train nothing need no JAX.
  from calibjax.train.per_example import OBJECTIVES
  c = ml_collections.ConfigDict()
  c.name = name
  c.hparams = ml_collections.ConfigDict(dict(OBJECTIVES[name][1] if name in OBJECTIVES else LOSSES.get(name).defaults))
  return c


def smoke_dataset(dataset: str) -> str:
  """The dataset of a smoke run: scikit-learn's digits instead of Fashion-MNIST (always available, seconds)."""
  return "digits" if dataset == "fashion_mnist" else dataset


def smoke(c: ml_collections.ConfigDict, *, dataset: str = "digits") -> None:
  """Shrinks the shared entries of a config to a seconds-long run for tests: `dataset` with 20 validation images
  per class, a width-16 depth-2 ConvNet, small evaluation batches, two MTS ratios; and 2 epochs of batch 64 for a
  config with a train block."""
  if "data" in c:
    c.data.name = dataset
    c.data.val_per_class = 20
    c.data.train_per_class = 0
  if "model" in c and c.model.name == "convnet":
    c.model.width = 16
    c.model.depth = 2
  if "eval_batch_size" in c:
    c.eval_batch_size = 256
  if "calibration" in c:
    c.calibration.mts_ratios = (0.1, 0.5)
  if "train" in c:
    c.train.epochs = 2
    c.train.batch_size = 64
    c.train.milestones = tuple(m for m in c.train.milestones if m < c.train.epochs)  # those of 2 epochs
