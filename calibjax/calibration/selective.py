"""Selective prediction: how well a confidence score ranks a classifier's errors below its correct predictions.

Conventions. `scores` (N,) is a confidence (higher = more confident; `confidence_scores` makes the usual ones
from logits), `correct` (N,) is 1 for a correct prediction and 0 for an error. A selective classifier accepts the
k most confident predictions; with k = 1 ... N the coverage is k / N and
  * the selective risk r_k = (errors among the k accepted) / k (the risk-coverage curve),
  * the generalised risk g_k = (errors among the k accepted) / N (Traub et al., 2024: the joint probability of
    accepting and erring).
Tied scores have no order: inside a run of equal scores the errors are spread evenly, i.e. each quantity is its
expectation over the orders of the tie (so all-equal scores give r_k = the error rate at every k, and no result
depends on the input order).
  * AURC = (1/N) sum_k r_k (Geifman et al., 2019), the mean selective risk over the N coverages;
  * E-AURC = AURC - AURC*, AURC* that of the oracle order (all correct predictions first): the excess over the
    best ranking of these predictions, 0 for a perfect score;
  * AUGRC = (1/N) sum_k g_k;
  * `selective_risk(coverage=c)` = r_k at k = ceil(c N) (at least 1).
Values are fractions (not %). Every function is jittable; N is static.
"""

import math

import jax
import jax.numpy as jnp

from calibjax.calibration.metrics import InvalidInputError

SCORES = ("msp", "max_logit", "neg_entropy")


def confidence_scores(*, logits: jax.Array, score: str = "msp", temperature: float | jax.Array = 1.0) -> jax.Array:
  """A confidence per row of `logits` (N, K) divided by `temperature` (the post-hoc calibrated score when it is
  TS / MTS's T): "msp" max softmax probability, "max_logit" the largest logit / T, "neg_entropy" sum_k p log p."""
  if score not in SCORES:
    raise InvalidInputError(f"unknown confidence score '{score}'; choose one of: {', '.join(SCORES)}")
  z = jnp.asarray(logits, jnp.promote_types(jnp.asarray(logits).dtype, jnp.float32)) / temperature
  if score == "max_logit":
    return jnp.max(z, axis=-1)
  return _probability_scores(jax.nn.softmax(z, axis=-1))[score]


def _probability_scores(probs: jax.Array) -> dict:
  """The MSP and the negative entropy (0 log 0 = 0) of each row of `probs`."""
  plogp = jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1)), 0)
  return {"msp": jnp.max(probs, axis=-1), "neg_entropy": jnp.sum(plogp, axis=-1)}


def _check(scores, correct):
  scores, correct = jnp.asarray(scores), jnp.asarray(correct)
  if scores.ndim != 1 or correct.shape != scores.shape or scores.size == 0:
    raise InvalidInputError(f"scores and correct must be non-empty (N,) arrays of one length; got {scores.shape} "
                            f"and {correct.shape}")
  dtype = jnp.promote_types(scores.dtype, jnp.float32)
  return scores.astype(dtype), correct.astype(dtype)


def accepted_errors(*, scores: jax.Array, correct: jax.Array) -> jax.Array:
  """(N,) expected errors among the k most confident predictions, k = 1 ... N (ties spread evenly)."""
  scores, correct = _check(scores, correct)
  n = scores.shape[0]
  order = jnp.argsort(-scores, stable=True)
  ranked, errors = scores[order], 1 - correct[order]
  starts = jnp.concatenate([jnp.ones(1, bool), ranked[1:] != ranked[:-1]])
  group = jnp.cumsum(starts) - 1  # tie-run id of each rank
  group_errors = jax.ops.segment_sum(errors, group, num_segments=n)
  group_sizes = jax.ops.segment_sum(jnp.ones_like(errors), group, num_segments=n)
  rank = jnp.arange(n)
  first = jax.lax.cummax(jnp.where(starts, rank, 0))  # first rank of each position's run
  before = jnp.concatenate([jnp.zeros(1, errors.dtype), jnp.cumsum(group_errors)])[group]  # errors of earlier runs
  return before + (rank - first + 1) * group_errors[group] / group_sizes[group]


def _curve(errors: jax.Array) -> tuple[jax.Array, jax.Array]:
  k = jnp.arange(1, errors.shape[0] + 1, dtype=errors.dtype)
  return k / errors.shape[0], errors / k


def risk_coverage(*, scores: jax.Array, correct: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(coverages k / N, selective risks r_k), k = 1 ... N: the risk-coverage curve."""
  return _curve(accepted_errors(scores=scores, correct=correct))


def aurc(*, scores: jax.Array, correct: jax.Array) -> jax.Array:
  """Area under the risk-coverage curve, (1/N) sum_k r_k."""
  return jnp.mean(risk_coverage(scores=scores, correct=correct)[1])


def _oracle_aurc(correct: jax.Array) -> jax.Array:
  """AURC of the order that accepts every correct prediction first: r*_k = max(0, k - C) / k, C = #correct."""
  n = correct.shape[0]
  k = jnp.arange(1, n + 1, dtype=correct.dtype)
  return jnp.mean(jnp.maximum(0, k - jnp.sum(correct)) / k)


def e_aurc(*, scores: jax.Array, correct: jax.Array) -> jax.Array:
  """Excess AURC: AURC minus the oracle order's (0 when every correct prediction outranks every error)."""
  scores, correct = _check(scores, correct)
  return aurc(scores=scores, correct=correct) - _oracle_aurc(correct)


def augrc(*, scores: jax.Array, correct: jax.Array) -> jax.Array:
  """Area under the generalised risk-coverage curve, (1/N) sum_k (errors among the k accepted) / N."""
  return _augrc(accepted_errors(scores=scores, correct=correct))


def _augrc(errors: jax.Array) -> jax.Array:
  return jnp.mean(errors) / errors.shape[0]


def selective_risk(*, scores: jax.Array, correct: jax.Array, coverage: float) -> jax.Array:
  """The selective risk when the ceil(coverage · N) most confident predictions (at least one) are accepted."""
  if not 0 < coverage <= 1:
    raise InvalidInputError(f"coverage must be in (0, 1], got {coverage}")
  return _selective_risk(accepted_errors(scores=scores, correct=correct), coverage)


def _selective_risk(errors: jax.Array, coverage: float) -> jax.Array:
  k = max(1, math.ceil(coverage * errors.shape[0] - 1e-9))  # the tolerance: 0.3 * 10 is 3.0000000000000004
  return errors[k - 1] / k


def selective_report(*, probs: jax.Array, labels: jax.Array, logits: jax.Array | None = None,
                     coverages: tuple[float, ...] = (0.8, 0.9)) -> dict:
  """AURC, E-AURC, AUGRC and the selective risk at each of `coverages` (floats, for results.json) for the MSP and
  the negative entropy of `probs` (N, K) — the calibrated probabilities: these scores change with a calibrator —
  and, when `logits` are given, their max logit (whose ranking no temperature changes)."""
  probs, labels = jnp.asarray(probs, jnp.float32), jnp.asarray(labels)
  correct = (jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32)
  scores = _probability_scores(probs)
  if logits is not None:
    scores["max_logit"] = jnp.max(jnp.asarray(logits, jnp.float32), axis=-1)
  report = {}
  for score, s in scores.items():
    errors = accepted_errors(scores=s, correct=correct)  # once per score: every statistic below derives from it
    area = jnp.mean(_curve(errors)[1])
    report[score] = {"aurc": float(area), "e_aurc": float(area - _oracle_aurc(correct)),
                     "augrc": float(_augrc(errors)),
                     **{f"risk_at_{c:g}": float(_selective_risk(errors, c)) for c in coverages}}
  return report
