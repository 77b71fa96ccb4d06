"""Histogram binning and isotonic regression: non-parametric maps of softmax probabilities.

Both take logits (N, C) (probabilities are `softmax(logits)`), labels (N,) integers or (N, C) soft targets
(a soft target's entry counts as a fractional hit), and their `apply_*` returns calibrated **probabilities**
(N, C) whose rows sum to 1.

Histogram binning (Zadrozny and Elkan 2001; top-label form as in Gupta and Ramdas 2021):

- Bins: `"equal_width"` edges k / n_bins; `"equal_mass"` inner edges at the k / n_bins quantiles (linear
  interpolation) of the fitted scores. Bins are (lo, hi], the first is [0, hi], so a score of 1.0 falls in the
  last bin and 0.0 in the first (the ECE convention of `calibjax.calibration.metrics`).
- A bin's value is the mean hit rate of the fitting samples in it; an empty bin gets the midpoint of its
  edges.
- `mode="top_label"`: the maximum probability c is replaced by its bin's value c'; the other classes share
  1 - c' in proportion to their original probabilities (uniformly if c = 1). If c' is smaller than some other
  class's new probability the predicted class changes (possible when a bin's accuracy is very low).
- `mode="classwise"`: every class k has its own bins on p_k (one-vs-rest); the C mapped values are then
  renormalised to sum to 1 (uniform if they are all 0).
- Re-application: `apply` is a step function, so `apply(apply(p)) == apply(p)` exactly when every bin's value
  lies inside its own bin (and, top-label, stays the largest probability). Otherwise a second pass re-bins the
  values: e.g. a bin (0.8, 0.867] with accuracy 0.95 sends its samples to 0.95, and a second pass sends them
  to the value of the bin (0.933, 1.0]. In classwise mode the renormalisation moves outputs off the bin
  values, so re-application generally changes them too.

Isotonic regression (Zadrozny and Elkan 2002), classwise one-vs-rest: for each class k a non-decreasing map
of p_k fitted by pool-adjacent-violators (PAV, squared error, ties in p_k averaged first); applied by linear
interpolation between the ends of the pooled blocks and held constant outside the fitted range (scikit-learn's
`IsotonicRegression(out_of_bounds="clip")`), then renormalised as classwise histogram binning. The fit runs
in numpy on the host (not jittable); `apply_isotonic` is jittable.
"""

import jax
import jax.numpy as jnp
import numpy as np

from calibjax.calibration.posthoc.temperature import _as_float
from calibjax.errors import ConfigError

BINNING_MODES = ("top_label", "classwise")
BIN_SCHEMES = ("equal_width", "equal_mass")


def _targets(labels: jax.Array, num_classes: int, dtype) -> jax.Array:
  labels = jnp.asarray(labels)
  return labels.astype(dtype) if labels.ndim == 2 else jax.nn.one_hot(labels, num_classes, dtype=dtype)


def _bin_index(inner_edges: jax.Array, scores: jax.Array) -> jax.Array:
  # side="left": a score equal to an edge stays in the lower bin, giving (lo, hi] bins and [0, hi] first.
  return jnp.searchsorted(inner_edges, scores, side="left")


def _fit_bins(scores: jax.Array, hits: jax.Array, n_bins: int, binning: str) -> tuple[jax.Array, jax.Array]:
  """Inner edges (n_bins - 1,) and bin values (n_bins,) for one score vector (N,)."""
  if binning == "equal_width":
    inner = jnp.arange(1, n_bins, dtype=scores.dtype) / n_bins
  else:
    inner = jnp.quantile(scores, jnp.arange(1, n_bins, dtype=scores.dtype) / n_bins)
  idx = _bin_index(inner, scores)
  count = jax.ops.segment_sum(jnp.ones_like(scores), idx, num_segments=n_bins)
  total = jax.ops.segment_sum(hits, idx, num_segments=n_bins)
  bounds = jnp.concatenate([jnp.zeros((1,), scores.dtype), inner, jnp.ones((1,), scores.dtype)])
  midpoint = (bounds[:-1] + bounds[1:]) / 2
  return inner, jnp.where(count > 0, total / jnp.maximum(count, 1), midpoint)


def _renormalise(q: jax.Array) -> jax.Array:
  total = jnp.sum(q, axis=-1, keepdims=True)
  return jnp.where(total > 0, q / jnp.where(total > 0, total, 1), 1.0 / q.shape[-1])


@jax.jit(static_argnames=("n_bins", "mode", "binning"))
def _fit_histogram(logits, targets, *, n_bins, mode, binning):
  probs = jax.nn.softmax(logits, axis=-1)
  if mode == "top_label":
    pred = jnp.argmax(probs, axis=-1)
    hits = jnp.take_along_axis(targets, pred[:, None], axis=-1)[:, 0]
    inner, values = _fit_bins(jnp.max(probs, axis=-1), hits, n_bins, binning)
  else:
    inner, values = jax.vmap(lambda s, h: _fit_bins(s, h, n_bins, binning), in_axes=1)(probs, targets)
  return {"edges": inner, "values": values}


def fit_histogram_binning(*, logits: jax.Array, labels: jax.Array, n_bins: int = 15, mode: str = "top_label",
                          binning: str = "equal_width") -> dict:
  """Fits histogram binning (conventions in the module docstring).

  Args:
    logits: (N, C) logits.
    labels: (N,) integer labels or (N, C) soft targets.
    n_bins: number of bins.
    mode: `"top_label"` or `"classwise"`.
    binning: `"equal_width"` or `"equal_mass"`.

  Returns:
    params `{"edges": inner bin edges, "values": bin values}`: shapes (n_bins - 1,) and (n_bins,) for
    top-label, (C, n_bins - 1) and (C, n_bins) for classwise.
  """
  if mode not in BINNING_MODES:
    raise ConfigError(f"unknown histogram-binning mode '{mode}'; use one of {BINNING_MODES}")
  if binning not in BIN_SCHEMES:
    raise ConfigError(f"unknown binning '{binning}'; use one of {BIN_SCHEMES}")
  if n_bins < 1:
    raise ConfigError(f"n_bins must be >= 1, got {n_bins}")
  logits = _as_float(logits)
  return _fit_histogram(logits, _targets(labels, logits.shape[-1], logits.dtype), n_bins=n_bins, mode=mode,
                        binning=binning)


@jax.jit
def apply_histogram_binning(params: dict, logits: jax.Array) -> jax.Array:
  """Returns calibrated probabilities (N, C); the mode is read from the shape of `params["values"]`."""
  probs = jax.nn.softmax(logits, axis=-1)
  edges, values = params["edges"], params["values"]
  if values.ndim == 2:
    q = jax.vmap(lambda e, v, p: v[_bin_index(e, p)], in_axes=(0, 0, 1), out_axes=1)(edges, values, probs)
    return _renormalise(q)
  is_pred = jax.nn.one_hot(jnp.argmax(probs, axis=-1), probs.shape[-1], dtype=bool)
  new_conf = values[_bin_index(edges, jnp.max(probs, axis=-1))][:, None]
  # The others' own sum, not 1 - conf: near conf = 1 that difference loses all float32 digits.
  rest = jnp.sum(jnp.where(is_pred, 0.0, probs), axis=-1, keepdims=True)
  others = jnp.where(rest > 0, probs * (1.0 - new_conf) / jnp.where(rest > 0, rest, 1),
                     (1.0 - new_conf) / max(probs.shape[-1] - 1, 1))
  return jnp.where(is_pred, new_conf, others)


def _pav(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Isotonic (non-decreasing) least-squares fit of y on x; returns the knots (x, value) of the fitted map.

  Ties in x are averaged first (weights = counts). Adjacent violators are pooled in parallel passes: every
  maximal run of consecutive violations is merged at once (valid because PAV's result does not depend on the
  order in which adjacent violators are pooled), until the block values are non-decreasing.
  """
  xs, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  w = counts.astype(np.float64)
  wy = np.bincount(inverse, weights=y, minlength=xs.size)
  lo, hi = xs.copy(), xs.copy()
  while True:
    v = wy / w
    violation = v[:-1] > v[1:]
    if not violation.any():
      break
    starts = np.concatenate([[True], ~violation])
    group = np.cumsum(starts) - 1
    wy, w = np.bincount(group, weights=wy), np.bincount(group, weights=w)
    lo, hi = lo[starts], hi[np.concatenate([starts[1:], [True]])]
  v = wy / w
  # Each block contributes its two end points (one when it holds a single x value).
  knots_x = np.stack([lo, hi], axis=1).reshape(-1)
  knots_y = np.repeat(v, 2)
  keep = np.concatenate([[True], knots_x[1:] != knots_x[:-1]])
  return knots_x[keep], knots_y[keep]


def fit_isotonic(*, logits: jax.Array, labels: jax.Array) -> dict:
  """Fits classwise one-vs-rest isotonic regression (conventions in the module docstring). Host numpy code.

  Args:
    logits: (N, C) logits.
    labels: (N,) integer labels or (N, C) soft targets.

  Returns:
    params `{"x": (C, M), "y": (C, M)}`: per class, the knots of the piecewise-linear map, padded to a common
    length M with knots at x = 2, 3, ... (beyond any probability) that repeat the last value.
  """
  logits = _as_float(logits)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
  targets = np.asarray(_targets(labels, probs.shape[-1], jnp.float32), np.float64)
  knots = [_pav(probs[:, k], targets[:, k]) for k in range(probs.shape[-1])]
  m = max(kx.size for kx, _ in knots) + 1
  xs = np.stack([np.concatenate([kx, 2.0 + np.arange(m - kx.size)]) for kx, _ in knots])
  ys = np.stack([np.concatenate([ky, np.full(m - ky.size, ky[-1])]) for _, ky in knots])
  return {"x": jnp.asarray(xs, logits.dtype), "y": jnp.asarray(ys, logits.dtype)}


@jax.jit
def apply_isotonic(params: dict, logits: jax.Array) -> jax.Array:
  """Returns calibrated probabilities (N, C) of classwise isotonic regression, renormalised."""
  probs = jax.nn.softmax(logits, axis=-1)
  q = jax.vmap(jnp.interp, in_axes=(1, 0, 0), out_axes=1)(probs, params["x"], params["y"])
  return _renormalise(q)
