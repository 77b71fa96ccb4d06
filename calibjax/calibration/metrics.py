"""Calibration metrics as pure, jittable JAX functions, with every binning convention made explicit.

Inputs. `probs` is (N, K) probabilities (rows sum to 1), `labels` is (N,) int class indices; `logits` is
(N, K). Half-precision inputs are promoted to float32; float64 is kept when x64 is enabled. All sums are
accumulated in that dtype. Every public metric is `jax.jit`-compiled with its structural arguments (`n_bins`,
`binning`, `norm`, `edges`, `mode`, `convention`) static, so it can be called eagerly or inside other
jitted/vmapped code. Values inside the arrays are never checked (a NaN propagates); shapes are, and
a wrong shape raises `InvalidInputError`.

Top-label quantities: confidence c_i = max_k p_ik, prediction argmax_k p_ik (ties go to the lowest class
index, as numpy/torch/jnp argmax), correctness a_i = 1[prediction = y_i].

Binned calibration error. Samples are grouped into bins b with n_b members, mean score s_b and mean target
t_b (top-label: s = confidence, t = correctness; classwise: s = p_ik, t = 1[y_i = k]); gap_b = s_b - t_b and
w_b = n_b / D, D = the number of samples considered (N unless a convention filters samples out). Norms:

  * "l1":  sum_b w_b |gap_b|                        (ECE)
  * "l2":  sqrt(sum_b w_b gap_b^2)                  (RMSCE)
  * "max": max over non-empty bins of |gap_b|        (MCE; empty bins count as 0)
  * "l2_debiased": sqrt(max(0, sum_b w_b (gap_b^2 - t_b (1 - t_b) / (n_b - 1)))), bins with n_b < 2 adding 0
    (Kumar et al. 2019, verified_calibration `unbiased_l2_ce`).

Classwise (marginal) errors reduce the per-class values CE_k as (mean_k CE_k^p)^(1/p) with p = 1 for "l1" and
p = 2 for the L2 norms (verified_calibration's marginal CE; identical to robustness_metrics' GCE, which sums
CE_k / K and takes the square root at the end), and as max_k for "max".

Binnings (`binning=`), each tied to the reference whose numbers it reproduces:

  * "equal_width": n_bins bins of width 1/n_bins with edges k/n_bins rounded to the input dtype. `edges`
    chooses what happens on an edge:
      - "upper_inclusive" (default, docs/metrics.md §3): (lo, hi], the first bin is [0, hi]; p = 1.0 is in the last
        bin.
        CXKD/calibration_library, focal_calibration, gpleiss `_ECELoss`, verified_calibration `get_ece`.
        (Those references use (lo, hi] for the first bin too, so an exact p = 0 -- possible only in classwise
        metrics -- is dropped there and counted here.)
      - "lower_inclusive": [lo, hi), the last bin is [lo, 1]. MTS fork `calc_ece`, Keras/robustness_metrics
        `ece` (`histogram_fixed_width_bins`).
      - "lower_inclusive_open": [lo, hi) for every bin and p = 1.0 alone in an extra (n_bins + 1)-th bin.
        torchmetrics (`bucketize(right=True) - 1`, Lightning-AI/torchmetrics#3510), robustness_metrics GCE
        "even", relplot `binnedECE`.
    References that bin with `floor(p * n)` instead of comparing with edges can differ for a p within one ulp
    of an edge.
  * "equal_mass": sort the scores (stable: ties keep their input order), then split the sorted array into
    n_bins consecutive runs whose sizes differ by at most one, the N mod n_bins larger runs first
    (`torch.tensor_split`); tied scores may straddle two bins; with N < n_bins the trailing bins are empty.
    torch-uncertainty `AdaptiveCalibrationError`.
  * "equal_mass_interp": AdaECE of Mukhoti et al. 2020 (torrvision/focal_calibration `AdaptiveECELoss`,
    3mcloud/adafocal): edges e_j = np.interp(j N / n_bins, arange(N), sorted scores), j = 0..n_bins, and bins
    (e_j, e_{j+1}]; the smallest score(s) (equal to e_0) fall in no bin but still count in D = N. The
    interpolation is done in the input dtype (the reference computes it in float64 and compares in float32).
  * "equal_mass_midpoint": verified_calibration `get_equal_bins`: sorted scores cut into runs of
    ceil(N / n_bins) (so there may be fewer than n_bins bins), bin boundaries half-way between runs; a value
    tied across a boundary goes to the lower bin.
  * "equal_mass_rm": robustness_metrics `_get_adaptive_bins`: upper edges at the sorted scores of rank
    round_half_even(j N / n_bins), j = 1..n_bins-1, then 1.0, used with `np.digitize`: a value equal to an
    edge goes to the upper bin and p = 1.0 to an extra bin.
  * "equal_mass_cxkd": CXKD/calibration_library ACE: lower edges at sorted[i * floor(N / n_bins)], last upper
    edge 1.0, bins (lo, hi]; the minimum score(s) fall in no bin but count in D = N.
  * "sweep": monotonic sweep of Roelofs et al. 2022 as robustness_metrics implements it
    (`_em_monotonic_sweep`, its `msce` metric): b = 2, 3, ... equal-mass bins (sorted ranks split at
    floor(i b / N)) are tried until the mean targets of the bins stop being non-decreasing (compared exactly,
    in integers); the last monotone b is used (1 if b = 2 already fails, N - 1 if none fails). The bins are
    then evaluated as robustness_metrics does (mid-point edges + `np.digitize`): a value tied across a
    boundary goes to the upper bin and the sample(s) equal to the maximum score form an extra bin. `n_bins`
    is ignored. Targets must be 0/1 and N < 2^24. The sweep stops at 32768 bins (reached only when the
    targets are almost perfectly sorted by score; robustness_metrics would continue to N - 1). Ties are
    ordered stably (robustness_metrics sorts unstably, so with tied scores its bins can differ). Cost: one
    sort plus O(B^2) for the B bin counts tried.
  * "unique": one bin per distinct score, verified_calibration `get_discrete_bins` (for binned/discrete
    models); `n_bins` is ignored.

Equal-mass bins, the sweep and "unique" need the whole data set at once; only "equal_width" has a streaming
form (`BinStats`).
"""

import functools
import inspect
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from calibjax.errors import CalibjaxError, ConfigError
from calibjax.registry import Registry


class InvalidInputError(CalibjaxError, ValueError):
  """Arrays given to a metric or a plot have the wrong shape or dtype, or hold non-finite values."""


EDGES = ("upper_inclusive", "lower_inclusive", "lower_inclusive_open")
NORMS = ("l1", "l2", "max", "l2_debiased")
BINARY_MODES = ("p_positive", "top_label")
ACE_CONVENTIONS = ("cxkd", "rm")

BINNINGS: Registry[Callable[..., tuple[jax.Array, int]]] = Registry("binning")
METRICS: Registry[Callable[..., jax.Array]] = Registry("metric")

# Digit widths of the radix select on 32-bit float keys (see `_select`).
_RADIX_DIGITS = (11, 11, 10)
# Smallest input for which `_select` uses the radix select instead of a sort.
_SELECT_MIN_SIZE = 2**15
# Rows per partial sum of the bin statistics (see `_chunked_segment_sum`).
_CHUNK = 4096
# The sweep compares rational bin means exactly with 24-bit integer limbs (see `_product_ge`), which bounds N.
_SWEEP_MAX_N = 2**24
# Bins the sweep may reach; each candidate count b is checked with arrays of the smallest capacity >= b.
_SWEEP_CAPACITIES = (64, 1024, 32768)
# relplot smECE (`smECE_fast`): 200-point grid, x4 while round(20 / sigma) exceeds it, sigma >= 2^-10 after
# the 10-step bisection, so the grid never exceeds 200 * 4^4 points.
_SMECE_BASE_POINTS = 200
_SMECE_LEVELS = 5
_SMECE_EPS = 0.001
_SMECE_REFINE = 10


def _jit(*static: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """`jax.jit` with `static` arguments, called with every argument spelled out.

  jit caches on the exact call signature, so f(x=a) and f(x=a, n_bins=15) would compile twice; filling in the
  defaults first makes equal calls share one compilation. Inside another jit the call is simply inlined. The
  jitted function is kept as `.compiled` (for `.lower(...)` / ahead-of-time use and cache inspection).
  """

  def wrap(fn):
    compiled = jax.jit(fn, static_argnames=static)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
      bound = signature.bind(*args, **kwargs)
      bound.apply_defaults()
      return compiled(**bound.arguments)

    call.compiled = compiled
    return call

  return wrap


# ---------------------------------------------------------------------------------------------------------
# Input handling.


def _float_dtype(dtype: Any) -> Any:
  return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _prepare(probs: jax.Array, labels: jax.Array, name: str = "probs") -> tuple[jax.Array, jax.Array]:
  """Checks shapes and returns float probabilities (N, K) and int32 labels (N,)."""
  probs = jnp.asarray(probs)
  labels = jnp.asarray(labels)
  if probs.ndim != 2:
    raise InvalidInputError(f"{name} must have shape (N, K); got {probs.shape}")
  if labels.shape != probs.shape[:1]:
    raise InvalidInputError(f"labels must have shape ({probs.shape[0]},) to match {name} {probs.shape}; "
                            f"got {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise InvalidInputError(f"labels must be integer class indices; got dtype {labels.dtype}")
  if probs.shape[0] == 0:
    raise InvalidInputError(f"{name} is empty; metrics need at least one sample")
  return probs.astype(_float_dtype(probs.dtype)), labels.astype(jnp.int32)


def _prepare_pairs(scores: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  scores = jnp.asarray(scores)
  targets = jnp.asarray(targets)
  if scores.ndim != 1 or targets.shape != scores.shape:
    raise InvalidInputError(f"scores and targets must both have shape (N,); got {scores.shape} and "
                            f"{targets.shape}")
  if scores.shape[0] == 0:
    raise InvalidInputError("scores is empty; metrics need at least one sample")
  dtype = _float_dtype(scores.dtype)
  return scores.astype(dtype), targets.astype(dtype)


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
  if value not in choices:
    raise ConfigError(f"unknown {what} '{value}'; choose one of: {', '.join(choices)}")


def _top_label(probs: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Top-label confidence (N,) and correctness (N,) in the dtype of `probs`.

  Correct means argmax = label with ties to the lowest index, written as "the label's probability is the
  maximum and no lower class reaches it" because XLA's CPU argmax is about 2x slower than these two passes.
  """
  confidence = jnp.max(probs, axis=-1)
  p_label = jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
  earlier = jnp.arange(probs.shape[-1]) < labels[:, None]
  tied_before = jnp.any((probs == confidence[:, None]) & earlier, axis=-1)
  return confidence, ((p_label == confidence) & ~tied_before).astype(probs.dtype)


def _binary_pairs(probs_pos: jax.Array, labels: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
  """(score, target) pairs of a binary problem under the chosen semantics."""
  _check_choice(mode, BINARY_MODES, "binary mode")
  probs_pos = jnp.asarray(probs_pos)
  labels = jnp.asarray(labels)
  if probs_pos.ndim != 1 or labels.shape != probs_pos.shape:
    raise InvalidInputError(f"probs_pos and labels must both have shape (N,); got {probs_pos.shape} and "
                            f"{labels.shape}")
  if probs_pos.shape[0] == 0:
    raise InvalidInputError("probs_pos is empty; metrics need at least one sample")
  p = probs_pos.astype(_float_dtype(probs_pos.dtype))
  y = labels.astype(p.dtype)
  if mode == "p_positive":
    return p, y
  # argmax of [1 - p, p] with ties to class 0 (torch.round, np.argmax): positive iff p > 0.5.
  return jnp.maximum(p, 1 - p), ((p > 0.5).astype(p.dtype) == y).astype(p.dtype)


# ---------------------------------------------------------------------------------------------------------
# Integer helpers (exact where float arithmetic would not be).


def _mul_div(j: jax.Array, m: jax.Array, d: int) -> tuple[jax.Array, jax.Array]:
  """floor(j * m / d) and (j * m) mod d for small j and d without forming j * m (int32 overflow)."""
  a, c = m // d, m % d
  return j * a + (j * c) // d, (j * c) % d


def _wide_product(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """a * b as (high, low) base-2^24 digits, exact in int32 for 0 <= a, b < 2^24."""
  a1, a0 = a >> 12, a & 0xFFF
  b1, b0 = b >> 12, b & 0xFFF
  mid = a1 * b0 + a0 * b1
  low = ((mid & 0xFFF) << 12) + a0 * b0
  high = a1 * b1 + (mid >> 12) + (low >> 24)
  return high, low & 0xFFFFFF


def _product_ge(a: jax.Array, b: jax.Array, c: jax.Array, d: jax.Array) -> jax.Array:
  """a * b >= c * d, exact for 0 <= a, b, c, d < 2^24 (the sweep compares bin means h1/n1 >= h0/n0 as
  h1 n0 >= h0 n1)."""
  h1, l1 = _wide_product(a, b)
  h2, l2 = _wide_product(c, d)
  return (h1 > h2) | ((h1 == h2) & (l1 >= l2))


def _searchsorted(sorted_values: jax.Array, query: jax.Array, side: str) -> jax.Array:
  """int32 jnp.searchsorted; a few edges are compared all at once (much faster on CPU than bisection)."""
  method = "compare_all" if sorted_values.shape[0] <= 64 else "scan"
  return jnp.searchsorted(sorted_values, query, side=side, method=method).astype(jnp.int32)


def _float_keys(x: jax.Array) -> jax.Array:
  """float32 -> uint32 keys in the same order (negative floats flipped, positive ones above them)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _float_from_keys(keys: jax.Array) -> jax.Array:
  bits = jnp.where(keys >> 31 == 1, keys & jnp.uint32(0x7FFFFFFF), ~keys)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _select(values: jax.Array, ranks: jax.Array) -> jax.Array:
  """jnp.sort(values)[ranks] for a few ranks, exactly, without sorting (float32; float64 sorts).

  XLA's CPU sort takes ~0.4 s per 10^6 values, and the equal-mass binnings only need n_bins order statistics.
  This is a most-significant-digit radix select on the order-preserving integer keys of the floats: three
  passes of 11/11/10 bits, each one histogram (a scatter-add of N counts) per distinct digit prefix of the
  requested ranks. Below `_SELECT_MIN_SIZE` values a sort is cheap and compiles faster, so it is used instead.
  """
  if values.dtype != jnp.float32 or values.shape[0] < _SELECT_MIN_SIZE:
    return jnp.sort(values)[ranks]
  order = jnp.argsort(ranks)
  wanted = ranks[order].astype(jnp.int32)
  count = wanted.shape[0]
  keys = _float_keys(values)
  prefix = jnp.zeros((count,), jnp.uint32)
  remaining = wanted
  done_bits = 0
  for width in _RADIX_DIGITS:
    shift = 32 - done_bits - width
    digit = ((keys >> shift) & ((1 << width) - 1)).astype(jnp.int32)
    if done_bits == 0:
      hist = jnp.broadcast_to(jnp.bincount(digit, length=1 << width), (count, 1 << width))
    else:
      # Requested ranks sharing a prefix share one histogram; the prefixes are sorted since the ranks are.
      known = prefix >> (shift + width)
      high = keys >> (shift + width)
      slot = _searchsorted(known, high, "left")
      hit = known[jnp.minimum(slot, count - 1)] == high
      ids = jnp.where(hit, slot * (1 << width) + digit, count << width)
      hist = jax.ops.segment_sum(jnp.ones_like(ids), ids, num_segments=(count << width) + 1)[:-1]
      hist = hist.reshape(count, 1 << width)[_searchsorted(known, known, "left")]
    below = jnp.cumsum(hist, axis=1)
    # The digit is the first one whose cumulative count exceeds the rank still to skip.
    chosen = jnp.sum(below <= remaining[:, None], axis=1)
    skipped = jnp.take_along_axis(below, jnp.maximum(chosen - 1, 0)[:, None], axis=1)[:, 0]
    remaining = remaining - jnp.where(chosen > 0, skipped, 0)
    prefix = prefix | (chosen.astype(jnp.uint32) << shift)
    done_bits += width
  return jnp.zeros_like(values, shape=(count,)).at[order].set(_float_from_keys(prefix))


def _masked(scores: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Scores with the samples outside `valid` set to +inf (so they sort last), and the number of valid ones."""
  return jnp.where(valid, scores, jnp.inf), jnp.sum(valid, dtype=jnp.int32)


# ---------------------------------------------------------------------------------------------------------
# Binnings: (scores (N,), targets (N,), valid (N,) bool, n_bins, edges) -> (bin ids (N,), number of bins).
# A sample outside every bin gets the id `number of bins`. "equal_mass" needs the sorting permutation and
# "unique"/"sweep" a full sort (slow on CPU); the other equal-mass binnings select a few order statistics.


def _equal_width_ids(scores: jax.Array, n_bins: int, edges: str) -> tuple[jax.Array, int]:
  grid = jnp.asarray(np.linspace(0.0, 1.0, n_bins + 1), scores.dtype)
  if edges == "upper_inclusive":
    return _searchsorted(grid[1:-1], scores, "left"), n_bins
  if edges == "lower_inclusive":
    return _searchsorted(grid[1:-1], scores, "right"), n_bins
  return _searchsorted(grid[1:], scores, "right"), n_bins + 1


@BINNINGS.register("equal_width")
def _bin_equal_width(scores, targets, valid, n_bins, edges):
  del targets
  ids, num = _equal_width_ids(scores, n_bins, edges)
  return jnp.where(valid, ids, num), num


@BINNINGS.register("equal_mass")
def _bin_equal_mass(scores, targets, valid, n_bins, edges):
  del targets, edges
  order = jnp.argsort(jnp.where(valid, scores, jnp.inf), stable=True)
  ranks = jnp.zeros_like(order).at[order].set(jnp.arange(scores.shape[0], dtype=order.dtype))
  m = jnp.sum(valid, dtype=jnp.int32)
  size, extra = m // n_bins, m % n_bins
  split = extra * (size + 1)
  ids = jnp.where(ranks < split, ranks // (size + 1), extra + (ranks - split) // jnp.maximum(size, 1))
  return jnp.where(valid, ids, n_bins), n_bins


@BINNINGS.register("equal_mass_interp")
def _bin_equal_mass_interp(scores, targets, valid, n_bins, edges):
  del targets, edges
  masked, m = _masked(scores, valid)
  last = jnp.maximum(m - 1, 0)
  whole, rem = _mul_div(jnp.arange(n_bins + 1), m, n_bins)
  knots = jnp.concatenate([jnp.minimum(whole, last), jnp.minimum(whole + 1, last)])
  lo, hi = jnp.split(_select(masked, knots), 2)
  frac = (rem / n_bins).astype(scores.dtype)
  # np.interp: slope * (x - x_j) + y_j, exactly y_j on a knot, the last value at and beyond the last knot.
  grid = jnp.where(whole >= last, hi[-1], jnp.where(rem == 0, lo, (hi - lo) * frac + lo))
  ids = _searchsorted(grid[1:], scores, "left")
  inside = valid & (scores > grid[0]) & (ids < n_bins)
  return jnp.where(inside, ids, n_bins), n_bins


@BINNINGS.register("equal_mass_midpoint")
def _bin_equal_mass_midpoint(scores, targets, valid, n_bins, edges):
  del targets, edges
  masked, m = _masked(scores, valid)
  run = jnp.maximum((m + n_bins - 1) // n_bins, 1)
  runs = (m + run - 1) // run
  cut = jnp.arange(n_bins - 1)
  # A data value lies above the mid-point between two runs iff it exceeds the last value of the lower run.
  run_last = _select(masked, jnp.clip((cut + 1) * run - 1, 0, scores.shape[0] - 1))
  run_last = jnp.where(cut < runs - 1, run_last, jnp.inf)
  ids = _searchsorted(run_last, scores, "left")
  return jnp.where(valid, ids, n_bins), n_bins


@BINNINGS.register("equal_mass_rm")
def _bin_equal_mass_rm(scores, targets, valid, n_bins, edges):
  del targets, edges
  masked, m = _masked(scores, valid)
  whole, rem = _mul_div(jnp.arange(1, n_bins), m, n_bins)
  up = (2 * rem > n_bins) | ((2 * rem == n_bins) & (whole % 2 == 1))
  rank = jnp.clip(jnp.minimum(whole + up, m - 1), 0, scores.shape[0] - 1)
  uppers = jnp.concatenate([_select(masked, rank), jnp.ones((1,), scores.dtype)])
  ids = _searchsorted(uppers, scores, "right")
  return jnp.where(valid, ids, n_bins + 1), n_bins + 1


@BINNINGS.register("equal_mass_cxkd")
def _bin_equal_mass_cxkd(scores, targets, valid, n_bins, edges):
  del targets, edges
  lowers = _select(_masked(scores, valid)[0], jnp.arange(n_bins) * (scores.shape[0] // n_bins))
  uppers = jnp.concatenate([lowers[1:], jnp.ones((1,), scores.dtype)])
  ids = _searchsorted(uppers, scores, "left")
  inside = valid & (scores > lowers[0]) & (ids < n_bins)
  return jnp.where(inside, ids, n_bins), n_bins


@BINNINGS.register("unique")
def _bin_unique(scores, targets, valid, n_bins, edges):
  del targets, n_bins, edges
  s = jnp.sort(_masked(scores, valid)[0])
  distinct_before = jnp.cumsum(jnp.concatenate([jnp.zeros((1,), bool), s[1:] != s[:-1]]), dtype=jnp.int32)
  n = scores.shape[0]
  return jnp.where(valid, distinct_before[_searchsorted(s, scores, "left")], n), n


def _sweep_starts(j: jax.Array, b: jax.Array, n: int) -> jax.Array:
  """First sorted rank of bin j when n samples are split at ranks floor(i b / n): ceil(j n / b)."""
  return j * (n // b) + (j * (n % b) + b - 1) // b


def _sweep_is_monotone(b: jax.Array, csum: jax.Array, n: int, capacity: int) -> jax.Array:
  j = jnp.minimum(jnp.arange(capacity + 1), b)
  starts = _sweep_starts(j, b, n)
  hits = csum[starts[1:]] - csum[starts[:-1]]
  sizes = starts[1:] - starts[:-1]
  rises = _product_ge(hits[1:], sizes[:-1], hits[:-1], sizes[1:])
  return jnp.all(rises | (jnp.arange(1, capacity) >= b))


def _sweep_max_bins(n: int) -> int:
  return max(min(n - 1, _SWEEP_CAPACITIES[-1]), 1)


def _sweep_num_bins(sorted_hits: jax.Array) -> jax.Array:
  """Number of equal-mass bins the monotonic sweep chooses, given the 0/1 targets in score order."""
  n = sorted_hits.shape[0]
  if n >= _SWEEP_MAX_N:
    raise ConfigError(f"binning='sweep' supports fewer than {_SWEEP_MAX_N} samples; got {n}")
  max_bins = _sweep_max_bins(n)
  if max_bins < 2:
    return jnp.asarray(1, jnp.int32)
  csum = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(sorted_hits, dtype=jnp.int32)])
  capacities = tuple(c for c in _SWEEP_CAPACITIES if c < max_bins) + (max_bins,)
  branches = [functools.partial(_sweep_is_monotone, csum=csum, n=n, capacity=c) for c in capacities]
  bounds = jnp.asarray(capacities, jnp.int32)

  def body(state):
    b, best, _ = state
    monotone = jax.lax.switch(jnp.searchsorted(bounds, b), branches, b)
    return b + 1, jnp.where(monotone, b, best), monotone & (b < max_bins)

  # With sorted targets every split is monotone, so the loop is skipped and the answer is N - 1.
  sorted_targets = jnp.all(sorted_hits[1:] >= sorted_hits[:-1])
  init = (jnp.asarray(2, jnp.int32), jnp.asarray(1, jnp.int32), ~sorted_targets)
  _, best, _ = jax.lax.while_loop(lambda state: state[2], body, init)
  return jnp.where(sorted_targets, n - 1, best)


@BINNINGS.register("sweep")
def _bin_sweep(scores, targets, valid, n_bins, edges):
  del n_bins, edges
  n = scores.shape[0]
  s, hits = jax.lax.sort((scores, jnp.round(targets).astype(jnp.int32)), num_keys=1, is_stable=True)
  b = _sweep_num_bins(hits)
  # robustness_metrics evaluates the chosen split with mid-point edges and np.digitize: a value tied across a
  # boundary lands in the bin of its last occurrence, and the maximum value in an extra bin b.
  last_of_tie = _searchsorted(s, scores, "right") - 1
  cut = jnp.arange(1, _sweep_max_bins(n) + 1)
  starts = jnp.where(cut < b, _sweep_starts(cut, b, n), n)
  rank_bin = jnp.where(b > cut.shape[0], jnp.maximum(last_of_tie - 1, 0),
                       _searchsorted(starts, last_of_tie, "right"))
  ids = jnp.where(scores == s[-1], b, rank_bin)
  return jnp.where(valid, ids, n + 1), n + 1


def _check_binning(n_bins: int, binning: str, edges: str) -> None:
  _check_choice(edges, EDGES, "edges")
  if binning != "equal_width" and edges != "upper_inclusive":
    raise ConfigError(f"edges='{edges}' only applies to binning='equal_width'; got binning='{binning}'")
  if n_bins < 1:
    raise ConfigError(f"n_bins must be a positive integer; got {n_bins}")


def _bin_ids(scores, targets, valid, n_bins, binning, edges) -> tuple[jax.Array, int]:
  _check_binning(n_bins, binning, edges)
  return BINNINGS.get(binning)(scores, targets, valid, n_bins, edges)


# ---------------------------------------------------------------------------------------------------------
# Per-bin statistics and their reduction.


class _Bins(struct.PyTreeNode):
  """Per-bin sums: counts n_b, score sums, target sums, and the denominator D of the bin weights."""

  counts: jax.Array
  score_sums: jax.Array
  target_sums: jax.Array
  total: jax.Array

  @property
  def means(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    filled = self.counts > 0
    safe = jnp.where(filled, self.counts, 1)
    return self.score_sums / safe, self.target_sums / safe, filled

  @property
  def weights(self) -> jax.Array:
    return self.counts / jnp.where(self.total > 0, self.total, 1)


def _chunked_segment_sum(values: jax.Array, ids: jax.Array, num: int) -> jax.Array:
  """sum of `values` (N, ...) per segment id in [0, num) along axis 0; ids >= num are dropped.

  A scatter-add accumulates sequentially, so one float32 bin sum over 10^7 samples drifts by ~1e-4 relative.
  Rows are cut into chunks of `_CHUNK`, summed per (chunk, segment), and the chunk sums are then reduced
  pairwise, which keeps the error near that of a 4096-term sum.
  """
  n = values.shape[0]
  chunks = -(-n // _CHUNK)
  chunk_of_row = (jnp.arange(n, dtype=jnp.int32) // _CHUNK).reshape((n,) + (1,) * (ids.ndim - 1))
  keyed = jnp.minimum(ids, num) + (num + 1) * chunk_of_row
  sums = jax.ops.segment_sum(values.reshape(-1), keyed.reshape(-1), num_segments=chunks * (num + 1))
  return jnp.sum(sums.reshape(chunks, num + 1)[:, :num], axis=0)


def _segment_bins(ids, num, scores, targets, weight, total) -> _Bins:
  def segsum(x):
    return _chunked_segment_sum(x, ids, num)

  weight = weight.astype(scores.dtype)
  return _Bins(segsum(weight), segsum(weight * scores), segsum(weight * targets), total.astype(scores.dtype))


def _bins_1d(scores, targets, valid, n_bins, binning, edges) -> _Bins:
  ids, num = _bin_ids(scores, targets, valid, n_bins, binning, edges)
  return _segment_bins(ids, num, scores, targets, valid, jnp.sum(valid))


def _error_power(bins: _Bins, norm: str) -> jax.Array:
  """sum_b w_b |gap_b|^p before the final root (p = 1 for l1, 2 for l2 and l2_debiased), or max_b |gap_b|."""
  score, target, filled = bins.means
  gap = score - target
  if norm == "l1":
    return jnp.sum(bins.weights * jnp.abs(gap))
  if norm == "l2":
    return jnp.sum(bins.weights * gap**2)
  if norm == "max":
    return jnp.max(jnp.where(filled, jnp.abs(gap), 0))
  big = bins.counts >= 2
  bias = target * (1 - target) / jnp.where(big, bins.counts - 1, 1)
  return jnp.maximum(jnp.sum(jnp.where(big, bins.weights * (gap**2 - bias), 0)), 0)


def _finish(power: jax.Array, norm: str) -> jax.Array:
  return jnp.sqrt(power) if norm in ("l2", "l2_debiased") else power


def _reduce_classes(powers: jax.Array, norm: str) -> jax.Array:
  return jnp.max(powers) if norm == "max" else _finish(jnp.mean(powers), norm)


def _overconfidence(bins: _Bins) -> jax.Array:
  score, target, _ = bins.means
  return jnp.sum(bins.weights * score * jnp.maximum(score - target, 0))


def _classwise_equal_width_bins(probs, onehot, weight, n_bins, edges) -> _Bins:
  """(K, bins) statistics of every class at once: one scatter-add over N * K entries."""
  num_classes = probs.shape[1]
  ids, num = _equal_width_ids(probs, n_bins, edges)
  flat = ids + num * jnp.arange(num_classes, dtype=jnp.int32)
  w = jnp.broadcast_to(weight.astype(probs.dtype)[:, None], probs.shape)

  def segsum(x):
    return _chunked_segment_sum(x, flat, num * num_classes).reshape(num_classes, num)

  total = jnp.broadcast_to(jnp.sum(w[:, 0]), (num_classes, 1))
  return _Bins(segsum(w), segsum(w * probs), segsum(w * onehot), total)


def _classwise_bins(probs, labels, n_bins, binning, edges) -> _Bins:
  onehot = jax.nn.one_hot(labels, probs.shape[1], dtype=probs.dtype)
  if binning == "equal_width":
    _check_binning(n_bins, binning, edges)
    return _classwise_equal_width_bins(probs, onehot, jnp.ones(probs.shape[:1], bool), n_bins, edges)
  valid = jnp.ones(probs.shape[:1], bool)
  column = functools.partial(_bins_1d, valid=valid, n_bins=n_bins, binning=binning, edges=edges)
  return jax.vmap(column, in_axes=(1, 1))(probs, onehot)


# ---------------------------------------------------------------------------------------------------------
# Public binned metrics.

_STATIC = ("n_bins", "binning", "norm", "edges")


@_jit(*_STATIC)
def binned_calibration_error(*, scores: jax.Array, targets: jax.Array, n_bins: int = 15,
                             binning: str = "equal_width", norm: str = "l1",
                             edges: str = "upper_inclusive") -> jax.Array:
  """Binned calibration error of any score against 0/1 targets (the one-dimensional core of every ECE).

  This is the form of relplot/verified_calibration/robustness_metrics' binary functions: e.g. scores =
  p(positive) and targets = labels for the reliability of a binary classifier.

  Args:
    scores: (N,) predicted probabilities of the event.
    targets: (N,) 0/1 outcomes (any values in [0, 1] are accepted, except by binning="sweep").
    n_bins: number of bins (ignored by "sweep" and "unique").
    binning: a name from `BINNINGS` (module docstring).
    norm: "l1", "l2", "max" or "l2_debiased" (module docstring).
    edges: edge convention of binning="equal_width".

  Returns:
    Scalar calibration error.
  """
  scores, targets = _prepare_pairs(scores, targets)
  _check_choice(norm, NORMS, "norm")
  bins = _bins_1d(scores, targets, jnp.ones(scores.shape, bool), n_bins, binning, edges)
  return _finish(_error_power(bins, norm), norm)


@METRICS.register("ece")
@_jit(*_STATIC)
def ece(*, probs: jax.Array, labels: jax.Array, n_bins: int = 15, binning: str = "equal_width",
        norm: str = "l1", edges: str = "upper_inclusive") -> jax.Array:
  """Top-label expected calibration error (Guo et al. 2017; Naeini et al. 2015).

  sum_b (n_b / N) |conf_b - acc_b| for norm="l1"; "l2" gives RMSCE, "max" gives MCE (module docstring). The
  default (15 equal-width (lo, hi] bins, l1) equals CXKD/calibration_library `ECELoss`, focal_calibration
  `ECELoss` and gpleiss `_ECELoss(n_bins=15)`; binning="equal_mass_interp" is AdaECE (focal_calibration,
  AdaFocal), "equal_mass" torch-uncertainty's adaptive CE, "sweep" robustness_metrics `msce`, and
  edges="lower_inclusive" with n_bins=10 the MTS fork's `calc_ece`.

  Args:
    probs: (N, K) probabilities.
    labels: (N,) int labels.
    n_bins: number of bins.
    binning: a name from `BINNINGS` (module docstring).
    norm: "l1", "l2", "max" or "l2_debiased".
    edges: edge convention of binning="equal_width": "upper_inclusive", "lower_inclusive" or
      "lower_inclusive_open".

  Returns:
    Scalar in [0, 1].
  """
  probs, labels = _prepare(probs, labels)
  _check_choice(norm, NORMS, "norm")
  confidence, correct = _top_label(probs, labels)
  bins = _bins_1d(confidence, correct, jnp.ones(confidence.shape, bool), n_bins, binning, edges)
  return _finish(_error_power(bins, norm), norm)


@METRICS.register("mce")
@_jit("n_bins", "binning", "edges")
def mce(*, probs: jax.Array, labels: jax.Array, n_bins: int = 15, binning: str = "equal_width",
        edges: str = "upper_inclusive") -> jax.Array:
  """Maximum calibration error max_b |conf_b - acc_b| over non-empty bins (CXKD `MCELoss`: empty bins give 0).

  Args:
    probs: (N, K) probabilities.
    labels: (N,) int labels.
    n_bins: number of bins.
    binning: a name from `BINNINGS`.
    edges: edge convention of binning="equal_width".

  Returns:
    Scalar in [0, 1].
  """
  return ece(probs=probs, labels=labels, n_bins=n_bins, binning=binning, norm="max", edges=edges)


@METRICS.register("oe")
@_jit("n_bins", "binning", "edges")
def oe(*, probs: jax.Array, labels: jax.Array, n_bins: int = 15, binning: str = "equal_width",
       edges: str = "upper_inclusive") -> jax.Array:
  """Over-confidence error sum_b (n_b / N) conf_b max(conf_b - acc_b, 0) (Thulasidasan et al. 2019; CXKD).

  Args:
    probs: (N, K) probabilities.
    labels: (N,) int labels.
    n_bins: number of bins (CXKD reports 15 equal-width (lo, hi] bins, the default).
    binning: a name from `BINNINGS`.
    edges: edge convention of binning="equal_width".

  Returns:
    Scalar in [0, 1].
  """
  probs, labels = _prepare(probs, labels)
  confidence, correct = _top_label(probs, labels)
  return _overconfidence(_bins_1d(confidence, correct, jnp.ones(confidence.shape, bool), n_bins, binning,
                                  edges))


@METRICS.register("sce")
@_jit(*_STATIC)
def classwise_ece(*, probs: jax.Array, labels: jax.Array, n_bins: int = 15, binning: str = "equal_width",
                  norm: str = "l1", edges: str = "upper_inclusive") -> jax.Array:
  """Classwise (marginal) calibration error; with the defaults the static calibration error SCE.

  For each class k the scores p_ik are binned (15 equal-width (lo, hi] bins by default) and CE_k =
  sum_b (n_b / N) |mean_b p_ik - mean_b 1[y_i = k]|; the result is mean_k CE_k (Nixon et al. 2019 SCE as in
  CXKD `SCELoss`, focal_calibration `ClasswiseECELoss`, robustness_metrics `sce`; Kull et al. 2019 classwise
  ECE). For the L2 norms it is sqrt(mean_k CE_k^2) (verified_calibration marginal CE; with
  norm="l2_debiased", binning="equal_mass_midpoint" see `debiased_l2_ece`), for "max" max_k CE_k.

  Args:
    probs: (N, K) probabilities.
    labels: (N,) int labels.
    n_bins: number of bins per class.
    binning: a name from `BINNINGS`, applied to every class column separately.
    norm: "l1", "l2", "max" or "l2_debiased".
    edges: edge convention of binning="equal_width".

  Returns:
    Scalar in [0, 1].
  """
  probs, labels = _prepare(probs, labels)
  _check_choice(norm, NORMS, "norm")
  bins = _classwise_bins(probs, labels, n_bins, binning, edges)
  return _reduce_classes(jax.vmap(_error_power, in_axes=(0, None))(bins, norm), norm)


sce = classwise_ece


@METRICS.register("ace")
@_jit("n_bins", "norm", "convention")
def ace(*, probs: jax.Array, labels: jax.Array, n_bins: int = 15, threshold: float = 0.0, norm: str = "l1",
        convention: str = "cxkd") -> jax.Array:
  """Adaptive calibration error of Nixon et al. 2019: classwise, with equal-mass bins per class.

  convention="cxkd" (CXKD/calibration_library `ACELoss`/`TACELoss`, the numbers CXKD reports): probabilities
  below `threshold` are set to 0; per class, bins (lo, hi] with lower edges at sorted[i * floor(N / n_bins)]
  and last upper edge 1.0, so the smallest value(s) of the column -- every zeroed probability when the
  threshold removed any -- fall in no bin; weights n_b / N; mean over classes.

  convention="rm" (robustness_metrics GCE `ace`/`tace` with the threshold actually applied): per class only
  probabilities > threshold are kept, binned with "equal_mass_rm" (module docstring), weighted by
  n_b / (number kept in that class); CE_k are averaged over all K classes (a class with nothing kept adds 0).

  Args:
    probs: (N, K) probabilities.
    labels: (N,) int labels.
    n_bins: equal-mass bins per class.
    threshold: probabilities below it (cxkd) / not above it (rm) are ignored; 0 keeps everything.
    norm: "l1" (the references), "l2", "max" or "l2_debiased", reduced over classes as in `classwise_ece`.
    convention: "cxkd" or "rm".

  Returns:
    Scalar in [0, 1].
  """
  probs, labels = _prepare(probs, labels)
  _check_choice(norm, NORMS, "norm")
  _check_choice(convention, ACE_CONVENTIONS, "ACE convention")
  onehot = jax.nn.one_hot(labels, probs.shape[1], dtype=probs.dtype)
  if convention == "cxkd":
    probs = jnp.where(probs < threshold, 0, probs)
    valid = jnp.ones(probs.shape, bool)
    binning = "equal_mass_cxkd"
  else:
    valid = probs > threshold
    binning = "equal_mass_rm"
  column = functools.partial(_bins_1d, n_bins=n_bins, binning=binning, edges="upper_inclusive")
  bins = jax.vmap(column, in_axes=(1, 1, 1))(probs, onehot, valid)
  return _reduce_classes(jax.vmap(_error_power, in_axes=(0, None))(bins, norm), norm)


@METRICS.register("tace")
@_jit("n_bins", "norm", "convention")
def tace(*, probs: jax.Array, labels: jax.Array, n_bins: int = 15, threshold: float = 0.01, norm: str = "l1",
         convention: str = "cxkd") -> jax.Array:
  """Thresholded ACE (Nixon et al. 2019): `ace` with threshold 0.01 by default, and the threshold honoured.

  Args:
    probs: (N, K) probabilities.
    labels: (N,) int labels.
    n_bins: equal-mass bins per class.
    threshold: see `ace` (robustness_metrics' `tace` passes 0 instead of its 0.01; both conventions here
      apply it).
    norm: see `ace`.
    convention: "cxkd" or "rm" (see `ace`).

  Returns:
    Scalar in [0, 1].
  """
  return ace(probs=probs, labels=labels, n_bins=n_bins, threshold=threshold, norm=norm, convention=convention)


@METRICS.register("debiased_l2_ece")
@_jit("n_bins", "binning", "mode")
def debiased_l2_ece(*, probs: jax.Array, labels: jax.Array, n_bins: int = 15,
                    binning: str = "equal_mass_midpoint", mode: str = "marginal") -> jax.Array:
  """Debiased L2 calibration error of Kumar et al. 2019 (verified_calibration `get_calibration_error`).

  Per bin (n_b >= 2; smaller bins add 0): (mean score - mean label)^2 - mean label (1 - mean label) /
  (n_b - 1), weighted by n_b / N; CE = sqrt(max(0, sum)). mode="marginal" (the reference default) computes it
  per class and returns sqrt(mean_k CE_k^2); mode="top_label" uses confidence/correctness. The default
  binning is the reference's `get_equal_bins` with 15 bins (`lower_bound_scaling_ce`); use binning="unique"
  for models with discrete outputs (the reference picks that by a heuristic, `is_discrete`).

  Args:
    probs: (N, K) probabilities.
    labels: (N,) int labels.
    n_bins: number of bins.
    binning: a name from `BINNINGS`.
    mode: "marginal" or "top_label".

  Returns:
    Scalar, smaller than the plug-in L2 error on the same bins.
  """
  _check_choice(mode, ("marginal", "top_label"), "mode")
  if mode == "marginal":
    return classwise_ece(probs=probs, labels=labels, n_bins=n_bins, binning=binning, norm="l2_debiased")
  return ece(probs=probs, labels=labels, n_bins=n_bins, binning=binning, norm="l2_debiased")


@_jit("mode", *_STATIC)
def binary_ece(*, probs_pos: jax.Array, labels: jax.Array, mode: str, n_bins: int = 15,
               binning: str = "equal_width", norm: str = "l1", edges: str = "upper_inclusive") -> jax.Array:
  """Calibration error of a binary classifier under an explicitly chosen semantics.

  mode="p_positive": score = p(positive), target = label, i.e. the reliability of p itself (torchmetrics
  `BinaryCalibrationError`, verified_calibration and relplot with 1-D input). mode="top_label": score =
  max(p, 1 - p), target = correctness of predicting positive iff p > 0.5 (torch-uncertainty
  `BinaryAdaptiveCalibrationError`, robustness_metrics GCE with `max_prob=True`; equals `ece` on [1 - p, p]).
  The two differ (Lightning-AI/torchmetrics#2519), hence no default.

  Args:
    probs_pos: (N,) probability of the positive class.
    labels: (N,) 0/1 labels.
    mode: "p_positive" or "top_label".
    n_bins: number of bins.
    binning: a name from `BINNINGS`.
    norm: "l1", "l2", "max" or "l2_debiased".
    edges: edge convention of binning="equal_width".

  Returns:
    Scalar in [0, 1].
  """
  scores, targets = _binary_pairs(probs_pos, labels, mode)
  return binned_calibration_error(scores=scores, targets=targets, n_bins=n_bins, binning=binning, norm=norm,
                                  edges=edges)


@_jit("n_bins", "binning", "edges")
def reliability_bins(*, probs: jax.Array, labels: jax.Array, n_bins: int = 15, binning: str = "equal_width",
                     edges: str = "upper_inclusive") -> dict[str, jax.Array]:
  """Top-label reliability-diagram statistics.

  Args:
    probs: (N, K) probabilities.
    labels: (N,) int labels.
    n_bins: number of bins; edges="lower_inclusive_open" and binning="equal_mass_rm" have n_bins + 1 bins.
    binning: a name from `BINNINGS` with a fixed number of bins (not "sweep" or "unique").
    edges: edge convention of binning="equal_width".

  Returns:
    dict with "edges" (B + 1,), "counts" (B,), "confidence" (B,) mean confidence, "accuracy" (B,) and "gap"
    (B,) = confidence - accuracy. For equal-width bins the edges are k / n_bins (the extra bin of
    "lower_inclusive_open" is [1, 1]); for data-dependent bins edge b is the smallest confidence in bin b and
    the last edge the largest confidence seen. Statistics of empty bins (and their edges) are NaN.
  """
  if binning in ("sweep", "unique"):
    raise ConfigError(f"reliability_bins needs a fixed number of bins; binning='{binning}' has a "
                      "data-dependent one")
  probs, labels = _prepare(probs, labels)
  confidence, correct = _top_label(probs, labels)
  ids, num = _bin_ids(confidence, correct, jnp.ones(confidence.shape, bool), n_bins, binning, edges)
  bins = _segment_bins(ids, num, confidence, correct, jnp.ones(confidence.shape, bool),
                       jnp.asarray(confidence.shape[0]))
  score, target, filled = bins.means
  nan = jnp.asarray(jnp.nan, confidence.dtype)
  if binning == "equal_width":
    grid = np.linspace(0.0, 1.0, n_bins + 1)
    grid = np.concatenate([grid, [1.0]]) if num > n_bins else grid
    bounds = jnp.asarray(grid, confidence.dtype)
  else:
    lowest = jax.ops.segment_min(confidence, ids, num_segments=num + 1)[:num]
    bounds = jnp.concatenate([jnp.where(filled, lowest, nan), jnp.max(confidence)[None]])
  return {"edges": bounds, "counts": bins.counts, "confidence": jnp.where(filled, score, nan),
          "accuracy": jnp.where(filled, target, nan), "gap": jnp.where(filled, score - target, nan)}


# ---------------------------------------------------------------------------------------------------------
# Kernel and smooth estimators.


def _smece_grid(f: jax.Array, residual: jax.Array, points: int) -> jax.Array:
  """relplot `smooth_round_to_grid`: each residual split linearly between its two neighbouring grid points."""
  left = jnp.clip(jnp.floor(f * (points - 1)).astype(jnp.int32), 0, points - 2)
  frac = f * (points - 1) - left
  grid = jnp.zeros((points,), f.dtype).at[left].add((1 - frac) * residual)
  return grid.at[left + 1].add(frac * residual) / f.shape[0]


def _smece_at(f: jax.Array, residual: jax.Array, sigma: jax.Array, points: int) -> jax.Array:
  """relplot `smooth_ece_interpolated` with the reflected Gaussian kernel on a grid of `points` points."""
  values = _smece_grid(f, residual, points)
  t = jnp.asarray(np.linspace(0.0, 1.0, points), f.dtype)
  kernel = jnp.exp(-((t - 0.5) ** 2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)
  flipped = values[::-1]
  extended = jnp.concatenate([flipped[:-1], values, flipped[1:]])
  # 'valid' convolution of the reflected values, FFT-based so that the 51200-point grid stays cheap.
  size = extended.shape[0] + points - 1
  nfft = 1 << (size - 1).bit_length()
  full = jnp.fft.irfft(jnp.fft.rfft(extended, nfft) * jnp.fft.rfft(kernel, nfft), nfft)
  start = points - 1 + points // 2
  smoothed = jax.lax.dynamic_slice_in_dim(full, start, points).astype(f.dtype)
  return jnp.sum(jnp.abs(smoothed)) / points


def _smece_level(alpha: jax.Array) -> jax.Array:
  """Index of the grid relplot uses after seeing width alpha: 200 * 4^level >= round(20 / alpha)."""
  need = jnp.round(20 / alpha)
  sizes = _SMECE_BASE_POINTS * 4 ** np.arange(_SMECE_LEVELS - 1)
  return jnp.sum(need > jnp.asarray(sizes, alpha.dtype)).astype(jnp.int32)


def _smooth_ce_with_width(f: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """relplot `smECE_fast`: the fixed point sigma = smECE_sigma found by bisection, and smECE at it."""
  residual = f - y
  branches = [functools.partial(_smece_at, points=_SMECE_BASE_POINTS * 4**level)
              for level in range(_SMECE_LEVELS)]
  one = jnp.asarray(1.0, f.dtype)
  final_step = _SMECE_REFINE + 1

  # Step 0 tries sigma = 1, steps 1..10 bisect [0, 1] unless sigma = 1 was accepted, the last step evaluates
  # the chosen sigma; one loop keeps a single compiled copy of the five grid sizes.
  def step(i, state):
    start, end, level, accept_one, _ = state
    first, final = i == 0, i == final_step
    mid = (start + end) / 2
    alpha = jnp.where(first, one, jnp.where(final, jnp.where(accept_one, one, start), mid))
    frozen = final | (accept_one & ~first)
    level = jnp.where(frozen, level, jnp.maximum(level, _smece_level(alpha)))
    value = jax.lax.switch(level, branches, f, residual, alpha)
    below = (alpha < _SMECE_EPS) | (alpha < value)
    accept_one = jnp.where(first, below, accept_one)
    bisect = ~first & ~final & ~accept_one
    return (jnp.where(bisect & ~below, mid, start), jnp.where(bisect & below, mid, end), level, accept_one,
            value)

  init = (one, jnp.zeros_like(one), jnp.asarray(0, jnp.int32), jnp.asarray(False), jnp.zeros_like(one))
  start, _, _, accept_one, value = jax.lax.fori_loop(0, final_step + 1, step, init)
  return value, jnp.where(accept_one, one, start)


@_jit()
def smooth_calibration_error(*, scores: jax.Array, targets: jax.Array) -> jax.Array:
  """smECE of a score against 0/1 targets (Blasiok & Nakkiran 2023, relplot `smECE` with its defaults).

  The residuals scores - targets are spread linearly onto a grid of 200 points on [0, 1] (divided by N),
  smoothed with a reflected Gaussian kernel of width sigma, and smECE_sigma = mean over the grid of
  |smoothed|.
  sigma is the fixed point sigma = smECE_sigma, found as relplot does: sigma = 1 if it already satisfies
  sigma >= smECE_sigma, otherwise 10 bisection steps on [0, 1] (widths below 0.001 count as too small) and the
  upper end of the final bracket; the grid grows x4 whenever round(20 / sigma) exceeds it and never shrinks.
  The convolution is FFT-based (relplot uses scipy's), so values agree to rounding.

  Args:
    scores: (N,) predicted probabilities.
    targets: (N,) 0/1 outcomes.

  Returns:
    Scalar smECE.
  """
  scores, targets = _prepare_pairs(scores, targets)
  return _smooth_ce_with_width(scores, targets)[0]


@METRICS.register("smece")
@_jit()
def smooth_ece(*, probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-label smooth ECE: `smooth_calibration_error` of confidence against correctness (relplot's multiclass
  usage via `multiclass_logits_to_confidences`).

  Args:
    probs: (N, K) probabilities.
    labels: (N,) int labels.

  Returns:
    Scalar smECE.
  """
  probs, labels = _prepare(probs, labels)
  return _smooth_ce_with_width(*_top_label(probs, labels))[0]


@METRICS.register("mmce")
@_jit()
def mmce(*, probs: jax.Array, labels: jax.Array, width: float = 0.4) -> jax.Array:
  """MMCE of Kumar et al. 2018 (the metric, as netcal `MMCE`): a kernel calibration error on confidences.

  MMCE = sqrt(sum_ij (a_i - c_i)(a_j - c_j) exp(-|c_i - c_j| / width)) / N with c the top-label confidence and
  a the correctness. Computed in O(N log N) without an N x N matrix: after sorting by confidence,
  sum_{i<j} r_i r_j exp(-(c_j - c_i) / w) = sum_j r_j e^{-(c_j - m) / w} sum_{i<j} r_i e^{(c_i - m) / w}
  (a cumulative sum) with w the width, r = a - c and m the mid-range of c. The terms' scale e^{(c_i - m)/w}
  grows along the sorted order, so each partial sum is as accurate as its largest (last) terms: relative
  error ~1e-7 in float32 against the float64 O(N^2) sum at N = 1e5. The exponentials must stay finite and
  normal: (max c - min c) / width <= 160 in float32, i.e. width >= 0.00625 for confidences spanning [0, 1].

  Args:
    probs: (N, K) probabilities.
    labels: (N,) int labels.
    width: kernel width (0.4 in the paper and netcal).

  Returns:
    Scalar MMCE.
  """
  probs, labels = _prepare(probs, labels)
  confidence, correct = _top_label(probs, labels)
  c, r = jax.lax.sort((confidence, correct - confidence), num_keys=1, is_stable=False)
  mid = (c[0] + c[-1]) / 2
  left_mass = jnp.cumsum(r * jnp.exp((c - mid) / width))
  cross = jnp.sum(r[1:] * jnp.exp(-(c[1:] - mid) / width) * left_mass[:-1])
  return jnp.sqrt(jnp.maximum(jnp.sum(r**2) + 2 * cross, 0)) / c.shape[0]


# ---------------------------------------------------------------------------------------------------------
# Proper scores and summary statistics.


@METRICS.register("nll")
@_jit()
def nll(*, probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean negative log-likelihood -mean_i log p_{i, y_i}; p is floored at the dtype's smallest normal number
  so that a zero probability gives a large finite value (87.3 in float32) instead of inf.

  Args:
    probs: (N, K) probabilities.
    labels: (N,) int labels.

  Returns:
    Scalar NLL in nats.
  """
  probs, labels = _prepare(probs, labels)
  p_true = jnp.take_along_axis(probs, labels[:, None], axis=1)[:, 0]
  return -jnp.mean(jnp.log(jnp.maximum(p_true, jnp.finfo(probs.dtype).tiny)))


@_jit()
def nll_from_logits(*, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean negative log-likelihood from logits: mean_i (logsumexp(z_i) - z_{i, y_i}) (exact, no flooring).

  Args:
    logits: (N, K) logits.
    labels: (N,) int labels.

  Returns:
    Scalar NLL in nats.
  """
  logits, labels = _prepare(logits, labels, name="logits")
  z_true = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - z_true)


def _brier_per_sample(probs: jax.Array, labels: jax.Array) -> jax.Array:
  p_true = jnp.take_along_axis(probs, labels[:, None], axis=1)[:, 0]
  return jnp.sum(probs**2, axis=1) - 2 * p_true + 1


@METRICS.register("brier")
@_jit()
def brier(*, probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Multiclass Brier score mean_i sum_k (p_ik - 1[y_i = k])^2 (Brier 1950; CXKD, robustness_metrics `brier`).

  Args:
    probs: (N, K) probabilities.
    labels: (N,) int labels.

  Returns:
    Scalar in [0, 2].
  """
  probs, labels = _prepare(probs, labels)
  return jnp.mean(_brier_per_sample(probs, labels))


@_jit()
def brier_decomposition(*, probs: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Murphy/Broecker decomposition of the Brier score with the partition of robustness_metrics.

  The simplex is partitioned by the predicted class: M_k = {i : argmax p_i = k} (robustness_metrics
  `brier_decomposition`). With w_k = |M_k| / N, d_k the empirical label distribution in M_k and pbar the
  overall label distribution:

    uncertainty = 1 - sum_k pbar_k^2
    resolution  = sum_k w_k ||d_k - pbar||^2
    reliability = mean_i ||d_{argmax p_i} - p_i||^2

  brier ~= reliability - resolution + uncertainty, exactly when the forecasts are constant within each M_k and
  otherwise up to a covariance term of the within-cell spread (robustness_metrics tests 0.01 agreement).
  robustness_metrics decomposes sum_k p_k^2 - 2 p_y = brier - 1, so its uncertainty is this value - 1, and
  adds 1e-7 to the cell sizes; the cell means here are exact.

  Args:
    probs: (N, K) probabilities.
    labels: (N,) int labels.

  Returns:
    dict with "reliability", "resolution" and "uncertainty".
  """
  probs, labels = _prepare(probs, labels)
  num_classes = probs.shape[1]
  pred = jnp.argmax(probs, axis=1)
  table = jax.ops.segment_sum(jnp.ones_like(labels, probs.dtype), pred * num_classes + labels,
                              num_segments=num_classes * num_classes).reshape(num_classes, num_classes)
  cell = jnp.sum(table, axis=1)
  weight = cell / probs.shape[0]
  pbar = jnp.sum(table, axis=0) / probs.shape[0]
  dist = table / jnp.where(cell > 0, cell, 1)[:, None]
  return {"reliability": jnp.mean(jnp.sum((dist[pred] - probs) ** 2, axis=1)),
          "resolution": jnp.sum(weight * jnp.sum((dist - pbar) ** 2, axis=1)),
          "uncertainty": 1 - jnp.sum(pbar**2)}


@METRICS.register("accuracy")
@_jit()
def accuracy(*, probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-1 accuracy (argmax ties go to the lowest class index).

  Args:
    probs: (N, K) probabilities or logits.
    labels: (N,) int labels.

  Returns:
    Scalar in [0, 1].
  """
  probs, labels = _prepare(probs, labels)
  return jnp.mean(_top_label(probs, labels)[1])


@METRICS.register("mean_confidence")
@_jit()
def mean_confidence(*, probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean top-label confidence mean_i max_k p_ik (`labels` only checked, for a uniform signature).

  Args:
    probs: (N, K) probabilities.
    labels: (N,) int labels.

  Returns:
    Scalar in [0, 1].
  """
  probs, labels = _prepare(probs, labels)
  return jnp.mean(jnp.max(probs, axis=1))


@METRICS.register("confidence_gap")
@_jit()
def confidence_gap(*, probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Signed mean confidence - accuracy: > 0 means over-confident on average, < 0 under-confident.

  Args:
    probs: (N, K) probabilities.
    labels: (N,) int labels.

  Returns:
    Scalar in [-1, 1].
  """
  probs, labels = _prepare(probs, labels)
  confidence, correct = _top_label(probs, labels)
  return jnp.mean(confidence - correct)


# ---------------------------------------------------------------------------------------------------------
# Bootstrap.


def bootstrap_ci(metric_fn: Callable[..., jax.Array], *, probs: jax.Array, labels: jax.Array, key: jax.Array,
                 n_resamples: int = 1000, level: float = 0.95, **kwargs: Any) -> dict[str, jax.Array]:
  """Percentile bootstrap confidence interval of any metric taking `probs` and `labels`.

  Each resample draws N indices with replacement; resamples are evaluated in vmapped chunks (`lax.map` with a
  batch size that keeps a chunk near 2^24 gathered probabilities), so memory stays O(chunk * N * K).

  Args:
    metric_fn: e.g. `ece`; called as metric_fn(probs=..., labels=..., **kwargs).
    probs: (N, K) probabilities.
    labels: (N,) int labels.
    key: PRNG key.
    n_resamples: number of bootstrap resamples.
    level: coverage of the interval, in (0, 1).
    **kwargs: static arguments of the metric (n_bins, binning, ...).

  Returns:
    dict with "value" (the metric on the full data), "lower", "upper" (the (1 -+ level) / 2 quantiles of the
    resampled values), "std" (their standard deviation) and "samples" (n_resamples,).
  """
  if not 0 < level < 1:
    raise ConfigError(f"level must be in (0, 1); got {level}")
  if n_resamples < 2:
    raise ConfigError(f"n_resamples must be at least 2; got {n_resamples}")
  probs, labels = _prepare(probs, labels)
  n = labels.shape[0]

  def one(k):
    idx = jax.random.randint(k, (n,), 0, n)
    return metric_fn(probs=probs[idx], labels=labels[idx], **kwargs)

  batch = max(1, min(n_resamples, 2**24 // probs.size))
  samples = jax.lax.map(one, jax.random.split(key, n_resamples), batch_size=batch)
  lower, upper = jnp.quantile(samples, jnp.asarray([(1 - level) / 2, (1 + level) / 2]))
  return {"value": metric_fn(probs=probs, labels=labels, **kwargs), "lower": lower, "upper": upper,
          "std": jnp.std(samples), "samples": samples}


# ---------------------------------------------------------------------------------------------------------
# Streaming statistics.


class BinStats(struct.PyTreeNode):
  """Sufficient statistics of the equal-width metrics, accumulated batch by batch.

  Per top-label bin: counts, sums of confidence and of correctness; per class and bin: counts, sums of p_k
  and of 1[y = k]; plus the sample count and the sums of correctness, confidence, NLL and Brier terms. Every
  field is a sum over samples, so two stats merge by adding them (`merge` = tree sum), which is also how
  per-device stats of a batch sharded over a mesh combine (or simply `jit(update)` on the sharded batch).
  `compute` returns the same values as the one-shot functions with binning="equal_width" and the same
  n_bins/edges (up to float summation order). Equal-mass binnings, the sweep, smECE, MMCE and ACE need the
  whole data set and have no streaming form.

  Use: stats = BinStats.init(15, num_classes); stats = stats.update(probs=p, labels=y) (or
  BinStats.update(stats, probs=p, labels=y) under jit); BinStats.merge(a, b); stats.compute().
  """

  counts: jax.Array
  confidence_sums: jax.Array
  correct_sums: jax.Array
  class_counts: jax.Array
  class_prob_sums: jax.Array
  class_label_sums: jax.Array
  n: jax.Array
  correct: jax.Array
  confidence: jax.Array
  nll_sum: jax.Array
  brier_sum: jax.Array
  edges: str = struct.field(pytree_node=False, default="upper_inclusive")

  @classmethod
  def init(cls, n_bins: int, num_classes: int, *, edges: str = "upper_inclusive",
           dtype: Any = jnp.float32) -> "BinStats":
    """Empty statistics for `n_bins` equal-width bins and `num_classes` classes.

    Args:
      n_bins: number of bins (edges="lower_inclusive_open" stores one more).
      num_classes: K.
      edges: edge convention (module docstring).
      dtype: dtype of the sums.

    Returns:
      Zero `BinStats`.
    """
    _check_choice(edges, EDGES, "edges")
    num = n_bins + (edges == "lower_inclusive_open")
    zeros = functools.partial(jnp.zeros, dtype=dtype)
    return cls(zeros((num,)), zeros((num,)), zeros((num,)), zeros((num_classes, num)),
               zeros((num_classes, num)), zeros((num_classes, num)), jnp.zeros((), jnp.int32), zeros(()),
               zeros(()), zeros(()), zeros(()), edges=edges)

  @property
  def n_bins(self) -> int:
    return self.counts.shape[0] - (self.edges == "lower_inclusive_open")

  def update(self, *, probs: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> "BinStats":
    """Adds a batch.

    Args:
      probs: (B, K) probabilities.
      labels: (B,) int labels.
      mask: optional (B,) bool; False rows (padding) are ignored.

    Returns:
      The updated statistics.
    """
    probs, labels = _prepare(probs, labels)
    if probs.shape[1] != self.class_counts.shape[0]:
      raise InvalidInputError(f"probs has {probs.shape[1]} classes; these stats were made for "
                              f"{self.class_counts.shape[0]}")
    weight = jnp.ones(labels.shape, bool) if mask is None else jnp.asarray(mask, bool)
    dtype = self.counts.dtype
    probs = probs.astype(dtype)
    w = weight.astype(dtype)
    confidence, correct = _top_label(probs, labels)
    ids, num = _equal_width_ids(confidence, self.n_bins, self.edges)
    top = _segment_bins(ids, num, confidence, correct, weight, jnp.sum(w))
    onehot = jax.nn.one_hot(labels, probs.shape[1], dtype=dtype)
    cls = _classwise_equal_width_bins(probs, onehot, weight, self.n_bins, self.edges)
    p_true = jnp.take_along_axis(probs, labels[:, None], axis=1)[:, 0]
    nll_terms = -jnp.log(jnp.maximum(p_true, jnp.finfo(dtype).tiny))
    return self.replace(
        counts=self.counts + top.counts, confidence_sums=self.confidence_sums + top.score_sums,
        correct_sums=self.correct_sums + top.target_sums, class_counts=self.class_counts + cls.counts,
        class_prob_sums=self.class_prob_sums + cls.score_sums,
        class_label_sums=self.class_label_sums + cls.target_sums,
        n=self.n + jnp.sum(weight, dtype=jnp.int32), correct=self.correct + jnp.sum(w * correct),
        confidence=self.confidence + jnp.sum(w * confidence), nll_sum=self.nll_sum + jnp.sum(w * nll_terms),
        brier_sum=self.brier_sum + jnp.sum(w * _brier_per_sample(probs, labels)))

  @staticmethod
  def merge(a: "BinStats", b: "BinStats") -> "BinStats":
    """Statistics of the union of two disjoint sets of samples (a tree sum)."""
    return jax.tree.map(jnp.add, a, b)

  def compute(self) -> dict[str, jax.Array]:
    """Metrics of everything added so far.

    Returns:
      dict with "n", "accuracy", "nll", "brier", "ece" (l1), "rmsce" (l2), "mce" (max), "oe", "sce" (classwise
      l1), "mean_confidence" and "confidence_gap", equal to the one-shot functions.
    """
    total = self.n.astype(self.counts.dtype)
    top = _Bins(self.counts, self.confidence_sums, self.correct_sums, total)
    cls = _Bins(self.class_counts, self.class_prob_sums, self.class_label_sums,
                jnp.broadcast_to(total, (self.class_counts.shape[0], 1)))
    acc = self.correct / total
    mean_conf = self.confidence / total
    return {"n": self.n, "accuracy": acc, "nll": self.nll_sum / total, "brier": self.brier_sum / total,
            "ece": _error_power(top, "l1"), "rmsce": _finish(_error_power(top, "l2"), "l2"),
            "mce": _error_power(top, "max"), "oe": _overconfidence(top),
            "sce": jnp.mean(jax.vmap(_error_power, in_axes=(0, None))(cls, "l1")),
            "mean_confidence": mean_conf, "confidence_gap": mean_conf - acc}


# ---------------------------------------------------------------------------------------------------------
# The report every run writes.

REPORT_KEYS = ("n", "accuracy", "nll", "brier", "ece", "ece_10", "adaece", "mce", "rmsce", "sce", "ace",
               "tace", "oe", "smece", "mean_confidence", "confidence_gap", "over_confident")


@_jit("n_bins")
def _report_arrays(logits: jax.Array, labels: jax.Array, n_bins: int) -> dict[str, jax.Array]:
  logits, labels = _prepare(logits, labels, name="logits")
  probs = jax.nn.softmax(logits, axis=1)
  common = {"probs": probs, "labels": labels}
  gap = confidence_gap(**common)
  return {"accuracy": accuracy(**common), "nll": nll_from_logits(logits=logits, labels=labels),
          "brier": brier(**common), "ece": ece(**common, n_bins=n_bins), "ece_10": ece(**common, n_bins=10),
          "adaece": ece(**common, n_bins=n_bins, binning="equal_mass_interp"),
          "mce": mce(**common, n_bins=n_bins), "rmsce": ece(**common, n_bins=n_bins, norm="l2"),
          "sce": classwise_ece(**common, n_bins=n_bins), "ace": ace(**common, n_bins=n_bins),
          "tace": tace(**common, n_bins=n_bins), "oe": oe(**common, n_bins=n_bins),
          "smece": smooth_ece(**common),
          "mean_confidence": mean_confidence(**common), "confidence_gap": gap}


def calibration_report(*, logits: jax.Array, labels: jax.Array, n_bins: int = 15) -> dict[str, Any]:
  """Accuracy and calibration of a classifier: the one call every run uses for results.json.

  Keys (all top-label unless stated; bins equal-width (lo, hi] with p = 1.0 in the last bin, unless stated):

    n               int, number of samples.
    accuracy        top-1 accuracy.
    nll             mean negative log-likelihood from the logits (log-softmax, exact).
    brier           mean_i sum_k (p_ik - 1[y_i = k])^2.
    ece             ECE with `n_bins` (15) equal-width bins, l1 (CXKD, focal_calibration, Guo et al.).
    ece_10          ECE with 10 equal-width bins (the bin count of the MTS paper; its code uses [lo, hi)
                    bins, which differ only for confidences exactly on an edge:
                    `ece(edges="lower_inclusive", n_bins=10)`).
    adaece          AdaECE, `n_bins` equal-mass bins with np.interp edges (focal_calibration, AdaFocal).
    mce             max_b |conf_b - acc_b| over non-empty bins, `n_bins` equal-width bins.
    rmsce           sqrt(sum_b (n_b/N)(conf_b - acc_b)^2), `n_bins` equal-width bins.
    sce             classwise ECE/SCE, `n_bins` equal-width bins per class, mean over classes (CXKD).
    ace             classwise adaptive CE, `n_bins` equal-mass bins per class, CXKD convention (`ace`).
    tace            `ace` after zeroing probabilities below 0.01, CXKD convention (`tace`).
    oe              over-confidence error sum_b (n_b/N) conf_b max(conf_b - acc_b, 0), `n_bins` bins (CXKD).
    smece           relplot smooth ECE (reflected Gaussian kernel, fixed-point bandwidth).
    mean_confidence mean max-softmax probability.
    confidence_gap  mean_confidence - accuracy (signed).
    over_confident  bool, confidence_gap > 0.

  Args:
    logits: (N, K) logits (the softmax gives the probabilities).
    labels: (N,) int labels.
    n_bins: bins of every binned metric except ece_10.

  Returns:
    dict with exactly the keys of `REPORT_KEYS`; Python int/float/bool values.
  """
  arrays = jax.device_get(_report_arrays(logits, labels, n_bins))
  report = {key: float(value) for key, value in arrays.items()}
  report["n"] = int(np.shape(labels)[0])
  report["over_confident"] = bool(report["confidence_gap"] > 0)
  return {key: report[key] for key in REPORT_KEYS}
