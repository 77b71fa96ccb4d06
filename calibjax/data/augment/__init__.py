"""On-device training augmentation built from a config: crop + flip, DSA, then one of mixup / CutMix / cutout.

`make_batch_transform(cfg, num_classes=, data_transforms=)` returns a `BatchTransform` for `calibjax.train.step`
— a pure `(key, batch) -> batch` that runs inside the jitted train step — or None when nothing is enabled.

Order: the random crop (padding with black) and horizontal flip of the CIFAR recipes first (the pixel-space
augmentation torchvision applies before normalising; here on normalised images with the normalised black), then
DSA (per-sample parameters, as the references train networks), then the mixing
augmentation; mixup and CutMix turn the labels into soft targets λ·onehot(y_a) + (1−λ)·onehot(y_b), which every
calibjax loss accepts and which gives exactly λ·CE(y_a) + (1−λ)·CE(y_b) for cross-entropy. (The MTS fork applies
mixup before DSA; with per-sample DSA parameters the order changes only which pixels the mixing sees.)
"""

import jax
import ml_collections

from calibjax.data import transforms as transforms_lib
from calibjax.data.augment import crop_flip, dsa, mixing
from calibjax.errors import ConfigError

MIXING = ("none", "mixup", "cutmix", "cutout")


def augment_config() -> ml_collections.ConfigDict:
  """Augmentation settings with the references' defaults; all off."""
  c = ml_collections.ConfigDict()
  # Random crop (black padding of crop_padding pixels) + horizontal flip: the KD papers' CIFAR recipes
  # (configs/kd.py and configs/train.py:protocol=kd turn it on for config_lib.KD_CROP_FLIP_DATASETS).
  c.crop_flip = False
  c.crop_padding = 4
  c.dsa = False
  c.dsa_strategy = dsa.DEFAULT_STRATEGY
  c.dsa_align_corners = False  # False: DC's grids; True: MTT's
  c.mixing = "none"  # none | mixup | cutmix | cutout
  c.mixup_alpha = 1.0  # Beta(α, α); the MTS fork's mixup baseline uses 1, paper 004 uses 0.4
  c.cutmix_alpha = 1.0
  c.cutmix_prob = 0.5
  c.cutout_size = 0.5  # fraction of the image side (16 px on 32-px CIFAR); an integer ≥ 1 means pixels
  return c


# The crop + flip key is the step key with this folded in, not a third split: runs without crop + flip keep the
# DSA and mixing draws they had before it existed. (fold_in(key, 1) would equal split(key)[1]; this does not.)
_CROP_FLIP_FOLD = 0x63726F70  # "crop"


def make_batch_transform(cfg: ml_collections.ConfigDict, *, num_classes: int, data_transforms: dict):
  """The training batch transform of `cfg` (an `augment` block), or None when nothing is on.

  Args:
    cfg: the run's `augment` config.
    num_classes: K (soft targets of mixup / CutMix).
    data_transforms: `Splits.transforms` of the training images (crop + flip pads with their black pixel).

  Raises:
    ConfigError: an unknown mixing or DSA strategy, or crop + flip on ZCA-whitened images (whitening mixes the
      pixels, so there is no padding value).
  """
  if cfg.mixing not in MIXING:
    raise ConfigError(f"augment.mixing must be one of {', '.join(MIXING)}; got '{cfg.mixing}'")
  dsa_params = dsa.DSAParams(align_corners=cfg.dsa_align_corners)
  if cfg.dsa:
    dsa.strategy_families(cfg.dsa_strategy)  # a bad strategy fails now, not inside the first jitted step
  if cfg.crop_flip and "zca" in data_transforms:
    raise ConfigError("augment.crop_flip pads images with black pixels, which ZCA-whitened images (data.zca=True) "
                      "do not have; turn one of them off")
  if not cfg.crop_flip and not cfg.dsa and cfg.mixing == "none":
    return None
  cutout_size = int(cfg.cutout_size) if cfg.cutout_size >= 1 else float(cfg.cutout_size)
  black = transforms_lib.black_pixel(data_transforms)

  def transform(key: jax.Array, batch: dict) -> dict:
    dsa_key, mix_key = jax.random.split(key)
    images, labels = batch["images"], batch["labels"]
    if cfg.crop_flip:
      images = crop_flip.random_crop_flip(jax.random.fold_in(key, _CROP_FLIP_FOLD), images,
                                          padding=cfg.crop_padding, fill=black)
    if cfg.dsa:
      images = dsa.dsa_augment(dsa_key, images, strategy=cfg.dsa_strategy, siamese=False, params=dsa_params)
    if cfg.mixing == "cutout":
      images = mixing.cutout(mix_key, images, size=cutout_size)
    elif cfg.mixing in ("mixup", "cutmix"):
      mixed = (mixing.mixup(mix_key, images, labels, alpha=cfg.mixup_alpha, num_classes=num_classes)
               if cfg.mixing == "mixup" else
               mixing.cutmix(mix_key, images, labels, alpha=cfg.cutmix_alpha, prob=cfg.cutmix_prob,
                             num_classes=num_classes))
      images, labels = mixed.images, mixing.mixed_targets(mixed, num_classes)
    return {**batch, "images": images, "labels": labels}  # other per-sample fields pass through

  return transform
