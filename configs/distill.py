"""Distil a synthetic set with DC, DSA, DM or MTT, with or without Masked Distillation Training (MDT).

  python -m calibjax.main --config configs/distill.py:method=dsa,dataset=fashion_mnist,ipc=10 --workdir runs/dsa10
  python -m calibjax.main --config configs/distill.py:method=dsa,ipc=10,mdt=fixed,budget=cpu --workdir runs/x

Then train and score networks on the set with `configs/evaluate.py` (`--config.evaluate.source=<workdir>`).
MTT needs an expert buffer (`configs/buffer.py`) with the same data and model settings:

  python -m calibjax.main --config configs/buffer.py:dataset=fashion_mnist --workdir runs/buffer_fmnist
  python -m calibjax.main --config configs/distill.py:method=mtt,ipc=10 \
      --config.distill.mtt.buffer_dir=runs/buffer_fmnist --workdir runs/mtt10

Presets (`:key=value,...`): method (dc, dsa, dm, mtt), dataset, ipc, mdt (off, fixed, dynamic), mdt_ratio (r, or
r_max of the dynamic mode; 0.1 as the paper), budget (paper, cpu), iterations (0 = the budget's), init (default:
the method's), seed, smoke.

budget=paper (default) is the reference setting for every dataset: DC/DSA 1000 iterations with the reference's
(outer, inner) loops per IPC, lr_img 0.1, batch_real 256; DM 20000 iterations, lr_img 1.0 (10 from IPC 100);
MTT 5000 iterations with the reference's per-dataset table (`calibjax.distill.mtt.default_config`). DC starts
from noise as the DC code's default, DSA/DM/MTT from real images as their README commands. These budgets are GPU
budgets (DC IPC 10 is ~44 h for the PyTorch reference on 2 CPU cores).

budget=cpu is the Fashion-MNIST budget that finishes on 2 CPU cores (see `CPU_BUDGETS` for the numbers; README
and experiments/results/ state the wall time): far fewer iterations (DC/DSA: 60 at IPC 1, 10 at IPC 10 instead
of 1000), 64 instead of 256 real images per class per matching step, at IPC 10 an inner loop of 5 instead of 50
epochs; MTT 150 instead of 5000 iterations, at IPC 10 with 10 synthetic images per student step instead of the
whole set (the reference's batch_syn, which it uses for its large sets); everything else at the paper's values;
every method starts from real images.

MDT (`distill.mdt`): the paper's Bernoulli input mask on the synthetic images inside the matching criterion,
after the DSA augmentation (`calibjax.distill.matching` documents every choice); `mdt_granularity` element | pixel,
`mdt_inner` also masks the inner network training of DC/DSA.
"""

import importlib

import ml_collections

from calibjax import config_lib
from calibjax.data.augment.dsa import DEFAULT_STRATEGY
from calibjax.errors import ConfigError

PAPER_ITERATIONS = {"dc": 1000, "dsa": 1000, "dm": 20000, "mtt": 5000}
# (iterations, outer_loop, inner_loop, batch_real) per (method, ipc) on 2 CPU cores; 0 = the reference's value.
# Measured on 2 busy cores: DSA IPC 1 takes ~7 s per iteration at batch_real 64.
CPU_BUDGETS = {("dc", 1): (60, 0, 0, 64), ("dsa", 1): (60, 0, 0, 64), ("dc", 10): (10, 10, 5, 64),
               ("dsa", 10): (10, 10, 5, 64), ("dm", 1): (1000, 0, 0, 64), ("dm", 10): (1000, 0, 0, 64),
               ("mtt", 1): (150, 0, 0, 0), ("mtt", 10): (150, 0, 0, 0)}
# MTT synthetic images per student step at the CPU budget (0 = the whole set, the reference default): at N = 20 an
# iteration with 100-image steps (IPC 10, whole set) took 72 s on the shared 2-core CPU, with 10-image steps 4.8 s
# (benchmarks/mtt_step.py --single 20,none,auto,128,<ipc>,2).
CPU_MTT_BATCH_SYN = {1: 0, 10: 10}
# The DSA strategy the references use where flips change the class (digits) or the dataset is SVHN.
NO_FLIP_DATASETS = ("mnist", "svhn", "digits")


def distill_config(*, method: str, ipc: int, dataset: str) -> ml_collections.ConfigDict:
  """The `config.distill` block with the reference defaults of `method` at `ipc`."""
  if method not in PAPER_ITERATIONS:
    raise ConfigError(f"unknown distillation method '{method}'; choose one of: {', '.join(PAPER_ITERATIONS)}")
  d = ml_collections.ConfigDict()
  d.method = method
  d.ipc = ipc
  d.iterations = PAPER_ITERATIONS[method]
  d.init = "noise" if method == "dc" else "real"
  d.lr_img = {"dc": 0.1, "dsa": 0.1, "dm": 1.0 if ipc < 100 else 10.0, "mtt": 0.0}[method]
  d.momentum = 0.5
  d.batch_real = 256
  # Gradient matching (DC/DSA): inner network training and the (outer, inner) loops; 0 = the IPC table's.
  d.lr_net = 0.01
  d.batch_train = 256
  d.outer_loop = 0
  d.inner_loop = 0
  d.metric = "ours"  # ours | mse | cos
  d.loop_driver = "auto"  # auto | scan | python (calibjax.distill.gm: Python loops on CPU, one scan elsewhere)
  d.dsa_strategy = "none" if method == "dc" else (
      "color_crop_cutout_scale_rotate" if dataset in NO_FLIP_DATASETS else DEFAULT_STRATEGY)
  d.dsa_align_corners = method == "mtt"  # DC/DSA/DM use PyTorch's default grids, MTT align_corners=True
  d.dsa_per_class_keys = False  # True: the reference's one augmentation draw per class (slower under vmap)
  d.mdt = "off"  # off | fixed | dynamic
  d.mdt_ratio = 0.1
  d.mdt_granularity = "element"  # element (the MTS code's mask) | pixel
  d.mdt_inner = False
  d.class_map = "vmap"  # vmap | loop (a Python loop over classes inside the same jitted step)
  d.class_chunk = 0  # k > 0: vmap over k classes at a time (bounds memory); 0: 1 on the CPU, all elsewhere
  d.log_every_iterations = 10
  d.checkpoint_every_iterations = 50
  if method == "mtt":
    mtt = importlib.import_module("calibjax.distill.mtt")
    d.mtt = mtt.default_config(dataset, ipc)
    d.lr_img = mtt.reference_row(dataset, ipc)["lr_img"]
  return d


def get_config(arg=None):
  preset = config_lib.parse_arg(arg, method="dsa", dataset="fashion_mnist", ipc=10, mdt="off", mdt_ratio=0.1,
                                budget="paper", iterations=0, init="", seed=0, smoke=False)
  if preset.budget not in ("paper", "cpu"):
    raise ConfigError(f"preset budget must be 'paper' or 'cpu', got '{preset.budget}'")
  c = config_lib.base_config("distill")
  c.seed = preset.seed
  c.data.name = preset.dataset
  c.distill = distill_config(method=preset.method, ipc=preset.ipc, dataset=preset.dataset)
  d = c.distill
  d.mdt = preset.mdt
  d.mdt_ratio = preset.mdt_ratio
  if preset.budget == "cpu":
    if (preset.method, preset.ipc) not in CPU_BUDGETS:
      known = ", ".join(f"{m} ipc={i}" for m, i in CPU_BUDGETS)
      raise ConfigError(f"no CPU budget for {preset.method} ipc={preset.ipc} (known: {known}); use "
                        "budget=paper with iterations=N")
    d.iterations, d.outer_loop, d.inner_loop, batch_real = CPU_BUDGETS[preset.method, preset.ipc]
    d.batch_real = batch_real or d.batch_real
    d.init = "real"
    if preset.method == "mtt":
      d.mtt.batch_syn = CPU_MTT_BATCH_SYN[preset.ipc]
  if preset.init:
    d.init = preset.init
  if preset.iterations:
    d.iterations = preset.iterations
  if preset.smoke:
    config_lib.smoke(c, dataset=config_lib.smoke_dataset(preset.dataset))
    d.ipc = preset.ipc if preset.ipc <= 2 else 2
    d.iterations = preset.iterations or 3
    d.batch_real = 16
    d.outer_loop, d.inner_loop = 2, 1
    d.log_every_iterations = 1
    d.checkpoint_every_iterations = 2
    d.dsa_strategy = "none" if preset.method == "dc" else "color_crop_cutout_scale_rotate"
    if preset.method == "mtt":  # fits the 3 snapshots per expert of configs/buffer.py:smoke
      d.mtt.update(dict(syn_steps=2, expert_epochs=1, max_start_epoch=1))
  return c
