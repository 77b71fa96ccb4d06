"""Progressive self-knowledge distillation, PSKD (Kim et al., ICCV 2021): the network's own predictions of the
previous epoch soften its targets, more and more as training goes on.

For example i at epoch t (0-based) of E: target_i = (1 - a_t) onehot(y_i) + a_t p_i with a_t = alpha_T (t + 1) / E,
where p_i is the softmax the network gave example i the last time it trained on it (the previous epoch; the
one-hot label before that, so the first epoch trains on hard labels). The loss is the cross-entropy with these
targets, averaged over the batch; after the step p_i becomes this step's softmax (gradient stopped). alpha_T = 0.8
as the reference. The predictions are a per-example memory (N, K) in the objective's state — checkpointed with the
train state, so a resumed run continues with the same memory — read and written at the batch's "index"; the
state also counts the steps, which give the epoch.
"""

import jax
import jax.numpy as jnp
import numpy as np

from calibjax.train import step as step_lib

NAME = "pskd"
DEFAULTS = {"alpha_T": 0.8}


def alpha(epoch: jax.Array | int, *, alpha_T: float, epochs: int) -> jax.Array:
  """The weight of the remembered predictions at (0-based) `epoch` of `epochs`."""
  return alpha_T * (epoch + 1) / epochs


def make_objective(*, train_labels: np.ndarray, num_classes: int, steps_per_epoch: int, epochs: int,
                   alpha_T: float = DEFAULTS["alpha_T"]) -> step_lib.Objective:
  """The PSKD `step.Objective` over the training array whose integer labels are `train_labels` (N,)."""
  memory = jax.nn.one_hot(jnp.asarray(train_labels), num_classes, dtype=jnp.float32)

  def fn(params, state, *, logits, features, batch, key):
    index = batch["index"]
    onehot = jax.nn.one_hot(batch["labels"], num_classes, dtype=jnp.float32)
    weight = alpha(state["step"] // steps_per_epoch, alpha_T=alpha_T, epochs=epochs)
    targets = (1 - weight) * onehot + weight * state["predictions"][index]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    loss = -jnp.mean(jnp.sum(targets * log_probs, axis=-1))
    predictions = state["predictions"].at[index].set(jax.lax.stop_gradient(jnp.exp(log_probs)))
    return loss, {"predictions": predictions, "step": state["step"] + 1}

  return step_lib.Objective(fn, state={"predictions": memory, "step": jnp.zeros((), jnp.int32)}, uses_indices=True)
