"""K networks trained together on one small training set: their train states stacked on a leading axis and one
`jax.vmap`-ed, jitted step updating all of them (one XLA computation per step instead of K).

This is how `evaluate` trains its K evaluation networks on a synthetic set: each network has its own
initialisation, step keys and shuffle of the set, and network k computes exactly what it computes alone. With a
mesh the K networks are split over its devices (K = 8 on 8 devices: one network each); the training set is
replicated, and nothing crosses devices.
"""

import functools

import jax
from jax.sharding import Mesh
import optax

from calibjax import parallel
from calibjax.models import Network
from calibjax.train import step as step_lib


def make_ensemble_step(net: Network, objective: step_lib.Objective, tx: optax.GradientTransformation, *,
                       batch_transform: step_lib.BatchTransform | None = None, mesh: Mesh | None = None):
  """Returns (init, step) for K stacked networks.

  `init(keys (K,)) -> states`; `step(states, keys (K,), idx (K, B), images (N, ...), targets (N, ...)) ->
  (states, metrics (K,))`, where idx is each network's batch of the shared training set (images, targets) and
  the states are donated. With `mesh` (whose size divides K: `parallel.mesh_dividing`), the states, keys,
  batches and metrics are split along K over it and the training set replicated.
  """
  train_step = step_lib.make_train_step(net, objective, tx, batch_transform=batch_transform)

  def one(state, key, idx, images, targets):
    return train_step(state, key, {"images": images[idx], "labels": targets[idx]})

  init = jax.vmap(lambda key: step_lib.init_train_state(net, tx, key, objective=objective))
  step = jax.vmap(one, in_axes=(0, 0, 0, None, None))
  if mesh is None:
    return jax.jit(init), jax.jit(step, donate_argnums=(0,))
  split, repl = parallel.data_sharded(mesh), parallel.replicated(mesh)
  return (jax.jit(init, in_shardings=split, out_shardings=split),
          jax.jit(step, in_shardings=(split, split, split, repl, repl), out_shardings=(split, split),
                  donate_argnums=(0,)))


@functools.partial(jax.jit, static_argnums=(2, 3))
def epoch_batches(order_keys: jax.Array, epoch: int, n: int, batch: int) -> list[jax.Array]:
  """Each network's shuffle of epoch `epoch` (from its order key), cut into batches of `batch` (the last one may
  be smaller): a list of (K, B) index arrays."""
  perms = jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, epoch), n))(order_keys)
  return [perms[:, start:start + batch] for start in range(0, n, batch)]
