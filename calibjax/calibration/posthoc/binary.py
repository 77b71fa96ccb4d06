"""Binary calibrators: Platt scaling and beta calibration.

Input convention: `logits` are either (N,) scores s = log-odds of class 1, or (N, 2) logits, reduced to
s = z_1 - z_0. `labels` are integers in {0, 1}. Every `apply_*` returns calibrated **probabilities** of shape
(N, 2), columns [P(y = 0), P(y = 1)], so binary calibrators are scored like the multiclass ones.

- Platt scaling (Platt 1999): P(y = 1) = sigmoid(a s + b), from a = 1, b = 0. With `platt_targets=True`
  (default, as Platt and scikit-learn) the 0/1 targets are replaced by 1/(N_- + 2) and (N_+ + 1)/(N_+ + 2),
  which keeps a separable validation set from driving a to infinity.
- Beta calibration (Kull, Silva Filho and Flach, AISTATS 2017), three-parameter version:
  logit P(y = 1) = a ln q - b ln(1 - q) + c with q = sigmoid(s), from a = b = 1, c = 0 (the identity). The
  paper requires a, b >= 0: a coefficient that comes out negative is fixed to 0 and the rest refitted.

Fits: optax L-BFGS with a zoom line search on the mean binary cross-entropy until the max-abs gradient is
<= `tol` (default 1e-6) or `max_iter` iterations.
"""

import jax
import jax.numpy as jnp

from calibjax.calibration.posthoc.temperature import FitInfo, _as_float, _minimize
from calibjax.errors import ConfigError


def _scores(logits: jax.typing.ArrayLike) -> jax.Array:
  logits = _as_float(logits)
  if logits.ndim == 1:
    return logits
  if logits.ndim == 2 and logits.shape[-1] == 2:
    return logits[:, 1] - logits[:, 0]
  raise ConfigError(f"binary calibrators need (N,) log-odds or (N, 2) logits, got shape {logits.shape}")


def _bce(log_odds: jax.Array, targets: jax.Array) -> jax.Array:
  return -jnp.mean(targets * jax.nn.log_sigmoid(log_odds) + (1 - targets) * jax.nn.log_sigmoid(-log_odds))


def _two_column_probs(log_odds: jax.Array) -> jax.Array:
  return jnp.stack([jax.nn.sigmoid(-log_odds), jax.nn.sigmoid(log_odds)], axis=-1)


@jax.jit(static_argnames=("max_iter",))
def _fit_platt(s, labels, tol, platt_targets, *, max_iter):
  y = labels.astype(s.dtype)
  n_pos = jnp.sum(y)
  smoothed = jnp.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (y.shape[0] - n_pos + 2))
  y = jnp.where(platt_targets, smoothed, y)
  return _minimize(lambda p: _bce(p[0] * s + p[1], y), jnp.array([1.0, 0.0], s.dtype), tol=tol,
                   max_iter=max_iter)


def fit_platt(*, logits: jax.Array, labels: jax.Array, platt_targets: bool = True, tol: float = 1e-6,
              max_iter: int = 200, return_info: bool = False) -> dict | tuple[dict, FitInfo]:
  """Fits Platt scaling P(y = 1) = sigmoid(a s + b).

  Args:
    logits: (N,) log-odds or (N, 2) logits.
    labels: (N,) labels in {0, 1}.
    platt_targets: use Platt's smoothed targets instead of 0/1.
    tol: max-abs gradient tolerance.
    max_iter: iteration cap.
    return_info: also return a `FitInfo`.

  Returns:
    params `{"a": (), "b": ()}` (or (params, FitInfo)).
  """
  p, info = _fit_platt(_scores(logits), jnp.asarray(labels), tol, platt_targets, max_iter=max_iter)
  params = {"a": p[0], "b": p[1]}
  return (params, info) if return_info else params


@jax.jit
def apply_platt(params: dict, logits: jax.Array) -> jax.Array:
  """Returns calibrated probabilities (N, 2) of Platt scaling."""
  return _two_column_probs(params["a"] * _scores(logits) + params["b"])


def _beta_features(s: jax.Array) -> jax.Array:
  # [ln q, -ln(1 - q)] computed from the log-odds, so q = 0 or 1 never produces -inf.
  return jnp.stack([jax.nn.log_sigmoid(s), -jax.nn.log_sigmoid(-s)], axis=-1)


@jax.jit(static_argnames=("max_iter",))
def _fit_beta(s, labels, tol, *, max_iter):
  features = _beta_features(s)
  y = labels.astype(s.dtype)

  def stage(carry, _):
    # Stage 1 fits freely (the start a = b = 1 keeps both features); stage 2 pins a negative coefficient
    # to 0 and refits the rest (a no-op restart when both are >= 0). One traced body, so one compile.
    p, keep = carry
    keep = keep * (p[:2] >= 0)

    def objective(q):
      return _bce(features @ (q[:2] * keep) + q[2], y)

    p, info = _minimize(objective, p.at[:2].max(0.0), tol=tol, max_iter=max_iter)
    return (p.at[:2].multiply(keep), keep), info

  (p, _), infos = jax.lax.scan(stage, (jnp.array([1.0, 1.0, 0.0], s.dtype), jnp.ones((2,), s.dtype)),
                               length=2)
  return p, jax.tree.map(lambda leaf: leaf[-1], infos)


def fit_beta(*, logits: jax.Array, labels: jax.Array, tol: float = 1e-6, max_iter: int = 200,
             return_info: bool = False) -> dict | tuple[dict, FitInfo]:
  """Fits three-parameter beta calibration logit P(y = 1) = a ln q - b ln(1 - q) + c, with a, b >= 0.

  Args:
    logits: (N,) log-odds or (N, 2) logits; q = sigmoid(log-odds).
    labels: (N,) labels in {0, 1}.
    tol: max-abs gradient tolerance (of the final, possibly constrained, fit).
    max_iter: iteration cap of each of the two fits.
    return_info: also return the final fit's `FitInfo`.

  Returns:
    params `{"a": (), "b": (), "c": ()}` (or (params, FitInfo)).
  """
  p, info = _fit_beta(_scores(logits), jnp.asarray(labels), tol, max_iter=max_iter)
  params = {"a": p[0], "b": p[1], "c": p[2]}
  return (params, info) if return_info else params


@jax.jit
def apply_beta(params: dict, logits: jax.Array) -> jax.Array:
  """Returns calibrated probabilities (N, 2) of beta calibration."""
  coef = jnp.stack([params["a"], params["b"]])
  return _two_column_probs(_beta_features(_scores(logits)) @ coef + params["c"])
