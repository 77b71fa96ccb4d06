"""Tests of calibjax.calibration.plots: files are written, are PNG images, and bad inputs fail clearly."""

import numpy as np
import pytest
from matplotlib import image as mpimg

from calibjax.calibration import plots
from calibjax.calibration.metrics import InvalidInputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _problem(seed, n=200, k=4):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, k)) * 2
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  return probs.astype(np.float32), rng.integers(0, k, n), logits


def _assert_png(path, min_size):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  pixels = mpimg.imread(path)
  assert pixels.ndim == 3 and pixels.shape[0] >= min_size[0] and pixels.shape[1] >= min_size[1]
  assert pixels[..., :3].std() > 0.05  # not a blank canvas


def test_plot_reliability(tmp_path):
  probs, labels, _ = _problem(0)
  path = plots.plot_reliability(str(tmp_path / "sub" / "rel.png"), probs=probs, labels=labels, title="model")
  assert path == str(tmp_path / "sub" / "rel.png")
  _assert_png(path, (500, 400))


def test_plot_reliability_grid(tmp_path):
  before, labels, _ = _problem(1)
  sharpened = before**3 / (before**3).sum(1, keepdims=True)
  path = plots.plot_reliability_grid(str(tmp_path / "grid.png"), {"before": (before, labels),
                                                                  "after": (sharpened, labels)}, n_bins=10)
  _assert_png(path, (500, 800))


def test_plot_max_logit_histograms(tmp_path):
  _, _, full = _problem(2)
  _, _, distilled = _problem(3, n=150)
  path = plots.plot_max_logit_histograms(str(tmp_path / "maxlogit.png"),
                                         {"full data": full * 3, "distilled": distilled}, bins=30)
  _assert_png(path, (400, 600))


def test_non_finite_inputs_raise(tmp_path):
  probs, labels, logits = _problem(4)
  bad = probs.copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match="non-finite"):
    plots.plot_reliability(str(tmp_path / "a.png"), probs=bad, labels=labels)
  with pytest.raises(InvalidInputError, match="non-finite"):
    plots.plot_reliability_grid(str(tmp_path / "b.png"), {"ok": (probs, labels), "bad": (bad, labels)})
  logits[0, 0] = np.inf
  with pytest.raises(InvalidInputError, match="non-finite"):
    plots.plot_max_logit_histograms(str(tmp_path / "c.png"), {"bad": logits})
  with pytest.raises(InvalidInputError):
    plots.plot_reliability(str(tmp_path / "d.png"), probs=probs, labels=labels[:-1])
  assert not list(tmp_path.iterdir())
