"""Pure, jitted training and prediction steps over a plain-dict train state, with one loss protocol.

TrainState = {"step": int32 scalar, "params": ..., "model_state": ..., "opt_state": ..., "objective": ...}

Every training loss is an `Objective`: a function of the forward pass and the batch, with parameters and state
of its own where it has them. The batch carries everything per-sample as named fields: "images", "labels"
((B,) int or (B, K) soft targets), and what a method adds ("index": dataset positions, "teacher_log_probs",
"teacher_features", ...); nothing is packed into the labels. `objective` in the train state is
{"params": trainable parameters of the loss (CRD's heads; {} for most losses), "opt_state": their optimiser
state, "state": what the loss carries between steps (CRD's memory banks, AdaFocal's per-bin gammas)}. The step
differentiates w.r.t. the network's params and the objective's params together and updates both with the same
optimiser (for calibjax's SGD, per-parameter weight decay and momentum, that equals one optimiser over both
trees; a global-norm clip would differ).
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
# batch_transform(key, batch) -> batch: augmentation, mixup/CutMix (which may turn labels soft), masking, the
# teacher's outputs of a KD run.
BatchTransform = Callable[[jax.Array, dict], dict]


@dataclasses.dataclass(frozen=True)
class Objective:
  """A training loss and its own parameters and state.

  Attributes:
    fn: `(params, state, *, logits (B', K), features (B', D) or None, batch, key) -> (scalar loss, new state)`;
      `batch` is the transformed batch, `key` the step's key for the loss's own randomness (independent of the
      batch transform's), `params` and `state` the objective's (module docstring).
    params: initial trainable parameters ({} for a loss without any).
    state: initial state carried between steps ({} for a stateless loss).
    uses_features: the loss reads the network's penultimate features of the same forward pass.
    uses_indices: the loss reads the batch field "index", each example's position in the training array
      (per-sample state such as CRD's memory banks).
  """

  fn: Callable[..., tuple[jax.Array, Any]]
  params: Any = dataclasses.field(default_factory=dict)
  state: Any = dataclasses.field(default_factory=dict)
  uses_features: bool = False
  uses_indices: bool = False


def label_loss(loss: Callable[[jax.Array, jax.Array], jax.Array]) -> Objective:
  """The `Objective` of a stateless loss `loss(logits, labels) -> scalar` of the logits and the batch's labels."""
  return Objective(lambda params, state, *, logits, features, batch, key: (loss(logits, batch["labels"]), state))


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
                     objective: Objective | None = None) -> TrainState:
  """The state before the first step: the network initialised from `key`, fresh optimiser states."""
  params, model_state = net.init(key)
  objective = objective or Objective(fn=None)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
          "opt_state": tx.init(params),
          "objective": {"params": objective.params, "opt_state": tx.init(objective.params) if
                        jax.tree.leaves(objective.params) else {}, "state": objective.state}}


def make_train_step(net: Network, objective: Objective, tx: optax.GradientTransformation, *,
                    batch_transform: BatchTransform | None = None):
  """Returns `step(state, key, batch) -> (state, metrics)`.

  `key` is the run's steps key; the step folds in its own counter, so the randomness of step t does not depend on
  how the run was split into resumed pieces. `batch` = {"images": (B, H, W, C), "labels": (B,) int} and any
  per-sample fields (e.g. "index", the dataset positions). Metrics: the loss and the accuracy against the
  (transformed) labels, their argmax when soft.
  """
  trains_params = bool(jax.tree.leaves(objective.params))

  def step(state: TrainState, key: jax.Array, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(key, state["step"])
    if batch_transform is not None:
      batch = batch_transform(key, batch)
    own = state["objective"]

    def total(params, objective_params):
      if objective.uses_features:
        logits, features, model_state = apply_with_features(net, params, state["model_state"], batch["images"],
                                                            train=True)
      else:
        (logits, model_state), features = net.apply(params, state["model_state"], batch["images"], train=True), None
      # fold_in(key, 1): the loss's randomness is independent of the batch transform's (which splits `key`).
      loss, objective_state = objective.fn(objective_params, own["state"], logits=logits, features=features,
                                           batch=batch, key=jax.random.fold_in(key, 1))
      return loss, (logits, model_state, objective_state)

    (loss, (logits, model_state, objective_state)), (grads, objective_grads) = jax.value_and_grad(
        total, argnums=(0, 1), has_aux=True)(state["params"], own["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    own = dict(own, state=objective_state)
    if trains_params:
      objective_updates, objective_opt_state = tx.update(objective_grads, own["opt_state"], own["params"])
      own.update(params=optax.apply_updates(own["params"], objective_updates), opt_state=objective_opt_state)
    hard_labels = batch["labels"] if batch["labels"].ndim == 1 else jnp.argmax(batch["labels"], -1)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == hard_labels)}
    new_state = dict(state, step=state["step"] + 1, params=optax.apply_updates(state["params"], updates),
                     model_state=model_state, opt_state=opt_state, objective=own)
    return new_state, metrics

  return step


def jit_train_step(step, mesh: Mesh):
  """Jits a train step with the state replicated and the batch split over the mesh; the state is donated."""
  repl, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return jax.jit(step, in_shardings=(repl, repl, data), out_shardings=(repl, repl), donate_argnums=(0,))


def make_predict_fn(net: Network, mesh: Mesh):
  """Returns a jitted `(params, model_state, images) -> logits` in inference mode, batch split over the mesh and
  the logits gathered (replicated), so every process can read them."""
  repl, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return jax.jit(lambda params, model_state, images: net.apply(params, model_state, images, train=False)[0],
                 in_shardings=(repl, repl, data), out_shardings=repl)


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
