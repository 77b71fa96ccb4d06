"""Pure, jitted training and prediction steps over a plain-dict train state.

TrainState = {"step": int32 scalar, "params": ..., "model_state": ..., "opt_state": ..., "loss_state": ...}
(`loss_state` carries the state of stateful calibration losses such as AdaFocal's per-bin gammas; {} otherwise).
"""

from typing import Any, Callable

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


def init_train_state(net: Network, tx: optax.GradientTransformation, key: jax.Array, *,
                     loss_state: Any = None) -> TrainState:
  params, model_state = net.init(key)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
          "opt_state": tx.init(params), "loss_state": {} if loss_state is None else loss_state}


def make_train_step(net: Network, loss_fn: LossFn, tx: optax.GradientTransformation, *,
                    batch_transform: BatchTransform | None = None):
  """Returns `step(state, key, batch) -> (state, metrics)`.

  `key` is the run's root key; the step folds in its own counter, so the randomness of step t does not depend on
  how the run was split into resumed pieces. `batch` = {"images": (B, H, W, C), "labels": (B,) int}.
  """

  def step(state: TrainState, key: jax.Array, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(key, state["step"])
    if batch_transform is not None:
      batch = batch_transform(key, batch)

    def objective(params):
      logits, model_state = net.apply(params, state["model_state"], batch["images"], train=True)
      return loss_fn(logits, batch["labels"], state["loss_state"]), (logits, model_state)

    (loss, (logits, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    hard_labels = batch["labels"] if batch["labels"].ndim == 1 else jnp.argmax(batch["labels"], -1)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == hard_labels)}
    new_state = dict(state, step=state["step"] + 1, params=optax.apply_updates(state["params"], updates),
                     model_state=model_state, opt_state=opt_state)
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
  """Logits for all `images` (host numpy), in fixed-size batches so the function compiles once.

  The last batch is padded with zeros and the padding is dropped from the result.
  """
  batch_size = max(mesh.size, batch_size - batch_size % mesh.size)
  n = len(images)
  outputs = []
  for start in range(0, n, batch_size):
    chunk = np.asarray(images[start:start + batch_size])
    valid = len(chunk)
    if valid < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - valid, *chunk.shape[1:]), chunk.dtype)])
    logits = predict_fn(params, model_state, parallel.shard_batch(chunk, mesh))
    outputs.append(np.asarray(jax.device_get(logits))[:valid])
  return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)
