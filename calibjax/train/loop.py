"""The epoch loop shared by every method that trains a network (train, evaluate, kd, buffer).

Resume order (each run, each start):
  1. the workdir's latest checkpoint, if any (a run killed at any point continues from its last saved epoch);
  2. otherwise a fresh state from the run's root key.
Batches of epoch e are a permutation drawn from (seed, e) alone and step keys are `fold_in(root, step)`, so a
resumed run computes exactly what an uninterrupted one computes.
"""

import dataclasses
from typing import Any, Callable

import jax
from jax.sharding import Mesh
import numpy as np
import optax
from tqdm.auto import tqdm

from calibjax import parallel
from calibjax.data.sampling import batch_indices
from calibjax.models import Network
from calibjax.train import step as step_lib
from calibjax.train.workdir import Workdir


@dataclasses.dataclass
class LoopSpec:
  """What to train and how long.

  Attributes:
    epochs: passes over the training set.
    batch_size: global batch size (split over the mesh's devices).
    seed: seeds the initialisation (fold 0), the step keys (fold 1) and the batch order.
    checkpoint_every: save every this many epochs (and always after the last).
    description: progress-bar label.
  """

  epochs: int
  batch_size: int
  seed: int
  checkpoint_every: int = 1
  description: str = "train"


def fit(net: Network, *, loss_fn: step_lib.LossFn | step_lib.FeatureLoss, tx: optax.GradientTransformation,
        images: np.ndarray, labels: np.ndarray, spec: LoopSpec, mesh: Mesh, workdir: Workdir | None = None,
        batch_transform: step_lib.BatchTransform | None = None,
        end_of_epoch: Callable[[int, step_lib.TrainState], dict] | None = None,
        initial_loss_state: Any = None, with_indices: bool = False) -> step_lib.TrainState:
  """Trains `net` on (images, labels) and returns the final train state.

  Args:
    net: the model.
    loss_fn: `(logits, labels, loss_state) -> scalar`, or a `step.FeatureLoss`.
    tx: optax optimiser (its schedule counts optimiser steps).
    images: (N, H, W, C) host array, already normalised.
    labels: (N,) int host array.
    spec: epochs, batch size, seed, checkpoint frequency.
    mesh: device mesh; the batch size must be divisible by its size.
    workdir: where to log metrics and keep checkpoints (None: no logging, no resume).
    batch_transform: per-step augmentation on device (see `step.BatchTransform`).
    end_of_epoch: `(epoch, state) -> dict` of extra metrics to log (validation accuracy, ...); it may also
      return a "loss_state" entry to replace the state of a stateful loss (AdaFocal).
    initial_loss_state: initial state of a stateful loss.
    with_indices: also pass each batch's positions in `images` as "index" ((B,) int32), for losses that keep
      per-sample state (CRD's memory banks).
  """
  parallel.check_batch_size(spec.batch_size, mesh)
  if len(images) < spec.batch_size:
    raise ValueError(f"{len(images)} training images are fewer than one batch of {spec.batch_size}")
  root = jax.random.key(spec.seed)
  init_key, step_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
  state = parallel.replicate(step_lib.init_train_state(net, tx, init_key, loss_state=initial_loss_state), mesh)
  first_epoch = 0
  if workdir is not None and (saved := workdir.checkpoints.latest_step()) is not None:
    state, _ = workdir.checkpoints.restore(saved, state)
    first_epoch = saved
    workdir.truncate_log(key="epoch", last=saved)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(net, loss_fn, tx, batch_transform=batch_transform),
                                       mesh)
  steps_per_epoch = len(images) // spec.batch_size
  with tqdm(total=spec.epochs * steps_per_epoch, initial=first_epoch * steps_per_epoch, desc=spec.description,
            unit="step", disable=None, dynamic_ncols=True) as progress:
    for epoch in range(first_epoch, spec.epochs):
      order = batch_indices(len(images), spec.batch_size, seed=spec.seed, epoch=epoch, drop_remainder=True)
      sums = None
      for idx in order:
        batch = {"images": images[idx], "labels": labels[idx]}
        if with_indices:
          batch["index"] = idx.astype(np.int32)
        batch = parallel.shard_batch(batch, mesh)
        state, metrics = train_step(state, step_key, batch)
        sums = metrics if sums is None else jax.tree.map(lambda a, b: a + b, sums, metrics)
        progress.update()
      record = {"epoch": epoch + 1, "lr_step": int(state["step"]),
                **{f"train_{k}": float(v) / len(order) for k, v in jax.device_get(sums).items()}}
      if end_of_epoch is not None:
        extra = dict(end_of_epoch(epoch + 1, state))
        if "loss_state" in extra:
          state = dict(state, loss_state=parallel.replicate(extra.pop("loss_state"), mesh))
        record.update(extra)
      progress.set_postfix({k: f"{v:.3f}" for k, v in record.items() if isinstance(v, float)}, refresh=False)
      if workdir is not None:
        workdir.log(record)
        if (epoch + 1) % spec.checkpoint_every == 0 or epoch + 1 == spec.epochs:
          workdir.checkpoints.save(epoch + 1, state, {"epoch": epoch + 1})
  if workdir is not None:
    workdir.checkpoints.wait()
  return state
