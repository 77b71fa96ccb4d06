"""From a data config to normalised host arrays: train / held-out validation / test splits.

The validation split is carved out of the training split per class (seeded), never out of the test split: it is
where calibrators are fitted and the MTS ratio is chosen.
"""

import dataclasses

import ml_collections
import numpy as np

from calibjax import data as data_lib
from calibjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Splits:
  """Normalised float32 NHWC images and int32 labels of each split, plus what produced them."""

  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]
  transforms: dict  # name -> transform.to_dict(), applied in insertion order (normalize, then zca)

  @property
  def input_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])


def prepare(cfg: ml_collections.ConfigDict, *, seed: int) -> Splits:
  """Loads cfg.name, splits off cfg.val_per_class per class, subsamples, normalises and optionally ZCA-whitens."""
  data_dir = cfg.data_dir or None
  train = data_lib.load(cfg.name, "train", data_dir=data_dir)
  test = data_lib.load(cfg.name, "test", data_dir=data_dir)
  train_idx, val_idx = data_lib.split_per_class(train.labels, val_per_class=cfg.val_per_class, seed=seed)
  if cfg.train_per_class:
    keep = data_lib.class_balanced_indices(train.labels[train_idx], cfg.train_per_class, seed=seed,
                                           num_classes=train.num_classes)
    train_idx = train_idx[keep]
  x_train, x_val, x_test = train.images[train_idx], train.images[val_idx], test.images
  transforms = {}
  if cfg.normalize != "none":
    if cfg.normalize == "dataset":
      normalize = data_lib.Normalize.for_dataset(cfg.name) or data_lib.Normalize.fit(x_train)
    elif cfg.normalize == "fit":
      normalize = data_lib.Normalize.fit(x_train)
    else:
      raise ConfigError(f"data.normalize must be dataset, fit or none, got '{cfg.normalize}'")
    x_train, x_val, x_test = (normalize.apply(x) for x in (x_train, x_val, x_test))
    transforms["normalize"] = normalize.to_dict()
  if cfg.zca:
    zca = data_lib.ZCA.fit(x_train, eps=cfg.zca_eps)
    x_train, x_val, x_test = (zca.apply(x) for x in (x_train, x_val, x_test))
    transforms["zca"] = zca.to_dict()
  as_f32 = lambda x: np.ascontiguousarray(x, dtype=np.float32)
  as_i32 = lambda y: np.ascontiguousarray(y, dtype=np.int32)
  return Splits(as_f32(x_train), as_i32(train.labels[train_idx]), as_f32(x_val), as_i32(train.labels[val_idx]),
                as_f32(x_test), as_i32(test.labels), train.num_classes, train.class_names, transforms)


def subsample_validation(splits: Splits, per_class: int, seed: int) -> Splits:
  """Keeps a class-balanced `per_class` of the validation split (0 keeps all): fitting TS and selecting the MTS
  ratio for K networks costs K x (1 + 2 x len(mts_ratios)) passes over it."""
  if not per_class:
    return splits
  keep = data_lib.class_balanced_indices(splits.val_labels, per_class, seed=seed, num_classes=splits.num_classes)
  return dataclasses.replace(splits, val_images=splits.val_images[keep], val_labels=splits.val_labels[keep])

