"""OOD detection with confidence scores (MSP, max logit, energy, entropy): AUROC, AUPR and FPR@TPR.

Convention: every score is oriented so that a HIGHER score means MORE in-distribution, and the evaluation
functions treat the in-distribution samples as the positive class (the usual "detect the in-distribution
sample" reading of AUROC / FPR95; Hendrycks & Gimpel 2017, Liu et al. 2020). All functions are jittable and
exact with ties (AUROC counts a tie as 1/2, as the Mann-Whitney statistic and sklearn's `roc_auc_score`).
"""

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from calibjax import data as data_lib
from calibjax.calibration.metrics import InvalidInputError
from calibjax.data.prepare import Splits
from calibjax.errors import ConfigError
from calibjax.registry import Registry

SCORES: Registry[Callable[..., jax.Array]] = Registry("OOD score")


def _logits(logits: jax.Array) -> jax.Array:
  logits = jnp.asarray(logits)
  if logits.ndim != 2:
    raise InvalidInputError(f"logits must have shape (N, K); got {logits.shape}")
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


@SCORES.register("msp")
@jax.jit
def msp_score(logits: jax.Array) -> jax.Array:
  """Maximum softmax probability max_k softmax(z)_k (Hendrycks & Gimpel 2017). (N, K) -> (N,)."""
  return jnp.max(jax.nn.softmax(_logits(logits), axis=-1), axis=-1)


@SCORES.register("max_logit")
@jax.jit
def max_logit_score(logits: jax.Array) -> jax.Array:
  """Maximum logit max_k z_k (Hendrycks et al. 2022). (N, K) -> (N,)."""
  return jnp.max(_logits(logits), axis=-1)


@SCORES.register("energy")
@jax.jit
def energy_score(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Negative energy T logsumexp(z / T) (Liu et al. 2020). (N, K) -> (N,).

  The energy is E(x) = -T logsumexp(z / T); low energy means in-distribution, so the score returned is -E.
  """
  return temperature * jax.nn.logsumexp(_logits(logits) / temperature, axis=-1)


@SCORES.register("entropy")
@jax.jit
def neg_entropy_score(logits: jax.Array) -> jax.Array:
  """Negative predictive entropy sum_k p_k log p_k of p = softmax(z) (in nats). (N, K) -> (N,)."""
  log_p = jax.nn.log_softmax(_logits(logits), axis=-1)
  return jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def _pair(in_scores: jax.Array, out_scores: jax.Array) -> tuple[jax.Array, jax.Array]:
  in_scores = jnp.asarray(in_scores)
  out_scores = jnp.asarray(out_scores)
  if in_scores.ndim != 1 or out_scores.ndim != 1 or in_scores.shape[0] == 0 or out_scores.shape[0] == 0:
    raise InvalidInputError(f"in_scores and out_scores must be non-empty 1-D arrays; got {in_scores.shape} "
                            f"and {out_scores.shape}")
  dtype = jnp.promote_types(jnp.result_type(in_scores, out_scores), jnp.float32)
  return in_scores.astype(dtype), out_scores.astype(dtype)


def _count_at_least(sorted_values: jax.Array, query: jax.Array) -> jax.Array:
  """Number of entries of `sorted_values` that are >= each query."""
  return sorted_values.shape[0] - jnp.searchsorted(sorted_values, query, side="left")


@jax.jit
def ood_auroc(*, in_scores: jax.Array, out_scores: jax.Array) -> jax.Array:
  """Area under the ROC curve with in-distribution as positive: P(s_in > s_out) + P(s_in = s_out) / 2.

  Args:
    in_scores: (N_in,) scores of in-distribution samples (higher = more in-distribution).
    out_scores: (N_out,) scores of out-of-distribution samples.

  Returns:
    Scalar in [0, 1]; 0.5 for an uninformative score.
  """
  in_scores, out_scores = _pair(in_scores, out_scores)
  out_sorted = jnp.sort(out_scores)
  below = jnp.searchsorted(out_sorted, in_scores, side="left")
  ties = jnp.searchsorted(out_sorted, in_scores, side="right") - below
  return jnp.mean((below + 0.5 * ties) / out_scores.shape[0])


@functools.partial(jax.jit, static_argnames=("positive",))
def aupr(*, in_scores: jax.Array, out_scores: jax.Array, positive: str = "in") -> jax.Array:
  """Area under the precision-recall curve as average precision (sklearn `average_precision_score`).

  AP = sum over distinct thresholds t of (R(t) - R(t_prev)) P(t), which equals the mean over positive samples
  of the precision at their own score (all samples with a score >= it predicted positive).

  Args:
    in_scores: (N_in,) scores of in-distribution samples.
    out_scores: (N_out,) scores of out-of-distribution samples.
    positive: "in" (AUPR-In: in-distribution is the positive class, scores as given) or "out" (AUPR-Out:
      out-of-distribution is positive and the scores are negated).

  Returns:
    Scalar in [0, 1].
  """
  if positive not in ("in", "out"):
    raise ConfigError(f"positive must be 'in' or 'out'; got '{positive}'")
  in_scores, out_scores = _pair(in_scores, out_scores)
  pos, neg = (in_scores, out_scores) if positive == "in" else (-out_scores, -in_scores)
  true_pos = _count_at_least(jnp.sort(pos), pos)
  false_pos = _count_at_least(jnp.sort(neg), pos)
  return jnp.mean(true_pos / (true_pos + false_pos))


def _accepted_count(n_in: int, tpr: float) -> int:
  """Smallest k with k / n_in >= tpr in float64, as sklearn's float TPR array is compared."""
  if not 0 < tpr <= 1:
    raise ConfigError(f"tpr must be in (0, 1]; got {tpr}")
  k = min(max(math.ceil(tpr * n_in), 1), n_in)
  while k > 1 and (k - 1) / n_in >= tpr:
    k -= 1
  while k < n_in and k / n_in < tpr:
    k += 1
  return k


@functools.partial(jax.jit, static_argnames=("tpr",))
def fpr_at_tpr(*, in_scores: jax.Array, out_scores: jax.Array, tpr: float = 0.95) -> jax.Array:
  """False-positive rate at the first ROC point whose true-positive rate reaches `tpr` (FPR95 by default).

  The threshold t is the k-th largest in-distribution score with k the smallest count such that k / N_in >=
  tpr; everything scoring >= t is accepted as in-distribution (so tied in-distribution scores can push the
  TPR above `tpr`), and FPR = #{out >= t} / N_out. This is sklearn's `roc_curve` point
  fpr[searchsorted(tpr_curve, tpr)].

  Args:
    in_scores: (N_in,) scores of in-distribution samples (the positives).
    out_scores: (N_out,) scores of out-of-distribution samples.
    tpr: target true-positive rate in (0, 1] (static: the count k is found in float64 at trace time).

  Returns:
    Scalar in [0, 1].
  """
  in_scores, out_scores = _pair(in_scores, out_scores)
  k = _accepted_count(in_scores.shape[0], float(tpr))
  threshold = jnp.sort(in_scores)[in_scores.shape[0] - k]
  return _count_at_least(jnp.sort(out_scores), threshold) / out_scores.shape[0]


def ood_report(*, in_logits: jax.Array, out_logits: jax.Array, score: str = "msp") -> dict[str, float]:
  """AUROC, AUPR-In, AUPR-Out and FPR95 of one registered score.

  Args:
    in_logits: (N_in, K) logits on in-distribution data.
    out_logits: (N_out, K) logits on out-of-distribution data.
    score: a name from `SCORES` ("msp", "max_logit", "energy", "entropy").

  Returns:
    dict with "auroc", "aupr_in", "aupr_out", "fpr95" as Python floats.
  """
  fn = SCORES.get(score)
  s_in, s_out = fn(in_logits), fn(out_logits)
  pair = {"in_scores": s_in, "out_scores": s_out}
  values = {"auroc": ood_auroc(**pair), "aupr_in": aupr(**pair, positive="in"),
            "aupr_out": aupr(**pair, positive="out"), "fpr95": fpr_at_tpr(**pair, tpr=0.95)}
  return {key: float(value) for key, value in jax.device_get(values).items()}


def shifted_sets(*, noise_sigmas, dataset: str, splits: Splits, data_dir: str | None, key: jax.Array) -> dict:
  """Shifted versions of the test inputs, in the network's (normalised) input space.

  "gaussian_noise_<sigma>" for each of `noise_sigmas`: the test images plus N(0, sigma²) noise (sigma in
  normalised units);
  `dataset` (optional): that dataset's test split, converted to the source's channels and size (bilinear)
  and passed through the transforms of `splits` (the source run's normalisation / ZCA).
  """
  sets = {}
  for sigma in noise_sigmas:
    noise = sigma * np.asarray(jax.random.normal(jax.random.fold_in(key, int(sigma * 1000)),
                                                 splits.test_images.shape))
    sets[f"gaussian_noise_{sigma:g}"] = (splits.test_images + noise).astype(np.float32)
  if dataset:
    other = data_lib.load(dataset, "test", data_dir=data_dir)
    images = np.asarray(jax.image.resize(other.images, (len(other.images), *splits.input_shape[:2],
                                                        other.images.shape[-1]), "bilinear"))
    channels = splits.input_shape[-1]
    if images.shape[-1] != channels:  # gray <-> colour: repeat or average the channels
      images = np.repeat(images, channels, -1) if images.shape[-1] == 1 else images.mean(-1, keepdims=True)
    sets[dataset] = data_lib.apply_transforms(images, splits.transforms)
  return sets


def out_of_distribution(*, in_logits: np.ndarray, out_logits: np.ndarray, temperatures: dict) -> dict:
  """OOD detection quality of each score, computed on logits / T for each temperature (max logit ignores T)."""
  report = {"max_logit": ood_report(in_logits=in_logits, out_logits=out_logits, score="max_logit")}
  for name, t in temperatures.items():
    for score in ("msp", "energy"):
      report[f"{score}_{name}"] = ood_report(in_logits=in_logits / t, out_logits=out_logits / t, score=score)
  return report
