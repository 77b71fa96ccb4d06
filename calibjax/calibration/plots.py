"""Reliability diagrams and max-logit histograms, written as PNG files.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas (no pyplot, no global backend
switch, safe in headless and multi-threaded runs). Every function checks its inputs on the host, raises
`InvalidInputError` (a ValueError) for non-finite or mis-shaped arrays, creates the parent directory, writes
the PNG and returns its path. Bins are the top-label equal-width (lo, hi] bins of `metrics.reliability_bins`
(the first bin is [0, hi], confidence 1.0 is in the last bin).
"""

import os
from typing import Mapping

import jax
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from calibjax.calibration import metrics
from calibjax.calibration.metrics import InvalidInputError

_OVER = "#d62728"   # over-confident: confidence above accuracy
_UNDER = "#1f77b4"  # under-confident: confidence below accuracy
_BAR = "#7f7f7f"


def _finite(name: str, array: np.ndarray) -> np.ndarray:
  array = np.asarray(array)
  if array.size == 0:
    raise InvalidInputError(f"{name} is empty; nothing to plot")
  if np.issubdtype(array.dtype, np.number) and not np.all(np.isfinite(array)):
    raise InvalidInputError(f"{name} contains {int(np.size(array) - np.isfinite(array).sum())} non-finite "
                            "values (NaN or inf); check the model outputs before plotting")
  return array


def _host_pair(name: str, probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  probs = _finite(f"{name} probs", np.asarray(jax.device_get(probs)))
  labels = _finite(f"{name} labels", np.asarray(jax.device_get(labels)))
  if probs.ndim != 2 or labels.shape != probs.shape[:1]:
    raise InvalidInputError(f"{name}: probs must be (N, K) and labels (N,); got {probs.shape} and "
                            f"{labels.shape}")
  return probs, labels


def _save(fig: Figure, path: str) -> str:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, format="png", dpi=120)
  return path


def _draw_reliability(ax_rel, ax_hist, probs: np.ndarray, labels: np.ndarray, n_bins: int,
                      title: str | None) -> None:
  stats = jax.device_get(metrics.reliability_bins(probs=probs, labels=labels, n_bins=n_bins))
  ece = float(metrics.ece(probs=probs, labels=labels, n_bins=n_bins))
  edges = np.asarray(stats["edges"], np.float64)
  width = np.diff(edges)
  left = edges[:-1]
  counts = np.asarray(stats["counts"])
  filled = counts > 0
  acc = np.where(filled, stats["accuracy"], 0.0)
  conf = np.where(filled, stats["confidence"], 0.0)

  ax_rel.bar(left, acc, width=width, align="edge", color=_BAR, edgecolor="black", linewidth=0.5,
             label=f"accuracy (ECE = {100 * ece:.2f}%)")
  over = filled & (conf > acc)
  under = filled & (conf < acc)
  # The shaded part spans accuracy..confidence of each bin, coloured by the direction of the error.
  ax_rel.bar(left[over], (conf - acc)[over], bottom=acc[over], width=width[over], align="edge", color=_OVER,
             alpha=0.45, edgecolor=_OVER, label="over-confident gap")
  ax_rel.bar(left[under], (acc - conf)[under], bottom=conf[under], width=width[under], align="edge",
             color=_UNDER, alpha=0.45, edgecolor=_UNDER, label="under-confident gap")
  ax_rel.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=1, label="perfect calibration")
  ax_rel.set_xlim(0, 1)
  ax_rel.set_ylim(0, 1)
  ax_rel.set_ylabel("accuracy")
  ax_rel.legend(loc="upper left", fontsize=8)
  if title:
    ax_rel.set_title(title)

  ax_hist.bar(left, counts, width=width, align="edge", color=_BAR, edgecolor="black", linewidth=0.5)
  ax_hist.set_xlim(0, 1)
  ax_hist.set_xlabel("confidence")
  ax_hist.set_ylabel("count")


def plot_reliability(path: str, *, probs: np.ndarray, labels: np.ndarray, n_bins: int = 15,
                     title: str | None = None) -> str:
  """Reliability diagram of one model: accuracy per confidence bin, the diagonal, the gap shaded red where
  the model is over-confident and blue where it is under-confident, the ECE in the legend, and the number of
  samples per bin below.

  Args:
    path: output PNG path (parent directories are created).
    probs: (N, K) probabilities.
    labels: (N,) int labels.
    n_bins: equal-width bins.
    title: optional title.

  Returns:
    `path`.
  """
  probs, labels = _host_pair("reliability", probs, labels)
  fig = Figure(figsize=(5, 6))
  ax_rel, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
  _draw_reliability(ax_rel, ax_hist, probs, labels, n_bins, title)
  fig.tight_layout()
  return _save(fig, path)


def plot_reliability_grid(path: str, panels: Mapping[str, tuple[np.ndarray, np.ndarray]],
                          n_bins: int = 15) -> str:
  """Reliability diagrams side by side, e.g. before/after a calibrator or across training methods.

  Args:
    path: output PNG path.
    panels: ordered mapping title -> (probs (N, K), labels (N,)); one column per entry.
    n_bins: equal-width bins.

  Returns:
    `path`.
  """
  if not panels:
    raise InvalidInputError("panels is empty; give at least one (probs, labels) pair")
  checked = {name: _host_pair(name, *pair) for name, pair in panels.items()}
  fig = Figure(figsize=(4 * len(checked), 6))
  axes = fig.subplots(2, len(checked), squeeze=False, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
  for column, (name, (probs, labels)) in enumerate(checked.items()):
    _draw_reliability(axes[0, column], axes[1, column], probs, labels, n_bins, name)
  fig.tight_layout()
  return _save(fig, path)


def plot_max_logit_histograms(path: str, logits_by_name: Mapping[str, np.ndarray], bins: int = 50) -> str:
  """Overlaid histograms of the per-sample maximum logit of several models (the MTS paper's Figs. 2 and 7:
  networks trained on distilled data have concentrated, small max logits).

  Args:
    path: output PNG path.
    logits_by_name: mapping legend name -> (N, K) logits (N may differ between models).
    bins: histogram bins over the common range of all models.

  Returns:
    `path`.
  """
  if not logits_by_name:
    raise InvalidInputError("logits_by_name is empty; give at least one (N, K) logits array")
  max_logits = {}
  for name, logits in logits_by_name.items():
    logits = _finite(f"{name} logits", np.asarray(jax.device_get(logits)))
    if logits.ndim != 2:
      raise InvalidInputError(f"{name} logits must be (N, K); got {logits.shape}")
    max_logits[name] = logits.max(axis=1)
  return plot_histograms(path, max_logits, xlabel="max logit", bins=bins)


def plot_histograms(path: str, values_by_name: Mapping[str, np.ndarray], *, xlabel: str, bins: int = 50) -> str:
  """Overlaid density histograms of 1-D samples (one per legend name) over their common range; returns `path`."""
  values_by_name = {name: _finite(name, np.asarray(values, np.float64).ravel())
                    for name, values in values_by_name.items()}
  lo = min(float(v.min()) for v in values_by_name.values())
  hi = max(float(v.max()) for v in values_by_name.values())
  grid = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for name, values in values_by_name.items():
    ax.hist(values, bins=grid, density=True, histtype="stepfilled", alpha=0.4, label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("density")
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def plot_embeddings(path: str, panels: Mapping[str, np.ndarray], *, labels: np.ndarray, columns: int) -> str:
  """2-D points (N, 2) per panel title, coloured by integer label, `columns` panels a row; returns `path`."""
  rows = -(-len(panels) // columns)
  fig = Figure(figsize=(3 * columns, 3 * rows))
  axes = np.atleast_2d(fig.subplots(rows, columns, squeeze=False))
  for ax, (title, points) in zip(axes.ravel(), panels.items()):
    ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=4)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
  for ax in axes.ravel()[len(panels):]:
    ax.axis("off")
  fig.tight_layout()
  return _save(fig, path)


def plot_curves(path: str, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], *, xlabel: str,
                ylabel: str) -> str:
  """One line (with markers) per legend name, from (x, y) pairs; returns `path`."""
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for name, (x, y) in curves.items():
    ax.plot(np.asarray(x), _finite(name, np.asarray(y, np.float64)), marker="o", label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)
