"""Train a classifier on real data, then report calibration raw / after TS / after MTS.

  python -m calibjax.main --config configs/train.py:dataset=fashion_mnist,epochs=20 --workdir runs/fmnist_convnet

Presets (`:key=value,...`): dataset, model, epochs, loss (ce, label_smoothing, focal, flsd53, adafocal, mmce,
mdca, focal_mdca, dca, logit_norm, mbls, acls, cpc, pskd, crl; its hyperparameters are then `--config.loss.hparams.*`),
mixing (none, mixup, cutmix, cutout), dsa (DSA augmentation on), train_per_class (0 = the whole training split),
batch_size (protocol dd), seed,
smoke (a tiny run for tests on scikit-learn's digits; finishes in seconds), protocol.
protocol=dd (default): the dataset-distillation protocol for full-data ConvNets: SGD momentum 0.9, weight decay
5e-4, lr 0.01, batch 256, lr ×0.1 after half the epochs, 20 epochs (epochs=0).
protocol=kd: the knowledge-distillation protocol configs/kd.py trains students with (`config_lib.kd_protocol`:
batch, lr, RepDistiller's milestones scaled to the epochs, the dataset's epochs for epochs=0, its
train_per_class and val_per_class), for the teachers of `kd` runs and for directly calibrated students that a
KD table compares with:
  python -m calibjax.main --config configs/train.py:protocol=kd,model=wrn_40_2,loss=mdca --workdir runs/t_mdca
"""

import ml_collections

from calibjax import config_lib
from calibjax.errors import ConfigError


def get_config(arg=None):
  preset = config_lib.parse_arg(arg, dataset="fashion_mnist", model="convnet", epochs=0, loss="ce",
                                mixing="none", dsa=False, train_per_class=0, batch_size=256, seed=0,
                                protocol="dd", smoke=False)
  if preset.protocol not in ("dd", "kd"):
    raise ConfigError(f"preset protocol must be 'dd' or 'kd', got '{preset.protocol}'")
  c = config_lib.base_config("train")
  c.seed = preset.seed
  c.data.name = preset.dataset
  c.data.train_per_class = preset.train_per_class
  if preset.model == "convnet":
    c.model.name = preset.model
  else:  # a zoo model takes its own options, not the ConvNet's width/depth/norm/pooling
    c.model = ml_collections.ConfigDict({"name": preset.model})

  if preset.protocol == "kd":
    c.train, per_class, c.data.val_per_class = config_lib.kd_protocol(preset.dataset, model=preset.model,
                                                                      epochs=preset.epochs)
    c.data.train_per_class = preset.train_per_class or per_class
  else:
    c.train = config_lib.train_config(epochs=preset.epochs or 20, batch_size=preset.batch_size)
  c.loss = config_lib.loss_config(preset.loss)
  c.augment.mixing = preset.mixing
  c.augment.dsa = preset.dsa

  if preset.smoke:
    config_lib.smoke(c, dataset=config_lib.smoke_dataset(preset.dataset))
  c.augment.crop_flip = preset.protocol == "kd" and c.data.name in config_lib.KD_CROP_FLIP_DATASETS
  return c
