"""Learning-rate schedules, specified in epochs and compiled to optax step schedules, and PyTorch's SGD."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from calibjax.errors import ConfigError


def make_schedule(name: str, *, base_lr: float, epochs: int, steps_per_epoch: int, milestones=(),
                  factor: float = 0.1, warmup_epochs: int = 0) -> optax.Schedule:
  """Returns lr(step).

  Args:
    name: "constant"; "half" (×factor once after epochs // 2 epochs: the dataset-distillation evaluation
      protocol's single decay; a 1-epoch run has none); "multistep" (×factor after each epoch in `milestones`,
      e.g. RepDistiller's 150/180/210); "cosine" (cosine annealing to 0 over all epochs, optional linear warm-up).
    base_lr: initial learning rate.
    epochs: total epochs of the run.
    steps_per_epoch: optimiser steps per epoch.
    milestones: epochs after which the lr is multiplied by `factor` ("multistep").
    factor: multiplicative decay.
    warmup_epochs: linear warm-up length for "cosine".
  """
  if name == "constant":
    return optax.constant_schedule(base_lr)
  if name in ("half", "multistep"):
    if name == "half":
      milestones = (epochs // 2,) if epochs >= 2 else ()
    milestones = tuple(milestones)
    if any(not 0 < m < epochs for m in milestones):
      raise ConfigError(f"lr milestones {milestones} must lie strictly between 0 and epochs={epochs}")
    return optax.piecewise_constant_schedule(
        base_lr, {int(m) * steps_per_epoch: factor for m in milestones})
  if name == "cosine":
    total = epochs * steps_per_epoch
    if warmup_epochs:
      return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_epochs * steps_per_epoch, total)
    return optax.cosine_decay_schedule(base_lr, total)
  raise ConfigError(f"unknown lr schedule '{name}'; choose one of: constant, half, multistep, cosine")


def make_optimizer(*, lr_schedule: optax.Schedule, momentum: float = 0.9, nesterov: bool = False,
                   weight_decay: float = 0.0, momentum_restarts: tuple[int, ...] = ()
                   ) -> optax.GradientTransformation:
  """SGD as PyTorch defines it: weight decay is added to the gradient before momentum (coupled L2).

  `momentum_restarts`: optimiser steps (counted from 0) before which the momentum buffer starts again from zero,
  as when the dataset-distillation references build a new `torch.optim.SGD` at their lr decay (its first step's
  buffer is the gradient itself, which a zero buffer gives too).
  """
  if not (momentum and momentum_restarts):
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(lr_schedule, momentum=momentum or None, nesterov=nesterov))
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     restart_at(optax.trace(decay=momentum, nesterov=nesterov), momentum_restarts),
                     optax.scale_by_learning_rate(lr_schedule))


class RestartState(NamedTuple):
  count: jax.Array  # updates applied so far
  inner: Any


def restart_at(inner: optax.GradientTransformation, steps: tuple[int, ...]) -> optax.GradientTransformation:
  """`inner` with its state re-initialised before update number s (0-based) for each s in `steps`."""
  steps = jnp.asarray(tuple(steps), jnp.int32)

  def init(params):
    return RestartState(jnp.zeros((), jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    restart = jnp.any(state.count == steps)
    inner_state = jax.tree.map(lambda fresh, old: jnp.where(restart, fresh, old), inner.init(updates), state.inner)
    updates, inner_state = inner.update(updates, inner_state, params)
    return updates, RestartState(state.count + 1, inner_state)

  return optax.GradientTransformation(init, update)
