"""Throughput of ECE / SCE / ACE on inputs streamed in chunks: calibjax against numpy on the same numbers.

    python benchmarks/metrics_throughput.py           # 10^6 and 10^7 predictions x 10 / 100 / 1000 classes
    python benchmarks/metrics_throughput.py --quick   # 10^5 predictions x 10 / 100 classes (seconds; smoke)

Synthetic problem. Labels y_i are uniform over K classes, logits z_ik = 2 g_ik + 1.5 * 1[k = y_i] with g
standard normal, probabilities p_ik = exp(z_ik - logsumexp_k z_ik) in float32. Every number is drawn from one
seeded key: g_ik of row i in chunk j (rows [j R, (j + 1) R)) comes from fold_in(fold_in(key, j), k), so a
block of rows and a whole class column can each be generated on their own, with identical values. The (N, K)
matrix is never built, except on cells with N K <= 10^7, where it is built once to assert that the streamed
values equal the one-shot functions' and that the class columns equal the row chunks bit for bit.

What is timed (15 bins; definitions as `calibjax.calibration.metrics`):
  * "ece, sce, ... (BinStats)": rows are generated in chunks of R = `--chunk` / K rows. calibjax: a jitted
    `BinStats.update` per chunk and one `BinStats.compute` at the end (the update accumulates every streamed
    statistic: top-label and classwise (lo, hi] equal-width bins, accuracy, confidence, NLL, Brier). numpy:
    the same statistics of the same chunk with searchsorted + bincount, accumulated in float64, and the same
    final formulas. Both yield ece, sce, mce, rmsce, oe, nll, brier and accuracy; "abs. diff" is the largest
    difference over those eight values.
  * "ace (class by class)": CXKD ACE (per class, equal-mass (lo, hi] bins with lower edges at
    sorted[i floor(N / 15)]; mean over classes) has no row-streaming form: its bin edges are order statistics
    of the whole column. It is computed one class column (N values) at a time: calibjax
    `binned_calibration_error(binning="equal_mass_cxkd")` per column (radix select of the edges), numpy
    np.sort + searchsorted + bincount per column, then the mean over classes.
Both sides get the same float32 chunk or column. Generating it (JAX threefry, softmax, copy to numpy) is NOT
in the metric times; its total is reported separately in the "generation" column. Each chunk or column is
timed best-of-r (r = 3 when N K <= 10^8, else 1) and the per-chunk times are summed. "first call" is the
first calibjax call on the first chunk or column (tracing + compilation + one run; about 0 when an earlier
cell already compiled the same shape). XLA may use both cores; the numpy code runs on one. Prints the load
average before and after, the peak resident memory, and a markdown table.
"""

import argparse
import functools
import os
import resource
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from calibjax.calibration import metrics

N_BINS = 15
SEED = 0
# Cells up to this many probabilities are also materialised once to assert streamed == one-shot.
CHECK_LIMIT = 10**7
# Largest allowed |streamed - one-shot| (float32 sums over <= 10^7 terms, summed in a different order).
CHECK_TOLERANCE = 2e-5
STREAMED = ("ece", "sce", "mce", "rmsce", "oe", "nll", "brier", "accuracy")


# ---------------------------------------------------------------------------------------------------------
# Seeded chunk and column generation.


def _scaled_normal(key: jax.Array, chunk: jax.Array, column: jax.Array, rows: int) -> jax.Array:
  """2 g for the `rows` entries of one class column inside one row chunk."""
  return 2 * jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, chunk), column), (rows,),
                               jnp.float32)


def _labels(key: jax.Array, chunk: jax.Array, rows: int, num_classes: int) -> jax.Array:
  return jax.random.randint(jax.random.fold_in(key, chunk), (rows,), 0, num_classes, jnp.int32)


@functools.partial(jax.jit, static_argnames=("rows", "num_classes"))
def row_chunk(logit_key: jax.Array, label_key: jax.Array, chunk: jax.Array, *, rows: int,
              num_classes: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Rows [chunk * rows, (chunk + 1) * rows): probabilities (rows, K), labels (rows,), logsumexp (rows,)."""
  labels = _labels(label_key, chunk, rows, num_classes)
  classes = jnp.arange(num_classes)
  z = jax.vmap(lambda c: _scaled_normal(logit_key, chunk, c, rows), out_axes=1)(classes)
  z = z + 1.5 * (classes == labels[:, None])
  lse = jax.nn.logsumexp(z, axis=1)
  return jnp.exp(z - lse[:, None]), labels, lse


@functools.partial(jax.jit, static_argnames=("rows", "chunks", "num_classes"))
def all_labels(label_key: jax.Array, *, rows: int, chunks: int, num_classes: int) -> jax.Array:
  """The (N,) labels of every chunk, as `row_chunk` draws them."""
  return jax.vmap(lambda j: _labels(label_key, j, rows, num_classes))(jnp.arange(chunks)).reshape(-1)


@functools.partial(jax.jit, static_argnames=("rows", "chunks"))
def class_column(logit_key: jax.Array, labels: jax.Array, lse: jax.Array, column: jax.Array, *, rows: int,
                 chunks: int) -> tuple[jax.Array, jax.Array]:
  """Probabilities p_ic (N,) of one class over all rows (equal to `row_chunk`'s column) and 1[y_i = c]."""
  z = jax.vmap(lambda j: _scaled_normal(logit_key, j, column, rows))(jnp.arange(chunks)).reshape(-1)
  hit = labels == column
  z = z + 1.5 * hit
  return jnp.exp(z - lse), hit.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------------
# numpy reference: the sufficient statistics of `BinStats`, in float64.


def _interior_edges() -> np.ndarray:
  return np.linspace(0, 1, N_BINS + 1).astype(np.float32)[1:-1]


def numpy_init(num_classes: int) -> dict[str, Any]:
  zeros = {"top": np.zeros((3, N_BINS)), "cls": np.zeros((3, num_classes, N_BINS))}
  return zeros | {name: 0.0 for name in ("n", "correct", "confidence", "nll", "brier")}


def numpy_update(acc: dict[str, Any], probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
  """acc plus the statistics of one chunk: (lo, hi] equal-width bins via searchsorted + bincount."""
  n, k = probs.shape
  rows = np.arange(n)
  edges = _interior_edges()
  confidence = probs.max(1)
  correct = (probs.argmax(1) == labels).astype(np.float64)
  ids = np.searchsorted(edges, confidence, side="left")
  top = np.stack([np.bincount(ids, minlength=N_BINS), np.bincount(ids, confidence, N_BINS),
                  np.bincount(ids, correct, N_BINS)])
  flat = np.searchsorted(edges, probs, side="left") + N_BINS * np.arange(k)
  cls = np.stack([np.bincount(flat.ravel(), minlength=N_BINS * k),
                  np.bincount(flat.ravel(), probs.ravel(), N_BINS * k),
                  np.bincount(flat[rows, labels], minlength=N_BINS * k)]).reshape(3, k, N_BINS)
  p_true = probs[rows, labels].astype(np.float64)
  nll = -np.log(np.maximum(p_true, np.finfo(np.float32).tiny))
  brier = np.einsum("ij,ij->i", probs, probs, dtype=np.float64) - 2 * p_true + 1
  return {"top": acc["top"] + top, "cls": acc["cls"] + cls, "n": acc["n"] + n,
          "correct": acc["correct"] + correct.sum(),
          "confidence": acc["confidence"] + confidence.sum(dtype=np.float64), "nll": acc["nll"] + nll.sum(),
          "brier": acc["brier"] + brier.sum()}


def _gaps(stats: np.ndarray, n: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Bin weights n_b / N, mean scores and gaps (mean score - mean target) along the last axis."""
  counts, score_sums, target_sums = stats
  safe = np.maximum(counts, 1)
  return counts / n, score_sums / safe, (score_sums - target_sums) / safe


def numpy_compute(acc: dict[str, Any]) -> dict[str, float]:
  n = acc["n"]
  weight, score, gap = _gaps(acc["top"], n)
  cls_weight, _, cls_gap = _gaps(acc["cls"], n)
  return {"ece": np.sum(weight * np.abs(gap)), "sce": np.mean(np.sum(cls_weight * np.abs(cls_gap), axis=1)),
          "mce": np.max(np.abs(gap) * (acc["top"][0] > 0)), "rmsce": np.sqrt(np.sum(weight * gap**2)),
          "oe": np.sum(weight * score * np.maximum(gap, 0)), "nll": acc["nll"] / n, "brier": acc["brier"] / n,
          "accuracy": acc["correct"] / n}


def numpy_column_ce(p: np.ndarray, hit: np.ndarray) -> float:
  """CE_c of CXKD ACE for one class column: lower edges sorted[i floor(N / 15)], bins (lo, hi], upper 1.0."""
  n = p.shape[0]
  lowers = np.sort(p)[np.arange(N_BINS) * (n // N_BINS)]
  uppers = np.append(lowers[1:], np.float32(1.0))
  ids = np.searchsorted(uppers, p, side="left")
  ids[p <= lowers[0]] = N_BINS  # the minimum is in no bin
  stats = np.stack([np.bincount(ids, minlength=N_BINS + 1), np.bincount(ids, p, N_BINS + 1),
                    np.bincount(ids, hit, N_BINS + 1)])[:, :N_BINS]
  weight, _, gap = _gaps(stats, n)
  return float(np.sum(weight * np.abs(gap)))


# ---------------------------------------------------------------------------------------------------------
# calibjax side.

UPDATE = jax.jit(metrics.BinStats.update)
COMPUTE = jax.jit(metrics.BinStats.compute)


def calibjax_column_ce(p: jax.Array, hit: jax.Array) -> jax.Array:
  return metrics.binned_calibration_error(scores=p, targets=hit, n_bins=N_BINS, binning="equal_mass_cxkd")


def one_shot(probs: jax.Array, labels: jax.Array) -> dict[str, float]:
  """Every streamed metric and ACE from the one-shot functions on the whole matrix."""
  pair = {"probs": probs, "labels": labels}
  common = pair | {"n_bins": N_BINS}
  values = {"ece": metrics.ece(**common), "sce": metrics.classwise_ece(**common),
            "mce": metrics.mce(**common), "rmsce": metrics.ece(**common, norm="l2"),
            "oe": metrics.oe(**common), "nll": metrics.nll(**pair), "brier": metrics.brier(**pair),
            "accuracy": metrics.accuracy(**pair), "ace": metrics.ace(**common)}
  return {name: float(value) for name, value in values.items()}


# ---------------------------------------------------------------------------------------------------------
# Timing.


def _seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - start, out


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
  runs = [_seconds(fn) for _ in range(repeats)]
  return min(run[0] for run in runs), runs[-1][1]


class Cell:
  """One (N, K) grid cell: its chunking and keys; `run` times both passes."""

  def __init__(self, n: int, k: int, chunk_elements: int):
    self.n, self.k = n, k
    self.rows = max(1, min(n, chunk_elements // k))
    if n % self.rows:
      raise SystemExit(f"N = {n} is not a multiple of the {self.rows} rows per chunk; pick another --chunk")
    self.chunks = n // self.rows
    self.repeats = 3 if n * k <= 10**8 else 1
    self.logit_key, self.label_key = jax.random.split(jax.random.key(SEED))
    self.check = n * k <= CHECK_LIMIT

  def stream(self) -> tuple[dict[str, Any], jax.Array, list[tuple[np.ndarray, np.ndarray]]]:
    """Row-chunked pass: BinStats against the numpy accumulation.

    Returns:
      The table row, the (N,) logsumexp of every row (for the column pass), and the host chunks when the cell
      is checked (else []).
    """
    stats, acc = metrics.BinStats.init(N_BINS, self.k), numpy_init(self.k)
    jax.block_until_ready(COMPUTE(stats))
    generation = ours = reference = first = 0.0
    lse, kept = [], []
    for j in range(self.chunks):
      start = time.perf_counter()
      probs, labels, chunk_lse = jax.block_until_ready(
          row_chunk(self.logit_key, self.label_key, jnp.int32(j), rows=self.rows, num_classes=self.k))
      host_probs, host_labels = np.asarray(probs), np.asarray(labels)
      generation += time.perf_counter() - start
      lse.append(chunk_lse)
      if self.check:
        kept.append((host_probs, host_labels))
      if j == 0:
        first = _seconds(lambda: UPDATE(stats, probs=probs, labels=labels))[0]
      seconds, stats = best_of(lambda: UPDATE(stats, probs=probs, labels=labels), self.repeats)
      ours += seconds
      seconds, acc = best_of(lambda: numpy_update(acc, host_probs, host_labels), self.repeats)
      reference += seconds
    seconds, ours_values = _seconds(lambda: COMPUTE(stats))
    ours += seconds
    seconds, reference_values = _seconds(lambda: numpy_compute(acc))
    reference += seconds
    values = {name: float(ours_values[name]) for name in STREAMED}
    diff = max(abs(values[name] - float(reference_values[name])) for name in STREAMED)
    row = {"metric": "ece, sce, mce, rmsce, oe, nll, brier, acc (BinStats)", "first": first, "ours": ours,
           "reference": reference, "diff": diff, "generation": generation, "values": values}
    return row, jnp.concatenate(lse), kept

  def ace_by_class(self, lse: jax.Array) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Column pass: per-class CXKD ACE terms from calibjax and numpy, averaged over classes.

    Returns:
      The table row and the host columns when the cell is checked (else []).
    """
    labels = all_labels(self.label_key, rows=self.rows, chunks=self.chunks, num_classes=self.k)
    generation = ours = reference = first = 0.0
    ours_terms, reference_terms, columns = [], [], []
    for c in range(self.k):
      start = time.perf_counter()
      p, hit = jax.block_until_ready(class_column(self.logit_key, labels, lse, jnp.int32(c), rows=self.rows,
                                                  chunks=self.chunks))
      host_p, host_hit = np.asarray(p), np.asarray(hit)
      generation += time.perf_counter() - start
      if self.check:
        columns.append(host_p)
      if c == 0:
        first = _seconds(lambda: calibjax_column_ce(p, hit))[0]
      seconds, term = best_of(lambda: calibjax_column_ce(p, hit), self.repeats)
      ours += seconds
      ours_terms.append(term)
      seconds, term = best_of(lambda: numpy_column_ce(host_p, host_hit), self.repeats)
      reference += seconds
      reference_terms.append(term)
    seconds, value = _seconds(lambda: jnp.mean(jnp.stack(ours_terms)))
    ours += seconds
    value = float(value)
    row = {"metric": "ace (class by class)", "first": first, "ours": ours, "reference": reference,
           "diff": abs(value - float(np.mean(reference_terms))), "generation": generation,
           "values": {"ace": value}}
    return row, columns

  def _check(self, kept: list[tuple[np.ndarray, np.ndarray]], columns: list[np.ndarray],
             got: dict[str, float]) -> None:
    """Asserts that the column pass saw the row pass's numbers and that streamed == one-shot."""
    probs = np.concatenate([chunk[0] for chunk in kept])
    labels = np.concatenate([chunk[1] for chunk in kept])
    assert np.array_equal(np.stack(columns, axis=1), probs), "class columns differ from the row chunks"
    expected = one_shot(jnp.asarray(probs), jnp.asarray(labels))
    diffs = {name: abs(got[name] - expected[name]) for name in expected}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= CHECK_TOLERANCE, f"streamed {worst} = {got[worst]} != one-shot {expected[worst]}"
    print(f"check N = {self.n:.0e}, K = {self.k} ({self.chunks} chunks of {self.rows} rows): streamed == "
          f"one-shot for {', '.join(expected)}; largest |diff| {diffs[worst]:.1e} ({worst}), tolerance "
          f"{CHECK_TOLERANCE:.0e}; class columns == row chunks bit for bit", flush=True)

  def run(self) -> list[dict[str, Any]]:
    streamed, lse, kept = self.stream()
    ace, columns = self.ace_by_class(lse)
    if self.check:
      self._check(kept, columns, streamed["values"] | ace["values"])
    return [streamed, ace]


def _load() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="10^5 predictions x 10 / 100 classes (seconds)")
  parser.add_argument("--chunk", type=int, default=None,
                      help="probabilities per row chunk (default 2 * 10^6, --quick 2 * 10^5)")
  args = parser.parse_args()
  if args.quick:
    sizes = [(10**5, 10), (10**5, 100)]
  else:
    sizes = [(n, k) for n in (10**6, 10**7) for k in (10, 100, 1000)]
  chunk = args.chunk or (2 * 10**5 if args.quick else 2 * 10**6)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s)), "
        f"numpy {np.__version__}; {N_BINS} bins; chunks of {chunk} probabilities; times in seconds; "
        f"generation time is excluded from the calibjax and numpy times and reported separately", flush=True)
  print(f"load average before: {_load()}", flush=True)
  rows = []
  for n, k in sizes:
    start = time.perf_counter()
    cell_rows = Cell(n, k, chunk).run()
    for row in cell_rows:
      print(f"  N = {n:.0e}, K = {k}, {row['metric']}: calibjax {row['ours']:.3f}, numpy "
            f"{row['reference']:.3f}, |diff| {row['diff']:.1e}", flush=True)
    print(f"cell N = {n:.0e}, K = {k} done in {time.perf_counter() - start:.0f} s; load average {_load()}",
          flush=True)
    rows += [(n, k, row) for row in cell_rows]
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"\nload average after: {_load()}; peak resident memory {peak:.2f} GiB\n")
  print("| N | K | metrics | first call | calibjax | numpy | numpy / calibjax | abs. diff | generation "
        "(untimed) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for n, k, row in rows:
    print(f"| {n:.0e} | {k} | {row['metric']} | {row['first']:.2f} | {row['ours']:.3f} | "
          f"{row['reference']:.3f} | {row['reference'] / row['ours']:.2f} | {row['diff']:.1e} | "
          f"{row['generation']:.1f} |")


if __name__ == "__main__":
  main()
