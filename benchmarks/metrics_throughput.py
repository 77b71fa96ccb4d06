"""Throughput of ECE / SCE / ACE: jitted calibjax against vectorised numpy versions of the same definitions.

    python benchmarks/metrics_throughput.py           # 10^6 and 10^7 predictions x 10 / 100 / 1000 classes
    python benchmarks/metrics_throughput.py --quick   # 10^6 x 10 only (seconds; used as a smoke test)

Definitions (15 bins, as `calibjax.calibration.metrics`): ECE = top-label, equal-width (lo, hi] bins; SCE =
classwise, equal-width (lo, hi] bins, mean over classes; ACE = classwise, CXKD equal-mass bins (lower edges at
sorted[i * floor(N / 15)], bins (lo, hi]), mean over classes. The numpy versions use searchsorted + bincount
(ECE, SCE) and per-class np.sort + searchsorted + bincount (ACE); calibjax selects the ACE edges by radix
select instead of sorting (XLA's CPU sort is ~10x slower than numpy's). Times are the best of a few runs after
one warm-up call; the first calibjax call (compilation + one run) is reported separately. Combinations whose
estimated peak memory (about 6 float32 copies of the (N, K) probabilities) exceeds 4 GiB are skipped and
listed. Prints a markdown table.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from calibjax.calibration import metrics

N_BINS = 15
MEMORY_LIMIT = 4 * 2**30
COPIES = 6  # inputs, bin ids, flattened ids, products and sort buffers alive at once


def make_problem(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((n, k), dtype=np.float32) * 2
  labels = rng.integers(0, k, n)
  logits[np.arange(n), labels] += 1.5
  logits -= logits.max(1, keepdims=True)
  np.exp(logits, out=logits)
  logits /= logits.sum(1, keepdims=True)
  return logits, labels.astype(np.int32)


def _interior_edges() -> np.ndarray:
  return np.linspace(0, 1, N_BINS + 1).astype(np.float32)[1:-1]


def _l1(counts: np.ndarray, score_sums: np.ndarray, target_sums: np.ndarray, n: int) -> np.ndarray:
  """sum_b (n_b / n) |mean score - mean target| along the last axis."""
  safe = np.maximum(counts, 1)
  return np.sum(counts / n * np.abs(score_sums / safe - target_sums / safe), axis=-1)


def numpy_ece(probs: np.ndarray, labels: np.ndarray) -> float:
  conf = probs.max(1)
  correct = (probs.argmax(1) == labels).astype(np.float64)
  ids = np.searchsorted(_interior_edges(), conf, side="left")
  counts = np.bincount(ids, minlength=N_BINS)
  return float(_l1(counts, np.bincount(ids, conf, N_BINS), np.bincount(ids, correct, N_BINS), len(labels)))


def numpy_sce(probs: np.ndarray, labels: np.ndarray) -> float:
  n, k = probs.shape
  flat = (np.searchsorted(_interior_edges(), probs, side="left") + N_BINS * np.arange(k)).ravel()
  counts = np.bincount(flat, minlength=N_BINS * k).reshape(k, N_BINS)
  sums = np.bincount(flat, probs.ravel(), N_BINS * k).reshape(k, N_BINS)
  hits = np.bincount(flat.reshape(n, k)[np.arange(n), labels], minlength=N_BINS * k).reshape(k, N_BINS)
  return float(np.mean(_l1(counts, sums, hits, n)))


def numpy_ace(probs: np.ndarray, labels: np.ndarray) -> float:
  n, k = probs.shape
  step = n // N_BINS
  total = 0.0
  for c in range(k):
    p = probs[:, c]
    lowers = np.sort(p)[np.arange(N_BINS) * step]
    uppers = np.append(lowers[1:], np.float32(1.0))
    ids = np.searchsorted(uppers, p, side="left")
    ids[p <= lowers[0]] = N_BINS  # the minimum is in no bin
    counts = np.bincount(ids, minlength=N_BINS + 1)[:N_BINS]
    sums = np.bincount(ids, p, N_BINS + 1)[:N_BINS]
    hits = np.bincount(ids, (labels == c).astype(np.float64), N_BINS + 1)[:N_BINS]
    total += _l1(counts, sums, hits, n)
  return total / k


CALIBJAX = {
    "ece": lambda p, y: metrics.ece(probs=p, labels=y, n_bins=N_BINS),
    "sce": lambda p, y: metrics.classwise_ece(probs=p, labels=y, n_bins=N_BINS),
    "ace": lambda p, y: metrics.ace(probs=p, labels=y, n_bins=N_BINS),
}
NUMPY = {"ece": numpy_ece, "sce": numpy_sce, "ace": numpy_ace}


def best_time(fn, repeats: int) -> tuple[float, float]:
  times, value = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    value = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times), float(value)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="only 10^6 predictions x 10 classes")
  args = parser.parse_args()
  sizes = [(10**6, 10)] if args.quick else [(n, k) for n in (10**6, 10**7) for k in (10, 100, 1000)]
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s)), numpy "
        f"{np.__version__}; {N_BINS} bins; times in seconds\n")
  rows, skipped = [], []
  for n, k in sizes:
    need = COPIES * n * k * 4
    if need > MEMORY_LIMIT:
      skipped.append(f"N = {n:.0e}, K = {k}: ~{need / 2**30:.1f} GiB estimated peak > 4 GiB")
      continue
    probs, labels = make_problem(n, k)
    device_probs, device_labels = jnp.asarray(probs), jnp.asarray(labels)
    repeats = 3 if n * k <= 10**7 else 1
    for name in ("ece", "sce", "ace"):
      start = time.perf_counter()
      jax.block_until_ready(CALIBJAX[name](device_probs, device_labels))
      first = time.perf_counter() - start
      ours, ours_value = best_time(lambda: CALIBJAX[name](device_probs, device_labels), repeats)
      reference, reference_value = best_time(lambda: NUMPY[name](probs, labels), repeats)
      rows.append((n, k, name, first, ours, reference, reference / ours,
                   abs(ours_value - reference_value)))
    del probs, labels, device_probs, device_labels
  print("| N | K | metric | first call (s) | calibjax (s) | numpy (s) | numpy / calibjax | abs. difference |")
  print("|---|---|---|---|---|---|---|---|")
  for n, k, name, first, ours, reference, ratio, diff in rows:
    print(f"| {n:.0e} | {k} | {name} | {first:.2f} | {ours:.3f} | {reference:.3f} | {ratio:.2f} | "
          f"{diff:.1e} |")
  for line in skipped:
    print(f"\nskipped: {line}")


if __name__ == "__main__":
  main()
