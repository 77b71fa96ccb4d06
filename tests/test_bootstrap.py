"""Tests of the bootstrap confidence intervals over evaluation networks (calibration/report.py)."""

import numpy as np
import pytest

from calibjax.calibration.metrics import InvalidInputError
from calibjax.calibration.report import SUMMARY_METRICS, bootstrap_interval, summarize_networks


def test_two_values_span_both():
  # The resample means are a (probability 1/4), (a + b) / 2 (1/2) and b (1/4): the 2.5 % and 97.5 % quantiles
  # fall inside the two outer masses.
  assert bootstrap_interval([0.3, 0.7]) == (0.3, 0.7)


def test_constant_values_give_a_point():
  assert bootstrap_interval([0.25] * 5) == (0.25, 0.25)


def test_interval_holds_the_mean_and_narrows_with_confidence():
  values = np.random.default_rng(1).normal(size=8)
  low95, high95 = bootstrap_interval(values)
  low50, high50 = bootstrap_interval(values, level=0.5)
  assert low95 < low50 < values.mean() < high50 < high95
  assert values.min() <= low95 and high95 <= values.max()


def test_same_seed_same_interval_and_resamples_are_paired():
  values = np.random.default_rng(2).uniform(size=5)
  assert bootstrap_interval(values) == bootstrap_interval(values)
  # The same draws serve every metric: an affine map of the values maps the interval.
  low, high = bootstrap_interval(values)
  assert bootstrap_interval(2 * values + 1) == pytest.approx((2 * low + 1, 2 * high + 1))


def test_coverage_of_a_normal_mean():
  # 200 samples of 30 standard normals: the percentile interval covers the true mean 0 in about 94 % of them
  # (its small-sample coverage at n = 30). Binomial sd at 200 trials is 1.7 %: [87 %, 99 %] is 4 sd wide on each
  # side. Intervals of the values instead of their means would cover 100 %, too-narrow ones far less.
  rng = np.random.default_rng(3)
  covered = [low <= 0 <= high for low, high in
             (bootstrap_interval(rng.normal(size=30), resamples=2000, seed=s) for s in range(200))]
  assert 0.87 <= np.mean(covered) <= 0.99


@pytest.mark.parametrize("values, level", [([], 0.95), ([[1.0, 2.0]], 0.95), ([1.0, 2.0], 1.0)])
def test_bad_input(values, level):
  with pytest.raises(InvalidInputError):
    bootstrap_interval(values, level=level)


def test_summary_reports_the_interval():
  stages = ("raw", "ts", "mts")
  networks = [{stage: {m: float(k + i) for i, m in enumerate(SUMMARY_METRICS)} | {"over_calibrated": k == 0}
               for stage in stages} for k in range(3)]
  summary = summarize_networks(networks)
  for stage in stages:
    i = SUMMARY_METRICS.index("ece")
    ece = summary[stage]["ece"]
    assert ece["mean"] == pytest.approx(i + 1) and ece["ci95"] == list(bootstrap_interval([i, i + 1.0, i + 2.0]))
