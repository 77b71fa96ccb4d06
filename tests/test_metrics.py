"""Tests of calibjax.calibration.metrics.

Three kinds of checks:
  * golden vectors: every published test vector of docs/metrics.md §5, each in the convention of its source
    (the test says which convention it needs and whether others give the same number);
  * plain-numpy loop re-implementations of each reference's definition (written from the definitions in
    docs/metrics.md §1-§4 / the reference semantics, bin by bin, in float64) compared on random data;
  * invariants with hypothesis: range, permutation invariance, zero error on perfectly calibrated data,
    streaming == one-shot for random batch splits, and a sharded run in a subprocess with 4 fake CPU devices.

Shapes are fixed per test so that each jitted function compiles once.
"""

import functools
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
from hypothesis import given, settings
from hypothesis import strategies as st

from calibjax.calibration import metrics as M
from calibjax.errors import CalibjaxError, ConfigError, UnknownNameError

F32 = np.float32
ATOL = 2e-6  # float32 accumulation of <= 1000 terms against float64 references

# ---------------------------------------------------------------------------------------------------------
# Plain numpy references (loops over bins, float64 arithmetic on the float32 inputs).


def np_top_label(probs, labels):
  probs = np.asarray(probs, np.float64)
  return probs.max(1), (probs.argmax(1) == labels).astype(np.float64)


def np_reduce(members, scores, targets, denom, norm):
  """members: list of boolean masks, one per bin. Returns the error before the classwise reduction (power)."""
  gaps = []
  total = 0.0
  for mask in members:
    n_b = mask.sum()
    if n_b == 0:
      continue
    s_b, t_b = scores[mask].mean(), targets[mask].mean()
    w_b = n_b / denom
    gaps.append(abs(s_b - t_b))
    if norm == "l1":
      total += w_b * abs(s_b - t_b)
    elif norm == "l2":
      total += w_b * (s_b - t_b) ** 2
    elif norm == "l2_debiased" and n_b >= 2:
      total += w_b * ((s_b - t_b) ** 2 - t_b * (1 - t_b) / (n_b - 1))
  if norm == "max":
    return max(gaps) if gaps else 0.0
  return max(total, 0.0) if norm == "l2_debiased" else total


def np_finish(power, norm):
  return math.sqrt(power) if norm in ("l2", "l2_debiased") else power


def np_members(scores, targets, binning, n_bins, edges="upper_inclusive"):
  """Bin membership masks of each reference binning, written as the reference computes it."""
  x = np.asarray(scores, np.float64)
  n = x.shape[0]
  if binning == "equal_width":
    e = np.linspace(0, 1, n_bins + 1).astype(F32).astype(np.float64)  # edges k/n rounded to float32
    if edges == "upper_inclusive":
      return [(x <= e[1]) if b == 0 else (x > e[b]) & (x <= e[b + 1]) for b in range(n_bins)]
    if edges == "lower_inclusive":
      return [(x >= e[b]) & (x < e[b + 1]) if b < n_bins - 1 else (x >= e[b]) for b in range(n_bins)]
    return [(x >= e[b]) & (x < e[b + 1]) for b in range(n_bins)] + [x >= 1.0]
  if binning == "equal_mass":  # torch.tensor_split of the stably sorted scores
    order = np.argsort(x, kind="stable")
    masks = []
    for chunk in np.array_split(order, n_bins):
      mask = np.zeros(n, bool)
      mask[chunk] = True
      masks.append(mask)
    return masks
  if binning == "equal_mass_interp":  # focal_calibration AdaptiveECELoss
    e = np.interp(np.linspace(0, n, n_bins + 1), np.arange(n), np.sort(x)).astype(F32).astype(np.float64)
    return [(x > e[b]) & (x <= e[b + 1]) for b in range(n_bins)]
  if binning == "equal_mass_midpoint":  # verified_calibration get_equal_bins + np.searchsorted
    sorted_x = sorted(x)
    size = int(np.ceil(n / n_bins))
    runs = [sorted_x[i:i + size] for i in range(0, n, size)]
    bounds = sorted(set([(runs[i][-1] + runs[i + 1][0]) / 2.0 for i in range(len(runs) - 1)] + [1.0]))
    idx = np.searchsorted(bounds, x)
    return [idx == b for b in range(len(bounds))]
  if binning == "equal_mass_rm":  # robustness_metrics _get_adaptive_bins + np.digitize
    positions = np.minimum(np.round(np.linspace(0, n, n_bins, endpoint=False)).astype(int), n - 1)
    uppers = np.concatenate([np.sort(x)[positions][1:], [1.0]])
    idx = np.digitize(x, uppers)
    return [idx == b for b in range(n_bins + 1)]
  if binning == "equal_mass_cxkd":  # calibration_library CELoss.compute_bin_boundaries(probabilities)
    step = n // n_bins
    lowers = [np.sort(x)[i * step] for i in range(n_bins)]
    uppers = lowers[1:] + [1.0]
    return [(x > lo) & (x <= hi) for lo, hi in zip(lowers, uppers)]
  if binning == "unique":  # verified_calibration get_discrete_bins
    values = sorted(np.unique(x))
    bounds = [(values[i] + values[i + 1]) / 2.0 for i in range(len(values) - 1)] + [1.0]
    idx = np.searchsorted(bounds, x)
    return [idx == b for b in range(len(bounds))]
  if binning == "sweep":  # robustness_metrics _em_monotonic_sweep + _get_bin_edges + np.digitize
    return np_sweep_members(x, np.asarray(targets, np.float64))
  raise ValueError(binning)


def np_is_monotonic(n_bins, assign, targets):
  last = -1000.0
  for i in range(n_bins):
    cur = assign == i
    if cur.any():
      mean = targets[cur].mean()
      if mean < last:
        return False
      last = mean
  return True


def np_sweep_assign(x, targets):
  n = len(x)
  order = np.argsort(x, kind="stable")
  assign = np.zeros(n, int)
  previous = np.zeros(n, int)
  for n_bins in range(2, n):
    assign[order] = np.minimum(n_bins - 1, np.floor((np.arange(n) / n) * n_bins)).astype(int)
    if not np_is_monotonic(n_bins, assign, targets):
      return previous
    previous = assign.copy()
  return assign


def np_sweep_members(x, targets):
  assign = np_sweep_assign(x, targets)
  bounds = []
  previous_max = None
  for i, b in enumerate(sorted(set(assign))):
    values = x[assign == b]
    bounds.append(values.min() if i == 0 else (values.min() + previous_max) / 2)
    previous_max = values.max()
  bounds.append(previous_max)
  idx = np.digitize(x, bounds[1:])
  return [idx == b for b in range(idx.max() + 1)]


def np_ece(probs, labels, binning="equal_width", n_bins=15, norm="l1", edges="upper_inclusive"):
  conf, correct = np_top_label(probs, labels)
  members = np_members(conf, correct, binning, n_bins, edges)
  return np_finish(np_reduce(members, conf, correct, len(conf), norm), norm)


def np_classwise(probs, labels, binning="equal_width", n_bins=15, norm="l1", edges="upper_inclusive"):
  probs = np.asarray(probs, np.float64)
  powers = []
  for k in range(probs.shape[1]):
    p, t = probs[:, k], (labels == k).astype(np.float64)
    powers.append(np_reduce(np_members(p, t, binning, n_bins, edges), p, t, len(p), norm))
  return max(powers) if norm == "max" else np_finish(np.mean(powers), norm)


def np_ace_cxkd(probs, labels, n_bins=15, threshold=0.0):
  probs = np.array(probs, np.float64)
  probs[probs < threshold] = 0
  total = 0.0
  for k in range(probs.shape[1]):
    p, t = probs[:, k], (labels == k).astype(np.float64)
    total += np_reduce(np_members(p, t, "equal_mass_cxkd", n_bins), p, t, len(p), "l1")
  return total / probs.shape[1]


def np_ace_rm(probs, labels, n_bins=15, threshold=0.0):
  probs = np.asarray(probs, np.float64)
  total = 0.0
  for k in range(probs.shape[1]):
    keep = probs[:, k] > threshold
    p, t = probs[keep, k], (labels[keep] == k).astype(np.float64)
    if p.size:
      total += np_reduce(np_members(p, t, "equal_mass_rm", n_bins), p, t, len(p), "l1") / probs.shape[1]
  return total


def np_oe(probs, labels, n_bins=15):
  conf, correct = np_top_label(probs, labels)
  total = 0.0
  for mask in np_members(conf, correct, "equal_width", n_bins):
    if mask.any():
      c, a = conf[mask].mean(), correct[mask].mean()
      total += mask.mean() * c * max(c - a, 0.0)
  return total


def np_mmce(probs, labels, width=0.4):
  conf, correct = np_top_label(probs, labels)
  diff = correct - conf
  kernel = np.exp(-np.abs(conf[:, None] - conf[None, :]) / width)
  return np.sqrt(np.sum(diff[:, None] * diff[None, :] * kernel)) / len(conf)


def np_smece(f, y):
  """relplot smECE_fast with the reflected Gaussian kernel (config defaults), float64."""
  f = np.asarray(f, np.float64)
  y = np.asarray(y, np.float64)

  def to_grid(points):
    values = np.zeros(points)
    left = (f * (points - 1)).astype(int).clip(0, points - 2)
    frac = f * (points - 1) - left
    np.add.at(values, left, (1 - frac) * (f - y))
    np.add.at(values, left + 1, frac * (f - y))
    return values / len(f)

  def smooth(values, sigma):
    points = len(values)
    t = np.linspace(0, 1, points)
    kernel = np.exp(-(t - 0.5) * (t - 0.5) / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)
    ext = np.concatenate([np.flip(values)[:-1], values, np.flip(values)[1:]])
    out = scipy.signal.convolve(ext, kernel, "valid")[points // 2: points // 2 + points]
    return np.sum(np.abs(out)) / points

  state = {"points": 200, "grid": to_grid(200)}

  def check(alpha):
    grown = False
    while round(20 / alpha) > state["points"]:
      state["points"] *= 4
      grown = True
    if grown:
      state["grid"] = to_grid(state["points"])
    return alpha < 0.001 or alpha < smooth(state["grid"], alpha)

  if check(1.0):
    sigma = 1.0
  else:
    start, end = 1.0, 0.0
    for _ in range(10):
      mid = (start + end) / 2
      if check(mid):
        end = mid
      else:
        start = mid
    sigma = start
  return smooth(state["grid"], sigma), sigma


def np_brier_decomposition_rm(probs, labels):
  """robustness_metrics _compute_brier_decomposition (numpy, exact cell means), uncertainty shifted by +1."""
  probs = np.asarray(probs, np.float64)
  k = probs.shape[1]
  pred = probs.argmax(1)
  table = np.zeros((k, k))
  np.add.at(table, (pred, labels), 1.0)
  weights = table.sum(1) / table.sum()
  pbar = table.sum(0) / table.sum()
  dist = table / np.maximum(table.sum(1, keepdims=True), 1)
  return {"uncertainty": 1 - np.sum(pbar**2),
          "resolution": np.sum(weights * np.sum((pbar[None] - dist) ** 2, 1)),
          "reliability": np.mean(np.sum((dist[pred] - probs) ** 2, 1))}


def random_problem(seed, n=300, k=5, scale=2.0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, k)) * scale
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs = (probs / probs.sum(1, keepdims=True)).astype(F32)
  # Labels drawn from a sharpened version of the prediction: miscalibrated but informative.
  sharp = probs.astype(np.float64) ** 1.5
  sharp /= sharp.sum(1, keepdims=True)
  labels = np.minimum((np.cumsum(sharp, 1) < rng.random((n, 1))).sum(1), k - 1)
  return probs, labels


# 307 samples: not a multiple of the bin counts, so the equal-mass conventions give different bins.
PROBS, LABELS = random_problem(0, n=307)


# ---------------------------------------------------------------------------------------------------------
# Golden vectors (docs/metrics.md §5).


def test_vector_1a_torchmetrics_binary():
  # torchmetrics binary semantics = p(positive) against the label, bins [lo, hi) with 1.0 in an extra bin.
  # No prediction sits on the edge 0.5, so all three edge conventions give the published numbers.
  p = np.array([0.25, 0.25, 0.55, 0.75, 0.75])
  y = np.array([0, 0, 1, 1, 1])
  got = {norm: float(M.binary_ece(probs_pos=p, labels=y, mode="p_positive", n_bins=2, norm=norm))
         for norm in ("l1", "l2", "max")}
  assert got == pytest.approx({"l1": 0.2900, "l2": 0.2918, "max": 0.3167}, abs=5e-5)
  for edges in M.EDGES:
    got = M.binary_ece(probs_pos=p, labels=y, mode="p_positive", n_bins=2, edges=edges)
    assert float(got) == pytest.approx(0.2900, abs=5e-5), edges


def test_vector_1b_torchmetrics_multiclass():
  # torchmetrics bins are [lo, hi) (bucketize(right=True) - 1) with 1.0 in an extra bin. The confidences
  # .55, .55, .60, .90 are all strictly inside the 3 bins, so [lo, hi) and (lo, hi] give the same 0.2000.
  probs = np.array([[.25, .20, .55], [.55, .05, .40], [.10, .30, .60], [.90, .05, .05]])
  labels = np.array([0, 1, 2, 0])
  got = {norm: float(M.ece(probs=probs, labels=labels, n_bins=3, norm=norm)) for norm in ("l1", "l2", "max")}
  assert got == pytest.approx({"l1": 0.2000, "l2": 0.2082, "max": 0.2333}, abs=5e-5)
  for edges in M.EDGES:
    got = M.ece(probs=probs, labels=labels, n_bins=3, edges=edges)
    assert float(got) == pytest.approx(0.2, abs=5e-5), edges


PROBS_2A = np.array([[0.42610548, 0.41748077, 0.15641374], [0.44766216, 0.47721294, 0.0751249],
                     [0.1862702, 0.15139402, 0.66233578], [0.05753544, 0.8561222, 0.08634236],
                     [0.18697925, 0.29836466, 0.51465609]])
LABELS_2A = np.array([0, 1, 2, 1, 2])


def test_vector_2a_robustness_metrics_gce():
  # GCE "even": np.digitize on upper edges: [lo, hi) with 1.0 in an extra bin (edges="lower_inclusive_open").
  got = M.ece(probs=PROBS_2A, labels=LABELS_2A, n_bins=30, edges="lower_inclusive_open")
  assert float(got) == pytest.approx(0.412713502, abs=1e-6)
  # The published sweep value uses the equal-width sweep; every prediction here is correct, so any binning
  # gives mean(1 - confidence), and the equal-mass sweep reproduces it too.
  sweep = M.ece(probs=PROBS_2A, labels=LABELS_2A, binning="sweep")
  assert float(sweep) == pytest.approx(0.412713502, abs=1e-6)


def test_sweep_assignment_of_robustness_metrics_test():
  # robustness_metrics test_monotonic: _em_monotonic_sweep(max probs, class labels) == [0, 0, 1, 1, 0].
  conf = PROBS_2A.max(1).astype(F32)
  s, hits = jax.lax.sort((jnp.asarray(conf), jnp.asarray(LABELS_2A, jnp.int32)), num_keys=1)
  assert int(M._sweep_num_bins(hits)) == 2
  np.testing.assert_array_equal(np_sweep_assign(conf.astype(np.float64), LABELS_2A.astype(float)),
                                [0, 0, 1, 1, 0])


def test_vector_2b_robustness_metrics_binary_top_label():
  # 1-D probs are p(positive); max_prob=True makes it top-label; 30 even bins ("lower_inclusive_open").
  p = np.array([.91, .32, .66, .67, .57, .98, .41, .19])
  y = np.array([1, 0, 1, 1, 0, 1, 0, 0])
  got = M.binary_ece(probs_pos=p, labels=y, mode="top_label", n_bins=30, edges="lower_inclusive_open")
  assert float(got) == pytest.approx(0.18125, abs=1e-6)
  stacked = M.ece(probs=np.stack([1 - p, p], 1), labels=y, n_bins=30, edges="lower_inclusive_open")
  assert float(stacked) == pytest.approx(float(got), abs=1e-7)


def test_vector_2c_keras_ece():
  # Keras ECE: tf.histogram_fixed_width_bins -> [lo, hi) with the last bin closed ("lower_inclusive").
  probs = np.array([[.31, .32, .27], [.37, .33, .30], [.30, .31, .39], [.61, .38, .01], [.10, .65, .25],
                    [.91, .05, .04]])
  labels = np.array([1, 0, 0, 1, 0, 0])
  got = M.ece(probs=probs, labels=labels, n_bins=10, edges="lower_inclusive")
  assert float(got) == pytest.approx(0.378333, abs=1e-6)
  stats = M.reliability_bins(probs=probs, labels=labels, n_bins=10, edges="lower_inclusive")
  np.testing.assert_array_equal(stats["counts"], [0, 0, 0, 3, 0, 0, 2, 0, 0, 1])


def test_vector_3_torch_uncertainty_binary_semantics():
  # torch-uncertainty binary adaptive CE: top-label confidences, torch.tensor_split bins ("equal_mass").
  p = np.array([0.3, 0.24, 0.25, 0.2, 0.8])
  y = np.array([0, 0, 0, 1, 1])
  top = M.binary_ece(probs_pos=p, labels=y, mode="top_label", n_bins=2, binning="equal_mass")
  assert float(top) == pytest.approx(3 / 5 * (1 - (0.7 + 0.76 + 0.75) / 3) + 2 / 5 * (0.8 - 0.5), abs=1e-6)
  assert float(top) == pytest.approx(0.278, abs=1e-6)
  positive = M.binary_ece(probs_pos=p, labels=y, mode="p_positive", n_bins=2, binning="equal_mass")
  assert float(positive) == pytest.approx(0.082, abs=1e-6)


P_4A = np.array([.5, .5, .5, .6, .5, .6, .6, .6, .6])
Y_4A = np.array([0, 1, 0, 1, 0, 1, 1, 1, 0])


def test_vector_4a_verified_calibration_binary():
  # verified_calibration 1-D input = p(positive) semantics; get_discrete_bins = one bin per distinct value.
  l1 = M.binary_ece(probs_pos=P_4A, labels=Y_4A, mode="p_positive", binning="unique")
  l2 = M.binary_ece(probs_pos=P_4A, labels=Y_4A, mode="p_positive", binning="unique", norm="l2")
  assert float(l1) == pytest.approx(4 / 9 * 0.25 + 5 / 9 * 0.2, abs=1e-6)
  assert float(l1) == pytest.approx(0.22222, abs=1e-5)
  assert float(l2) == pytest.approx(0.223607, abs=1e-6)
  # The 2-class marginal error equals the 1-D one (both columns have the same gaps); debiased is smaller.
  stacked = np.stack([1 - P_4A, P_4A], 1)
  assert float(M.classwise_ece(probs=stacked, labels=Y_4A, binning="unique", norm="l2")) == pytest.approx(
      0.223607, abs=1e-6)
  debiased = M.debiased_l2_ece(probs=stacked, labels=Y_4A, binning="unique")
  assert float(debiased) < float(l2)
  # Each bin's squared gap equals its label-variance correction here (.25^2 = .25*.75/3, .2^2 = .8*.2/4).
  assert float(debiased) == pytest.approx(0.0, abs=1e-6)
  top = M.debiased_l2_ece(probs=stacked, labels=Y_4A, binning="unique", mode="top_label")
  assert float(top) < float(M.ece(probs=stacked, labels=Y_4A, binning="unique", norm="l2"))


def test_vector_4b_verified_calibration_three_classes():
  rows = [[.6, .3, .1]] * 6 + [[.1, .8, .1]] * 4 + [[.1, 0, .9]] * 4
  probs = np.array(rows)
  labels = np.array([0] * 5 + [1] + [1] * 3 + [2] + [2] * 4)
  perm = np.random.default_rng(1).permutation(len(labels))
  probs, labels = probs[perm], labels[perm]
  marginal = M.classwise_ece(probs=probs, labels=labels, binning="unique")
  top = M.ece(probs=probs, labels=labels, binning="unique")
  assert float(marginal) == pytest.approx(0.0857143, abs=1e-6)
  assert float(top) == pytest.approx(0.142857, abs=1e-6)


def test_vector_4c_verified_calibration_equal_mass_lower_bound():
  # get_equal_bins with 2 bins ("equal_mass_midpoint"); with 6 distinct confidences the tensor_split bins
  # ("equal_mass") are the same 3 + 3 split.
  probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.2, 0.2], [0.0, 0.9, 0.1], [0.0, 1.0, 0.0], [0.3, 0.3, 0.4],
                    [0.2, 0.0, 0.85]])
  labels = np.array([0, 0, 1, 1, 0, 2])
  expected = 0.5 * (2 / 3 - 0.6) + 0.5 * (1 - 2.75 / 3)
  for binning in ("equal_mass_midpoint", "equal_mass"):
    assert float(M.ece(probs=probs, labels=labels, n_bins=2, binning=binning)) == pytest.approx(expected,
                                                                                              abs=1e-6)
  assert expected == pytest.approx(0.075)
  # verified_calibration get_ece (15 equal-width (lo, hi] bins) on the same data: 4/6 (1 - mean of the rest).
  assert float(M.ece(probs=probs, labels=labels, n_bins=3)) == pytest.approx(
      4 / 6 * (1 - (0.8 + 0.85 + 0.9 + 1.0) / 4), abs=1e-6)


def _relplot_demo_sample(seed, n=10_000):
  rng = np.random.default_rng(seed)
  f = rng.uniform(size=n)
  y = (rng.uniform(size=n) < f + 0.2 * np.sin(2 * np.pi * f)).astype(np.float64)
  return f.astype(F32), y.astype(F32)


def test_vector_7_relplot_demo_statistical():
  # The relplot demo is unseeded. Over seeds 0..39 of this sampler smECE has mean 0.1136 and standard
  # deviation 0.0031 (the float64 reference below agrees to 1e-7): the published 0.1156 is an ordinary draw.
  # A fixed seed must land within 0.01 (about 3 standard deviations) of 0.1156. The binned 15-bin ECE of the
  # same sample is 0.129, so returning a binned estimate instead would fail.
  f, y = _relplot_demo_sample(7)
  got = float(M.smooth_calibration_error(scores=f, targets=y))
  assert abs(got - 0.1156) < 0.01
  assert got == pytest.approx(np_smece(f, y)[0], abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Against the numpy references on random data.

BINNINGS = ("equal_width", "equal_mass", "equal_mass_interp", "equal_mass_midpoint", "equal_mass_rm",
            "equal_mass_cxkd", "unique", "sweep")
NORM_CASES = ([(b, "l1") for b in BINNINGS]
              + [(b, n) for b in ("equal_width", "equal_mass_interp") for n in ("l2", "max", "l2_debiased")])


@pytest.mark.parametrize("binning,norm", NORM_CASES)
def test_ece_matches_reference(binning, norm):
  got = float(M.ece(probs=PROBS, labels=LABELS, binning=binning, norm=norm))
  assert got == pytest.approx(np_ece(PROBS, LABELS, binning=binning, norm=norm), abs=ATOL)


def test_equal_mass_conventions_differ_on_this_data():
  # Guards the comparisons above: with N = 307 the conventions really choose different bins.
  values = {b: float(M.ece(probs=PROBS, labels=LABELS, binning=b)) for b in BINNINGS[1:6]}
  assert len({round(v, 6) for v in values.values()}) >= 3, values


@pytest.mark.parametrize("binning", ("equal_width", "equal_mass_interp", "equal_mass_rm", "unique", "sweep"))
def test_classwise_matches_reference(binning):
  got = float(M.classwise_ece(probs=PROBS, labels=LABELS, binning=binning))
  assert got == pytest.approx(np_classwise(PROBS, LABELS, binning=binning), abs=ATOL)


@pytest.mark.parametrize("norm", ("l2", "max", "l2_debiased"))
def test_classwise_norms_match_reference(norm):
  got = float(M.classwise_ece(probs=PROBS, labels=LABELS, norm=norm))
  assert got == pytest.approx(np_classwise(PROBS, LABELS, norm=norm), abs=ATOL)


def test_debiased_l2_ece_matches_reference():
  got = float(M.debiased_l2_ece(probs=PROBS, labels=LABELS))
  expected = np_classwise(PROBS, LABELS, binning="equal_mass_midpoint", norm="l2_debiased")
  assert got == pytest.approx(expected, abs=ATOL)
  assert got < float(M.classwise_ece(probs=PROBS, labels=LABELS, binning="equal_mass_midpoint", norm="l2"))


@pytest.mark.parametrize("threshold", (0.0, 0.05))
def test_ace_tace_match_references(threshold):
  cxkd = M.ace(probs=PROBS, labels=LABELS, threshold=threshold)
  rm = M.ace(probs=PROBS, labels=LABELS, threshold=threshold, convention="rm")
  assert float(cxkd) == pytest.approx(np_ace_cxkd(PROBS, LABELS, threshold=threshold), abs=ATOL)
  assert float(rm) == pytest.approx(np_ace_rm(PROBS, LABELS, threshold=threshold), abs=ATOL)


def test_tace_threshold_is_honoured():
  # robustness_metrics' TACE passes threshold 0 (TACE == ACE); here the default 0.01 changes the value.
  probs, labels = random_problem(5, n=307, k=5, scale=4.0)
  assert float(np.mean(probs < 0.01)) > 0.1
  assert float(M.tace(probs=probs, labels=labels)) == pytest.approx(
      np_ace_cxkd(probs, labels, threshold=0.01), abs=ATOL)
  assert abs(float(M.tace(probs=probs, labels=labels)) - float(M.ace(probs=probs, labels=labels))) > 1e-4


def test_radix_select_matches_sort():
  # The equal-mass binnings take order statistics by radix select for N >= 2^15 (a sort below that).
  rng = np.random.default_rng(4)
  select = jax.jit(M._select)
  n = M._SELECT_MIN_SIZE + 123
  for kind in range(4):
    values = [rng.random(n), np.round(rng.random(n) * 10) / 10, rng.normal(size=n) * 1e3,
              np.where(rng.random(n) < 0.3, np.inf, rng.random(n) * (rng.random(n) < 0.8))][kind].astype(F32)
    ranks = np.r_[0, n - 1, rng.integers(0, n, 31)]
    np.testing.assert_array_equal(select(values, ranks), np.sort(values)[ranks])


def test_large_input_equal_mass_matches_reference():
  probs, labels = random_problem(6, n=M._SELECT_MIN_SIZE + 77, k=3)
  for binning in ("equal_mass_cxkd", "equal_mass_interp"):
    assert float(M.ece(probs=probs, labels=labels, binning=binning)) == pytest.approx(
        np_ece(probs, labels, binning=binning), abs=1e-5), binning


def test_oe_mce_match_reference():
  assert float(M.oe(probs=PROBS, labels=LABELS)) == pytest.approx(np_oe(PROBS, LABELS), abs=ATOL)
  assert float(M.mce(probs=PROBS, labels=LABELS)) == pytest.approx(np_ece(PROBS, LABELS, norm="max"),
                                                                   abs=ATOL)


def test_mmce_matches_quadratic_reference():
  assert float(M.mmce(probs=PROBS, labels=LABELS)) == pytest.approx(np_mmce(PROBS, LABELS), rel=1e-5)


def test_smooth_ece_matches_relplot_reference():
  conf, correct = np_top_label(PROBS, LABELS)
  expected, _ = np_smece(conf.astype(F32), correct)
  assert float(M.smooth_ece(probs=PROBS, labels=LABELS)) == pytest.approx(expected, abs=1e-5)


def test_smooth_ece_bandwidth_search_grows_the_grid():
  # A calibrated sample: the fixed-point width is ~0.012 < 20/800, so relplot's search grows the grid from 200
  # to 3200 points and beyond; same shape as the demo sample of vector 7, so no new compilation.
  rng = np.random.default_rng(0)
  f = rng.uniform(size=10_000).astype(F32)
  y = (rng.uniform(size=10_000) < f).astype(F32)
  expected, sigma = np_smece(f, y)
  assert 20 / sigma > 800
  assert float(M.smooth_calibration_error(scores=f, targets=y)) == pytest.approx(expected, abs=1e-5)


def test_proper_scores_match_numpy():
  p = PROBS.astype(np.float64)
  onehot = np.eye(p.shape[1])[LABELS]
  assert float(M.brier(probs=PROBS, labels=LABELS)) == pytest.approx(np.mean(np.sum((p - onehot) ** 2, 1)),
                                                                     abs=ATOL)
  expected_nll = -np.mean(np.log(p[np.arange(307), LABELS]))
  assert float(M.nll(probs=PROBS, labels=LABELS)) == pytest.approx(expected_nll, abs=1e-5)
  logits = np.log(PROBS) + 3.0
  assert float(M.nll_from_logits(logits=logits, labels=LABELS)) == pytest.approx(
      float(M.nll(probs=PROBS, labels=LABELS)), abs=1e-5)
  conf, correct = np_top_label(PROBS, LABELS)
  assert float(M.accuracy(probs=PROBS, labels=LABELS)) == pytest.approx(correct.mean())
  assert float(M.mean_confidence(probs=PROBS, labels=LABELS)) == pytest.approx(conf.mean(), abs=ATOL)
  assert float(M.confidence_gap(probs=PROBS, labels=LABELS)) == pytest.approx(conf.mean() - correct.mean(),
                                                                              abs=ATOL)
  # A zero probability on the true class gives a large finite NLL instead of inf.
  assert np.isfinite(float(M.nll(probs=np.array([[1.0, 0.0]]), labels=np.array([1]))))


def test_brier_decomposition():
  got = jax.device_get(M.brier_decomposition(probs=PROBS, labels=LABELS))
  ref = np_brier_decomposition_rm(PROBS, LABELS)
  for key in ref:
    assert float(got[key]) == pytest.approx(ref[key], abs=ATOL), key
  # Forecasts constant within each predicted-class cell: the decomposition is exact.
  rng = np.random.default_rng(2)
  table = rng.dirichlet(np.ones(4) * 2, size=4)
  table[np.arange(4), np.arange(4)] += 1.0
  table /= table.sum(1, keepdims=True)
  cells = rng.integers(0, 4, 500)
  probs = table[cells].astype(F32)
  labels = rng.integers(0, 4, 500)
  parts = jax.device_get(M.brier_decomposition(probs=probs, labels=labels))
  assert float(parts["reliability"] - parts["resolution"] + parts["uncertainty"]) == pytest.approx(
      float(M.brier(probs=probs, labels=labels)), abs=1e-5)


@pytest.mark.parametrize("binning", ("equal_width", "equal_mass_interp"))
def test_reliability_bins_match_reference(binning):
  stats = jax.device_get(M.reliability_bins(probs=PROBS, labels=LABELS, binning=binning))
  conf, correct = np_top_label(PROBS, LABELS)
  members = np_members(conf, correct, binning, 15)
  np.testing.assert_array_equal(stats["counts"], [m.sum() for m in members])
  for b, mask in enumerate(members):
    if mask.any():
      assert stats["confidence"][b] == pytest.approx(conf[mask].mean(), abs=ATOL)
      assert stats["accuracy"][b] == pytest.approx(correct[mask].mean(), abs=ATOL)
      assert stats["edges"][b] <= conf[mask].min() + ATOL
    else:
      assert np.isnan(stats["accuracy"][b])


EDGE_PROBS = np.array([[0.2] * 5, [0.4] + [0.15] * 4, [0.5] + [0.125] * 4, [1.0, 0, 0, 0, 0],
                       [0.6] + [0.1] * 4], F32)


def test_edge_conventions_on_exact_edges():
  # Confidences 0.2, 0.4, 0.5, 1.0 and 0.6 with 5 bins: 0.2, 0.4 and 0.6 are edges (rounded to float32).
  labels = np.zeros(5, int)
  counts = {}
  for e in M.EDGES:
    stats = M.reliability_bins(probs=EDGE_PROBS, labels=labels, n_bins=5, edges=e)
    counts[e] = [int(c) for c in stats["counts"]]
  assert counts["upper_inclusive"] == [1, 1, 2, 0, 1]       # (lo, hi], 1.0 in the last bin
  assert counts["lower_inclusive"] == [0, 1, 2, 1, 1]       # [lo, hi), 1.0 in the last bin
  assert counts["lower_inclusive_open"] == [0, 1, 2, 1, 0, 1]  # [lo, hi), 1.0 in an extra bin
  conf, correct = np_top_label(EDGE_PROBS, labels)
  for e in M.EDGES:
    assert [int(m.sum()) for m in np_members(conf, correct, "equal_width", 5, e)] == counts[e]


def test_binary_top_label_equals_stacked_multiclass():
  p = PROBS[:, 0] / (PROBS[:, 0] + PROBS[:, 1])
  y = (LABELS % 2).astype(np.int32)
  stacked = np.stack([1 - p, p], 1)
  assert float(M.binary_ece(probs_pos=p, labels=y, mode="top_label")) == pytest.approx(
      float(M.ece(probs=stacked, labels=y)), abs=1e-6)
  conf = np.asarray(p, np.float64)
  members = np_members(conf, y, "equal_width", 15)
  expected = np_reduce(members, conf, y.astype(np.float64), len(conf), "l1")
  assert float(M.binary_ece(probs_pos=p, labels=y, mode="p_positive")) == pytest.approx(expected, abs=ATOL)


def test_bootstrap_ci():
  key = jax.random.key(0)
  out = jax.device_get(M.bootstrap_ci(M.accuracy, probs=PROBS, labels=LABELS, key=key, n_resamples=400))
  acc = float(out["value"])
  # Bootstrap standard error of a proportion: sqrt(acc (1 - acc) / N), within sampling noise of 400 draws.
  assert float(out["std"]) == pytest.approx(math.sqrt(acc * (1 - acc) / 307), rel=0.15)
  assert out["lower"] < acc < out["upper"]
  assert out["samples"].shape == (400,)
  again = jax.device_get(M.bootstrap_ci(M.accuracy, probs=PROBS, labels=LABELS, key=key, n_resamples=400))
  np.testing.assert_array_equal(out["samples"], again["samples"])


def test_calibration_report():
  logits = np.log(PROBS) * 1.3
  report = M.calibration_report(logits=logits, labels=LABELS)
  assert tuple(report) == M.REPORT_KEYS
  assert isinstance(report["n"], int) and report["n"] == 307
  assert isinstance(report["over_confident"], bool)
  assert all(isinstance(report[k], float) for k in M.REPORT_KEYS if k not in ("n", "over_confident"))
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=1))
  assert report["ece"] == pytest.approx(np_ece(probs, LABELS), abs=ATOL)
  assert report["ece_10"] == pytest.approx(np_ece(probs, LABELS, n_bins=10), abs=ATOL)
  assert report["adaece"] == pytest.approx(np_ece(probs, LABELS, binning="equal_mass_interp"), abs=ATOL)
  assert report["rmsce"] == pytest.approx(np_ece(probs, LABELS, norm="l2"), abs=ATOL)
  assert report["mce"] == pytest.approx(np_ece(probs, LABELS, norm="max"), abs=ATOL)
  assert report["sce"] == pytest.approx(np_classwise(probs, LABELS), abs=ATOL)
  assert report["ace"] == pytest.approx(np_ace_cxkd(probs, LABELS), abs=ATOL)
  assert report["tace"] == pytest.approx(np_ace_cxkd(probs, LABELS, threshold=0.01), abs=ATOL)
  assert report["oe"] == pytest.approx(np_oe(probs, LABELS), abs=ATOL)
  assert report["over_confident"] == (report["confidence_gap"] > 0)


def test_user_errors():
  with pytest.raises(UnknownNameError):
    M.ece(probs=PROBS, labels=LABELS, binning="quantile")
  with pytest.raises(ConfigError):
    M.ece(probs=PROBS, labels=LABELS, norm="l3")
  with pytest.raises(ConfigError):
    M.ece(probs=PROBS, labels=LABELS, binning="equal_mass", edges="lower_inclusive")
  with pytest.raises(M.InvalidInputError):
    M.ece(probs=PROBS[:, 0], labels=LABELS)
  with pytest.raises(M.InvalidInputError):
    M.ece(probs=PROBS, labels=LABELS[:-1])
  with pytest.raises(M.InvalidInputError):
    M.ece(probs=PROBS, labels=LABELS.astype(F32))
  with pytest.raises(TypeError):
    M.binary_ece(probs_pos=PROBS[:, 0], labels=LABELS)  # the binary semantics must be chosen explicitly
  with pytest.raises(ConfigError):
    M.reliability_bins(probs=PROBS, labels=LABELS, binning="sweep")
  assert issubclass(M.InvalidInputError, CalibjaxError) and issubclass(M.InvalidInputError, ValueError)


# ---------------------------------------------------------------------------------------------------------
# Invariants.

ECE_FAMILY = [("ece", b, n) for b, n in NORM_CASES] + [("classwise", "equal_width", "l1"),
                                                        ("classwise", "sweep", "l1")]


def _family(kind, binning, norm, probs, labels):
  fn = M.ece if kind == "ece" else M.classwise_ece
  return float(fn(probs=probs, labels=labels, binning=binning, norm=norm))


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 8.0))
def test_range_and_permutation_invariance(seed, scale):
  probs, labels = random_problem(seed, n=307, k=5, scale=scale)
  perm = np.random.default_rng(seed + 1).permutation(307)
  scores = {"ece": probs.max(1)[:, None], "classwise": probs}
  for kind, binning, norm in ECE_FAMILY:
    value = _family(kind, binning, norm, probs, labels)
    assert -1e-7 <= value <= 1 + 1e-7, (kind, binning, norm)
    # "equal_mass" and "sweep" order tied scores by position, so only tie-free scores make them invariant
    # (large scales saturate float32 probabilities at exactly 1.0).
    tied = any(len(np.unique(column)) < len(column) for column in scores[kind].T)
    if not (tied and binning in ("equal_mass", "sweep")):
      assert _family(kind, binning, norm, probs[perm], labels[perm]) == pytest.approx(value, abs=1e-6)
  for fn in (M.ace, M.tace, M.oe, M.smooth_ece, M.mmce):
    value = float(fn(probs=probs, labels=labels))
    assert 0 <= value <= 1 + 1e-7
    assert float(fn(probs=probs[perm], labels=labels[perm])) == pytest.approx(value, abs=1e-6)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_tie_aware_binnings_are_invariant_with_ties(seed):
  rng = np.random.default_rng(seed)
  probs, labels = random_problem(seed, n=307, k=5)
  probs = np.round(probs * 8) / 8  # many tied confidences
  probs[:, 0] += 1 - probs.sum(1)
  perm = rng.permutation(307)
  for binning in ("equal_width", "equal_mass_interp", "equal_mass_midpoint", "equal_mass_rm",
                  "equal_mass_cxkd", "unique"):
    assert float(M.ece(probs=probs[perm], labels=labels[perm], binning=binning)) == pytest.approx(
        float(M.ece(probs=probs, labels=labels, binning=binning)), abs=1e-6), binning


def _perfectly_calibrated(rng, k=5):
  """307 rows in 12 groups; in a group of n rows the confidence is j / n and exactly j rows are correct.

  The groups have confidences in distinct equal-width bins (15 bins), so every bin's mean confidence equals
  its accuracy. 307 rows keep the shape of the other tests (no recompilation).
  """
  sizes = [25] * 11 + [32]
  rows, labels = [], []
  for b, n in zip(range(3, 15), sizes):
    j = round((b + 0.5) / 15 * n)
    conf = j / n
    assert b / 15 < conf <= (b + 1) / 15
    for i in range(n):
      pred = rng.integers(k)
      row = np.full(k, (1 - conf) / (k - 1))
      row[pred] = conf
      rows.append(row)
      labels.append(pred if i < j else (pred + 1 + rng.integers(k - 1)) % k)
  return np.array(rows, F32), np.array(labels)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_perfect_calibration_gives_zero(seed):
  probs, labels = _perfectly_calibrated(np.random.default_rng(seed))
  perm = np.random.default_rng(seed).permutation(len(labels))
  probs, labels = probs[perm], labels[perm]
  for norm in ("l1", "l2", "max"):
    assert float(M.ece(probs=probs, labels=labels, norm=norm)) == pytest.approx(0, abs=1e-6)
  assert float(M.ece(probs=probs, labels=labels, binning="unique")) == pytest.approx(0, abs=1e-6)
  assert float(M.oe(probs=probs, labels=labels)) == pytest.approx(0, abs=1e-6)
  assert float(M.confidence_gap(probs=probs, labels=labels)) == pytest.approx(0, abs=1e-6)


def _streamed(edges, bounds, probs=PROBS):
  """BinStats over the batches probs[a:b] (each padded to 307 rows with a mask, so `update` compiles once)."""
  stats = None
  for a, b in zip(np.r_[0, bounds], np.r_[bounds, 307]):
    pad = 307 - (b - a)
    part = _UPDATE(M.BinStats.init(15, 5, edges=edges),
                   probs=np.pad(probs[a:b], ((0, pad), (0, 0)), constant_values=0.2),
                   labels=np.pad(LABELS[a:b], (0, pad)), mask=np.arange(307) < b - a)
    stats = part if stats is None else M.BinStats.merge(stats, part)
  return jax.device_get(_COMPUTE(stats))


_UPDATE = jax.jit(M.BinStats.update)
_COMPUTE = jax.jit(M.BinStats.compute)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cuts=st.integers(0, 4))
def test_streaming_equals_one_shot(seed, cuts):
  bounds = np.sort(np.random.default_rng(seed).choice(np.arange(1, 307), size=cuts, replace=False))
  got = _streamed("upper_inclusive", bounds)
  assert int(got["n"]) == 307
  one_shot = {"ece": M.ece, "rmsce": functools.partial(M.ece, norm="l2"), "mce": M.mce, "oe": M.oe,
              "sce": M.classwise_ece, "accuracy": M.accuracy, "nll": M.nll, "brier": M.brier,
              "mean_confidence": M.mean_confidence, "confidence_gap": M.confidence_gap}
  for key, fn in one_shot.items():
    assert float(got[key]) == pytest.approx(float(fn(probs=PROBS, labels=LABELS)), abs=1e-5), key


def test_streaming_extra_bin_convention():
  # "lower_inclusive_open" stores one more bin (p = 1.0); two rows with confidence exactly 1.0 make it matter.
  probs = PROBS.copy()
  probs[:2] = np.eye(5)[:2]
  got = _streamed("lower_inclusive_open", np.array([100, 250]), probs)
  one_shot = {"ece": M.ece(probs=probs, labels=LABELS, edges="lower_inclusive_open"),
              "sce": M.classwise_ece(probs=probs, labels=LABELS, edges="lower_inclusive_open")}
  for key, value in one_shot.items():
    assert float(got[key]) == pytest.approx(float(value), abs=1e-5), key
  assert float(one_shot["ece"]) != pytest.approx(float(M.ece(probs=probs, labels=LABELS)), abs=1e-6)


def test_streaming_sharded_over_devices(tmp_path):
  # Fake CPU devices must be configured before jax starts, hence a subprocess.
  script = tmp_path / "shard.py"
  script.write_text(textwrap.dedent("""
      import numpy as np, jax, jax.numpy as jnp
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from calibjax.calibration import metrics as M
      assert jax.device_count() == 4
      rng = np.random.default_rng(0)
      logits = rng.normal(size=(400, 6)) * 2
      probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=1))
      labels = rng.integers(0, 6, 400)
      mesh = Mesh(np.array(jax.devices()), ("data",))
      rows = NamedSharding(mesh, P("data"))
      sharded = jax.device_put(probs, rows), jax.device_put(labels, rows)
      update = jax.jit(M.BinStats.update)
      compute = jax.jit(M.BinStats.compute)
      stats = compute(update(M.BinStats.init(15, 6), probs=sharded[0], labels=sharded[1]))
      # Per-device statistics merged with a tree sum.
      parts = [update(M.BinStats.init(15, 6), probs=probs[i::4], labels=labels[i::4]) for i in range(4)]
      merged = compute(jax.tree.map(lambda *xs: sum(xs), *parts))
      one = {"ece": M.ece(probs=probs, labels=labels), "sce": M.classwise_ece(probs=probs, labels=labels)}
      for key in ("ece", "sce", "nll", "brier", "accuracy", "mce", "oe"):
        assert abs(float(stats[key]) - float(merged[key])) < 1e-5, key
      for key in one:
        assert abs(float(stats[key]) - float(one[key])) < 1e-5, key
      assert abs(float(M.ece(probs=sharded[0], labels=sharded[1])) - float(one["ece"])) < 1e-6
      print("ok")
      """))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().endswith("ok")


def test_metrics_compile_once_and_vmap():
  # Equal calls share one compilation whether or not the defaults are spelled out.
  probs, labels = random_problem(9, n=50, k=3)
  before = M.ece.compiled._cache_size()
  M.ece(probs=probs, labels=labels)
  M.ece(probs=probs, labels=labels, n_bins=15, binning="equal_width", norm="l1", edges="upper_inclusive")
  M.ece(probs=probs[::-1], labels=labels[::-1], n_bins=15)
  assert M.ece.compiled._cache_size() == before + 1
  # vmap over a batch of problems works (bootstrap_ci relies on it).
  batch = np.stack([PROBS, PROBS[::-1]])
  labels = np.stack([LABELS, LABELS[::-1]])
  values = jax.vmap(lambda p, y: M.ece(probs=p, labels=y, binning="equal_mass_interp"))(batch, labels)
  assert float(values[0]) == pytest.approx(float(values[1]), abs=1e-6)
  assert "ece" in M.METRICS and "equal_mass_cxkd" in M.BINNINGS
