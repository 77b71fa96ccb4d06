"""Pure, jitted training and prediction steps over a plain-dict train state.

TrainState = {"step": int32 scalar, "params": ..., "model_state": ..., "opt_state": ..., "loss_state": ...}
(`loss_state` carries the state of stateful calibration losses such as AdaFocal's per-bin gammas; {} otherwise).

Two kinds of loss:
  * `LossFn` `(logits, labels, loss_state) -> scalar`: differentiated w.r.t. the network's params only; the
    step leaves `loss_state` as it is (an end-of-epoch hook of the loop may replace it).
  * `FeatureLoss`: also sees the student's penultimate features and the whole (transformed) batch, and has
    trainable parameters of its own and buffers it updates every step (CRD: two embedding heads; memory
    banks). Its `loss_state` is `feature_loss_state(...)` = {"params", "opt_state", "buffers"}: the step
    differentiates w.r.t. the network's params and `loss_state["params"]` together, updates both with the same
    optimiser (for calibjax's SGD, per-parameter weight decay and momentum, that equals one optimiser over
    both trees; a global-norm clip would differ) and stores the buffers the loss returns.
"""

import dataclasses
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax

from calibjax import parallel
from calibjax.models import Network

TrainState = dict[str, Any]
# loss_fn(logits, labels, loss_state) -> scalar; labels are int (B,) or soft (B, K).
LossFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
# batch_transform(key, batch) -> batch: augmentation, mixup/CutMix (which may turn labels soft), masking.
BatchTransform = Callable[[jax.Array, dict], dict]


@dataclasses.dataclass(frozen=True)
class FeatureLoss:
  """A loss over features with trainable parameters and per-step buffers (module docstring).

  Attributes:
    fn: `(loss_params, *, logits (R, K), features (R, D), batch, buffers, key) -> (scalar loss, new buffers)`;
      `features` are the student's penultimate features (`apply_with_features`) of the same forward pass as
      the logits, `batch` is the transformed batch, `key` is the step's key for the loss's own randomness.
  """

  fn: Callable[..., tuple[jax.Array, Any]]


def feature_loss_state(params: Any, buffers: Any, tx: optax.GradientTransformation) -> dict:
  """The initial `loss_state` of a `FeatureLoss`: its parameters, their optimiser state, its buffers."""
  return {"params": params, "opt_state": tx.init(params), "buffers": buffers}


def apply_with_features(net: Network, params, model_state, x: jax.Array, *, train: bool = False
                        ) -> tuple[jax.Array, jax.Array, Any]:
  """(logits (N, K), penultimate features (N, D), updated model state) from ONE forward pass.

  Every zoo model and the ConvNet compute `head(embed(x))`; calling the two halves gives the features of the
  same pass (and, in train mode, the same batch statistics) as `net.apply`'s logits.
  """
  model = nnx.merge(net.graphdef, params, model_state, copy=True)
  features = model.embed(x, train=train)
  logits = model.head(features)
  _, _, new_state = nnx.split(model, nnx.Param, ...)
  return logits, features, new_state


def init_train_state(net: Network, tx: optax.GradientTransformation, key: jax.Array, *,
                     loss_state: Any = None) -> TrainState:
  params, model_state = net.init(key)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
          "opt_state": tx.init(params), "loss_state": {} if loss_state is None else loss_state}


def make_train_step(net: Network, loss_fn: LossFn | FeatureLoss, tx: optax.GradientTransformation, *,
                    batch_transform: BatchTransform | None = None):
  """Returns `step(state, key, batch) -> (state, metrics)`.

  `key` is the run's root key; the step folds in its own counter, so the randomness of step t does not depend on
  how the run was split into resumed pieces. `batch` = {"images": (B, H, W, C), "labels": (B,) int} and any
  per-sample extras (e.g. "index", the dataset positions, for a `FeatureLoss`).
  """
  feature_loss = isinstance(loss_fn, FeatureLoss)

  def step(state: TrainState, key: jax.Array, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(key, state["step"])
    if batch_transform is not None:
      batch = batch_transform(key, batch)
    loss_state = state["loss_state"]

    def objective(params, loss_params):
      if not feature_loss:
        logits, model_state = net.apply(params, state["model_state"], batch["images"], train=True)
        return loss_fn(logits, batch["labels"], loss_state), (logits, model_state, None)
      logits, features, model_state = apply_with_features(net, params, state["model_state"], batch["images"],
                                                          train=True)
      # fold_in(key, 1): the loss's randomness is independent of the batch transform's (which splits `key`).
      loss, buffers = loss_fn.fn(loss_params, logits=logits, features=features, batch=batch,
                                 buffers=loss_state["buffers"], key=jax.random.fold_in(key, 1))
      return loss, (logits, model_state, buffers)

    loss_params = loss_state["params"] if feature_loss else {}
    (loss, (logits, model_state, buffers)), (grads, loss_grads) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True)(state["params"], loss_params)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    if feature_loss:
      loss_updates, loss_opt_state = tx.update(loss_grads, loss_state["opt_state"], loss_params)
      loss_state = {"params": optax.apply_updates(loss_params, loss_updates), "opt_state": loss_opt_state,
                    "buffers": buffers}
    hard_labels = batch["labels"] if batch["labels"].ndim == 1 else jnp.argmax(batch["labels"], -1)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == hard_labels)}
    new_state = dict(state, step=state["step"] + 1, params=optax.apply_updates(state["params"], updates),
                     model_state=model_state, opt_state=opt_state, loss_state=loss_state)
    return new_state, metrics

  return step


def jit_train_step(step, mesh: Mesh):
  """Jits a train step with the state replicated and the batch split over the mesh; the state is donated."""
  repl, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return jax.jit(step, in_shardings=(repl, repl, data), out_shardings=(repl, repl), donate_argnums=(0,))


def make_predict_fn(net: Network, mesh: Mesh):
  """Returns a jitted `(params, model_state, images) -> logits` in inference mode, batch split over the mesh."""
  repl, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return jax.jit(lambda params, model_state, images: net.apply(params, model_state, images, train=False)[0],
                 in_shardings=(repl, repl, data), out_shardings=data)


def predict(predict_fn, params, model_state, images: np.ndarray, *, batch_size: int, mesh: Mesh) -> np.ndarray:
  """Logits for all `images` (host numpy), in fixed-size batches so the function compiles once per split size.

  The batch is `batch_size` (rounded down to a multiple of the mesh size), or `len(images)` rounded up to one
  when that is smaller, so a small split (validation halves, a 500-image validation set) is not padded to a
  full evaluation batch. The last batch is padded with zeros and the padding is dropped from the result.
  """
  n = len(images)
  batch_size = max(mesh.size, batch_size - batch_size % mesh.size)
  batch_size = min(batch_size, -(-n // mesh.size) * mesh.size)
  outputs = []
  for start in range(0, n, batch_size):
    chunk = np.asarray(images[start:start + batch_size])
    valid = len(chunk)
    if valid < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - valid, *chunk.shape[1:]), chunk.dtype)])
    logits = predict_fn(params, model_state, parallel.shard_batch(chunk, mesh))
    outputs.append(np.asarray(jax.device_get(logits))[:valid])
  return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)
