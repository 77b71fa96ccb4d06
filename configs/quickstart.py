"""Quickstart: ConvNet-3 on Fashion-MNIST, then accuracy, NLL and ECE raw / after TS / after MTS.

  python -m calibjax.main --config configs/quickstart.py --workdir runs/quickstart

CPU budget (finishes in under 5 minutes on 2 CPU cores): ConvNet-3 (width 128, instance norm, PyTorch init) on a
class-balanced 500 images per class of the Fashion-MNIST training split, 5 epochs, SGD (momentum 0.9,
weight decay 5e-4, lr 0.01, ×0.1 after epoch 2), batch 256. 300 training images per class are held out for
fitting TS and MTS (MTS ratio chosen on half of them); everything is scored on the 10,000 test images.
`:smoke` is a seconds-long run on scikit-learn's digits for tests.
"""

from calibjax import config_lib


def get_config(arg=None):
  preset = config_lib.parse_arg(arg, smoke=False, seed=0)
  c = config_lib.base_config("train")
  c.seed = preset.seed
  c.data.name = "fashion_mnist"
  c.data.train_per_class = 500
  c.data.val_per_class = 300
  c.train = config_lib.train_config(epochs=5, batch_size=256)
  c.loss = config_lib.loss_config("ce")
  if preset.smoke:
    config_lib.smoke(c)
  return c
