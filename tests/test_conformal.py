"""Split-conformal sets (calibjax.calibration.conformal): scores by hand, the quantile rank, coverage at least
1 - alpha on exchangeable data (within a binomial tolerance), and RAPS with lam = 0 equal to APS."""

import jax
import numpy as np
import pytest

from calibjax.calibration import conformal
from calibjax.calibration.metrics import InvalidInputError

PROBS = np.float32([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])


def test_scores_by_hand():
  np.testing.assert_allclose(conformal.class_scores(probs=PROBS, method="thr"), 1 - PROBS)
  # Non-randomised APS: the mass ranked above a class plus the class's own probability.
  np.testing.assert_allclose(conformal.class_scores(probs=PROBS, method="aps", randomized=False),
                             [[0.5, 0.8, 1.0], [1.0, 0.6, 0.9]], rtol=1e-6)
  # RAPS adds lam (rank - k_reg)^+: with k_reg = 1 the 2nd and 3rd ranked classes pay lam and 2 lam.
  np.testing.assert_allclose(conformal.class_scores(probs=PROBS, method="raps", randomized=False, lam=0.1, k_reg=1),
                             [[0.5, 0.9, 1.2], [1.2, 0.6, 1.0]], rtol=1e-6)
  u = jax.random.uniform(jax.random.key(3), (2,))
  randomised = conformal.class_scores(probs=PROBS, method="aps", key=jax.random.key(3))
  np.testing.assert_allclose(randomised[0], [u[0] * 0.5, 0.5 + u[0] * 0.3, 0.8 + u[0] * 0.2], rtol=1e-6)


def test_threshold_is_the_corrected_quantile():
  scores = np.arange(1, 10, dtype=np.float32)  # n = 9
  assert float(conformal.threshold(scores=scores, alpha=0.2)) == 8.0  # ceil(10 * 0.8) = 8th smallest
  assert float(conformal.threshold(scores=scores, alpha=0.5)) == 5.0
  assert np.isinf(conformal.threshold(scores=scores, alpha=0.05))  # rank 10 > 9: every class
  with pytest.raises(InvalidInputError, match="alpha"):
    conformal.threshold(scores=scores, alpha=1.0)


def _exchangeable(seed, n, k=10):
  """Noisy softmax classifier outputs and labels drawn from those very probabilities (calibrated), plus a
  temperature that makes them over-confident: conformal coverage must not care."""
  rng = np.random.default_rng(seed)
  logits = 2.0 * rng.normal(size=(n, k))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  labels = np.array([rng.choice(k, p=p) for p in probs])
  sharp = np.exp(3 * logits) / np.exp(3 * logits).sum(-1, keepdims=True)
  return sharp.astype(np.float32), labels


@pytest.mark.parametrize("method", conformal.METHODS)
def test_coverage_is_at_least_one_minus_alpha(method):
  alpha, n_cal, n_test = 0.1, 1000, 5000
  probs, labels = _exchangeable(0, n_cal + n_test)
  _, sets = conformal.calibrate_and_predict(cal_probs=probs[:n_cal], cal_labels=labels[:n_cal],
                                            test_probs=probs[n_cal:], method=method, alpha=alpha,
                                            key=jax.random.key(1))
  report = conformal.set_report(sets=sets, labels=labels[n_cal:])
  # Coverage given the calibration set is Beta-distributed around >= 1 - alpha with sd ~ sqrt(a(1-a)/n_cal) =
  # 0.0095; the test estimate adds sqrt(a(1-a)/n_test) = 0.0042: 3 combined sds = 0.031.
  assert report["coverage"] >= 1 - alpha - 0.031, report
  if method != "thr":  # randomised: also at most 1 - alpha + 1/(n+1)
    assert report["coverage"] <= 1 - alpha + 1 / (n_cal + 1) + 0.031, report
  assert 1 <= report["mean_size"] < 10


def test_raps_with_no_penalty_is_aps():
  probs, labels = _exchangeable(2, 600)
  key = jax.random.key(4)
  common = dict(cal_probs=probs[:300], cal_labels=labels[:300], test_probs=probs[300:], alpha=0.1, key=key)
  q_aps, aps = conformal.calibrate_and_predict(method="aps", **common)
  q_raps, raps = conformal.calibrate_and_predict(method="raps", lam=0.0, **common)
  assert float(q_aps) == float(q_raps)
  np.testing.assert_array_equal(aps, raps)
