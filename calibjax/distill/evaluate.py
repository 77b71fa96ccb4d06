"""Method `evaluate`: train K networks on a small training set with the dataset-distillation protocol and report
accuracy and calibration for each network and as mean ± std.

The training set is a distilled set (`evaluate.source` = a `distill` workdir or its `synthetic.npz`) or a
baseline at the same IPC drawn from the real training split (`evaluate.baseline` = "random" or "herding").

Protocol (DC/DSA/DM `evaluate_synset`, algorithms.md §3.5 and §1.5): a fresh network per seed; SGD momentum 0.9,
coupled weight decay 5e-4, lr `evaluate.lr` (0.01; `evaluate.learned_lr` takes an MTT set's learned lr), batch
256 over a per-network shuffle without dropping the last partial batch; `epochs + 1` passes with the lr ×0.1
from pass `epochs // 2 + 1` on, exactly the reference's `Epoch + 1` loop; DSA augmentation (per-sample
parameters) by default; test once at the end. The reference seeds its evaluation networks from the wall clock (DC) or with
one fixed seed (the MTS fork); here network k starts from `fold_in(root, k)`, so every number is reproducible
and the K networks differ.

The K networks train together: their train states are stacked on a leading axis and one `jax.vmap`-ed, jitted
step updates all of them (one XLA computation per step instead of K). Train-time calibration baselines are the
`loss` block (label smoothing 0.1, focal γ = 1, ...) and `augment.mixing` (mixup α = 1).

Calibration: TS and MTS are fitted on the held-out real validation split of the data config (never seen by
distillation: `calibjax.data.prepare` removes it from the training split first), the MTS ratio is chosen on
half of it; every metric is measured on the test split. A calibrator "over-calibrates" when it turns an
over-confident network (mean confidence above accuracy) under-confident, as the paper's Table 1 last row.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from calibjax import parallel
from calibjax.calibration.report import calibrate_and_report
from calibjax.data.augment import make_batch_transform
from calibjax.data.prepare import Splits, prepare
from calibjax.data.sampling import class_balanced_indices, class_indices
from calibjax.distill.run import SYNTHETIC_FILE
from calibjax.distill.synthetic import SyntheticSet, class_major_labels, load_npz
from calibjax.errors import CheckpointError, ConfigError
from calibjax.models import Network
from calibjax.train import schedules
from calibjax.train import step as step_lib
from calibjax.train.run import build_network, make_train_loss, restore_run
from calibjax.train.workdir import Workdir

BASELINES = ("random", "herding")
# Metrics summarised as mean ± std over the networks, for the raw network and after each calibrator.
SUMMARY_METRICS = ("accuracy", "nll", "ece", "ece_10", "sce", "ace", "oe", "mce", "brier", "mean_confidence",
                   "confidence_gap")


def herding_indices(features: np.ndarray, labels: np.ndarray, *, per_class: int, num_classes: int) -> np.ndarray:
  """Herding selection (Welling, ICML 2009), per class, class-major order.

  For each class, greedily picks the example whose feature brings the mean of the picked features closest (L2)
  to the class mean, without replacement: the coreset baseline of DC/DSA/DM, which embed with a network trained
  on the real data.

  Args:
    features: (N, D) embeddings.
    labels: (N,) int labels.
    per_class: examples to pick per class.
    num_classes: C.

  Returns:
    int64 (C * per_class,) indices into `features`, class c's picks in rows [c * per_class, (c + 1) * per_class)
    in pick order.
  """
  picks = []
  for c, idx in enumerate(class_indices(labels, num_classes)):
    if len(idx) < per_class:
      raise ConfigError(f"class {c} has {len(idx)} training examples, fewer than ipc={per_class}")
    feats = features[idx].astype(np.float64)
    target = feats.mean(axis=0)
    total = np.zeros_like(target)
    available = np.ones(len(idx), bool)
    for k in range(per_class):
      gap = np.linalg.norm(target - (total + feats) / (k + 1), axis=1)
      gap[~available] = np.inf
      best = int(np.argmin(gap))
      available[best] = False
      total += feats[best]
      picks.append(idx[best])
  return np.asarray(picks, np.int64)


def _same_data(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> bool:
  return all(a.get(k) == b.get(k) for k in ("name", "normalize", "zca", "zca_eps"))


def load_training_set(config: ml_collections.ConfigDict) -> tuple[SyntheticSet, Splits, dict]:
  """The set to train on, the data splits to validate and test on, and a description for results.json."""
  ev = config.evaluate
  if bool(ev.source) == bool(ev.baseline):
    raise ConfigError("set exactly one of evaluate.source (a distill workdir or .npz) and evaluate.baseline "
                      f"({' | '.join(BASELINES)})")
  if ev.source:
    path = os.path.join(ev.source, SYNTHETIC_FILE) if os.path.isdir(ev.source) else ev.source
    if not os.path.isfile(path):
      raise CheckpointError(f"no synthetic set at {path}; run the distill method first (its workdir holds "
                            f"{SYNTHETIC_FILE} when it has finished)")
    synset, config_json, _ = load_npz(path)
    source_config = ml_collections.ConfigDict(json.loads(config_json))
    # Validation and test data come from the distillation run's own data config and seed, so the held-out
    # validation split is exactly the one distillation never saw, in the same input space as the images.
    splits = prepare(source_config.data, seed=source_config.seed)
    described = {"source": os.path.abspath(path), "method": source_config.distill.method,
                 "mdt": source_config.distill.mdt, "ipc": int(source_config.distill.ipc),
                 "distill_iterations": int(source_config.distill.iterations)}
    return synset, splits, described
  if ev.baseline not in BASELINES:
    raise ConfigError(f"unknown evaluate.baseline '{ev.baseline}'; choose one of: {', '.join(BASELINES)}")
  splits = prepare(config.data, seed=config.seed)
  if ev.baseline == "random":
    idx = class_balanced_indices(splits.train_labels, ev.ipc, seed=config.seed, num_classes=splits.num_classes)
  else:
    if not ev.herding_model:
      raise ConfigError("herding needs evaluate.herding_model, the workdir of a finished train run on the same "
                        "data (e.g. `make quickstart` writes runs/quickstart)")
    model_config, _, model_net, state = restore_run(ev.herding_model)
    if not _same_data(model_config.data, config.data):
      raise ConfigError(f"{ev.herding_model} was trained on other data settings than config.data (name, "
                        "normalize, zca, val_per_class must match)")
    embed = jax.jit(lambda x: model_net.embed(state["params"], state["model_state"], x, train=False))
    features = np.concatenate([np.asarray(embed(splits.train_images[i:i + 1000]))
                               for i in range(0, len(splits.train_images), 1000)])
    idx = herding_indices(features, splits.train_labels, per_class=ev.ipc, num_classes=splits.num_classes)
  # Both selections are class-major, the synthetic sets' order.
  synset = SyntheticSet(images=splits.train_images[idx], labels=class_major_labels(splits.num_classes, ev.ipc),
                        log_lr=np.log(np.float32(ev.lr)))
  return synset, splits, {"source": ev.baseline, "method": ev.baseline, "mdt": "off", "ipc": int(ev.ipc)}


def subsample_validation(splits: Splits, per_class: int, seed: int) -> Splits:
  """Keeps a class-balanced `per_class` of the validation split (0 keeps all): fitting TS and selecting the MTS
  ratio for K networks costs K x (1 + 2 x len(mts_ratios)) passes over it."""
  if not per_class:
    return splits
  keep = class_balanced_indices(splits.val_labels, per_class, seed=seed, num_classes=splits.num_classes)
  return dataclasses.replace(splits, val_images=splits.val_images[keep], val_labels=splits.val_labels[keep])


def learning_rate(ev: ml_collections.ConfigDict, synset: SyntheticSet) -> float:
  """`evaluate.lr`, or the set's learned lr (MTT) with `evaluate.learned_lr`."""
  lr = float(np.exp(synset.log_lr)) if ev.learned_lr else float(ev.lr)
  if not lr > 0:
    raise ConfigError(f"the evaluation lr must be positive, got {lr}; set evaluate.lr or learned_lr=False")
  return lr


def make_multi_step(net: Network, config: ml_collections.ConfigDict, *, lr: float, steps_per_epoch: int,
                    num_classes: int):
  """A jitted step that trains all K stacked networks at once: `(states, keys, idx, images, targets)`, with
  states and keys stacked on axis 0 and idx (K, B) each network's batch of the shared training set."""
  epochs = config.evaluate.epochs + 1  # the reference's `Epoch + 1` passes
  schedule = schedules.make_schedule("multistep", base_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                     milestones=(config.evaluate.epochs // 2 + 1,) if epochs > 2 else ())
  tx = schedules.make_optimizer(lr_schedule=schedule, momentum=config.evaluate.momentum,
                                weight_decay=config.evaluate.weight_decay)
  loss_fn, loss_state, update = make_train_loss(config.loss)
  if update is not None:
    raise ConfigError(f"loss '{config.loss.name}' updates its state from validation data every epoch, which "
                      "evaluate does not do; use it with the train method")
  train_step = step_lib.make_train_step(
      net, loss_fn, tx, batch_transform=make_batch_transform(config.augment, num_classes=num_classes))

  def one(state, key, idx, images, targets):
    return train_step(state, key, {"images": images[idx], "labels": targets[idx]})

  init = jax.jit(jax.vmap(lambda key: step_lib.init_train_state(net, tx, key, loss_state=loss_state)))
  return init, jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, None)), donate_argnums=(0,))


@functools.partial(jax.jit, static_argnums=(2, 3))
def epoch_batches(perm_keys: jax.Array, epoch: int, n: int, batch: int) -> list[jax.Array]:
  """Each network's shuffle of epoch `epoch`, cut into batches of `batch` (the last one may be smaller)."""
  perms = jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, epoch), n))(perm_keys)
  return [perms[:, start:start + batch] for start in range(0, n, batch)]


def summarize(per_network: list[dict]) -> dict:
  """{stage: {metric: {"mean", "std"}}} over networks (std with ddof=0, as numpy and the references), plus the
  fraction of networks each calibrator over-calibrated."""
  summary = {}
  for stage in ("raw", "ts", "mts"):
    summary[stage] = {m: {"mean": float(np.mean([r[stage][m] for r in per_network])),
                          "std": float(np.std([r[stage][m] for r in per_network]))} for m in SUMMARY_METRICS}
    if stage != "raw":
      summary[stage]["over_calibrated_fraction"] = float(np.mean([r[stage]["over_calibrated"]
                                                                  for r in per_network]))
  return summary


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  ev = config.evaluate
  synset, splits, described = load_training_set(config)
  splits = subsample_validation(splits, ev.val_per_class, config.seed)
  images = jnp.asarray(synset.images, jnp.float32)
  targets = jnp.asarray(synset.soft_labels if synset.soft_labels is not None else synset.labels)
  n, batch = len(images), min(ev.batch_size, len(images))
  lr = learning_rate(ev, synset)
  net = build_network(config.model, splits)
  steps_per_epoch = -(-n // batch)
  init, multi_step = make_multi_step(net, config, lr=lr, steps_per_epoch=steps_per_epoch,
                                     num_classes=splits.num_classes)
  run_dir = Workdir(workdir, config)
  root = jax.random.key(config.seed)
  init_keys, step_keys, perm_keys, mts_keys = (jax.random.split(jax.random.fold_in(root, i), ev.num_nets)
                                               for i in range(4))
  states = init(init_keys)
  first = 0
  if (saved := run_dir.checkpoints.latest_step()) is not None:
    states, _ = run_dir.checkpoints.restore(saved, states)
    first = saved
    run_dir.truncate_log(key="epoch", last=saved)
  total = ev.epochs + 1
  with tqdm(total=total, initial=first, desc=f"evaluate {ev.num_nets} nets", unit="epoch", disable=None,
            dynamic_ncols=True) as progress:
    for epoch in range(first, total):
      for idx in epoch_batches(perm_keys, epoch, n, batch):
        states, metrics = multi_step(states, step_keys, idx, images, targets)
      done = epoch + 1
      if done % ev.log_every == 0 or done == total:
        metrics = jax.device_get(metrics)
        run_dir.log({"epoch": done, **{f"train_{k}_last_batch": [float(x) for x in v] for k, v in metrics.items()}})
      if done % ev.checkpoint_every == 0 or done == total:
        run_dir.checkpoints.save(done, states, {"epoch": done})
      progress.update()
  run_dir.checkpoints.wait()

  mesh = parallel.make_mesh()
  predict_fn = step_lib.make_predict_fn(net, mesh)
  per_network = []
  for k in range(ev.num_nets):
    state_k = jax.tree.map(lambda leaf: leaf[k], states)
    logits_fn = lambda x, s=state_k: step_lib.predict(predict_fn, s["params"], s["model_state"], x,
                                                      batch_size=config.eval_batch_size, mesh=mesh)
    plot = os.path.join(run_dir.plots, f"reliability_net{k}.png") if k == 0 else None
    per_network.append(calibrate_and_report(
        logits_fn=logits_fn, val_images=splits.val_images, val_labels=splits.val_labels,
        test_images=splits.test_images, test_labels=splits.test_labels, cfg=config.calibration,
        key=mts_keys[k], plot_path=plot))
  results = {"training_set": described, "summary": summarize(per_network), "per_network": per_network,
             "budget": {"networks": ev.num_nets, "epochs": total, "lr": lr, "batch_size": batch,
                        "train_examples": n, "val_examples": len(splits.val_images),
                        "test_examples": len(splits.test_images), "seed": config.seed, "dsa": config.augment.dsa,
                        "loss": config.loss.name, "mixing": config.augment.mixing}}
  run_dir.write_results(results)
  run_dir.close()
  return results
