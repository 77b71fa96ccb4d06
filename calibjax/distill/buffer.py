"""Method `buffer`: MTT expert trajectories (algorithms.md §2.1), every epoch's parameters of E experts.

Each expert is a fresh network trained on the real training split with `calibjax.train.loop.fit` and the
reference recipe of `configs/buffer.py` (SGD without momentum, constant lr 0.01, no weight decay, 50 epochs,
batch 256, non-Siamese DSA, ZCA as the data config says). Expert e is seeded by
`expert_seed(config.seed, e)` (the reference seeds from the wall clock), so a buffer is reproducible.

Workdir layout:

    config.json, metrics.jsonl    one record per finished expert (test accuracy), results.json at the end
    buffer.json                   the index (`load_buffer` reads it): counts, data / model settings and their
                                  signature, expert seeds
    trajectories/                 orbax checkpoints, step e = expert e's parameters stacked over epochs,
                                  leaves (epochs + 1, ...): snapshot 0 is the initialisation, snapshot k the
                                  parameters after epoch k
    experts/NNN/                  the expert being trained: its own metrics.jsonl (per epoch) and checkpoints/

Snapshots are real copies: every epoch's train state is an orbax checkpoint of expert NNN's workdir (all
kept), and the trajectory is read back from those files. The MTT reference appends `p.detach().cpu()`, which
copies nothing on a CPU, so all its snapshots alias the final weights (anchors.md); here keeping references
to the state inside `fit` would fail the same way, because the train step donates its input state.
`load_buffer` refuses a trajectory whose consecutive snapshots are identical.

Resume (each start of the same command): experts 0 .. k-1 whose trajectories are saved are skipped; expert k
resumes from its last epoch checkpoint (fit's own resume: batches and step keys depend on (seed, epoch,
step) only), so the final buffer equals an uninterrupted run's. Order of the writes of one expert: metrics
record, trajectory checkpoint (atomic), index, then the expert's epoch checkpoints are deleted; a kill
between any two is repaired on the next start.
"""

import json
import os
import shutil
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax

from calibjax import models, parallel
from calibjax.data.augment import make_batch_transform
from calibjax.data.prepare import Splits, prepare
from calibjax.distill import matching
from calibjax.errors import CheckpointError
from calibjax.train import step as step_lib
from calibjax.train.checkpoint import Checkpointer
from calibjax.train.loop import LoopSpec, fit
from calibjax.train.run import build_network, build_optimizer
from calibjax.train.workdir import Workdir, write_json_atomic

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


def _cross_entropy(logits: jax.Array, labels: jax.Array, loss_state: Any) -> jax.Array:
  del loss_state
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _write_index(path: str, config: ml_collections.ConfigDict, sig: dict, experts: int) -> None:
  write_json_atomic(os.path.join(path, INDEX), {
      "format": FORMAT, "experts": experts, "target_experts": config.buffer.experts,
      "epochs": config.train.epochs, "snapshots": config.train.epochs + 1,
      "expert_seeds": [expert_seed(config.seed, e) for e in range(experts)],
      "lr_teacher": config.train.lr, "batch_size": config.train.batch_size,
      "dsa": config.augment.dsa, "dsa_strategy": config.augment.dsa_strategy,
      "data": config.data.to_dict(), "model": config.model.to_dict(), "signature": sig})


def _expert_dir(path: str, expert: int) -> str:
  return os.path.join(path, "experts", f"{expert:03d}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.buffer.experts` experts for `config.train.epochs` epochs each; resumable (module doc).

  The recipe is `config.train` (SGD with its momentum, weight decay and schedule; configs/buffer.py sets the
  reference's: none, none, constant) with cross-entropy and `config.augment`.

  Returns:
    results: {"experts", "epochs", "test_accuracy": {"mean", "std", "per_expert"}, "budget": {...}}.
  """
  splits = prepare(config.data, seed=config.seed)
  mesh = parallel.make_mesh()
  net = build_network(config.model, splits)
  matching.require_stateless(net)  # MTT differentiates apply as a pure function of the parameters
  steps_per_epoch = len(splits.train_images) // config.train.batch_size
  tx = build_optimizer(config.train, steps_per_epoch=steps_per_epoch)
  batch_transform = make_batch_transform(config.augment, num_classes=splits.num_classes)
  predict_fn = step_lib.make_predict_fn(net, mesh)
  run_dir = Workdir(workdir, config)
  sig = signature(net, splits)
  trajectories = Checkpointer(os.path.join(run_dir.path, "trajectories"), keep=config.buffer.experts)
  done = 0 if trajectories.latest_step() is None else trajectories.latest_step() + 1
  run_dir.truncate_log(key="expert", last=done - 1)
  _write_index(run_dir.path, config, sig, done)
  epochs = config.train.epochs
  for expert in range(config.buffer.experts):
    expert_path = _expert_dir(run_dir.path, expert)
    if expert < done:
      shutil.rmtree(os.path.join(expert_path, "checkpoints"), ignore_errors=True)  # left by a kill
      continue
    spec = LoopSpec(epochs=epochs, batch_size=config.train.batch_size, seed=expert_seed(config.seed, expert),
                    checkpoint_every=1, description=f"expert {expert + 1}/{config.buffer.experts}")
    expert_dir = Workdir(expert_path, config, keep_checkpoints=epochs + 1)
    train = dict(net=net, loss_fn=_cross_entropy, tx=tx, images=splits.train_images,
                 labels=splits.train_labels, mesh=mesh, batch_transform=batch_transform)
    if expert_dir.checkpoints.latest_step() is None:
      # fit with no epochs returns the initial state exactly as fit builds it from the seed: snapshot 0.
      initial = fit(**train, spec=LoopSpec(epochs=0, batch_size=spec.batch_size, seed=spec.seed))
      expert_dir.checkpoints.save(0, initial, {"epoch": 0})
      expert_dir.checkpoints.wait()  # fit must see step 0 as the latest checkpoint
    state = fit(**train, spec=spec, workdir=expert_dir)
    snapshots = [jax.device_get(expert_dir.checkpoints.restore(k, state)[0]["params"])
                 for k in range(epochs + 1)]
    trajectory = jax.tree.map(lambda *xs: np.stack(xs), *snapshots)
    logits = step_lib.predict(predict_fn, state["params"], state["model_state"], splits.test_images,
                              batch_size=config.eval_batch_size, mesh=mesh)
    accuracy = float(np.mean(logits.argmax(-1) == splits.test_labels))
    run_dir.log({"expert": expert, "seed": spec.seed, "test_accuracy": accuracy})
    trajectories.save(expert, trajectory, {"expert": expert, "test_accuracy": accuracy})
    trajectories.wait()
    _write_index(run_dir.path, config, sig, expert + 1)
    expert_dir.close()
    shutil.rmtree(expert_dir.checkpoints.directory)
  trajectories.close()
  with open(run_dir.metrics_path) as f:
    accuracies = [json.loads(line)["test_accuracy"] for line in f if line.strip()]
  results = {"experts": config.buffer.experts, "epochs": epochs,
             "test_accuracy": {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
                               "per_expert": accuracies},
             "budget": {"train_examples": len(splits.train_images), "test_examples": len(splits.test_images),
                        "steps_per_epoch": steps_per_epoch, "seed": config.seed, "devices": mesh.size}}
  run_dir.write_results(results)
  run_dir.close()
  return results


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
