"""The synthetic (distilled) set as one pytree, its initialisation and its `.npz` export.

`SyntheticSet` is a NamedTuple, hence a pytree: optax optimises it (or one of its fields), orbax checkpoints
it and `jax.tree.map` walks it like any parameter tree. Images live in the network's input space (after
mean/std normalisation or ZCA whitening); the transforms that map them back to pixels travel with the export.

Ordering convention: **class-major**. Rows [c * ipc, (c + 1) * ipc) of `images` and `labels` belong to
class c, so `images.reshape(num_classes, ipc, H, W, C)` gives the per-class view the matching methods vmap
over.
"""

import json
import os
import tempfile
import zipfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from calibjax.data.sampling import class_balanced_indices
from calibjax.errors import CheckpointError, ConfigError
from calibjax.files import publish

INITS = ("real", "noise")
# Keys of an exported archive; transform fields are stored as "transform/<name>/<field>".
_TRANSFORM_PREFIX = "transform/"


class SyntheticSet(NamedTuple):
  """A distilled dataset.

  Attributes:
    images: float32 (C * ipc, H, W, ch), class-major, in the network's input space.
    labels: int32 (C * ipc,), `repeat(arange(C), ipc)`.
    log_lr: float32 scalar, log of a learnable student learning rate (trajectory matching learns it; gradient
      and distribution matching leave it untouched). Log-space keeps the learned lr positive.
    soft_labels: optional float32 (C * ipc, C) learned label distributions; None when labels are hard.
  """

  images: jax.Array
  labels: jax.Array
  log_lr: jax.Array
  soft_labels: jax.Array | None = None


def class_major_labels(num_classes: int, ipc: int) -> np.ndarray:
  """int32 (num_classes * ipc,) labels in class-major order."""
  return np.repeat(np.arange(num_classes, dtype=np.int32), ipc)


def init_synthetic(key: jax.Array, real_images: np.ndarray, real_labels: np.ndarray, *, ipc: int,
                   num_classes: int, init: str = "real", lr: float = 0.01) -> SyntheticSet:
  """A fresh synthetic set.

  Args:
    key: PRNG key. `init="real"` turns it into the integer seed of
      `calibjax.data.sampling.class_balanced_indices` (a per-class seeded draw without replacement, as the
      references' `get_images(c, ipc)`); `init="noise"` draws the images from it.
    real_images: float32 (N, H, W, ch) host array, already normalised (the synthetic set lives in that space).
    real_labels: int (N,) in [0, num_classes).
    ipc: images per class.
    num_classes: C.
    init: "real" (random real images of each class; DSA/DM/MTT default) or "noise" (N(0, 1) in the
      normalised space, the DC reference's `--init noise`).
    lr: initial value of the learnable learning rate stored as `log_lr` (MTT's default `lr_teacher`, 0.01).

  Returns:
    A SyntheticSet with class-major images and labels, `soft_labels=None`.

  Raises:
    ConfigError: an unknown `init`, `ipc < 1`, `lr <= 0`, or (init="real") a class with fewer than `ipc`
      examples.
  """
  if init not in INITS:
    raise ConfigError(f"unknown synthetic init '{init}'; use one of {INITS}")
  if ipc < 1:
    raise ConfigError(f"ipc must be at least 1, got {ipc}")
  if lr <= 0:
    raise ConfigError(f"the initial learnable lr must be positive, got {lr}")
  real_images = np.asarray(real_images)
  shape = (num_classes * ipc,) + real_images.shape[1:]
  if init == "real":
    seed = int(jax.random.bits(key, (), jnp.uint32))
    idx = class_balanced_indices(np.asarray(real_labels), ipc, seed=seed, num_classes=num_classes)
    images = jnp.asarray(real_images[idx], jnp.float32)
  else:
    images = jax.random.normal(key, shape, jnp.float32)
  return SyntheticSet(images=images, labels=jnp.asarray(class_major_labels(num_classes, ipc)),
                      log_lr=jnp.log(jnp.float32(lr)))


def export_npz(path: str, synset: SyntheticSet, *, config_json: str, transforms: dict[str, dict]) -> None:
  """Writes the synthetic set, the run's config and the input transforms to one `.npz`, atomically.

  The archive is written to a temporary file in the destination directory and renamed over `path`, so a
  reader never sees a half-written file and a crash leaves any previous export intact.

  Args:
    path: destination file (written as given; no '.npz' is appended).
    synset: the set to export (device or host arrays).
    config_json: the run's config as a JSON string (stored verbatim).
    transforms: name -> `transform.to_dict()` (e.g. {"normalize": ..., "zca": ...}, as
      `calibjax.data.prepare.Splits.transforms`), in the order they were applied to the data; values are
      numpy arrays or Python scalars.

  Raises:
    ConfigError: `config_json` is not valid JSON, or a transform name contains '/'.
  """
  try:
    json.loads(config_json)
  except json.JSONDecodeError as error:
    raise ConfigError(f"config_json is not valid JSON ({error}); pass json.dumps(config)") from None
  arrays = {"images": np.asarray(synset.images, np.float32), "labels": np.asarray(synset.labels, np.int32),
            "log_lr": np.asarray(synset.log_lr, np.float32), "config_json": np.asarray(config_json),
            "transform_order": np.asarray(list(transforms), dtype=str)}
  if synset.soft_labels is not None:
    arrays["soft_labels"] = np.asarray(synset.soft_labels, np.float32)
  for name, fields in transforms.items():
    if "/" in name:
      raise ConfigError(f"transform name '{name}' must not contain '/'")
    for field, value in fields.items():
      arrays[f"{_TRANSFORM_PREFIX}{name}/{field}"] = np.asarray(value)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    publish(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def load_npz(path: str) -> tuple[SyntheticSet, str, dict[str, dict[str, Any]]]:
  """Reads an archive written by `export_npz`.

  Args:
    path: the `.npz` file.

  Returns:
    (synset with numpy arrays, config_json, transforms) where transforms maps each name, in the order of the
    export, to {field: numpy array}; 0-d fields come back as 0-d arrays (the transforms' `from_dict` accept
    them).

  Raises:
    CheckpointError: the file is missing a required entry (not written by `export_npz`).
  """
  try:
    archive = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
    raise CheckpointError(f"{path} cannot be read as a synthetic-set .npz ({str(error).splitlines()[0][:120]}); "
                          "point at the synthetic.npz a distill run wrote") from None
  with archive:
    missing = {"images", "labels", "log_lr", "config_json", "transform_order"} - set(archive.files)
    if missing:
      raise CheckpointError(f"{path} is not a synthetic-set export (missing {sorted(missing)}); write it "
                            "with calibjax.distill.synthetic.export_npz")
    synset = SyntheticSet(images=archive["images"], labels=archive["labels"], log_lr=archive["log_lr"],
                          soft_labels=archive["soft_labels"] if "soft_labels" in archive.files else None)
    transforms = {str(name): {} for name in archive["transform_order"]}
    for key in archive.files:
      if key.startswith(_TRANSFORM_PREFIX):
        name, field = key[len(_TRANSFORM_PREFIX):].split("/", 1)
        transforms[name][field] = archive[key]
    return synset, str(archive["config_json"]), transforms


def save_image_grid(path: str, images: np.ndarray, *, num_classes: int, class_names=()) -> None:
  """One row per class, one column per image; each image min-max scaled on its own (the network's input space
  has no fixed pixel range after normalisation or ZCA)."""
  import matplotlib  # Imported here: only the end of a distill run draws.
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  images = np.asarray(images, np.float32)
  ipc = len(images) // num_classes
  shown = min(ipc, 10)
  fig, axes = plt.subplots(num_classes, shown, figsize=(shown * 0.9 + 1.2, num_classes * 0.9), squeeze=False)
  for c in range(num_classes):
    for j in range(shown):
      image = images[c * ipc + j]
      image = (image - image.min()) / max(float(image.max() - image.min()), 1e-12)
      ax = axes[c, j]
      ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
      ax.set_xticks([])
      ax.set_yticks([])
    if class_names:
      axes[c, 0].set_ylabel(str(class_names[c]), rotation=0, ha="right", va="center", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
