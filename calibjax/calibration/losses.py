"""Train-time calibration losses: label smoothing, focal, FLSD-53, AdaFocal, MMCE, MDCA, DCA, LogitNorm, MbLS,
ACLS and CPC.

Conventions shared by every loss here:

  * `logits` is (B, K). `labels` is either integer class indices (B,) or a target distribution (B, K)
    (one-hot, smoothed or mixed). Every per-sample loss is *linear in the target*: with a distribution y it is
    sum_k y_k * l_k, where l_k is the value the sample would have with the hard label k. One-hot targets
    therefore reproduce the integer-label values exactly, and a mixup target lam * e_a + (1 - lam) * e_b gives
    lam * l_a + (1 - lam) * l_b. For MMCE and DCA, "correct" becomes the target mass on the predicted class.
  * Half-precision logits are promoted to float32 before the softmax.
  * `reduction` is "mean" (over the batch), "sum" or "none" (per-sample values, shape (B,)).
  * MMCE, MDCA and DCA are batch statistics (one number per mini-batch; there is no per-sample value). The
    combined losses add beta * R to every per-sample term, so "none" gives base_i + beta * R, "mean" gives
    mean(base) + beta * R and "sum" gives sum(base) + B * beta * R (sum = B * mean in every case).
  * p = softmax(logits) and p_t is the probability of the target class.

`make_loss(name, **hparams)` binds the hyperparameters of a registered loss and returns the
`(logits, labels, state=None) -> scalar` function the training step calls.
"""

import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from calibjax.errors import ConfigError
from calibjax.registry import Registry

_REDUCTIONS = ("mean", "sum", "none")
# The reference AdaFocal adds 1e-20 to the focal base; a floor has the same value in float32/float64 (1 - p is
# either 0 or >= 6e-8 there) and keeps the gradient of base**gamma finite for 0 < gamma < 1 when p_t rounds
# to 1.
_FOCAL_FLOOR = 1e-20
# FLSD-53 (Mukhoti et al. 2020, torrvision/focal_calibration): gamma 5 below p_t = 0.2, gamma 3 below 0.5.
_FLSD_THRESHOLDS = ((0.2, 5.0), (0.5, 3.0))


def _prepare(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Promotes the logits to at least float32 and turns `labels` into (B, K) targets of the same dtype."""
  logits = jnp.asarray(logits)
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  labels = jnp.asarray(labels)
  if logits.ndim != 2:
    raise ConfigError(f"logits must have shape (batch, classes); got {logits.shape}")
  if labels.shape == logits.shape:
    return logits, labels.astype(logits.dtype)
  if labels.shape == logits.shape[:1] and jnp.issubdtype(labels.dtype, jnp.integer):
    return logits, jax.nn.one_hot(labels, logits.shape[1], dtype=logits.dtype)
  raise ConfigError(f"labels of shape {labels.shape} ({labels.dtype}) do not fit logits {logits.shape}; "
                    "pass integer labels (B,) or targets (B, K)")


def apply_reduction(values: jax.Array, reduction: str) -> jax.Array:
  """Per-sample `values` reduced by "mean", "sum" or "none" (the `reduction` switch every loss takes)."""
  if reduction == "mean":
    return jnp.mean(values)
  if reduction == "sum":
    return jnp.sum(values)
  if reduction == "none":
    return values
  raise ConfigError(f"unknown reduction '{reduction}'; choose one of: {', '.join(_REDUCTIONS)}")


def _with_batch_term(per_sample: jax.Array, term: jax.Array, reduction: str) -> jax.Array:
  """Adds a batch-level regulariser to every per-sample value, then reduces (see the module docstring)."""
  return apply_reduction(per_sample + term, reduction)


def _top1(probs: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Top-1 confidence (B,) and correctness (B,): the target mass on the argmax class (0/1 for hard labels)."""
  pred = jnp.argmax(probs, axis=-1)
  confidence = jnp.max(probs, axis=-1)
  correct = jnp.take_along_axis(targets, pred[:, None], axis=-1)[:, 0]
  return confidence, correct


def _focal_terms(log_probs: jax.Array, targets: jax.Array, gamma: jax.Array | float) -> jax.Array:
  """Per-sample -sum_k y_k (1 - sign(g_k) p_k)^|g_k| log p_k; `gamma` is a scalar or (B, K).

  gamma > 0 is the focal loss, gamma = 0 cross-entropy and gamma < 0 the inverse focal loss (1 + p)^|gamma|
  of AdaFocal; one expression serves all three.
  """
  probs = jnp.exp(log_probs)
  base = jnp.maximum(1.0 - jnp.sign(gamma) * probs, _FOCAL_FLOOR)
  return -jnp.sum(targets * base**jnp.abs(gamma) * log_probs, axis=-1)


def cross_entropy(*, logits: jax.Array, labels: jax.Array, reduction: str = "mean") -> jax.Array:
  """Softmax cross-entropy -sum_k y_k log p_k.

  Args:
    logits: (B, K).
    labels: integer (B,) or targets (B, K).
    reduction: "mean" | "sum" | "none".

  Returns:
    A scalar, or (B,) for reduction="none".
  """
  logits, targets = _prepare(logits, labels)
  return apply_reduction(-jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1), reduction)


def label_smoothing_ce(*, logits: jax.Array, labels: jax.Array, alpha: float = 0.1, form: str = "uniform",
                       reduction: str = "mean") -> jax.Array:
  """Cross-entropy against smoothed targets (Szegedy et al. 2016).

  Two forms are in use and change the numbers, so the form is explicit:
    * "uniform": (1 - alpha) y + alpha / K, alpha/K on every class including the target (optax
      `smooth_labels`, the standard form).
    * "others": 1 - alpha on the target and alpha / (K - 1) on every other class (CalibrationXferViaKD
      `LabelSmoothingLoss`); for a target distribution y it is (1 - alpha) y + alpha / (K - 1) (1 - y).

  Args:
    logits: (B, K).
    labels: integer (B,) or targets (B, K).
    alpha: smoothing mass in [0, 1].
    form: "uniform" | "others".
    reduction: "mean" | "sum" | "none".

  Returns:
    A scalar, or (B,) for reduction="none".
  """
  logits, targets = _prepare(logits, labels)
  num_classes = logits.shape[-1]
  if form == "uniform":
    smoothed = optax.smooth_labels(targets, alpha)
  elif form == "others":
    smoothed = (1.0 - alpha) * targets + alpha / (num_classes - 1) * (1.0 - targets)
  else:
    raise ConfigError(f"unknown label-smoothing form '{form}'; choose 'uniform' (alpha/K) or 'others' "
                      "(alpha/(K-1))")
  return cross_entropy(logits=logits, labels=smoothed, reduction=reduction)


def focal(*, logits: jax.Array, labels: jax.Array, gamma: float = 1.0, reduction: str = "mean") -> jax.Array:
  """Focal loss -(1 - p_t)^gamma log p_t (Lin et al. 2017; for calibration Mukhoti et al. 2020).

  CalibrationXferViaKD averages over the batch ("mean"); torrvision/focal_calibration sums.

  Args:
    logits: (B, K).
    labels: integer (B,) or targets (B, K).
    gamma: focusing parameter >= 0; 0 is cross-entropy.
    reduction: "mean" | "sum" | "none".

  Returns:
    A scalar, or (B,) for reduction="none".
  """
  logits, targets = _prepare(logits, labels)
  return apply_reduction(_focal_terms(jax.nn.log_softmax(logits), targets, gamma), reduction)


def flsd53_gamma(probs: jax.Array, *, gamma: float = 3.0) -> jax.Array:
  """FLSD-53's sample-dependent gamma: 5 if p < 0.2, 3 if 0.2 <= p < 0.5, else `gamma`.

  Args:
    probs: probabilities of any shape.
    gamma: the gamma used for p >= 0.5 (3 in FLSD-53).

  Returns:
    Gammas of the shape of `probs`.
  """
  result = jnp.full(probs.shape, gamma, dtype=jnp.result_type(probs.dtype, jnp.float32))
  for threshold, value in reversed(_FLSD_THRESHOLDS):
    result = jnp.where(probs < threshold, value, result)
  return result


def flsd53(*, logits: jax.Array, labels: jax.Array, gamma: float = 3.0, reduction: str = "mean") -> jax.Array:
  """Sample-dependent focal loss FLSD-53 (Mukhoti et al. 2020): focal with gamma = `flsd53_gamma(p_t)`.

  The references (torrvision/focal_calibration `FocalLossAdaptive`, CalibrationXferViaKD `FLSD`) sum over the
  batch; pass reduction="sum" to reproduce their scale.

  Args:
    logits: (B, K).
    labels: integer (B,) or targets (B, K) (each class k uses the gamma of its own p_k).
    gamma: gamma for p_t >= 0.5.
    reduction: "mean" | "sum" | "none".

  Returns:
    A scalar, or (B,) for reduction="none".
  """
  logits, targets = _prepare(logits, labels)
  log_probs = jax.nn.log_softmax(logits)
  gammas = flsd53_gamma(jnp.exp(log_probs), gamma=gamma)
  return apply_reduction(_focal_terms(log_probs, targets, gammas), reduction)


class AdaFocalState(NamedTuple):
  """AdaFocal's per-bin gammas and the bin edges they belong to.

  Attributes:
    gammas: (n_bins,) float32; negative values select the inverse focal loss.
    edges: (n_bins + 1,) float32, non-decreasing; bin b is [edges[b], edges[b + 1]) when looking up a gamma,
      with everything below edges[1] in bin 0 and everything at or above edges[-2] in the last bin.
  """
  gammas: jax.Array
  edges: jax.Array


def adafocal_init(n_bins: int = 15, gamma_init: float = 1.0) -> AdaFocalState:
  """Initial AdaFocal state (Ghosh et al. 2022): equal-width bins on [0, 1], every gamma = `gamma_init`.

  Args:
    n_bins: number of bins (15 in the reference).
    gamma_init: initial gamma (1.0 in the reference).

  Returns:
    An `AdaFocalState`.
  """
  return AdaFocalState(gammas=jnp.full((n_bins,), gamma_init, jnp.float32),
                       edges=jnp.linspace(0.0, 1.0, n_bins + 1, dtype=jnp.float32))


def adafocal_bin_index(probs: jax.Array, edges: jax.Array) -> jax.Array:
  """Bin of each probability under AdaFocal's lookup rule: [lo, hi), first and last bins open-ended.

  Args:
    probs: probabilities of any shape.
    edges: (n_bins + 1,) non-decreasing edges.

  Returns:
    int32 bin indices in [0, n_bins - 1], shape of `probs`. Empty bins (repeated edges) are skipped as in
    the reference's first-match scan.
  """
  return jnp.sum(probs[..., None] >= edges[1:-1], axis=-1, dtype=jnp.int32)


def _equal_mass_calibration_gaps(confidence: jax.Array, correct: jax.Array,
                                 n_bins: int) -> tuple[jax.Array, jax.Array]:
  """Equal-mass edges and per-bin gaps mean(confidence) - accuracy, as adaECE_error_mukhoti computes them.

  Edges interpolate the sorted confidences at n_bins + 1 equally spaced ranks (numpy `histogram` with
  `interp` edges); membership is (lo, hi], so a sample equal to the smallest confidence lies in no bin (the
  reference's quirk); an empty bin has gap 0.
  """
  n = confidence.shape[0]
  positions = jnp.linspace(0.0, n, n_bins + 1)
  edges = jnp.interp(positions, jnp.arange(n, dtype=confidence.dtype), jnp.sort(confidence))
  member = (confidence[:, None] > edges[None, :-1]) & (confidence[:, None] <= edges[None, 1:])
  member = member.astype(confidence.dtype)
  count = jnp.sum(member, axis=0)
  safe = jnp.maximum(count, 1.0)
  gaps = jnp.where(count > 0, (confidence @ member - correct @ member) / safe, 0.0)
  return edges, gaps


def adafocal_update(state: AdaFocalState, *, val_logits: jax.Array, val_labels: jax.Array, lam: float = 1.0,
                    switch: float = 0.2, gamma_min: float = -2.0, gamma_max: float = 20.0) -> AdaFocalState:
  """One AdaFocal gamma update from validation predictions (official 3mcloud/adafocal; end of each epoch).

  Bins are 15 (or `len(state.gammas)`) equal-mass bins of the validation top-1 confidence; with
  gap_b = mean confidence - accuracy in bin b:
    gamma_b <- gamma_b * exp(lam * gap_b) if gamma_b > 0 else gamma_b * exp(-lam * gap_b);
    if |gamma_b| < switch: gamma_b <- -switch if gamma_b > 0 else +switch (focal <-> inverse focal);
    gamma_b <- clip(gamma_b, gamma_min, gamma_max).
  The new edges replace the old ones for the lookup in `adafocal`.

  Args:
    state: current `AdaFocalState`.
    val_logits: (N, K) validation logits.
    val_labels: (N,) integer validation labels (or (N, K) targets; accuracy is then the target mass on the
      predicted class).
    lam: update rate lambda (1.0 in the reference).
    switch: focal/inverse-focal switch point (0.2).
    gamma_min: lower clip (-2).
    gamma_max: upper clip (20).

  Returns:
    The updated `AdaFocalState`. Jittable; N is static.
  """
  logits, targets = _prepare(val_logits, val_labels)
  confidence, correct = _top1(jax.nn.softmax(logits), targets)
  edges, gaps = _equal_mass_calibration_gaps(confidence, correct, state.gammas.shape[0])
  gammas = state.gammas
  gammas = gammas * jnp.exp(jnp.where(gammas > 0, lam, -lam) * gaps)
  gammas = jnp.where(jnp.abs(gammas) < switch, jnp.where(gammas > 0, -switch, switch), gammas)
  gammas = jnp.clip(gammas, gamma_min, gamma_max)
  return AdaFocalState(gammas=gammas.astype(state.gammas.dtype), edges=edges.astype(state.edges.dtype))


def adafocal(*, logits: jax.Array, labels: jax.Array, state: AdaFocalState,
             reduction: str = "sum") -> jax.Array:
  """AdaFocal loss (Ghosh et al., NeurIPS 2022): focal with a gamma per bin of p_t.

  Each sample's gamma is `state.gammas[adafocal_bin_index(p_t, state.edges)]` -- looked up by the TRUE-class
  probability p_t, while `adafocal_update` bins the validation TOP-1 confidence, as in the reference. The
  per-sample term is -(1 - sign(gamma) p_t)^|gamma| log p_t: the focal loss for gamma > 0 and the inverse
  focal loss (1 + p_t)^|gamma| for gamma < 0.

  The default reduction is "sum", the official implementation's; `make_loss` uses "mean" unless told
  otherwise.

  Args:
    logits: (B, K).
    labels: integer (B,) or targets (B, K) (each class k uses the gamma of the bin of its own p_k).
    state: `AdaFocalState` from `adafocal_init` / `adafocal_update`.
    reduction: "sum" | "mean" | "none".

  Returns:
    A scalar, or (B,) for reduction="none".
  """
  logits, targets = _prepare(logits, labels)
  log_probs = jax.nn.log_softmax(logits)
  gammas = state.gammas[adafocal_bin_index(jnp.exp(log_probs), state.edges)]
  return apply_reduction(_focal_terms(log_probs, targets, gammas), reduction)


def mmce_weighted(*, logits: jax.Array, labels: jax.Array, width: float = 0.4) -> jax.Array:
  """Weighted MMCE (Kumar et al., ICML 2018) as implemented in torrvision/focal_calibration `MMCE_weighted`.

  With top-1 confidences r, correctness c (m correct and n incorrect samples in the batch), the Laplacian
  kernel k(r, r') = exp(-|r - r'| / width), a_i = c_i (1 - r_i) and b_i = (1 - c_i) r_i:

    MMD^2 = a'Ka / (m^2 (m^2 + 1e-5)) + b'Kb / (n^2 (n^2 + 1e-5)) - 2 a'Kb / (m n (m n + 1e-5)),
    MMCE_w = sqrt(MMD^2 + 1e-10), and 0 when the batch is all correct or all incorrect.

  The extra 1/m^2, 1/n^2, 1/(mn) factors are the reference's quirk (a `mean` over the pair matrix inside each
  sum before dividing by m^2 + 1e-5 again); they are reproduced because the reference beta = 2 is tuned to
  them. MMD^2 is clamped at 0 before the square root (the reference would return NaN for a slightly
  negative value).

  Args:
    logits: (B, K).
    labels: integer (B,) or targets (B, K) (c_i is then the target mass on the predicted class).
    width: kernel width (0.4).

  Returns:
    A scalar (a batch statistic).
  """
  logits, targets = _prepare(logits, labels)
  confidence, correct = _top1(jax.nn.softmax(logits), targets)
  kernel = jnp.exp(-jnp.abs(confidence[:, None] - confidence[None, :]) / width)
  a = correct * (1.0 - confidence)
  b = (1.0 - correct) * confidence
  m, n = jnp.sum(correct), jnp.sum(1.0 - correct)
  valid = (m > 0) & (n > 0)
  m, n = jnp.where(valid, m, 1.0), jnp.where(valid, n, 1.0)
  mmd2 = (a @ kernel @ a / (m**2 * (m**2 + 1e-5)) + b @ kernel @ b / (n**2 * (n**2 + 1e-5))
          - 2.0 * (a @ kernel @ b) / (m * n * (m * n + 1e-5)))
  return jnp.where(valid, jnp.sqrt(jnp.maximum(mmd2, 0.0) + 1e-10), 0.0)


def ce_mmce(*, logits: jax.Array, labels: jax.Array, beta: float = 2.0, reduction: str = "mean") -> jax.Array:
  """Cross-entropy + beta * `mmce_weighted` (CalibrationXferViaKD `MMCE`, default beta = 2).

  Args:
    logits: (B, K).
    labels: integer (B,) or targets (B, K).
    beta: weight of the MMCE term.
    reduction: "mean" | "sum" | "none" (batch term convention in the module docstring).

  Returns:
    A scalar, or (B,) for reduction="none".
  """
  ce = cross_entropy(logits=logits, labels=labels, reduction="none")
  return _with_batch_term(ce, beta * mmce_weighted(logits=logits, labels=labels), reduction)


def mdca(*, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Multi-class difference of confidence and accuracy (Hebbalaguppe et al., CVPR 2022).

  (1/K) sum_c |mean_i p_ic - mean_i y_ic| over the mini-batch, y the one-hot (or soft) targets.

  Args:
    logits: (B, K).
    labels: integer (B,) or targets (B, K).

  Returns:
    A scalar (a batch statistic).
  """
  logits, targets = _prepare(logits, labels)
  return jnp.mean(jnp.abs(jnp.mean(jax.nn.softmax(logits), axis=0) - jnp.mean(targets, axis=0)))


def ce_mdca(*, logits: jax.Array, labels: jax.Array, beta: float = 1.0, reduction: str = "mean") -> jax.Array:
  """Cross-entropy + beta * `mdca` (CalibrationXferViaKD "NLL+MDCA", default beta = 1).

  Args:
    logits: (B, K).
    labels: integer (B,) or targets (B, K).
    beta: weight of the MDCA term.
    reduction: "mean" | "sum" | "none" (batch term convention in the module docstring).

  Returns:
    A scalar, or (B,) for reduction="none".
  """
  ce = cross_entropy(logits=logits, labels=labels, reduction="none")
  return _with_batch_term(ce, beta * mdca(logits=logits, labels=labels), reduction)


def focal_mdca(*, logits: jax.Array, labels: jax.Array, gamma: float = 1.0, beta: float = 1.0,
               reduction: str = "mean") -> jax.Array:
  """Focal + beta * `mdca` (CalibrationXferViaKD "FL+MDCA"; defaults gamma = beta = 1, its scripts use 3, 1).

  Args:
    logits: (B, K).
    labels: integer (B,) or targets (B, K).
    gamma: focal gamma.
    beta: weight of the MDCA term.
    reduction: "mean" | "sum" | "none" (batch term convention in the module docstring).

  Returns:
    A scalar, or (B,) for reduction="none".
  """
  fl = focal(logits=logits, labels=labels, gamma=gamma, reduction="none")
  return _with_batch_term(fl, beta * mdca(logits=logits, labels=labels), reduction)


def dca(*, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Difference between confidence and accuracy (Liang et al. 2020): |mean top-1 confidence - accuracy|.

  Args:
    logits: (B, K).
    labels: integer (B,) or targets (B, K) (accuracy is then the target mass on the predicted class).

  Returns:
    A scalar (a batch statistic).
  """
  logits, targets = _prepare(logits, labels)
  confidence, correct = _top1(jax.nn.softmax(logits), targets)
  return jnp.abs(jnp.mean(confidence) - jnp.mean(correct))


def ce_dca(*, logits: jax.Array, labels: jax.Array, beta: float = 1.0, reduction: str = "mean") -> jax.Array:
  """Cross-entropy + beta * `dca` (CalibrationXferViaKD `DCA`, default beta = 1).

  Args:
    logits: (B, K).
    labels: integer (B,) or targets (B, K).
    beta: weight of the DCA term.
    reduction: "mean" | "sum" | "none" (batch term convention in the module docstring).

  Returns:
    A scalar, or (B,) for reduction="none".
  """
  ce = cross_entropy(logits=logits, labels=labels, reduction="none")
  return _with_batch_term(ce, beta * dca(logits=logits, labels=labels), reduction)


def logit_norm_ce(*, logits: jax.Array, labels: jax.Array, tau: float = 0.04,
                  reduction: str = "mean") -> jax.Array:
  """LogitNorm (Wei et al., ICML 2022): cross-entropy on logits / (tau * (||logits||_2 + 1e-7)).

  The 1e-7 follows hongxin001/logitnorm_ood and keeps all-zero logits finite.

  Args:
    logits: (B, K).
    labels: integer (B,) or targets (B, K).
    tau: temperature (0.04 for CIFAR-10 in the paper).
    reduction: "mean" | "sum" | "none".

  Returns:
    A scalar, or (B,) for reduction="none".
  """
  logits, targets = _prepare(logits, labels)
  squared = jnp.sum(logits**2, axis=-1, keepdims=True)
  # The double `where` gives all-zero logits a zero gradient instead of the NaN of d||z||/dz at z = 0.
  norms = jnp.where(squared > 0, jnp.sqrt(jnp.where(squared > 0, squared, 1.0)), 0.0) + 1e-7
  return cross_entropy(logits=logits / (tau * norms), labels=targets, reduction=reduction)


def margin_ls(*, logits: jax.Array, labels: jax.Array, margin: float = 10.0, alpha: float = 0.1,
              reduction: str = "mean") -> jax.Array:
  """Margin-based label smoothing, MbLS (Liu et al., CVPR 2022): cross-entropy plus a linear penalty on logit
  distances to the max logit beyond a margin.

  Per sample: CE + alpha * (1/K) sum_k max(0, max_j z_j - z_k - margin) (the reference averages the penalty over
  the batch and the K classes; defaults margin 10, alpha 0.1 as its CIFAR runs). The gradient flows through the
  max logit too (it is not detached).

  Args:
    logits: (B, K).
    labels: integer (B,) or targets (B, K) (the penalty does not depend on them).
    margin: the logit distance allowed without penalty.
    alpha: weight of the penalty.
    reduction: "mean" | "sum" | "none".

  Returns:
    A scalar, or (B,) for reduction="none".
  """
  logits, targets = _prepare(logits, labels)
  distances = jnp.max(logits, axis=-1, keepdims=True) - logits
  penalty = jnp.mean(jax.nn.relu(distances - margin), axis=-1)
  return apply_reduction(cross_entropy(logits=logits, labels=targets, reduction="none") + alpha * penalty,
                         reduction)


def acls(*, logits: jax.Array, labels: jax.Array, margin: float = 10.0, alpha: float = 0.1, pos_lambda: float = 1.0,
         neg_lambda: float = 0.1, reduction: str = "mean") -> jax.Array:
  """Adaptive and conditional label smoothing, ACLS (Park et al., ICCV 2023): cross-entropy plus alpha times a
  squared-hinge regulariser that treats the predicted class and the others apart.

  Per sample, with z* = max_k z_k (the predicted class, indicator 1 where z_k equals it) and sg() a stopped
  gradient: pos = (1 / 1) * relu(z* - margin)^2 on the max logit (pulled down once above the margin) and
  neg = 1/(K-1) * sum over the other classes of relu(sg(z*) - z_k - margin)^2 (pulled up when further than the
  margin below the max, without moving the max); the loss is CE + alpha * (pos_lambda * pos + neg_lambda * neg).
  The reference normalises by B and B(K-1) over the batch, which is this per-sample form averaged. Defaults as
  the reference: margin 10, alpha 0.1, pos_lambda 1, neg_lambda 0.1.

  Args:
    logits: (B, K).
    labels: integer (B,) or targets (B, K) (the regulariser does not depend on them).
    margin, alpha, pos_lambda, neg_lambda: as above.
    reduction: "mean" | "sum" | "none".

  Returns:
    A scalar, or (B,) for reduction="none".
  """
  logits, targets = _prepare(logits, labels)
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  is_top = (jax.lax.stop_gradient(logits) == top).astype(logits.dtype)
  pos = jnp.sum(is_top * jax.nn.relu(logits - margin) ** 2, axis=-1)
  neg = jnp.sum((1 - is_top) * jax.nn.relu(top - logits - margin) ** 2, axis=-1) / (logits.shape[-1] - 1)
  regulariser = pos_lambda * pos + neg_lambda * neg
  return apply_reduction(cross_entropy(logits=logits, labels=targets, reduction="none") + alpha * regulariser,
                         reduction)


def cpc(*, logits: jax.Array, labels: jax.Array, lambda_bdc: float = 1.0, lambda_bec: float = 1.0,
        reduction: str = "mean") -> jax.Array:
  """Calibration by pairwise constraints, CPC (Cheng & Vasconcelos, CVPR 2022): cross-entropy plus binary
  discrimination and binary exclusion constraints on the logits.

  For a sample with label y and K classes: BDC = -1/(K-1) sum_{k != y} log sigmoid(z_y - z_k) (the true class
  beats each other one as a binary decision); BEC = -1/(2 (K-1)(K-2)) sum over ordered pairs (a, b) of classes
  other than y, a = b included, of log sigmoid(z_a - z_b) (no other class is singled out; the reference adds 1e-10
  inside, which changes log sigmoid by at most 5e-11, below float32's resolution of these sums). The loss is
  CE + lambda_bdc BDC + lambda_bec BEC, defaults 1 and 1 as the reference. With a target distribution each term is
  the target-weighted sum of its hard-label values (module convention); the exclusion sum for label k is the sum
  over all pairs minus the pairs that involve k.

  Args:
    logits: (B, K), K >= 3.
    labels: integer (B,) or targets (B, K).
    lambda_bdc, lambda_bec: weights of the two constraints.
    reduction: "mean" | "sum" | "none".

  Returns:
    A scalar, or (B,) for reduction="none".
  """
  logits, targets = _prepare(logits, labels)
  k = logits.shape[-1]
  if k < 3:
    raise ConfigError(f"cpc needs at least 3 classes (its exclusion term compares two non-target classes); got {k}")
  pairs = jax.nn.log_sigmoid(logits[:, :, None] - logits[:, None, :])  # (B, a, b): log sigmoid(z_a - z_b)
  # BDC for label c: the row c of `pairs` without its diagonal entry log sigmoid(0).
  bdc = -(jnp.sum(pairs, axis=-1) - jnp.log(0.5)) / (k - 1)
  total = jnp.sum(pairs, axis=(1, 2))
  without = total[:, None] - jnp.sum(pairs, axis=2) - jnp.sum(pairs, axis=1) + jnp.log(0.5)
  bec = -0.5 * without / ((k - 1) * (k - 2))
  per_label = -jax.nn.log_softmax(logits) + lambda_bdc * bdc + lambda_bec * bec
  return apply_reduction(jnp.sum(targets * per_label, axis=-1), reduction)


class Loss(NamedTuple):
  """A registered loss.

  Attributes:
    fn: the keyword-only loss function.
    defaults: its hyperparameters and their defaults (every keyword except logits, labels, state, reduction).
    stateful: True when `fn` takes a `state` that the training loop updates between epochs (AdaFocal).
  """
  fn: Callable[..., jax.Array]
  defaults: dict[str, Any]
  stateful: bool


LOSSES: Registry[Loss] = Registry("loss")
_NOT_HYPERPARAMETERS = ("logits", "labels", "state", "reduction")


def _register(name: str, fn: Callable[..., jax.Array]) -> None:
  params = inspect.signature(fn).parameters
  defaults = {k: p.default for k, p in params.items() if k not in _NOT_HYPERPARAMETERS}
  LOSSES.register(name)(Loss(fn=fn, defaults=defaults, stateful="state" in params))


for _name, _fn in (("ce", cross_entropy), ("label_smoothing", label_smoothing_ce), ("focal", focal),
                   ("flsd53", flsd53), ("adafocal", adafocal), ("mmce", ce_mmce), ("mdca", ce_mdca),
                   ("focal_mdca", focal_mdca), ("dca", ce_dca), ("logit_norm", logit_norm_ce), ("mbls", margin_ls),
                   ("acls", acls), ("cpc", cpc)):
  _register(_name, _fn)


def make_loss(name: str, **hparams: Any) -> Callable[..., jax.Array]:
  """Binds the hyperparameters of a registered loss.

  Args:
    name: a name in `LOSSES` ("ce", "label_smoothing", "focal", "flsd53", "adafocal", "mmce", "mdca",
      "focal_mdca", "dca", "logit_norm", "mbls", "acls", "cpc").
    **hparams: overrides of `LOSSES.get(name).defaults`, plus `reduction` ("mean", the default, or "sum";
      "sum" reproduces the official AdaFocal and FLSD scale).

  Returns:
    `loss(logits, labels, state=None) -> scalar`, jittable. Stateful losses (AdaFocal) require `state`
    (from `adafocal_init`, updated between epochs with `adafocal_update`); the others reject one.

  Raises:
    UnknownNameError: `name` is not registered.
    ConfigError: an unknown hyperparameter or reduction.
  """
  entry = LOSSES.get(name)
  allowed = sorted(entry.defaults) + ["reduction"]
  unknown = sorted(set(hparams) - set(allowed))
  if unknown:
    raise ConfigError(
        f"loss '{name}' has no hyperparameter {', '.join(unknown)}; allowed: {', '.join(allowed)}")
  reduction = hparams.pop("reduction", "mean")
  if reduction not in ("mean", "sum"):
    raise ConfigError(f"loss reduction must be 'mean' or 'sum' for training; got '{reduction}'")
  bound = functools.partial(entry.fn, **{**entry.defaults, **hparams}, reduction=reduction)

  def loss(logits: jax.Array, labels: jax.Array, state: Any = None) -> jax.Array:
    if entry.stateful != (state is not None):
      needs = "needs its state (adafocal_init, then adafocal_update each epoch)" if entry.stateful \
          else "takes no state; pass state=None"
      raise ConfigError(f"loss '{name}' {needs}")
    extra = {"state": state} if entry.stateful else {}
    return bound(logits=logits, labels=labels, **extra)

  return loss
