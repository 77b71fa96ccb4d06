"""Train-time losses with a memory of every training example, kept in the objective's state (checkpointed with
the train state, so a resumed run continues with the same memory) and read and written at the batch's "index":
PSKD and CRL, seed 003's baselines. Both take integer labels (no mixing) and one network (the `train` method).

* pskd — progressive self-knowledge distillation (Kim et al., ICCV 2021): for example i at epoch t (0-based) of E
  the target is (1 - a_t) onehot(y_i) + a_t p_i with a_t = alpha_T (t + 1) / E, where p_i is the softmax the
  network gave i the last time it trained on it (the previous epoch; the one-hot label before that, so the first
  epoch trains on hard labels); the loss is the cross-entropy with these targets, averaged over the batch; after
  the step p_i becomes this step's softmax (gradient stopped). alpha_T = 0.8 as the reference.
* crl — correctness ranking loss (Moon et al., ICML 2020): cross-entropy + rank_weight x a margin ranking loss
  between each example's confidence (max softmax) and that of the next example in the batch (the batch rolled by
  one): for the pair (i, j), with c the number of times each was classified correctly so far, normalised as
  (c - min c) / (m - min c) with m = max(1, completed epochs) and min over all examples, the target
  s = sign(c_i - c_j) and the margin |c_i - c_j| (normalised), the loss is max(0, -s (kappa_i - kappa_j) + margin)
  where s != 0 and 0 where the two are tied (all are tied when the span m - min c is 0); averaged over the batch. After the step each example's count grows
  by its correctness (argmax = label). rank_weight = 1 as the reference.

`OBJECTIVES[name] = (make_objective(training, **hparams), defaults)`; `training` is the `TrainingData` of the run.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from calibjax.train import step as step_lib


class TrainingData(NamedTuple):
  """What a per-example loss needs of the run: the training array's integer labels (N,), K, and the schedule."""
  train_labels: np.ndarray
  num_classes: int
  steps_per_epoch: int
  epochs: int


def pskd_alpha(epoch: jax.Array | int, *, alpha_T: float, epochs: int) -> jax.Array:
  """PSKD's weight of the remembered predictions at (0-based) `epoch` of `epochs`."""
  return alpha_T * (epoch + 1) / epochs


def make_pskd(training: TrainingData, *, alpha_T: float) -> step_lib.Objective:
  memory = jax.nn.one_hot(jnp.asarray(training.train_labels), training.num_classes, dtype=jnp.float32)

  def fn(params, state, *, logits, features, batch, key):
    index = batch["index"]
    onehot = jax.nn.one_hot(batch["labels"], training.num_classes, dtype=jnp.float32)
    weight = pskd_alpha(state["step"] // training.steps_per_epoch, alpha_T=alpha_T, epochs=training.epochs)
    targets = (1 - weight) * onehot + weight * state["predictions"][index]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    loss = -jnp.mean(jnp.sum(targets * log_probs, axis=-1))
    predictions = state["predictions"].at[index].set(jax.lax.stop_gradient(jnp.exp(log_probs)))
    return loss, {"predictions": predictions, "step": state["step"] + 1}

  return step_lib.Objective(fn, state={"predictions": memory, "step": jnp.zeros((), jnp.int32)}, uses_indices=True)


def crl_ranking(*, confidence: jax.Array, correctness: jax.Array, max_correctness: jax.Array,
                history_min: jax.Array) -> jax.Array:
  """CRL's ranking term of a batch: `confidence` (B,) max softmax, `correctness` (B,) the examples' counts."""
  span = max_correctness - history_min
  # Every example always right (span 0): all are tied, no pair is ranked (the reference would divide by zero).
  normalised = jnp.where(span > 0, (correctness - history_min) / jnp.where(span > 0, span, 1.0), 0.0)
  other_confidence, other = jnp.roll(confidence, -1), jnp.roll(normalised, -1)
  target = jnp.sign(normalised - other)
  hinge = jax.nn.relu(-target * (confidence - other_confidence) + jnp.abs(normalised - other))
  return jnp.mean(jnp.where(target != 0, hinge, 0.0))


def make_crl(training: TrainingData, *, rank_weight: float) -> step_lib.Objective:
  def fn(params, state, *, logits, features, batch, key):
    index, labels = batch["index"], batch["labels"]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    cross_entropy = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))
    history = state["correctness"]
    completed = state["step"] // training.steps_per_epoch
    ranking = crl_ranking(confidence=jnp.exp(jnp.max(log_probs, axis=-1)), correctness=history[index],
                          max_correctness=jnp.maximum(1, completed).astype(jnp.float32),
                          history_min=jnp.min(history))
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return cross_entropy + rank_weight * ranking, {"correctness": history.at[index].add(correct),
                                                   "step": state["step"] + 1}

  state = {"correctness": jnp.zeros(len(training.train_labels), jnp.float32), "step": jnp.zeros((), jnp.int32)}
  return step_lib.Objective(fn, state=state, uses_indices=True)


OBJECTIVES = {"pskd": (make_pskd, {"alpha_T": 0.8}), "crl": (make_crl, {"rank_weight": 1.0})}
