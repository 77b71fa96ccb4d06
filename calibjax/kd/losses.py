"""Knowledge-distillation losses: Hinton KD, paper 004's class-mean KD, CalibrationXferViaKD's kdloss, RKD.

Conventions shared by every loss here:

  * Logits are (B, K); embeddings are (B, ...) and flattened to (B, D). Student and teacher embeddings may
    have different widths (RKD compares relations, not features).
  * The teacher is a constant: its logits/embeddings pass through `stop_gradient`, as the references compute
    them under `no_grad` from a frozen network. Half-precision inputs are promoted to float32.
  * `reduction` is "mean" (over the batch), "sum" or "none" (per-sample values, shape (B,)) for the losses
    that are per-sample (KD, class-mean KD, CXKD). RKD is a statistic of the whole batch (pairs and triplets)
    and has no per-sample value, so it takes no `reduction`.
  * The KL direction is KL(p_teacher || p_student) = sum_k p_t,k (log p_t,k - log p_s,k), PyTorch's
    `kl_div(log p_s, p_t)`; terms with p_t,k = 0 are 0.

`combined` mixes a distillation term with a task loss (any `calibjax.calibration.losses` value), as the
papers do. The registry of the losses a `kd` run selects is `calibjax.kd.objective.KD_LOSSES`.
"""

import jax
import jax.numpy as jnp

from calibjax.calibration.losses import apply_reduction, cross_entropy
from calibjax.errors import ConfigError

# RepDistiller's RKD: pairwise distances clamp their square at 1e-12 before the square root, and F.normalize
# divides by max(norm, 1e-12).
_RKD_EPS = 1e-12


def _as_float(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_logits(student_logits: jax.Array, teacher_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  student, teacher = _as_float(student_logits), jax.lax.stop_gradient(_as_float(teacher_logits))
  if student.ndim != 2 or student.shape != teacher.shape:
    raise ConfigError(f"student and teacher logits must both be (batch, classes); got {student.shape} and "
                      f"{teacher.shape}")
  return student, teacher


def _check_range(name: str, value, low: float, high: float | None = None) -> None:
  """Checks a Python-number hyperparameter (traced values are left to the caller)."""
  if isinstance(value, (int, float)) and not (value > low and (high is None or value <= high)):
    bounds = f"in ({low}, {high}]" if high is not None else f"> {low}"
    raise ConfigError(f"{name} must be {bounds}; got {value}")


def kd_loss(*, student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 4.0,
            reduction: str = "mean") -> jax.Array:
  """Hinton KD: T² · KL(softmax(t / T) || softmax(s / T)) per sample (Hinton et al. 2015).

  With reduction "mean" this is RepDistiller's `DistillKL` (KL summed over classes and batch, times T²,
  divided by B) and mdistiller's `kd_loss` (`sum(1).mean() * T²`): the batch mean of the per-sample KL, times
  T². The T² keeps the gradient scale, T (p_s - p_t) per logit, comparable across temperatures. Default T = 4
  is the RepDistiller / mdistiller CIFAR-100 recipe.

  Args:
    student_logits: (B, K).
    teacher_logits: (B, K); treated as a constant.
    temperature: T > 0.
    reduction: "mean" | "sum" | "none".

  Returns:
    A scalar, or (B,) for reduction="none".
  """
  _check_range("temperature", temperature, 0.0)
  student, teacher = _check_logits(student_logits, teacher_logits)
  log_p_s = jax.nn.log_softmax(student / temperature, axis=-1)
  log_p_t = jax.nn.log_softmax(teacher / temperature, axis=-1)
  per_sample = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return apply_reduction(temperature**2 * per_sample, reduction)


def scaled_kd_loss(*, student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 50.0,
                   reduction: str = "mean") -> jax.Array:
  """The class-mean ("scaled") KD of paper 004: `kd_loss` divided by the number of classes K.

  "Distilling Calibrated Student from an Uncalibrated Teacher" (Mishra et al., arXiv 2302.11472, Sec. 3.1)
  scales the KL "by taking mean across the dimension of the logits (i.e. dividing it by the logit size, which
  is same as number of classes)", Eq. 12 writes (1 / n_c) KL[f_t || f_s], and every "KD" of that paper is this
  scaled form, with T = 50 (the default here) and alpha = 0.5. The paper has no public code and does not say
  whether T² stays; it builds on the RepDistiller loss, which has it, so it is kept: per sample T² · KL / K,
  i.e. PyTorch's `KLDivLoss(reduction='mean')` (an element mean over B·K) times T² (docs/protocols.md §5.1). At
  T = 50, K = 100 the factor is 25. For mixup, Eq. 12 adds this loss on both mixed sources (call it twice).

  Args:
    student_logits: (B, K).
    teacher_logits: (B, K); treated as a constant.
    temperature: T > 0.
    reduction: "mean" | "sum" | "none".

  Returns:
    A scalar, or (B,) for reduction="none".
  """
  per_sample = kd_loss(student_logits=student_logits, teacher_logits=teacher_logits, temperature=temperature,
                       reduction="none")
  return apply_reduction(per_sample / jnp.shape(student_logits)[-1], reduction)


def combined(*, distill: jax.Array, task: jax.Array, alpha: float) -> jax.Array:
  """alpha · distill + (1 - alpha) · task: the student objective of the KD papers.

  Hinton et al. (Eq. 3 of paper 004), CalibrationXferViaKD's kdloss (alpha = `--Lambda`, 0.9), RepDistiller's
  KD recipe (-r 0.1 -a 0.9: 0.1 · CE + 0.9 · KD) and paper 004 (Eq. 6 and 13, alpha = 0.5, where `task` is the
  augmentation loss of the student on the augmented batch) all have this form.

  Args:
    distill: a distillation loss value, scalar or per-sample (B,).
    task: the task loss value with the same reduction (cross-entropy, a calibration loss, mixup CE, ...).
    alpha: weight of the distillation term in [0, 1]; 1 is pure distillation.

  Returns:
    The mixed value, with the shape of the inputs.
  """
  if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
    raise ConfigError(f"alpha must be in [0, 1] (the weight of the distillation term); got {alpha}")
  return alpha * distill + (1.0 - alpha) * task


def cxkd_loss(*, student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
              temperature: float = 20.0, alpha: float = 0.9, reduction: str = "mean") -> jax.Array:
  """CalibrationXferViaKD's kdloss (solvers/kdloss.py): alpha · T² · KL_batchmean + (1 - alpha) · CE(s, y).

  The KL is `kd_loss` (T² included, batch mean); the CE is on the unsoftened student logits. Defaults are the
  reference's (`--T` 20, `--Lambda` 0.9); alpha = 1 is pure KD without labels. Both networks see the same
  input.

  Args:
    student_logits: (B, K).
    teacher_logits: (B, K); treated as a constant.
    labels: integer (B,) or targets (B, K) for the cross-entropy.
    temperature: T > 0.
    alpha: weight of the KD term in [0, 1].
    reduction: "mean" | "sum" | "none".

  Returns:
    A scalar, or (B,) for reduction="none".
  """
  distill = kd_loss(student_logits=student_logits, teacher_logits=teacher_logits, temperature=temperature,
                    reduction=reduction)
  task = cross_entropy(logits=student_logits, labels=labels, reduction=reduction)
  return combined(distill=distill, task=task, alpha=alpha)


def _flatten_pair(student: jax.Array, teacher: jax.Array) -> tuple[jax.Array, jax.Array]:
  student = _as_float(student).reshape(jnp.shape(student)[0], -1)
  teacher = jax.lax.stop_gradient(_as_float(teacher)).reshape(jnp.shape(teacher)[0], -1)
  if student.shape[0] != teacher.shape[0] or student.shape[0] < 2:
    raise ConfigError(f"RKD needs the same batch (>= 2 samples) for student and teacher embeddings; got "
                      f"{student.shape[0]} and {teacher.shape[0]}")
  return student, teacher


def _smooth_l1(x: jax.Array) -> jax.Array:
  """PyTorch's smooth_l1_loss with beta 1 (Huber, delta 1), elementwise."""
  abs_x = jnp.abs(x)
  return jnp.where(abs_x < 1.0, 0.5 * x**2, abs_x - 0.5)


def _normalised_distances(x: jax.Array) -> jax.Array:
  """(B, B) Euclidean distances, zero diagonal, divided by the mean of the positive (off-diagonal) entries."""
  squared = jnp.sum(x**2, axis=-1)
  gram = x @ x.T
  dist = jnp.sqrt(jnp.maximum(squared[:, None] + squared[None, :] - 2.0 * gram, _RKD_EPS))
  dist = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, dist)
  positive = dist > 0
  return dist / (jnp.sum(jnp.where(positive, dist, 0.0)) / jnp.sum(positive))


def _angles(x: jax.Array) -> jax.Array:
  """(B, B, B) cosines <e_ij, e_ik>, e_ij the unit vector from x_i to x_j (0 for j = i)."""
  diff = x[None, :, :] - x[:, None, :]
  # sqrt(max(|d|², eps²)) = max(|d|, eps) as F.normalize, without sqrt's infinite gradient at d = 0.
  norm = jnp.sqrt(jnp.maximum(jnp.sum(diff**2, axis=-1, keepdims=True), _RKD_EPS**2))
  unit = diff / norm
  return jnp.einsum("ijd,ikd->ijk", unit, unit)


def rkd_distance_loss(*, student_embeddings: jax.Array, teacher_embeddings: jax.Array) -> jax.Array:
  """RKD distance term (Park et al. 2019): smooth-L1 between mean-normalised pairwise distance matrices.

  Distances are normalised by their mean over distinct pairs; the smooth-L1 is averaged over all B² entries
  (diagonal zeros included), as RepDistiller's `RKDLoss`.

  Args:
    student_embeddings: (B, ...) student features (flattened to (B, D_s)).
    teacher_embeddings: (B, ...) teacher features (flattened to (B, D_t)); treated as a constant.

  Returns:
    A scalar.
  """
  student, teacher = _flatten_pair(student_embeddings, teacher_embeddings)
  return jnp.mean(_smooth_l1(_normalised_distances(student) - _normalised_distances(teacher)))


def rkd_angle_loss(*, student_embeddings: jax.Array, teacher_embeddings: jax.Array) -> jax.Array:
  """RKD angle term: smooth-L1 between the cosines of all triplet angles, averaged over the B³ entries.

  Args:
    student_embeddings: (B, ...) student features.
    teacher_embeddings: (B, ...) teacher features; treated as a constant.

  Returns:
    A scalar.
  """
  student, teacher = _flatten_pair(student_embeddings, teacher_embeddings)
  return jnp.mean(_smooth_l1(_angles(student) - _angles(teacher)))


def rkd_loss(*, student_embeddings: jax.Array, teacher_embeddings: jax.Array, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> jax.Array:
  """RKD-DA: distance_weight · distance term + angle_weight · angle term.

  Weights 25 and 50 are Park et al.'s and RepDistiller's defaults (`RKDLoss(w_d=25, w_a=50)`), applied to the
  penultimate (pooled) features (`embed` of the zoo models), as RepDistiller does.

  Args:
    student_embeddings: (B, ...) student features.
    teacher_embeddings: (B, ...) teacher features; treated as a constant.
    distance_weight: weight of `rkd_distance_loss`.
    angle_weight: weight of `rkd_angle_loss`.

  Returns:
    A scalar.
  """
  kwargs = dict(student_embeddings=student_embeddings, teacher_embeddings=teacher_embeddings)
  return distance_weight * rkd_distance_loss(**kwargs) + angle_weight * rkd_angle_loss(**kwargs)
