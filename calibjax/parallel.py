"""Data parallelism by sharding over a 1-D ('data',) mesh (no pmap; docs/jax.md §3).

Parameters and optimiser state are replicated (`P()`), batches are split along their first axis (`P('data')`);
`jax.jit` inserts the gradient all-reduce. The same code runs on one device and on N. The mesh uses Auto axes:
`jax.make_mesh` defaults to Explicit axes, under which integer-label cross-entropy inside `grad` fails
(docs/jax.md §3.3).
"""

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from calibjax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  if batch_size % mesh.size:
    raise ConfigError(f"batch size {batch_size} is not divisible by the {mesh.size} devices of the mesh; "
                      f"choose a multiple of {mesh.size}")


def shard_batch(batch, mesh: Mesh):
  """Host arrays (this process's slice) -> global arrays split along the first axis of the mesh."""
  sharding = data_sharded(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))


def maybe_initialize_distributed(enabled: bool) -> None:
  """Joins a multi-process run (Slurm, Open MPI, Kubernetes, TPU pods: arguments are auto-detected)."""
  if enabled:
    jax.distributed.initialize()
