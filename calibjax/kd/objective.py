"""A student's training objective from a frozen teacher: the teacher inside the step, one KD-loss registry.

The teacher runs inside the student's jitted train step, through the step's batch transform
(`make_kd_batch_transform`), which per step:

  1. applies the base augmentation (crop + flip, DSA, where on) to the batch: this is the "original sample";
  2. computes the teacher's logits on it in inference mode (batch-norm running statistics, no dropout), divided
     by the teacher's own TS / MTS temperature when the run asks for a post-hoc calibrated teacher, and stores
     their log-softmax as the batch field "teacher_log_probs" (B, K) (log-probabilities change no softmax-based
     loss: log_softmax(log_softmax(t) / T) = log_softmax(t / T));
  3. applies the mixing augmentation (mixup / CutMix / cutout) to the STUDENT's copy only, as paper 004 (Eq. 6,
     13) requires: the teacher never sees a mixed or cut image.

Batch fields after the transform: "images" (R, H, W, C) and "labels" (R, K) targets — one-hot, or
λ·onehot(y_a) + (1−λ)·onehot(y_b) after mixup/CutMix — with R = B without mixing and 2B with it (the originals,
then their augmented copies); "teacher_log_probs" (B, K) of the originals; with a feature-based loss,
"teacher_features" (B, D_t), the teacher's penultimate features from the same inference pass; and the input's
other per-sample fields (e.g. "index") unchanged.

Without mixing, teacher and student see the same input (Hinton KD, RepDistiller and CalibrationXferViaKD). With
mixing, the distillation term uses the first B rows (student and teacher on the original sample) and the task
loss (cross-entropy against the mixed targets: λ·CE(y_a) + (1−λ)·CE(y_b) for mixup/CutMix, CE(y) for cutout) the
last B. Both halves go through the student in one forward pass, so in train mode its batch-norm statistics are
those of the 2B rows (two separate passes would normalise each half on its own).

The losses (`KD_LOSSES`, selected by `config.kd.loss`; alpha and temperature default to the entry's):
  * "kd": Hinton KD as RepDistiller: α·T²·KL_batchmean + (1−α)·CE (T = 4, α = 0.9).
  * "scaled_kd": paper 004: α·(T²·KL / K) + (1−α)·augmentation loss (T = 50, α = 0.5). For mixup, Eq. 12 sums
    the class-mean KL over both mixed sources x_i and x_j; averaged over a batch whose partners x_j are a
    permutation of it, that is twice the batch-mean KL on the originals, so the term is doubled for mixup.
  * "cxkd": CalibrationXferViaKD's kdloss, the "kd" form with its defaults T = 20, α = 0.9.
  * "crd": Contrastive Representation Distillation (Tian et al., ICLR 2020) as RepDistiller's CRD recipe
    (`-r 1 -a 0 -b 0.8`): (1−α)·CE + α·T²·KL + β·CRD with α = 0, T = 4, β = 0.8; feat_dim 128, nce_k 16384
    negatives of other classes, nce_t 0.07, nce_m 0.5 (`calibjax.kd.crd`). nce_k is clipped to
    n_train − (largest class count) (`crd.clip_nce_k`). Its heads are trainable objective parameters and its
    memory banks objective state, checkpointed with the student.
  * "rkd": Relational KD (Park et al., CVPR 2019) as RepDistiller's RKD recipe (`-r 1 -a 0 -b 1`):
    (1−α)·CE + α·T²·KL + β·RKD on the penultimate features with α = 0, T = 4, β = 1 and RKD's own weights
    25 (distance) and 50 (angle).
The relation terms (CRD, RKD) use the original rows.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from calibjax.calibration.losses import cross_entropy
from calibjax.data.augment import make_batch_transform
from calibjax.kd import crd
from calibjax.kd import losses as kd_losses
from calibjax.models import Network
from calibjax.registry import Registry
from calibjax.train import step as step_lib


class KDLoss(NamedTuple):
  """One entry of `KD_LOSSES`.

  Attributes:
    distill: the logit distillation term `(*, student_logits, teacher_logits, temperature) -> scalar`.
    alpha: default weight of `distill` against the task loss (`kd_losses.combined`).
    temperature: default KD temperature.
    relation: None, "crd" or "rkd": a feature-relation term added with weight `kd.<relation>.weight`.
    relation_defaults: the settings of the `kd.<relation>` config block.
  """

  distill: Callable[..., jax.Array]
  alpha: float
  temperature: float
  relation: str | None = None
  relation_defaults: dict | None = None


KD_LOSSES: Registry[KDLoss] = Registry("KD loss")
KD_LOSSES.register("kd")(KDLoss(kd_losses.kd_loss, 0.9, 4.0))
KD_LOSSES.register("scaled_kd")(KDLoss(kd_losses.scaled_kd_loss, 0.5, 50.0))
KD_LOSSES.register("cxkd")(KDLoss(kd_losses.kd_loss, 0.9, 20.0))
# RepDistiller's CRD and RKD settings (train_student.py defaults; -b from scripts/run_cifar_distill.sh).
KD_LOSSES.register("crd")(KDLoss(kd_losses.kd_loss, 0.0, 4.0, "crd", {
    "weight": 0.8, "feat_dim": crd.FEAT_DIM, "nce_k": crd.NCE_K, "nce_t": crd.NCE_T, "nce_m": crd.NCE_M}))
KD_LOSSES.register("rkd")(KDLoss(kd_losses.kd_loss, 0.0, 4.0, "rkd", {
    "weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0}))


def make_teacher_apply(teacher_net: Network, teacher_state: dict, *, temperature: float, features: bool = False):
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


def make_kd_batch_transform(teacher_apply, augment_cfg: ml_collections.ConfigDict, *, num_classes: int,
                            data_transforms: dict, teacher_features: bool = False) -> step_lib.BatchTransform:
  """The step's batch transform: teacher outputs on the original sample, then mixing for the student only.

  Args:
    teacher_apply: `images -> logits` of the frozen teacher (inference mode), or `-> (logits, features)` with
      `teacher_features`.
    augment_cfg: the run's `augment` config; crop + flip and DSA are the base augmentation both networks see,
      `mixing` is applied to the student's copy only.
    num_classes: K.
    data_transforms: `Splits.transforms` of the training images (`make_batch_transform`).
    teacher_features: also add the teacher's penultimate features (for CRD, RKD).

  Returns:
    `(key, {"images", "labels" (B,) int, ...}) -> batch` with the fields of the module docstring.
  """
  base = make_batch_transform(ml_collections.ConfigDict(dict(augment_cfg, mixing="none")), num_classes=num_classes,
                              data_transforms=data_transforms)
  mix = make_batch_transform(ml_collections.ConfigDict(dict(augment_cfg, crop_flip=False, dsa=False)),
                             num_classes=num_classes, data_transforms=data_transforms)

  def transform(key: jax.Array, batch: dict) -> dict:
    base_key, mix_key = jax.random.split(key)
    if base is not None:
      batch = base(base_key, batch)
    teacher_out = jax.lax.stop_gradient(teacher_apply(batch["images"]))
    out = dict(batch)
    if teacher_features:
      teacher_out, out["teacher_features"] = teacher_out[0], teacher_out[1].astype(jnp.float32)
    out["teacher_log_probs"] = jax.nn.log_softmax(teacher_out.astype(jnp.float32), -1)
    onehot = jax.nn.one_hot(batch["labels"], num_classes, dtype=jnp.float32)
    if mix is None:
      return dict(out, labels=onehot)
    mixed = mix(mix_key, batch)
    targets = mixed["labels"]
    if targets.ndim == 1:  # cutout keeps integer labels
      targets = jax.nn.one_hot(targets, num_classes, dtype=jnp.float32)
    return dict(out, images=jnp.concatenate([batch["images"], mixed["images"]]),
                labels=jnp.concatenate([onehot, targets]))

  return transform


def logit_loss(kd_cfg: ml_collections.ConfigDict, *, mixing: str) -> Callable[[jax.Array, dict], jax.Array]:
  """`(logits (R, K), batch) -> α·distill + (1−α)·task` of the `kd.loss` entry (module docstring)."""
  entry = KD_LOSSES.get(kd_cfg.loss)
  # Eq. 12 of paper 004: mixup's KD term covers both mixed sources (twice the batch-mean KL on the originals).
  sources = 2.0 if kd_cfg.loss == "scaled_kd" and mixing == "mixup" else 1.0

  def loss(logits: jax.Array, batch: dict) -> jax.Array:
    originals = batch["teacher_log_probs"].shape[0]
    task_rows = slice(originals if mixing != "none" else 0, None)
    distill = sources * entry.distill(student_logits=logits[:originals], teacher_logits=batch["teacher_log_probs"],
                                      temperature=kd_cfg.temperature)
    task = cross_entropy(logits=logits[task_rows], labels=batch["labels"][task_rows])
    return kd_losses.combined(distill=distill, task=task, alpha=kd_cfg.alpha)

  return loss


def make_kd_objective(kd_cfg: ml_collections.ConfigDict, *, mixing: str, key: jax.Array, net: Network,
                      teacher_apply, train_images: np.ndarray, train_labels: np.ndarray) -> step_lib.Objective:
  """The student's `step.Objective` for `kd_cfg.loss` (module docstring).

  Args:
    kd_cfg: `config.kd` (loss, alpha, temperature and the relation block `crd` / `rkd` where the loss has one).
    mixing: `config.augment.mixing`.
    key: the objective's initial parameters and buffers (CRD).
    net: the student.
    teacher_apply: the teacher function of `make_teacher_apply` (with `features=True` for CRD and RKD).
    train_images: (n_train, H, W, C): their number and shape size CRD's memory banks and heads.
    train_labels: (n_train,) int labels in the order of the memory banks (the training array's).
  """
  entry = KD_LOSSES.get(kd_cfg.loss)
  logits_term = logit_loss(kd_cfg, mixing=mixing)
  if entry.relation is None:
    return step_lib.Objective(lambda params, state, *, logits, features, batch, key: (logits_term(logits, batch),
                                                                                      state))
  relation = kd_cfg[entry.relation]
  if entry.relation == "rkd":
    def rkd_fn(params, state, *, logits, features, batch, key):
      originals = batch["teacher_features"].shape[0]
      term = kd_losses.rkd_loss(student_embeddings=features[:originals], teacher_embeddings=batch["teacher_features"],
                                distance_weight=relation.distance_weight, angle_weight=relation.angle_weight)
      return logits_term(logits, batch) + relation.weight * term, state

    return step_lib.Objective(rkd_fn, uses_features=True)

  nce_k = crd.clip_nce_k(relation.nce_k, train_labels)
  labels = jnp.asarray(train_labels, jnp.int32)

  def crd_fn(heads, buffers, *, logits, features, batch, key):
    index = batch["index"]
    negatives = crd.sample_negatives(key, index=index, labels=labels, nce_k=nce_k)
    contrastive, buffers = crd.crd_loss(heads, student_features=features[:index.shape[0]],
                                        teacher_features=batch["teacher_features"], index=index,
                                        negatives=negatives, buffers=buffers, temperature=relation.nce_t,
                                        momentum=relation.nce_m)
    return logits_term(logits, batch) + relation.weight * contrastive, buffers

  spec = jax.ShapeDtypeStruct((1, *train_images.shape[1:]), train_images.dtype)
  student_dim = jax.eval_shape(lambda x: net.embed(*net.init(jax.random.key(0)), x), spec).shape[-1]
  teacher_dim = jax.eval_shape(teacher_apply, spec)[1].shape[-1]
  heads_key, buffers_key = jax.random.split(key)
  heads = crd.init_heads(heads_key, student_dim=student_dim, teacher_dim=teacher_dim, feat_dim=relation.feat_dim)
  buffers = crd.init_buffers(buffers_key, n_data=len(train_images), feat_dim=relation.feat_dim)
  return step_lib.Objective(crd_fn, params=heads, state=buffers, uses_features=True, uses_indices=True)


def negatives_drawn(kd_cfg: ml_collections.ConfigDict, train_labels: np.ndarray) -> dict | None:
  """What results.json records of CRD's sampling: {"nce_k": negatives drawn, "n_data"}; None for other losses."""
  if KD_LOSSES.get(kd_cfg.loss).relation != "crd":
    return None
  return {"nce_k": crd.clip_nce_k(kd_cfg.crd.nce_k, train_labels), "n_data": len(train_labels)}
