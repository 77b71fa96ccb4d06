"""Method `buffer`: MTT expert trajectories, every epoch's parameters of E experts (format:
`calibjax.distill.buffer`).

Each expert is a fresh network trained on the real training split by the shared epoch loop with the recipe of
`config.train` (configs/buffer.py: the reference's SGD without momentum, constant lr 0.01, no weight decay,
batch 256) with cross-entropy and `config.augment` (non-Siamese DSA).

Snapshots are real copies: every epoch's train state is an orbax checkpoint of the expert's own workdir (all kept,
snapshot 0 the initialisation), and the trajectory is read back from those files (keeping references to the
state would alias, because the train step donates its input state).

Resume (each start of the same command): experts 0 .. k-1 whose trajectories are saved are skipped; expert k
resumes from its last epoch checkpoint, so the final buffer equals an uninterrupted run's. Order of the writes of
one expert: metrics record, trajectory checkpoint (atomic), index, then the expert's epoch checkpoints are
deleted; a kill between any two is repaired on the next start.
"""

import os
import shutil

import jax
import ml_collections
import numpy as np
import optax

from calibjax import build, parallel
from calibjax.data.augment import make_batch_transform
from calibjax.data.prepare import prepare
from calibjax.distill import buffer as buffer_lib
from calibjax.distill import matching
from calibjax.runs import core
from calibjax.runs.fit import fit, initial_state
from calibjax.train import step as step_lib
from calibjax.train.checkpoint import Checkpointer

CROSS_ENTROPY = step_lib.label_loss(lambda logits, labels: optax.softmax_cross_entropy_with_integer_labels(
    logits, labels).mean())


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.buffer.experts` experts for `config.train.epochs` epochs each; resumable (module doc).

  Returns:
    results: {"experts", "epochs", "test_accuracy": {"mean", "std", "per_expert"}, "budget", "manifest"}.
  """
  splits = prepare(config.data, seed=config.seed)
  mesh = parallel.make_mesh()
  net = build.network(config.model, splits)
  matching.require_stateless(net)  # MTT differentiates apply as a pure function of the parameters
  steps_per_epoch = build.steps_per_epoch(config.train, len(splits.train_images))
  tx = build.optimizer(config.train, steps_per_epoch=steps_per_epoch)
  batch_transform = make_batch_transform(config.augment, num_classes=splits.num_classes,
                                         data_transforms=splits.transforms)
  predict_fn = step_lib.make_predict_fn(net, mesh)
  run_dir = core.Workdir(workdir, config)
  sig = buffer_lib.signature(net, splits)
  trajectories = Checkpointer(os.path.join(run_dir.path, "trajectories"), keep=config.buffer.experts)
  done = 0 if trajectories.latest_step() is None else trajectories.latest_step() + 1
  run_dir.truncate_log(key="expert", last=done - 1)
  buffer_lib.write_index(run_dir.path, config, sig, done)
  epochs = config.train.epochs
  for expert in range(config.buffer.experts):
    expert_path = os.path.join(run_dir.path, "experts", f"{expert:03d}")
    if expert < done:
      shutil.rmtree(os.path.join(expert_path, "checkpoints"), ignore_errors=True)  # left by a kill
      continue
    seed = buffer_lib.expert_seed(config.seed, expert)
    expert_dir = core.Workdir(expert_path, config, keep_checkpoints=epochs + 1)
    if expert_dir.checkpoints.latest_step() is None:  # snapshot 0: the initialisation
      expert_dir.checkpoints.save(0, initial_state(net, tx, seed=seed, mesh=mesh, objective=CROSS_ENTROPY),
                                  {"epoch": 0})
      expert_dir.checkpoints.wait()
    state = fit(expert_dir, net=net, objective=CROSS_ENTROPY, tx=tx, images=splits.train_images,
                labels=splits.train_labels, epochs=epochs, batch_size=config.train.batch_size, seed=seed, mesh=mesh,
                cadence=core.Cadence("epoch"), description=f"expert {expert + 1}/{config.buffer.experts}",
                batch_transform=batch_transform)
    snapshots = [jax.device_get(expert_dir.checkpoints.restore(k, state)[0]["params"]) for k in range(epochs + 1)]
    trajectory = jax.tree.map(lambda *xs: np.stack(xs), *snapshots)
    logits = build.logits_fn(net, state, mesh, config.eval_batch_size, predict_fn=predict_fn)(splits.test_images)
    accuracy = float(np.mean(logits.argmax(-1) == splits.test_labels))
    run_dir.log({"expert": expert, "seed": seed, "test_accuracy": accuracy})
    trajectories.save(expert, trajectory, {"expert": expert, "test_accuracy": accuracy})
    trajectories.wait()
    buffer_lib.write_index(run_dir.path, config, sig, expert + 1)
    expert_dir.close()
    shutil.rmtree(expert_dir.checkpoints.directory)
  trajectories.close()
  accuracies = [record["test_accuracy"] for record in run_dir.records()]
  results = {"experts": config.buffer.experts, "epochs": epochs,
             "test_accuracy": {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
                               "per_expert": accuracies}}
  budget = {"train_examples": len(splits.train_images), "test_examples": len(splits.test_images),
            "steps_per_epoch": steps_per_epoch, "seed": config.seed, "devices": mesh.size}
  protocol = {"model": config.model.name, "epochs": epochs, "lr": config.train.lr, "augment": config.augment.to_dict(),
              "zca": config.data.zca}
  return core.finish(run_dir, results, config=config, budget=budget, protocol=protocol,
                     seeds={"experts": [buffer_lib.expert_seed(config.seed, e) for e in range(config.buffer.experts)]})
