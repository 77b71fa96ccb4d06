"""Method `kd`: train a student from a frozen teacher (a finished `train` or `kd` run); calibrate and report.

Design: the teacher runs inside the student's jitted train step, through the step's `batch_transform`.
`calibjax.train.loop.fit` hands its loss only `(logits, labels, loss_state)`; the loss state is checkpointed
with the student, so the teacher's weights do not belong there. Instead `make_kd_batch_transform` closes over
the teacher's (replicated, read-only) params and, per step:

  1. applies the base augmentation (DSA, if on) to the batch: this is the "original sample";
  2. computes the teacher's logits on it in inference mode (batch-norm running statistics, no dropout),
     divided by the teacher's own TS / MTS temperature when `kd.teacher_calibration` asks for a post-hoc
     calibrated teacher;
  3. applies the mixing augmentation (mixup / CutMix / cutout) to the STUDENT's copy only, as paper 004
     (Eq. 6, 13) requires: the teacher never sees a mixed or cut image;
  4. returns {"images", "labels"} with labels = concat([targets (K), log_softmax(teacher logits) (K)], -1),
     shape (rows, 2K). The targets are one-hot, or λ·onehot(y_a) + (1−λ)·onehot(y_b) after mixup/CutMix.

  Storing the teacher as log-probabilities instead of logits changes no softmax-based loss (log_softmax is
  invariant to a per-row shift, so log_softmax(log_softmax(t) / T) = log_softmax(t / T)), and it keeps the
  train step's accuracy metric right: the step takes argmax over the whole label row, the target block's
  maximum is >= 0.5 > 0 >= every log-probability, so the argmax always falls in the target block.

  Without mixing, the rows are the B original images (teacher and student see the same input, as Hinton KD,
  RepDistiller and CalibrationXferViaKD). With mixing, the student batch is concat([originals, augmented])
  (2B rows): the distillation term uses the first B rows (student and teacher on the original sample), the
  task loss (cross-entropy against the mixed targets: λ·CE(y_a) + (1−λ)·CE(y_b) for mixup/CutMix, CE(y) for
  cutout) the last B. Both halves go through the student in one forward pass, so in train mode its batch-norm
  statistics are those of the 2B rows (two separate passes would normalise each half on its own); the logged
  train accuracy is over the 2B rows.

Losses (`config.kd.loss`; alpha and temperature from `config.kd`):
  * "kd": Hinton KD as RepDistiller: α·T²·KL_batchmean + (1−α)·CE (recipe T = 4, α = 0.9).
  * "scaled_kd": paper 004: α·(T²·KL / K) + (1−α)·augmentation loss (T = 50, α = 0.5, mixup Beta(0.4)).
    For mixup, Eq. 12 sums the class-mean KL over both mixed sources x_i and x_j; averaged over a batch whose
    partners x_j are a permutation of it, that is twice the batch-mean KL on the originals, so the
    distillation term is doubled for mixup (CutMix and cutout: once).
  * "cxkd": CalibrationXferViaKD's kdloss, the same α·T²·KL + (1−α)·CE form as "kd", with its defaults
    T = 20, α = 0.9.
  * "crd": Contrastive Representation Distillation (Tian et al., ICLR 2020) as RepDistiller's CRD recipe
    (`-r 1 -a 0 -b 0.8`): (1−α)·CE + α·T²·KL + β·CRD with α = 0, T = 4, β = `kd.crd.weight` = 0.8;
    feat_dim 128, nce_k 16384 negatives of other classes ("exact" mode), nce_t 0.07, nce_m 0.5 (`kd.crd`;
    calibjax.kd.crd has the definition). nce_k is clipped to n_train − (largest class count)
    (`crd.clip_nce_k`; the digits smoke run draws 1 030); results.json records the value drawn under "crd".
    With mixing, CRD (like the KD term) uses the original rows.
The teacher params are closed over, so they are compile-time constants of the jitted step (one compile per
run).

CRD in the jitted step. CRD needs dataset indices, the student's penultimate features with gradient, trainable
heads and memory banks updated every step; the step stays one pure function of the train state:
  * `fit(..., with_indices=True)` adds each batch's positions in the training array as "index" (B,); the
    batch transform passes it through and adds "teacher_features" (B, D_t), the teacher's penultimate features
    on the original sample from the same inference-mode pass as its logits (`step.apply_with_features`);
  * the loss is a `step.FeatureLoss`: the step computes logits and penultimate features in one student pass,
    differentiates w.r.t. the student's params and the two heads, updates both with the student's optimiser;
  * `loss_state` = {"params": heads, "opt_state": their SGD state, "buffers": {"student", "teacher" banks
    (n_train, 128), "z" (2,)}} is part of the checkpointed train state, so a killed run resumes exactly;
    negatives are drawn inside the step from `fold_in(step key, 1)`.
  * After the last epoch the CRD state is dropped from the train state (`end_of_epoch` returns loss_state {})
    before the final checkpoint: the heads and banks are training-time state (RepDistiller saves only the
    student), and the finished run restores like any other (`restore_run`, e.g. as the teacher of the next
    generation). Re-running a finished command restores that final checkpoint without the CRD state.

The student's validation split comes from its own config and seed; if the teacher was trained with another
seed, its training split may overlap the student's validation split (use the same seed to avoid that).

Results (results.json): raw / ts / mts from `calibrate_and_report` on the LAST epoch's student (the headline,
as RepDistiller reports), "best_epoch" (the epoch of highest validation accuracy and that accuracy, next to
the last epoch's), "budget", and "teacher" (its workdir, method and model).
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from calibjax import models, parallel
from calibjax.calibration.losses import cross_entropy
from calibjax.calibration.report import calibrate_and_report
from calibjax.data.augment import make_batch_transform
from calibjax.data.prepare import Splits, prepare
from calibjax.errors import ConfigError
from calibjax.kd import crd
from calibjax.kd import losses as kd_losses
from calibjax.train import step as step_lib
from calibjax.train.loop import LoopSpec, fit
from calibjax.train.run import build_network, build_optimizer, make_logits_fn, restore_run
from calibjax.train.workdir import Workdir

# The logit distillation term of each `config.kd.loss`; "cxkd" is the "kd" form with CalibrationXferViaKD's
# defaults; "crd" adds its contrastive term to the "kd" form (weight alpha = 0 in RepDistiller's CRD recipe).
DISTILL_TERMS = {"kd": kd_losses.kd_loss, "scaled_kd": kd_losses.scaled_kd_loss, "cxkd": kd_losses.kd_loss,
                 "crd": kd_losses.kd_loss}
# Data settings a student must share with its teacher (they change the inputs the teacher was trained on).
MATCHED_DATA_KEYS = ("name", "normalize", "zca")


def restore_teacher(workdir: str):
  """A finished `train` or `kd` run (a student of an earlier generation, for iterative self-distillation):
  (config, splits, network, train state), via `calibjax.train.run.restore_run`."""
  if not workdir or not os.path.exists(os.path.join(workdir, "config.json")):
    raise ConfigError(f"kd.teacher '{workdir}' is not a calibjax run (no config.json); set --config.kd.teacher "
                      "to the --workdir of a finished train or kd run")
  return restore_run(workdir, methods=("train", "kd"))


def teacher_temperature(workdir: str, calibration: str) -> float:
  """The post-hoc temperature that calibrates the teacher's logits before distillation (KD(C) with a TS or MTS
  teacher, paper 003): 1 for "none", else the temperature the teacher's own run fitted on its validation split
  (`results.json` ["ts"|"mts"]["temperature"]). Dividing the logits by it is what the teacher's calibrated
  predictions are; the KD temperature then applies on top (softmax(logits / (T_cal * T_kd)))."""
  if calibration == "none":
    return 1.0
  if calibration not in ("ts", "mts"):
    raise ConfigError(f"kd.teacher_calibration must be none, ts or mts; got '{calibration}'")
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    raise ConfigError(f"kd.teacher_calibration={calibration} needs the teacher's fitted temperature but {path} "
                      "does not exist; finish the teacher run (its results.json) or set kd.teacher_calibration=none")
  with open(path) as f:
    return float(json.load(f)[calibration]["temperature"])


def make_teacher_apply(teacher_net, teacher_state: dict, *, temperature: float, features: bool = False):
  """`images (B, H, W, C) -> logits (B, K) / temperature` of the frozen teacher in inference mode; with
  `features`, `images -> (logits / temperature, penultimate features (B, D_t))` from the same pass."""

  def teacher_apply(images: jax.Array):
    if features:
      logits, embedded, _ = step_lib.apply_with_features(teacher_net, teacher_state["params"],
                                                         teacher_state["model_state"], images, train=False)
      return logits / temperature, embedded
    logits = teacher_net.apply(teacher_state["params"], teacher_state["model_state"], images, train=False)[0]
    return logits / temperature

  return teacher_apply


def check_teacher_data(student_data: ml_collections.ConfigDict,
                       teacher_data: ml_collections.ConfigDict) -> None:
  """Raises a one-line ConfigError when the teacher was trained on differently prepared inputs."""
  for key in MATCHED_DATA_KEYS:
    if student_data[key] != teacher_data[key]:
      raise ConfigError(f"the teacher was trained with data.{key}={teacher_data[key]!r} but the student uses "
                        f"{student_data[key]!r}; set --config.data.{key}={teacher_data[key]!r} or pick "
                        f"another teacher")


def make_kd_batch_transform(teacher_apply, augment_cfg: ml_collections.ConfigDict, *, num_classes: int,
                            teacher_features: bool = False) -> step_lib.BatchTransform:
  """The step's batch transform: teacher logits on the original sample, then mixing for the student only.

  Args:
    teacher_apply: `images (B, H, W, C) -> logits (B, K)` of the frozen teacher (inference mode), or
      `-> (logits, features (B, D_t))` with `teacher_features`.
    augment_cfg: the run's `augment` config; DSA is the base augmentation both networks see, `mixing` is
      applied to the student's copy only.
    num_classes: K.
    teacher_features: also return the teacher's penultimate features on the original sample (for CRD).

  Returns:
    `(key, {"images": (B, H, W, C), "labels": (B,) int, ...}) -> {"images": (R, H, W, C), "labels": (R, 2K),
    ...}` with R = B without mixing and 2B (originals, then augmented) with it; labels rows are
    [targets, teacher log-probabilities] (module docstring). Other per-sample entries of the input (e.g.
    "index") pass through unchanged ((B, ...), the originals), and "teacher_features" (B, D_t) float32 is
    added with `teacher_features`.
  """
  base = make_batch_transform(ml_collections.ConfigDict(dict(augment_cfg, mixing="none")),
                              num_classes=num_classes)
  mix = make_batch_transform(ml_collections.ConfigDict(dict(augment_cfg, dsa=False)), num_classes=num_classes)

  def transform(key: jax.Array, batch: dict) -> dict:
    extras = {name: value for name, value in batch.items() if name not in ("images", "labels")}
    base_key, mix_key = jax.random.split(key)
    if base is not None:
      batch = base(base_key, batch)
    teacher_out = jax.lax.stop_gradient(teacher_apply(batch["images"]))
    if teacher_features:
      teacher_out, extras["teacher_features"] = teacher_out[0], teacher_out[1].astype(jnp.float32)
    teacher = jax.nn.log_softmax(teacher_out.astype(jnp.float32), -1)
    onehot = jax.nn.one_hot(batch["labels"], num_classes, dtype=jnp.float32)
    if mix is None:
      return {"images": batch["images"], "labels": jnp.concatenate([onehot, teacher], -1), **extras}
    mixed = mix(mix_key, batch)
    targets = mixed["labels"]
    if targets.ndim == 1:  # cutout keeps integer labels
      targets = jax.nn.one_hot(targets, num_classes, dtype=jnp.float32)
    return {"images": jnp.concatenate([batch["images"], mixed["images"]]),
            "labels": jnp.concatenate([jnp.concatenate([onehot, teacher], -1),
                                       jnp.concatenate([targets, teacher], -1)]), **extras}

  return transform


def make_kd_loss(kd_cfg: ml_collections.ConfigDict, *, mixing: str):
  """Returns `loss_fn(logits (R, K), labels (R, 2K), loss_state) -> scalar` for the labels of the transform.

  Args:
    kd_cfg: `config.kd` (loss, alpha, temperature).
    mixing: `config.augment.mixing`; with "none" both terms use all rows, otherwise the distillation term uses
      the first half (originals) and the task loss the second (augmented).
  """
  if kd_cfg.loss not in DISTILL_TERMS:
    raise ConfigError(f"kd.loss must be one of {', '.join(DISTILL_TERMS)}; got '{kd_cfg.loss}'")
  distill_fn = DISTILL_TERMS[kd_cfg.loss]
  # Eq. 12 of paper 004: mixup's KD term covers both mixed sources (twice the batch-mean KL on the originals).
  sources = 2.0 if kd_cfg.loss == "scaled_kd" and mixing == "mixup" else 1.0

  def loss_fn(logits: jax.Array, labels: jax.Array, loss_state) -> jax.Array:
    del loss_state
    num_classes = logits.shape[-1]
    targets, teacher = labels[:, :num_classes], labels[:, num_classes:]
    half = logits.shape[0] // 2 if mixing != "none" else 0
    distill_rows = slice(0, half) if half else slice(None)
    task_rows = slice(half, None)
    distill = sources * distill_fn(student_logits=logits[distill_rows], teacher_logits=teacher[distill_rows],
                                   temperature=kd_cfg.temperature)
    task = cross_entropy(logits=logits[task_rows], labels=targets[task_rows])
    return kd_losses.combined(distill=distill, task=task, alpha=kd_cfg.alpha)

  return loss_fn


def make_crd_loss(kd_cfg: ml_collections.ConfigDict, *, mixing: str,
                  train_labels: np.ndarray) -> tuple[step_lib.FeatureLoss, int]:
  """The "crd" objective: `make_kd_loss`'s (1−α)·CE + α·KD plus kd.crd.weight · CRD, as a `step.FeatureLoss`.

  The CRD term uses the first B rows (the originals, whose dataset positions are `batch["index"]`), the
  student's penultimate features of those rows and `batch["teacher_features"]`; negatives are drawn in the
  step.

  Args:
    kd_cfg: `config.kd` (alpha, temperature and `crd`: weight, feat_dim, nce_k, nce_t, nce_m).
    mixing: `config.augment.mixing` (as `make_kd_loss`).
    train_labels: (n_train,) int labels in the order of the memory banks (the training array's).

  Returns:
    (the loss, the number of negatives it draws: `crd.clip_nce_k(kd.crd.nce_k, train_labels)`).
  """
  logit_loss = make_kd_loss(kd_cfg, mixing=mixing)
  crd_cfg = kd_cfg.crd
  nce_k = crd.clip_nce_k(crd_cfg.nce_k, train_labels)
  labels = jnp.asarray(train_labels, jnp.int32)

  def loss_fn(heads, *, logits, features, batch, buffers, key):
    index = batch["index"]
    negatives = crd.sample_negatives(key, index=index, labels=labels, nce_k=nce_k)
    contrastive, buffers = crd.crd_loss(heads, student_features=features[:index.shape[0]],
                                        teacher_features=batch["teacher_features"], index=index,
                                        negatives=negatives, buffers=buffers, temperature=crd_cfg.nce_t,
                                        momentum=crd_cfg.nce_m)
    return logit_loss(logits, batch["labels"], None) + crd_cfg.weight * contrastive, buffers

  return step_lib.FeatureLoss(loss_fn), nce_k


def init_crd_state(key: jax.Array, crd_cfg: ml_collections.ConfigDict, *, net: models.Network, teacher_apply,
                   images: np.ndarray, tx) -> dict:
  """The initial `loss_state` of "crd": heads sized from the two networks' feature widths, memory banks of
  len(images) rows, the heads' optimiser state (`step.feature_loss_state`).

  Args:
    key: PRNG key (heads and banks).
    crd_cfg: `config.kd.crd`.
    net: the student.
    teacher_apply: the `features=True` teacher function of `make_teacher_apply`.
    images: (n_train, H, W, C) training images (their number and shape).
    tx: the student's optimiser.
  """
  spec = jax.ShapeDtypeStruct((1, *images.shape[1:]), images.dtype)
  student_dim = jax.eval_shape(lambda x: net.embed(*net.init(jax.random.key(0)), x), spec).shape[-1]
  teacher_dim = jax.eval_shape(teacher_apply, spec)[1].shape[-1]
  heads_key, buffers_key = jax.random.split(key)
  heads = crd.init_heads(heads_key, student_dim=student_dim, teacher_dim=teacher_dim,
                         feat_dim=crd_cfg.feat_dim)
  buffers = crd.init_buffers(buffers_key, n_data=len(images), feat_dim=crd_cfg.feat_dim)
  return step_lib.feature_loss_state(heads, buffers, tx)


def best_epoch(metrics_path: str) -> dict:
  """The epoch of highest validation accuracy (first on ties) and the last epoch's, from metrics.jsonl."""
  with open(metrics_path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  best = max(records, key=lambda r: (r["val_accuracy"], -r["epoch"]))
  return {"epoch": best["epoch"], "val_accuracy": best["val_accuracy"], "last_epoch": records[-1]["epoch"],
          "last_val_accuracy": records[-1]["val_accuracy"], "headline": "last_epoch"}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.model` from the teacher at `config.kd.teacher`; writes results.json (module docstring)."""
  if not config.train.validate_each_epoch:  # the shared train block has the switch; kd cannot honour it
    raise ConfigError("kd runs validate after every epoch to report their best epoch; drop "
                      "--config.train.validate_each_epoch=False")
  teacher_config, _, teacher_net, teacher_state = restore_teacher(config.kd.teacher)
  check_teacher_data(config.data, teacher_config.data)
  splits: Splits = prepare(config.data, seed=config.seed)
  mesh = parallel.make_mesh()
  net = build_network(config.model, splits)
  steps_per_epoch = len(splits.train_images) // config.train.batch_size
  tx = build_optimizer(config.train, steps_per_epoch=steps_per_epoch)
  run_dir = Workdir(workdir, config)
  predict_fn = step_lib.make_predict_fn(net, mesh)

  calibration_temperature = teacher_temperature(config.kd.teacher, config.kd.teacher_calibration)
  frozen = {key: teacher_state[key] for key in ("params", "model_state")}
  use_crd = config.kd.loss == "crd"
  teacher_apply = make_teacher_apply(teacher_net, parallel.replicate(frozen, mesh),
                                     temperature=calibration_temperature, features=use_crd)
  batch_transform = make_kd_batch_transform(teacher_apply, config.augment, num_classes=splits.num_classes,
                                            teacher_features=use_crd)
  initial_loss_state = None
  if use_crd:
    loss_fn, nce_k = make_crd_loss(config.kd, mixing=config.augment.mixing, train_labels=splits.train_labels)
    # A finished run's final checkpoint holds no CRD state (module docstring).
    if run_dir.checkpoints.latest_step() != config.train.epochs:
      initial_loss_state = init_crd_state(jax.random.fold_in(jax.random.key(config.seed), 3), config.kd.crd,
                                          net=net, teacher_apply=teacher_apply, images=splits.train_images,
                                          tx=tx)
  else:
    loss_fn = make_kd_loss(config.kd, mixing=config.augment.mixing)

  def validate(epoch, state):
    logits = step_lib.predict(predict_fn, state["params"], state["model_state"], splits.val_images,
                              batch_size=config.eval_batch_size, mesh=mesh)
    record = {"val_accuracy": float(np.mean(logits.argmax(-1) == splits.val_labels))}
    if use_crd and epoch == config.train.epochs:
      record["loss_state"] = {}  # drop CRD's heads and banks before the final checkpoint (module docstring)
    return record

  spec = LoopSpec(epochs=config.train.epochs, batch_size=config.train.batch_size, seed=config.seed,
                  checkpoint_every=config.train.checkpoint_every,
                  description=f"kd {teacher_config.model.name} -> {config.model.name}")
  state = fit(net, loss_fn=loss_fn, tx=tx, images=splits.train_images, labels=splits.train_labels, spec=spec,
              mesh=mesh, workdir=run_dir, batch_transform=batch_transform, end_of_epoch=validate,
              initial_loss_state=initial_loss_state, with_indices=use_crd)
  results = calibrate_and_report(
      logits_fn=make_logits_fn(net, state, mesh, config.eval_batch_size), val_images=splits.val_images,
      val_labels=splits.val_labels, test_images=splits.test_images, test_labels=splits.test_labels,
      cfg=config.calibration, key=jax.random.fold_in(jax.random.key(config.seed), 2),
      plot_path=os.path.join(run_dir.plots, "reliability.png"))
  results["best_epoch"] = best_epoch(run_dir.metrics_path)
  results["teacher"] = {"workdir": os.path.abspath(config.kd.teacher), "method": teacher_config.method,
                        "model": teacher_config.model.name, "calibration": config.kd.teacher_calibration,
                        "calibration_temperature": calibration_temperature}
  if use_crd:
    results["crd"] = {"nce_k": nce_k, "n_data": len(splits.train_images)}
  results["budget"] = {"epochs": config.train.epochs, "train_examples": len(splits.train_images),
                       "val_examples": len(splits.val_images), "test_examples": len(splits.test_images),
                       "seed": config.seed, "devices": mesh.size,
                       "student_params": models.count_params(state["params"])}
  run_dir.write_results(results)
  run_dir.close()
  return results
