"""Split-conformal prediction sets: THR (LAC), APS and RAPS, calibrated on held-out data, with the finite-sample
quantile correction.

Conventions. `probs` (N, K) are softmax probabilities (of logits / T when a calibrator's T is used), `labels` (N,)
int. A method gives each (example, class) a non-conformity score s(x, k); calibration takes the scores of the n
calibration examples at their true class and the threshold q = their ceil((n + 1)(1 - alpha))-th smallest value
(q = +inf when that rank exceeds n: every class is then in every set); the prediction set of x is
{k : s(x, k) <= q}. For exchangeable calibration and test data, P(y in set) >= 1 - alpha (and, for the
randomised APS / RAPS, <= 1 - alpha + 1/(n + 1)).

  * "thr" (LAC, Sadinle et al. 2019): s(x, k) = 1 - p_k.
  * "aps" (Romano et al. 2020): with the classes sorted by decreasing p (ties by index), s(x, k) = the mass of the
    classes ranked above k + u p_k, u ~ U(0, 1) per example (u = 1 when `randomized=False`).
  * "raps" (Angelopoulos et al. 2021): APS's score + lam · max(0, rank(k) - k_reg) with rank 1-based; lam = 0 is
    APS. Defaults lam = 0.01, k_reg = 5 (the paper's ImageNet choices; they matter little with few classes).
The uniform draws come from `key` (one per example) and are the same for every class of an example.
"""

import jax
import jax.numpy as jnp

from calibjax.calibration.metrics import InvalidInputError

METHODS = ("thr", "aps", "raps")


def class_scores(*, probs: jax.Array, method: str, key: jax.Array | None = None, randomized: bool = True,
                 lam: float = 0.01, k_reg: int = 5) -> jax.Array:
  """(N, K) non-conformity scores s(x, k) of every class (module docstring)."""
  probs = jnp.asarray(probs, jnp.promote_types(jnp.asarray(probs).dtype, jnp.float32))
  if method == "thr":
    return 1 - probs
  if method not in METHODS:
    raise InvalidInputError(f"unknown conformal method '{method}'; choose one of: {', '.join(METHODS)}")
  if randomized and key is None:
    raise InvalidInputError("randomised APS / RAPS need a key")
  order = jnp.argsort(-probs, axis=-1, stable=True)
  sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
  above = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass ranked strictly above each position
  u = (jax.random.uniform(key, probs.shape[:1], probs.dtype) if randomized else jnp.ones(probs.shape[:1], probs.dtype))
  sorted_scores = above + u[:, None] * sorted_probs
  if method == "raps":
    rank = jnp.arange(1, probs.shape[-1] + 1, dtype=probs.dtype)
    sorted_scores = sorted_scores + lam * jnp.maximum(0, rank - k_reg)
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(sorted_scores, inverse, axis=-1)


def threshold(*, scores: jax.Array, alpha: float) -> jax.Array:
  """The conformal threshold of calibration scores `scores` (n,) at their true class: the ceil((n+1)(1-alpha))-th
  smallest, +inf when that rank exceeds n."""
  if not 0 < alpha < 1:
    raise InvalidInputError(f"alpha must be in (0, 1), got {alpha}")
  n = scores.shape[0]
  rank = int(jnp.ceil((n + 1) * (1 - alpha) - 1e-9))
  if rank > n:
    return jnp.asarray(jnp.inf, scores.dtype)
  return jnp.sort(scores)[rank - 1]


def calibrate_and_predict(*, cal_probs: jax.Array, cal_labels: jax.Array, test_probs: jax.Array, method: str,
                          alpha: float = 0.1, key: jax.Array | None = None, **options) -> tuple[jax.Array, jax.Array]:
  """(q, test prediction sets (N_test, K) bool) of `method` calibrated on (cal_probs, cal_labels)."""
  cal_key, test_key = jax.random.split(key) if key is not None else (None, None)
  cal = class_scores(probs=cal_probs, method=method, key=cal_key, **options)
  q = threshold(scores=jnp.take_along_axis(cal, jnp.asarray(cal_labels)[:, None], axis=-1)[:, 0], alpha=alpha)
  return q, class_scores(probs=test_probs, method=method, key=test_key, **options) <= q


def set_report(*, sets: jax.Array, labels: jax.Array) -> dict:
  """Empirical coverage (true class in the set), mean set size and the share of empty sets, as floats."""
  covered = jnp.take_along_axis(sets, jnp.asarray(labels)[:, None], axis=-1)[:, 0]
  sizes = jnp.sum(sets, axis=-1)
  return {"coverage": float(jnp.mean(covered)), "mean_size": float(jnp.mean(sizes)),
          "empty": float(jnp.mean(sizes == 0))}
