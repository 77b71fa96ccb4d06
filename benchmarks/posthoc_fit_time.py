"""Fit time of temperature scaling, its PyTorch-reference mode and the MTS fit on 10^5 x 100 logits.

    .venv/bin/python benchmarks/posthoc_fit_time.py [--n 100000] [--classes 100] [--repeats 3]

Compares calibjax's jitted fits with `scipy.optimize.minimize_scalar` (bounded Brent) on the same mean NLL
written in numpy (float32 arrays, as the logits are). "First call" includes tracing and XLA compilation;
"steady" is the median of `--repeats` later calls on the same shapes. The MTS row times only the fit part:
the masked logits (a random linear map of inputs with 30 % of the input elements zeroed) are precomputed.
|dNLL/dT| is evaluated in float64 numpy at each method's T. Prints a markdown table.
"""

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import minimize_scalar

from calibjax.calibration.posthoc import fit_temperature
from calibjax.masks import mask_inputs


def make_logits(n: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Over-confident logits (labels from softmax(z), reported as 3 z) and masked logits of a linear map."""
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(n, 64)).astype(np.float32)
  weights = (rng.normal(size=(64, classes)) / 8).astype(np.float32)
  z = features @ weights
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  labels = (rng.random((n, 1)) > np.cumsum(p, 1)).sum(1).clip(0, classes - 1)
  masked = np.asarray(mask_inputs(jax.random.key(seed), jnp.asarray(features), 0.3)) @ weights
  return 3 * z, 3 * masked, labels


def np_nll(logits: np.ndarray, labels: np.ndarray, t: float) -> float:
  z = logits / np.float32(t)
  z = z - z.max(1, keepdims=True)
  return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels]))


def np_grad_t(logits: np.ndarray, labels: np.ndarray, t: float) -> float:
  z = logits.astype(np.float64)
  e = np.exp(z / t - (z / t).max(1, keepdims=True))
  p = e / e.sum(1, keepdims=True)
  return float(np.mean(z[np.arange(len(labels)), labels] - np.sum(p * z, 1)) / t ** 2)


def timed(fn, repeats: int) -> tuple[float, float, float]:
  """(first-call seconds, median steady seconds, result)."""
  start = time.perf_counter()
  result = float(fn())
  first = time.perf_counter() - start
  steady = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    steady.append(time.perf_counter() - start)
  return first, float(np.median(steady)), result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=100_000)
  parser.add_argument("--classes", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  clean, masked, labels = make_logits(args.n, args.classes)
  clean_j, masked_j, labels_j = jnp.asarray(clean), jnp.asarray(masked), jnp.asarray(labels)

  def scipy_fit(logits):
    return lambda: minimize_scalar(lambda t: np_nll(logits, labels, t), bounds=(0.05, 20.0), method="bounded",
                                   options={"xatol": 1e-6}).x

  rows = [
      ("TS, calibjax converged (jit)", clean,
       lambda: fit_temperature(logits=clean_j, labels=labels_j).block_until_ready()),
      ("TS, calibjax lbfgs_reference (jit)", clean,
       lambda: fit_temperature(logits=clean_j, labels=labels_j,
                               method="lbfgs_reference").block_until_ready()),
      ("TS, scipy minimize_scalar (numpy)", clean, scipy_fit(clean)),
      ("MTS fit r=0.3, calibjax converged (jit)", masked,
       lambda: fit_temperature(logits=masked_j, labels=labels_j).block_until_ready()),
      ("MTS fit r=0.3, scipy minimize_scalar (numpy)", masked, scipy_fit(masked)),
  ]
  print(f"{args.n} x {args.classes} float32 logits; jax {jax.__version__} on {jax.devices()[0].platform}; "
        f"{platform.processor() or platform.machine()}; median of {args.repeats} steady calls\n")
  print("| fit | first call (s) | steady (s) | T | abs(dNLL/dT) at T |")
  print("|---|---|---|---|---|")
  for name, logits, fn in rows:
    first, steady, t = timed(fn, args.repeats)
    print(f"| {name} | {first:.2f} | {steady:.3f} | {t:.5f} | {abs(np_grad_t(logits, labels, t)):.1e} |")


if __name__ == "__main__":
  main()
