"""Vector scaling, matrix scaling and Dirichlet calibration: affine maps fitted by mean NLL.

- Vector scaling (Guo et al. 2017): calibrated logits = `logits * w + b`, w, b in R^C.
- Matrix scaling (Guo et al. 2017): calibrated logits = `logits @ W.T + b`, W in R^{C x C}.
- Dirichlet calibration (Kull et al., NeurIPS 2019): the matrix map applied to the log-probabilities,
  calibrated logits = `log_softmax(logits) @ W.T + b`.

All start from the identity map (w = 1 or W = I, b = 0), i.e. from the uncalibrated model, and are fitted by
optax L-BFGS with a zoom line search until the max-abs gradient of the (regularised) objective is <= `tol`
(default 1e-5) or `max_iter` iterations (see `temperature._minimize`). Every `apply_*` returns calibrated
**logits** (softmax gives the probabilities). Inputs: logits (N, C); labels (N,) integers or (N, C) soft
targets.

Regularisation of the matrix maps (Kull et al.'s ODIR, and plain L2 as their Dir-L2 baseline), both normalised
so that `reg_lambda` and `reg_mu` do not scale with C:

- `"odir"`: `reg_lambda * mean_{i != j} W_ij^2 + reg_mu * mean_j b_j^2` (off-diagonal and intercept only).
- `"l2"`:   `reg_lambda * mean_{i, j} W_ij^2 + reg_mu * mean_j b_j^2` (weight decay towards 0, diagonal too).

With `reg_lambda = reg_mu = 0` (default) the fit is unregularised.
"""

import jax
import jax.numpy as jnp

from calibjax.calibration.posthoc.temperature import FitInfo, _as_float, _mean_nll, _minimize
from calibjax.errors import ConfigError

REGULARIZATIONS = ("odir", "l2")


def _affine(params: dict, features: jax.Array) -> jax.Array:
  w, b = params["w"], params["b"]
  return (features * w if w.ndim == 1 else features @ w.T) + b


def _penalty(params: dict, odir: jax.Array, reg_lambda: jax.Array, reg_mu: jax.Array) -> jax.Array:
  w, b = params["w"], params["b"]
  k = b.shape[0]
  sq = jnp.square(w)
  # Both forms are cheap, so `odir` is a traced flag and switching it does not recompile.
  off_diagonal = (jnp.sum(sq) - jnp.sum(jnp.diagonal(sq))) / max(k * (k - 1), 1)
  return reg_lambda * jnp.where(odir, off_diagonal, jnp.mean(sq)) + reg_mu * jnp.mean(jnp.square(b))


@jax.jit(static_argnames=("diagonal", "max_iter"))
def _fit_affine(features, labels, odir, reg_lambda, reg_mu, tol, *, diagonal, max_iter):
  k = features.shape[-1]
  w0 = jnp.ones((k,), features.dtype) if diagonal else jnp.eye(k, dtype=features.dtype)
  params0 = {"w": w0, "b": jnp.zeros((k,), features.dtype)}

  def objective(params):
    loss = _mean_nll(_affine(params, features), labels)
    if diagonal:
      return loss
    return loss + _penalty(params, odir, reg_lambda, reg_mu)

  return _minimize(objective, params0, tol=tol, max_iter=max_iter)


def _fit(features, labels, *, diagonal, regularization, reg_lambda, reg_mu, tol, max_iter, return_info):
  if regularization not in REGULARIZATIONS:
    raise ConfigError(f"unknown regularization '{regularization}'; use one of {REGULARIZATIONS}")
  params, info = _fit_affine(features, jnp.asarray(labels), regularization == "odir", reg_lambda, reg_mu, tol,
                             diagonal=diagonal, max_iter=max_iter)
  return (params, info) if return_info else params


def fit_vector_scaling(*, logits: jax.Array, labels: jax.Array, tol: float = 1e-5, max_iter: int = 500,
                       return_info: bool = False) -> dict | tuple[dict, FitInfo]:
  """Fits vector scaling `logits * w + b` by mean NLL.

  Args:
    logits: (N, C) logits.
    labels: (N,) integer labels or (N, C) soft targets.
    tol: max-abs gradient tolerance.
    max_iter: iteration cap.
    return_info: also return a `FitInfo`.

  Returns:
    params `{"w": (C,), "b": (C,)}` (or (params, FitInfo)).
  """
  return _fit(_as_float(logits), labels, diagonal=True, regularization="odir", reg_lambda=0.0, reg_mu=0.0,
              tol=tol, max_iter=max_iter, return_info=return_info)


@jax.jit
def apply_vector_scaling(params: dict, logits: jax.Array) -> jax.Array:
  """Returns calibrated logits `logits * w + b` (N, C)."""
  return _affine(params, logits)


def fit_matrix_scaling(*, logits: jax.Array, labels: jax.Array, regularization: str = "odir",
                       reg_lambda: float = 0.0, reg_mu: float = 0.0, tol: float = 1e-5, max_iter: int = 500,
                       return_info: bool = False) -> dict | tuple[dict, FitInfo]:
  """Fits matrix scaling `logits @ W.T + b` by mean NLL plus the optional penalty (module docstring).

  Args:
    logits: (N, C) logits.
    labels: (N,) integer labels or (N, C) soft targets.
    regularization: `"odir"` or `"l2"`.
    reg_lambda: weight of the matrix penalty.
    reg_mu: weight of the intercept penalty.
    tol: max-abs gradient tolerance.
    max_iter: iteration cap.
    return_info: also return a `FitInfo`.

  Returns:
    params `{"w": (C, C), "b": (C,)}` (or (params, FitInfo)).
  """
  return _fit(_as_float(logits), labels, diagonal=False, regularization=regularization, reg_lambda=reg_lambda,
              reg_mu=reg_mu, tol=tol, max_iter=max_iter, return_info=return_info)


@jax.jit
def apply_matrix_scaling(params: dict, logits: jax.Array) -> jax.Array:
  """Returns calibrated logits `logits @ W.T + b` (N, C)."""
  return _affine(params, logits)


def fit_dirichlet(*, logits: jax.Array, labels: jax.Array, regularization: str = "odir",
                  reg_lambda: float = 0.0, reg_mu: float = 0.0, tol: float = 1e-5, max_iter: int = 500,
                  return_info: bool = False) -> dict | tuple[dict, FitInfo]:
  """Fits Dirichlet calibration `log_softmax(logits) @ W.T + b` by mean NLL plus the penalty.

  Kull et al. tune `reg_lambda` and `reg_mu` (Dir-ODIR) by cross-validation; pass the chosen values.

  Args:
    logits: (N, C) logits (the log-probabilities are computed from them, so no probability is ever 0).
    labels: (N,) integer labels or (N, C) soft targets.
    regularization: `"odir"` or `"l2"`.
    reg_lambda: weight of the matrix penalty.
    reg_mu: weight of the intercept penalty.
    tol: max-abs gradient tolerance.
    max_iter: iteration cap.
    return_info: also return a `FitInfo`.

  Returns:
    params `{"w": (C, C), "b": (C,)}` (or (params, FitInfo)).
  """
  return _fit(jax.nn.log_softmax(_as_float(logits), axis=-1), labels, diagonal=False,
              regularization=regularization, reg_lambda=reg_lambda, reg_mu=reg_mu, tol=tol, max_iter=max_iter,
              return_info=return_info)


@jax.jit
def apply_dirichlet(params: dict, logits: jax.Array) -> jax.Array:
  """Returns calibrated logits `log_softmax(logits) @ W.T + b` (N, C)."""
  return _affine(params, jax.nn.log_softmax(logits, axis=-1))
