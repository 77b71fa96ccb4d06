"""MTT expert buffers (docs/protocols.md §2.1): the format a `buffer` run writes and the loader MTT reads it with.

A buffer is every epoch's parameters of E experts, networks trained on the real training split with the
reference recipe (`calibjax.runs.buffer` trains them). Expert e is seeded by `expert_seed(config.seed, e)` (the
reference seeds from the wall clock), so a buffer is reproducible.

Workdir layout:

    config.json, metrics.jsonl    one record per finished expert (test accuracy), results.json at the end
    buffer.json                   the index (`load_buffer` reads it): counts, data / model settings and their
                                  signature, expert seeds
    trajectories/                 orbax checkpoints, step e = expert e's parameters stacked over epochs,
                                  leaves (epochs + 1, ...): snapshot 0 is the initialisation, snapshot k the
                                  parameters after epoch k
    experts/NNN/                  the expert being trained: its own metrics.jsonl (per epoch) and checkpoints/

The MTT reference appends `p.detach().cpu()` to its trajectories, which copies nothing on a CPU, so all its
snapshots alias the final weights (docs/reference-quirks.md §2.1); `load_buffer` refuses a trajectory whose
consecutive snapshots are identical.
"""

import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from calibjax import models
from calibjax.data.prepare import Splits
from calibjax.errors import CheckpointError
from calibjax.files import write_json_atomic
from calibjax.train.checkpoint import Checkpointer

INDEX = "buffer.json"
FORMAT = 1


class Buffer(NamedTuple):
  """Expert trajectories as loaded by `load_buffer`.

  Attributes:
    params: the network's parameter pytree with numpy leaves of shape (experts, snapshots, ...); snapshot k
      is the parameters after k epochs (0 = initialisation).
    info: the index (`buffer.json`): "experts", "epochs", "data", "model", "signature", "expert_seeds", ...,
      plus "path" (the buffer directory).
  """

  params: Any
  info: dict


def expert_seed(seed: int, expert: int) -> int:
  """The integer seed of expert `expert` of a buffer run with `seed` (distinct, reproducible streams)."""
  return int(np.random.SeedSequence([seed, expert]).generate_state(1)[0])


def signature(net: models.Network, splits: Splits) -> dict:
  """What a distillation run must share with the buffer, from its network and prepared data (JSON types).

  Keys: "model" (registry name), "params" ({path: shape}), "num_classes", "input_shape", "class_names",
  "normalize" ({"mean", "std"} or None), "zca_eps" (None without ZCA). The ZCA matrix itself is not compared:
  it depends on the training subset, which a distillation run may choose differently.
  """
  params, _ = jax.eval_shape(net.init, jax.random.key(0))
  normalize = splits.transforms.get("normalize")
  zca = splits.transforms.get("zca")
  sig = {"model": net.name,
         "params": {jax.tree_util.keystr(path): list(leaf.shape)
                    for path, leaf in jax.tree_util.tree_leaves_with_path(params)},
         "num_classes": splits.num_classes, "input_shape": list(splits.input_shape),
         "class_names": list(splits.class_names),
         "normalize": None if normalize is None else {k: np.asarray(normalize[k]).tolist()
                                                      for k in ("mean", "std")},
         "zca_eps": None if zca is None else float(zca["eps"])}
  return json.loads(json.dumps(sig))


def check_compatible(buffer: Buffer, *, net: models.Network, splits: Splits) -> None:
  """Refuses a buffer built for other data (dataset, normalisation, ZCA) or another network.

  Raises:
    CheckpointError: one line naming the differing entries and the buffer's data and model settings.
  """
  mine, theirs = signature(net, splits), buffer.info["signature"]
  differ = [key for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]
  if differ:
    data = {k: buffer.info["data"].get(k) for k in ("name", "normalize", "zca", "zca_eps")}
    raise CheckpointError(
        f"the buffer {buffer.info['path']} does not match this run (differs in: {', '.join(differ)}); it was "
        f"built with data {data} and model {buffer.info['model']}: use the same data and model settings, or "
        f"build a matching buffer with configs/buffer.py")


def write_index(path: str, config: ml_collections.ConfigDict, sig: dict, experts: int) -> None:
  """Writes buffer.json for a buffer run of `config` with `experts` finished experts."""
  write_json_atomic(os.path.join(path, INDEX), {
      "format": FORMAT, "experts": experts, "target_experts": config.buffer.experts,
      "epochs": config.train.epochs, "snapshots": config.train.epochs + 1,
      "expert_seeds": [expert_seed(config.seed, e) for e in range(experts)],
      "lr_teacher": config.train.lr, "batch_size": config.train.batch_size,
      "dsa": config.augment.dsa, "dsa_strategy": config.augment.dsa_strategy,
      "data": config.data.to_dict(), "model": config.model.to_dict(), "signature": sig})


def load_buffer(buffer_dir: str, *, max_experts: int | None = None, snapshots: int | None = None) -> Buffer:
  """Reads the trajectories of a `buffer` run into host memory.

  Args:
    buffer_dir: the workdir of a `buffer` run (finished or not: its finished experts are used).
    max_experts: keep only the first this many experts (None: all).
    snapshots: keep only snapshots 0 .. snapshots - 1 of each expert (None: all); MTT needs
      max_start_epoch + expert_epochs of them.

  Returns:
    A `Buffer` with leaves (experts, snapshots, ...).

  Raises:
    CheckpointError: not a buffer run, no finished expert, unreadable checkpoints, or a trajectory with two
      identical consecutive snapshots (parameters that were not copied).
  """
  index_path = os.path.join(buffer_dir, INDEX)
  if not os.path.exists(index_path):
    raise CheckpointError(f"{buffer_dir} is not a buffer run (no {INDEX}); build one with "
                          "configs/buffer.py and pass its --workdir")
  with open(index_path) as f:
    info = json.load(f)
  experts = info["experts"] if max_experts is None else min(max_experts, info["experts"])
  if experts < 1:
    raise CheckpointError(f"the buffer {buffer_dir} has no finished expert yet; run its command again to "
                          "continue it")
  sig = info["signature"]
  model = dict(info["model"])
  net = models.build(model.pop("name"), num_classes=sig["num_classes"], input_shape=tuple(sig["input_shape"]),
                     **model)
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct((info["snapshots"],) + x.shape, x.dtype),
                      jax.eval_shape(net.init, jax.random.key(0))[0])
  keep = info["snapshots"] if snapshots is None else min(snapshots, info["snapshots"])
  trajectories = []
  with Checkpointer(os.path.join(buffer_dir, "trajectories"), keep=info["target_experts"]) as checkpoints:
    for expert in range(experts):
      restored, _ = checkpoints.restore(expert, like)
      trajectory = jax.tree.map(lambda x: np.asarray(x[:keep]), restored)
      leaves = jax.tree.leaves(trajectory)
      for k in range(keep - 1):
        if all(np.array_equal(leaf[k], leaf[k + 1]) for leaf in leaves):
          raise CheckpointError(f"expert {expert} of the buffer {buffer_dir} has identical snapshots {k} and "
                                f"{k + 1} (parameters not copied, or lr 0); rebuild the buffer")
      trajectories.append(trajectory)
  params = jax.tree.map(lambda *xs: np.stack(xs), *trajectories)
  return Buffer(params=params, info=dict(info, experts=experts, path=os.path.abspath(buffer_dir)))
