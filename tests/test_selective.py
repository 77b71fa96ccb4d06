"""Selective prediction (calibjax.calibration.selective): a hand-computed case, the oracle and random orders,
ties, and the confidence scores."""

import jax
import numpy as np
import pytest

from calibjax.calibration import selective
from calibjax.calibration.metrics import InvalidInputError

# Confidences 0.9 > 0.8 > 0.7 > 0.6 (given shuffled) with correctness 1, 0, 1, 0: errors among the top k are
# 0, 1, 1, 2, so r_k = 0, 1/2, 1/3, 1/2 and g_k = 0, 1/4, 1/4, 1/2.
SCORES = np.float32([0.7, 0.9, 0.6, 0.8])
CORRECT = np.float32([1, 1, 0, 0])


def test_hand_computed_curve_and_areas():
  coverage, risk = selective.risk_coverage(scores=SCORES, correct=CORRECT)
  np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(risk, [0, 1 / 2, 1 / 3, 1 / 2], rtol=1e-6)
  np.testing.assert_allclose(selective.aurc(scores=SCORES, correct=CORRECT), (1 / 2 + 1 / 3 + 1 / 2) / 4, rtol=1e-6)
  np.testing.assert_allclose(selective.augrc(scores=SCORES, correct=CORRECT), (0 + 1 + 1 + 2) / 16, rtol=1e-6)
  # The oracle accepts both correct ones first: r* = 0, 0, 1/3, 1/2.
  np.testing.assert_allclose(selective.e_aurc(scores=SCORES, correct=CORRECT),
                             (1 / 2 + 1 / 3 + 1 / 2) / 4 - (1 / 3 + 1 / 2) / 4, rtol=1e-6)
  assert float(selective.selective_risk(scores=SCORES, correct=CORRECT, coverage=0.5)) == pytest.approx(0.5)
  assert float(selective.selective_risk(scores=SCORES, correct=CORRECT, coverage=0.3)) == pytest.approx(0.5)  # k=2
  assert float(selective.selective_risk(scores=SCORES, correct=CORRECT, coverage=0.1)) == 0.0  # k = 1


def test_oracle_order_has_no_excess_and_a_random_score_costs_the_error_rate():
  rng = np.random.default_rng(0)
  correct = (rng.random(20000) < 0.7).astype(np.float32)
  oracle = correct + 0.5 * rng.random(20000)  # every correct prediction above every error
  assert abs(float(selective.e_aurc(scores=oracle, correct=correct))) < 1e-6
  random = rng.random(20000).astype(np.float32)
  # A score unrelated to correctness: r_k fluctuates around the error rate (0.3); its mean deviates by far
  # less than 0.01 at this N (the first few k are noisy but weigh 1/N each).
  assert float(selective.aurc(scores=random, correct=correct)) == pytest.approx(1 - correct.mean(), abs=0.01)
  assert float(selective.augrc(scores=random, correct=correct)) == pytest.approx((1 - correct.mean()) / 2, abs=0.01)


def test_ties_spread_their_errors_evenly_and_ignore_the_input_order():
  correct = np.float32([1, 0, 1, 1, 0, 1])
  tied = np.full(6, 0.5, np.float32)
  _, risk = selective.risk_coverage(scores=tied, correct=correct)
  np.testing.assert_allclose(risk, np.full(6, 2 / 6), rtol=1e-6)  # every k: the error rate
  scores = np.float32([0.9, 0.5, 0.5, 0.5, 0.1, 0.5])  # one tie run of four holding one error
  permutation = np.array([3, 0, 5, 1, 4, 2])
  a = selective.accepted_errors(scores=scores, correct=correct)
  b = selective.accepted_errors(scores=scores[permutation], correct=correct[permutation])
  np.testing.assert_allclose(a, b)
  np.testing.assert_allclose(a, [0, 0.25, 0.5, 0.75, 1, 2])


def test_confidence_scores_by_hand():
  logits = np.float32([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(selective.confidence_scores(logits=logits), p.max(-1), rtol=1e-6)
  np.testing.assert_allclose(selective.confidence_scores(logits=logits, score="max_logit", temperature=2.0),
                             [1.0, 0.5])
  np.testing.assert_allclose(selective.confidence_scores(logits=logits, score="neg_entropy"),
                             (p * np.log(p)).sum(-1), rtol=1e-6)
  with pytest.raises(InvalidInputError, match="unknown confidence score"):
    selective.confidence_scores(logits=logits, score="margin")


def test_jittable_and_report():
  jitted = jax.jit(selective.aurc)
  assert float(jitted(scores=SCORES, correct=CORRECT)) == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 4)
  logits = np.float32([[3, 0], [0, 1], [2, 1.5], [0.2, 0]])
  labels = np.array([0, 0, 1, 0])  # correct, wrong, wrong, correct
  report = selective.selective_report(probs=jax.nn.softmax(logits / 2), labels=labels, logits=logits)
  assert set(report) == set(selective.SCORES)
  assert set(report["msp"]) == {"aurc", "e_aurc", "augrc", "risk_at_0.8", "risk_at_0.9"}
  # Max logits 3, 1, 2, 0.2 rank the predictions correct, wrong, wrong, correct: r_k = 0, 1/2, 2/3, 2/4.
  assert report["max_logit"]["aurc"] == pytest.approx((0 + 1 / 2 + 2 / 3 + 1 / 2) / 4)
  assert report["max_logit"]["risk_at_0.8"] == pytest.approx(1 / 2)  # k = ceil(3.2) = 4
  assert "max_logit" not in selective.selective_report(probs=jax.nn.softmax(logits), labels=labels)
  with pytest.raises(InvalidInputError, match="one length"):
    selective.aurc(scores=SCORES, correct=CORRECT[:3])
