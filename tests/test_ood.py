"""Tests of calibjax.analysis.ood: scores, AUROC / AUPR / FPR@TPR against sklearn and hand-computed cases."""

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from calibjax.analysis import ood


def _labels_scores(s_in, s_out):
  return np.r_[np.ones(len(s_in)), np.zeros(len(s_out))], np.r_[s_in, s_out]


def test_auroc_hand_case():
  # Pairs (in, out): 3 > 1, 3 > 2, 3 = 3 (1/2), 2 > 1, 2 = 2 (1/2), 2 < 3: (1 + 1 + .5 + 1 + .5 + 0) / 6.
  assert float(ood.ood_auroc(in_scores=np.array([3.0, 2.0]), out_scores=np.array([1.0, 2.0, 3.0]))) == (
      pytest.approx(4 / 6))
  assert float(ood.ood_auroc(in_scores=np.array([5.0, 6.0]), out_scores=np.array([1.0, 2.0]))) == 1.0
  assert float(ood.ood_auroc(in_scores=np.array([1.0, 2.0]), out_scores=np.array([5.0, 6.0]))) == 0.0


@pytest.mark.parametrize("seed", (0, 1))
def test_against_sklearn(seed):
  rng = np.random.default_rng(seed)
  s_in = np.round(rng.normal(1.0, 1.0, 400), 1)  # rounding creates ties
  s_out = np.round(rng.normal(0.0, 1.0, 300), 1)
  y, s = _labels_scores(s_in, s_out)
  assert float(ood.ood_auroc(in_scores=s_in, out_scores=s_out)) == pytest.approx(skm.roc_auc_score(y, s),
                                                                                  abs=1e-6)
  assert float(ood.aupr(in_scores=s_in, out_scores=s_out)) == pytest.approx(
      skm.average_precision_score(y, s), abs=1e-6)
  assert float(ood.aupr(in_scores=s_in, out_scores=s_out, positive="out")) == pytest.approx(
      skm.average_precision_score(1 - y, -s), abs=1e-6)
  fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
  for target in (0.95, 0.8, 0.5):
    expected = fpr[np.searchsorted(tpr, target, side="left")]
    assert float(ood.fpr_at_tpr(in_scores=s_in, out_scores=s_out, tpr=target)) == pytest.approx(expected,
                                                                                                abs=1e-6)


def test_fpr95_hand_case():
  # 20 in-distribution scores 1..20: TPR 0.95 needs the top 19, threshold 2; out scores >= 2: 3 of 4.
  s_in = np.arange(1.0, 21.0)
  s_out = np.array([0.5, 2.0, 5.0, 30.0])
  assert float(ood.fpr_at_tpr(in_scores=s_in, out_scores=s_out)) == pytest.approx(0.75)


def test_scores_orientation_and_values():
  logits = np.array([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
  p = jax.nn.softmax(logits, axis=1)
  np.testing.assert_allclose(ood.msp_score(logits), np.max(p, 1), rtol=1e-6)
  np.testing.assert_allclose(ood.max_logit_score(logits), [10.0, 1.0])
  np.testing.assert_allclose(ood.energy_score(logits), np.log(np.exp(logits).sum(1)), rtol=1e-6)
  np.testing.assert_allclose(ood.energy_score(logits, temperature=2.0),
                             2 * np.log(np.exp(logits / 2).sum(1)), rtol=1e-6)
  np.testing.assert_allclose(ood.neg_entropy_score(logits), np.sum(p * np.log(p), 1), rtol=1e-5)
  # Every score ranks the confident row as more in-distribution than the uniform one.
  for name in ood.SCORES.names():
    scores = np.asarray(ood.SCORES.get(name)(logits))
    assert scores[0] > scores[1], name


def test_ood_report():
  rng = np.random.default_rng(0)
  in_logits = rng.normal(size=(300, 10)) + 4 * np.eye(10)[rng.integers(0, 10, 300)]
  out_logits = rng.normal(size=(200, 10))
  report = ood.ood_report(in_logits=in_logits, out_logits=out_logits, score="energy")
  assert set(report) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
  assert report["auroc"] > 0.9 and report["fpr95"] < 0.5
  assert all(isinstance(v, float) for v in report.values())
