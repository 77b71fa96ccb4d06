"""The epoch loop of every method that trains one network on real data (train, kd, the buffer's experts).

Batches of epoch e are a permutation drawn from (seed, e) alone and step t's key is `fold_in(steps key, t)`, so
a run resumed from any checkpoint computes exactly what an uninterrupted one computes.
"""

from typing import Callable

import jax
from jax.sharding import Mesh
import numpy as np
import optax

from calibjax import keys, parallel
from calibjax.data.prepare import Splits
from calibjax.data.sampling import batch_indices
from calibjax.models import Network
from calibjax.runs import core
from calibjax.train import step as step_lib

# end_of_epoch(epoch, state) -> (extra log entries, new objective state or None).
EndOfEpoch = Callable[[int, step_lib.TrainState], tuple[dict, object]]


def initial_state(net: Network, tx: optax.GradientTransformation, *, seed: int, mesh: Mesh,
                  objective: step_lib.Objective | None = None) -> step_lib.TrainState:
  """The replicated train state before the first step of the network seeded with `seed`."""
  return parallel.replicate(step_lib.init_train_state(net, tx, keys.stream(seed, "init"), objective=objective),
                            mesh)


def validation(net: Network, splits: Splits, *, mesh: Mesh, batch_size: int, update=None) -> EndOfEpoch:
  """An end-of-epoch hook logging the validation accuracy; with `update`, the objective state it returns
  (`update(state, val_logits=..., val_labels=...)`: AdaFocal's per-epoch update)."""
  predict_fn = step_lib.make_predict_fn(net, mesh)

  def end_of_epoch(epoch, state):
    logits = step_lib.predict(predict_fn, state["params"], state["model_state"], splits.val_images,
                              batch_size=batch_size, mesh=mesh)
    record = {"val_accuracy": float(np.mean(logits.argmax(-1) == splits.val_labels))}
    if update is None:
      return record, None
    return record, update(jax.device_get(state["objective"]["state"]), val_logits=logits,
                          val_labels=splits.val_labels)

  return end_of_epoch


def fit(workdir: core.Workdir, *, net: Network, objective: step_lib.Objective, tx: optax.GradientTransformation,
        images: np.ndarray, labels: np.ndarray, epochs: int, batch_size: int, seed: int, mesh: Mesh,
        cadence: core.Cadence, description: str, batch_transform: step_lib.BatchTransform | None = None,
        end_of_epoch: EndOfEpoch | None = None) -> step_lib.TrainState:
  """Trains `net` on (images, labels) for `epochs` epochs, resuming from the workdir; returns the final state.

  Args:
    workdir: the log (one record per epoch: "lr_step", the epoch means of the step metrics as "train_*", and
      what `end_of_epoch` adds) and the checkpoints.
    net, objective, tx: the network, its training objective and optimiser (whose schedule counts steps).
    images: (N, H, W, C) host array, already normalised; labels: (N,) int host array.
    epochs, batch_size, seed: the budget (the batch is global, split over the mesh) and the seed of the
      initialisation, the step keys and the batch order.
    mesh: device mesh; the batch size must be divisible by its size.
    cadence: when to checkpoint (in epochs).
    description: progress-bar label.
    batch_transform: per-step augmentation on device (see `step.BatchTransform`).
    end_of_epoch: validation, and a new objective state for losses updated between epochs (AdaFocal).

  Batches carry "index" ((B,) int32, positions in `images`) when the objective uses it.
  """
  parallel.check_batch_size(batch_size, mesh)  # the data's size: `build.steps_per_epoch`, before the optimiser
  state = initial_state(net, tx, seed=seed, mesh=mesh, objective=objective)
  steps_key = keys.stream(seed, "steps")
  train_step = step_lib.jit_train_step(step_lib.make_train_step(net, objective, tx, batch_transform=batch_transform),
                                       mesh)
  steps_per_epoch = len(images) // batch_size

  def epoch_body(state, epoch, tick):
    order = batch_indices(len(images), batch_size, seed=seed, epoch=epoch, drop_remainder=True)
    sums = None
    for idx in order:
      batch = {"images": images[idx], "labels": labels[idx]}
      if objective.uses_indices:
        batch["index"] = idx.astype(np.int32)
      state, metrics = train_step(state, steps_key, parallel.shard_batch(batch, mesh))
      sums = metrics if sums is None else jax.tree.map(lambda a, b: a + b, sums, metrics)
      tick()
    record = {"lr_step": int(state["step"]), **{k: v / len(order) for k, v in core.scalars(sums, "train_").items()}}
    if end_of_epoch is not None:
      extra, objective_state = end_of_epoch(epoch + 1, state)
      record.update(extra)
      if objective_state is not None:
        state = dict(state, objective=dict(state["objective"], state=parallel.replicate(objective_state, mesh)))
    return state, lambda: record

  return core.loop(workdir, state, epoch_body, total=epochs, cadence=cadence, description=description,
                   ticks_per_unit=steps_per_epoch)
