"""K networks trained together on one small training set: their train states stacked on a leading axis and one
`jax.vmap`-ed, jitted step updating all of them (one XLA computation per step instead of K).

This is how `evaluate` trains its K evaluation networks on a synthetic set: each network has its own
initialisation, step keys and shuffle of the set, and network k computes exactly what it computes alone.
"""

import functools

import jax
import optax

from calibjax.models import Network
from calibjax.train import step as step_lib


def make_ensemble_step(net: Network, objective: step_lib.Objective, tx: optax.GradientTransformation, *,
                       batch_transform: step_lib.BatchTransform | None = None):
  """Returns (init, step) for K stacked networks.

  `init(keys (K,)) -> states`; `step(states, keys (K,), idx (K, B), images (N, ...), targets (N, ...)) ->
  (states, metrics (K,))`, where idx is each network's batch of the shared training set (images, targets) and
  the states are donated.
  """
  train_step = step_lib.make_train_step(net, objective, tx, batch_transform=batch_transform)

  def one(state, key, idx, images, targets):
    return train_step(state, key, {"images": images[idx], "labels": targets[idx]})

  init = jax.jit(jax.vmap(lambda key: step_lib.init_train_state(net, tx, key, objective=objective)))
  return init, jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, None)), donate_argnums=(0,))


@functools.partial(jax.jit, static_argnums=(2, 3))
def epoch_batches(order_keys: jax.Array, epoch: int, n: int, batch: int) -> list[jax.Array]:
  """Each network's shuffle of epoch `epoch` (from its order key), cut into batches of `batch` (the last one may
  be smaller): a list of (K, B) index arrays."""
  perms = jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, epoch), n))(order_keys)
  return [perms[:, start:start + batch] for start in range(0, n, batch)]
