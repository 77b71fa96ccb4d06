"""Data parallelism by sharding over a 1-D ('data',) mesh (no pmap; docs/jax.md §3).

Parameters and optimiser state are replicated (`P()`), batches are split along their first axis (`P('data')`);
`jax.jit` inserts the gradient all-reduce. The same code runs on one device and on N. Inside a jitted step,
`split_along` splits an intermediate batch (the real batches of a matching step, a student's minibatch) over the
mesh, and XLA's partitioner (GSPMD) derives the rest; a size that the devices do not divide is padded by XLA.
The mesh uses Auto axes:
`jax.make_mesh` defaults to Explicit axes, under which integer-label cross-entropy inside `grad` fails
(docs/jax.md §3.3).
"""

import math

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


def split_along(x, mesh: Mesh | None, axis: int = 0):
  """Inside a jitted function: `x` split along `axis` over the mesh's data axis (the arrays computed from it
  follow). The identity without a mesh or on one device, so a single-device program is the one it always was."""
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*(None,) * axis, DATA_AXIS)))


def mesh_dividing(n: int, *, what: str) -> Mesh:
  """The mesh over the most devices that split `n` evenly, gcd(n, devices): all of them when they divide n
  (8 networks on 8 devices, one each), fewer otherwise (5 networks on 4 devices run on one). A multi-process
  run needs every process's devices, so there n must be a multiple of the device count (`what` names n in the
  error)."""
  devices = jax.devices()
  used = math.gcd(n, len(devices))
  if used < len(devices) and jax.process_count() > 1:
    raise ConfigError(f"{what}={n} does not split over the {len(devices)} devices of {jax.process_count()} "
                      f"processes; use a multiple of {len(devices)}")
  return make_mesh(devices[:used])


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  if batch_size % mesh.size:
    raise ConfigError(f"batch size {batch_size} is not divisible by the {mesh.size} devices of the mesh; "
                      f"choose a multiple of {mesh.size}")


def shard_batch(batch, mesh: Mesh):
  """Host arrays of the global batch (every process computes the same one) -> global arrays split along the
  first axis of the mesh; each process puts only the rows of its own devices."""
  sharding = data_sharded(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), batch)


def replicate(tree, mesh: Mesh):
  """`tree` (host or device arrays, the same on every process) replicated over the mesh. In a multi-process run
  the values go through the host: a device array of one process cannot become a global array by device_put."""
  if jax.process_count() > 1:
    tree = jax.device_get(tree)
  return jax.device_put(tree, replicated(mesh))


def initialize_distributed(config) -> None:
  """Joins a multi-process run when `config.distributed` (one process per host, or per GPU): arguments not given
  (`coordinator_address` "", `num_processes` 0, `process_id` -1) are detected by JAX on Slurm, Open MPI,
  Kubernetes and TPU pods. Every process runs the same command on the same data and holds the same replicated
  results; process 0 writes the workdir, process i > 0 its own log and results under process_<i>/ of it
  (`calibjax.runs.core.Workdir`), and all of them write the shared checkpoints."""
  given = {"coordinator_address": config.coordinator_address or None,
           "num_processes": config.num_processes or None,
           "process_id": None if config.process_id < 0 else config.process_id}
  if not config.distributed:
    named = [key for key, value in given.items() if value is not None]
    if named:
      raise ConfigError(f"{', '.join(named)} only apply to a multi-process run; add --config.distributed=True "
                        "or remove them")
    return
  if given["num_processes"] is not None and given["process_id"] is not None and \
      given["process_id"] >= given["num_processes"]:
    raise ConfigError(f"process_id={given['process_id']} is not below num_processes={given['num_processes']}; "
                      "number the processes 0 ... num_processes - 1")
  if jax.distributed.is_initialized():  # a second run in the same process (a notebook)
    return
  try:
    jax.distributed.initialize(**given)
  except (RuntimeError, ValueError) as error:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ConfigError(f"cannot join the multi-process run ({reason[:200]}); outside Slurm / Open MPI / "
                      "Kubernetes / TPU pods give --config.coordinator_address, num_processes and process_id"
                      ) from None
