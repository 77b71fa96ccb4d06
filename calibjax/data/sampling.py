"""Seeded index sampling: per-class subsets, stratified splits and epoch batches.

Every function takes an explicit integer seed and draws from `np.random.default_rng`, so the same arguments
give the same indices on every machine and after a restart. Per-class draws use the generator seeded with
`[seed, class]`, so the indices picked for one class do not depend on the sizes of the other classes.
"""

import numpy as np

from calibjax.errors import ConfigError


def _check_labels(labels: np.ndarray, num_classes: int | None) -> tuple[np.ndarray, int]:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
  if num_classes is None:
    num_classes = int(labels.max()) + 1 if labels.size else 0
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
  return labels, num_classes


def class_indices(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
  """Indices of each class.

  Args:
    labels: int (N,) in [0, num_classes).
    num_classes: number of classes C.

  Returns:
    C int64 arrays; entry c holds the positions of class c in ascending order (empty if c does not occur).
  """
  labels, num_classes = _check_labels(labels, num_classes)
  order = np.argsort(labels, kind="stable")
  counts = np.bincount(labels, minlength=num_classes)
  return np.split(order.astype(np.int64), np.cumsum(counts)[:-1])


def _concat(parts: list[np.ndarray]) -> np.ndarray:
  # The empty part keeps the dtype int64 and makes zero classes valid.
  return np.concatenate(parts + [np.zeros(0, np.int64)])


def _class_permutations(labels: np.ndarray, num_classes: int | None, seed: int) -> list[np.ndarray]:
  labels, num_classes = _check_labels(labels, num_classes)
  return [np.random.default_rng([seed, c]).permutation(idx)
          for c, idx in enumerate(class_indices(labels, num_classes))]


def class_balanced_indices(labels: np.ndarray, per_class: int, *, seed: int,
                           num_classes: int | None = None) -> np.ndarray:
  """Draws `per_class` distinct examples of every class without replacement.

  Args:
    labels: int (N,) in [0, num_classes).
    per_class: examples per class (e.g. images per class to initialise a synthetic set from real images).
    seed: non-negative integer seed.
    num_classes: number of classes C; default `labels.max() + 1`.

  Returns:
    int64 (C * per_class,) in class-major order: entries [c * per_class, (c + 1) * per_class) are class c.

  Raises:
    ConfigError: some class has fewer than `per_class` examples.
  """
  perms = _class_permutations(labels, num_classes, seed)
  for c, perm in enumerate(perms):
    if len(perm) < per_class:
      raise ConfigError(f"class {c} has {len(perm)} examples, fewer than the {per_class} per class asked "
                        "for; ask for fewer per class")
  return _concat([perm[:per_class] for perm in perms])


def split_per_class(labels: np.ndarray, *, val_per_class: int | None = None,
                    val_fraction: float | None = None, seed: int,
                    num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Stratified train/validation split.

  Exactly one of `val_per_class` (the same count from every class) and `val_fraction` (round(fraction * n_c)
  from class c, Python rounding) sets the validation size.

  Args:
    labels: int (N,) in [0, num_classes).
    val_per_class: validation examples per class.
    val_fraction: fraction of each class in validation, in (0, 1).
    seed: non-negative integer seed.
    num_classes: number of classes; default `labels.max() + 1`.

  Returns:
    (train_idx, val_idx): disjoint int64 index arrays in ascending order whose union is range(N).

  Raises:
    ConfigError: not exactly one size argument, a fraction outside (0, 1), or a class smaller than
      `val_per_class`.
  """
  if (val_per_class is None) == (val_fraction is None):
    raise ConfigError("split_per_class needs exactly one of val_per_class and val_fraction")
  if val_fraction is not None and not 0.0 < val_fraction < 1.0:
    raise ConfigError(f"val_fraction must lie in (0, 1), got {val_fraction}")
  train, val = [], []
  for c, perm in enumerate(_class_permutations(labels, num_classes, seed)):
    n_val = val_per_class if val_per_class is not None else round(val_fraction * len(perm))
    if n_val > len(perm):
      raise ConfigError(f"class {c} has {len(perm)} examples, fewer than val_per_class={val_per_class}; "
                        "lower val_per_class")
    val.append(perm[:n_val])
    train.append(perm[n_val:])
  return np.sort(_concat(train)), np.sort(_concat(val))


def batch_indices(n: int, batch_size: int, *, seed: int, epoch: int,
                  drop_remainder: bool) -> list[np.ndarray]:
  """The shuffled batches of one epoch, a function of (seed, epoch) only so a resumed run repeats them.

  Args:
    n: dataset size.
    batch_size: examples per batch.
    seed: non-negative integer seed of the run.
    epoch: non-negative epoch number.
    drop_remainder: drop the last n % batch_size examples (every batch then has `batch_size` entries, so a
      jitted step compiles once); otherwise the last batch is smaller.

  Returns:
    The batches as int64 index arrays; empty when drop_remainder and n < batch_size.
  """
  if batch_size < 1:
    raise ConfigError(f"batch_size must be positive, got {batch_size}")
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  stop = n - n % batch_size if drop_remainder else n
  return [perm[start:start + batch_size] for start in range(0, stop, batch_size)]


def herding_indices(features: np.ndarray, labels: np.ndarray, *, per_class: int, num_classes: int) -> np.ndarray:
  """Herding selection (Welling, ICML 2009), per class, class-major order.

  For each class, greedily picks the example whose feature brings the mean of the picked features closest (L2)
  to the class mean, without replacement: the coreset baseline of DC/DSA/DM, which embed with a network trained
  on the real data.

  Args:
    features: (N, D) embeddings.
    labels: (N,) int labels.
    per_class: examples to pick per class.
    num_classes: C.

  Returns:
    int64 (C * per_class,) indices into `features`, class c's picks in rows [c * per_class, (c + 1) * per_class)
    in pick order.
  """
  picks = []
  for c, idx in enumerate(class_indices(labels, num_classes)):
    if len(idx) < per_class:
      raise ConfigError(f"class {c} has {len(idx)} training examples, fewer than ipc={per_class}")
    feats = features[idx].astype(np.float64)
    target = feats.mean(axis=0)
    total = np.zeros_like(target)
    available = np.ones(len(idx), bool)
    for k in range(per_class):
      gap = np.linalg.norm(target - (total + feats) / (k + 1), axis=1)
      gap[~available] = np.inf
      best = int(np.argmin(gap))
      available[best] = False
      total += feats[best]
      picks.append(idx[best])
  return np.asarray(picks, np.int64)
