"""Contrastive Representation Distillation (CRD; Tian, Krishnan & Isola, ICLR 2020) as RepDistiller @ b84f547.

What the reference does (crd/criterion.py, crd/memory.py, dataset/cifar100.py, train_student.py, loops.py):

  * Features: the penultimate features (after global pooling, before the classifier) of student and teacher;
    the teacher's in inference mode, without gradient. Each goes through its own linear head (with bias,
    PyTorch-default init) to feat_dim = 128 and is L2-normalised. Both heads are trained by the student's
    optimiser (SGD with momentum and the same weight decay).
  * Two memory banks of n_data x feat_dim, one of student embeddings and one of teacher embeddings,
    initialised U(-stdv, stdv) with stdv = 1 / sqrt(feat_dim / 3) (rows of norm about 1, not normalised).
  * Sampling, mode "exact" (the default `--mode`): row i of the batch contrasts index i itself (the
    positive, column 0) with nce_k = 16384 negatives drawn uniformly without replacement from the training
    samples of the other classes (`np.random.choice(cls_negative[y], k, replace=k > len(cls_negative[y]))`).
  * Scores: the student embedding against the TEACHER bank and the teacher embedding against the STUDENT bank,
    out = exp(<bank[j], v> / T), T = nce_t = 0.07, for the K + 1 indices j of the row; bank rows are
    constants.
    Each side is divided by its own constant Z = mean(out) · n_data, set from the first batch and then fixed.
  * Loss per side (ContrastLoss, Eq. 18 of the paper), noise probability Pn = 1 / n_data, m = K:
      -(1/B) Σ_b [log(P_b0 / (P_b0 + m·Pn + ε)) + Σ_k log(m·Pn / (P_bk + m·Pn + ε))],  ε = 1e-7;
    CRD = student side + teacher side.
  * Memory update, after the scores: bank[i] <- normalize(m · bank[i] + (1 - m) · v_i) for the batch's indices
    (momentum nce_m = 0.5), with this batch's embeddings (no gradient).
  * Recipe (scripts/run_cifar_distill.sh): loss = 1·CE + 0·KD + 0.8·CRD (`-r 1 -a 0 -b 0.8`).

Choices of this implementation:

  * nce_k is clipped to the smallest negative pool, n_data - (largest class count) (`clip_nce_k`), so every
    row gets K distinct other-class negatives. The reference has no clip (it draws with replacement when K
    exceeds a pool); at its sizes (CIFAR-100, 450-500 per class) the pool is ~44 550 > 16 384 and nothing
    changes. m in the loss is the K actually drawn.
  * Negatives are the top K of uniform keys over the other-class samples (`sample_negatives`): a uniformly
    random K-subset without replacement, with fixed shapes inside the jitted step.
  * Scores are gathered from the (B, n_data) product of the anchors with the whole bank: the same dot products
    as gathering (B, K + 1, feat_dim) bank rows, without materialising B·(K + 1)·feat_dim floats (0.5 GB per
    bank at the recipe's sizes).
  * L2 normalisation divides by max(norm, 1e-12) (F.normalize's guard); the reference divides by the norm.

State: `init_heads` -> {"student": head, "teacher": head} with head = {"kernel": (D, F), "bias": (F,)}
(trainable); `init_buffers` -> {"student": (n_data, F) bank, "teacher": (n_data, F) bank, "z": (2,)} with
z = [Z of the student side, Z of the teacher side], -1 until the first batch sets them (the reference's
sentinel).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from calibjax.calibration.losses import apply_reduction
from calibjax.errors import ConfigError
from calibjax.models.init import torch_bias_init, torch_kernel_init

FEAT_DIM = 128
NCE_K = 16384
NCE_T = 0.07
NCE_M = 0.5
# ContrastLoss's epsilon in the NCE denominators.
_NCE_EPS = 1e-7
_NORM_EPS = 1e-12


def init_heads(key: jax.Array, *, student_dim: int, teacher_dim: int, feat_dim: int = FEAT_DIM) -> dict:
  """The two linear heads, PyTorch-default init (weights and biases U(-1/sqrt(D), 1/sqrt(D))).

  Args:
    key: PRNG key.
    student_dim: D_s, width of the student's penultimate features.
    teacher_dim: D_t, width of the teacher's.
    feat_dim: F, the embedding width.

  Returns:
    {"student": {"kernel": (D_s, F), "bias": (F,)}, "teacher": {"kernel": (D_t, F), "bias": (F,)}}.
  """
  heads = {}
  for name, dim, sub in zip(("student", "teacher"), (student_dim, teacher_dim), jax.random.split(key)):
    kernel_key, bias_key = jax.random.split(sub)
    heads[name] = {"kernel": torch_kernel_init(kernel_key, (dim, feat_dim)),
                   "bias": torch_bias_init(dim)(bias_key, (feat_dim,))}
  return heads


def init_buffers(key: jax.Array, *, n_data: int, feat_dim: int = FEAT_DIM) -> dict:
  """Memory banks U(-stdv, stdv), stdv = 1 / sqrt(feat_dim / 3), and the unset normalisers z = [-1, -1]."""
  stdv = 1.0 / math.sqrt(feat_dim / 3)
  student_key, teacher_key = jax.random.split(key)
  return {"student": jax.random.uniform(student_key, (n_data, feat_dim), jnp.float32, -stdv, stdv),
          "teacher": jax.random.uniform(teacher_key, (n_data, feat_dim), jnp.float32, -stdv, stdv),
          "z": jnp.full((2,), -1.0, jnp.float32)}


def _normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _NORM_EPS)


def embed(head: dict, features: jax.Array) -> jax.Array:
  """normalize(features @ kernel + bias): (B, ...) features, flattened to (B, D), -> (B, F) unit rows."""
  x = features.reshape(features.shape[0], -1).astype(jnp.float32)
  return _normalize(x @ head["kernel"] + head["bias"])


def clip_nce_k(nce_k: int, labels: np.ndarray) -> int:
  """min(nce_k, n_data - largest class count): the most negatives every sample can draw without replacement
  from the other classes.

  Args:
    nce_k: requested negatives per positive (the recipe's 16384).
    labels: (n_data,) integer training labels, in the order of the memory banks.

  Returns:
    The number of negatives the run draws.
  """
  labels = np.asarray(labels)
  pool = len(labels) - int(np.bincount(labels).max()) if len(labels) else 0
  if nce_k < 1:
    raise ConfigError(f"kd.crd.nce_k must be >= 1 (negatives per positive); got {nce_k}")
  if pool < 1:
    raise ConfigError("CRD draws its negatives from the other classes, but the training split has only one "
                      "class; use a dataset with at least two classes")
  return min(int(nce_k), pool)


def sample_negatives(key: jax.Array, *, index: jax.Array, labels: jax.Array, nce_k: int) -> jax.Array:
  """RepDistiller's "exact" sampling: nce_k distinct indices of samples whose class differs from the row's.

  The top nce_k of i.i.d. uniform keys over the other-class samples form a uniformly random nce_k-subset of
  them; same-class samples (the positive among them) get key -1 and are never picked while
  nce_k <= `clip_nce_k`.

  Args:
    key: PRNG key.
    index: (B,) int dataset indices of the batch's positives.
    labels: (n_data,) int labels of the whole training set.
    nce_k: K <= clip_nce_k(K, labels) (a Python int: it fixes the output shape).

  Returns:
    (B, K) int32 dataset indices.
  """
  labels = jnp.asarray(labels)
  other = labels[None, :] != labels[index][:, None]
  keys = jnp.where(other, jax.random.uniform(key, other.shape), -1.0)
  return jax.lax.top_k(keys, nce_k)[1].astype(jnp.int32)


def contrast(bank: jax.Array, anchors: jax.Array, sample_index: jax.Array, *, temperature: float = NCE_T
             ) -> jax.Array:
  """exp(<bank[j], anchor_b> / T) for the K + 1 indices j of each row (positive first); bank is a constant.

  Args:
    bank: (n_data, F) memory bank.
    anchors: (B, F) embeddings.
    sample_index: (B, K + 1) int dataset indices.
    temperature: T.

  Returns:
    (B, K + 1) unnormalised scores.
  """
  scores = anchors @ jax.lax.stop_gradient(bank).T
  return jnp.exp(jnp.take_along_axis(scores, sample_index, axis=1) / temperature)


def nce_loss(*, probs: jax.Array, n_data: int, reduction: str = "mean") -> jax.Array:
  """RepDistiller's ContrastLoss (Eq. 18): NCE with noise probability Pn = 1 / n_data and m = K negatives.

  Per row b: -[log(P_b0 / (P_b0 + m·Pn + ε)) + Σ_{k>=1} log(m·Pn / (P_bk + m·Pn + ε))], ε = 1e-7; the
  reference returns the batch mean ("mean").

  Args:
    probs: (B, K + 1) Z-normalised scores, positive in column 0.
    n_data: size of the training set (of the memory bank).
    reduction: "mean" | "sum" | "none".

  Returns:
    A scalar, or (B,) for reduction="none".
  """
  probs = probs.astype(jnp.float32)
  noise = (probs.shape[1] - 1) / n_data  # m · Pn
  positive = jnp.log(probs[:, 0] / (probs[:, 0] + noise + _NCE_EPS))
  negatives = jnp.sum(jnp.log(noise / (probs[:, 1:] + noise + _NCE_EPS)), axis=1)
  return apply_reduction(-(positive + negatives), reduction)


def update_bank(bank: jax.Array, index: jax.Array, values: jax.Array, *,
                momentum: float = NCE_M) -> jax.Array:
  """bank[i] <- normalize(momentum · bank[i] + (1 - momentum) · v_i) for the (distinct) indices of the batch.

  Args:
    bank: (n_data, F).
    index: (B,) distinct int dataset indices.
    values: (B, F) this batch's embeddings (taken without gradient).
    momentum: nce_m.

  Returns:
    The updated (n_data, F) bank.
  """
  mixed = momentum * bank[index] + (1.0 - momentum) * jax.lax.stop_gradient(values)
  return bank.at[index].set(_normalize(mixed))


def crd_loss(heads: dict, *, student_features: jax.Array, teacher_features: jax.Array, index: jax.Array,
             negatives: jax.Array, buffers: dict, temperature: float = NCE_T, momentum: float = NCE_M
             ) -> tuple[jax.Array, dict]:
  """The CRD term (student side + teacher side, batch means) and the next buffers.

  Args:
    heads: `init_heads` parameters (differentiated).
    student_features: (B, D_s) student penultimate features (differentiated).
    teacher_features: (B, D_t) teacher penultimate features; a constant.
    index: (B,) int dataset indices of the batch (the positives, and the bank rows to update).
    negatives: (B, K) int dataset indices (`sample_negatives`).
    buffers: `init_buffers` state: banks and the normalisers z (-1 = unset, set from this batch).
    temperature: nce_t.
    momentum: nce_m.

  Returns:
    (scalar loss, new buffers): banks updated at `index` with this batch's embeddings, z fixed.
  """
  student = embed(heads["student"], student_features)
  teacher = embed(heads["teacher"], jax.lax.stop_gradient(teacher_features))
  sample_index = jnp.concatenate([index[:, None].astype(negatives.dtype), negatives], axis=1)
  n_data = buffers["student"].shape[0]
  # The student anchors against the teacher bank (the reference's out_v1, Z_v1), and vice versa.
  outs = jnp.stack([contrast(buffers["teacher"], student, sample_index, temperature=temperature),
                    contrast(buffers["student"], teacher, sample_index, temperature=temperature)])
  first = jax.lax.stop_gradient(jnp.mean(outs, axis=(1, 2)) * n_data)
  z = jnp.where(buffers["z"] < 0, first, buffers["z"])
  loss = sum(nce_loss(probs=outs[side] / z[side], n_data=n_data) for side in range(2))
  new_buffers = {"student": update_bank(buffers["student"], index, student, momentum=momentum),
                 "teacher": update_bank(buffers["teacher"], index, teacher, momentum=momentum), "z": z}
  return loss, new_buffers
