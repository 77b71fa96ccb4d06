"""Temperature scaling (TS), Masked Temperature Scaling (MTS) and ensemble temperature scaling (ETS).

Conventions shared by the post-hoc calibrators of this package:

- `logits` are (N, C) pre-softmax scores of a frozen network on a held-out (validation) set.
- `labels` are either integer class ids (N,) or soft targets (N, C) whose rows sum to 1.
- The fitting objective is the mean negative log-likelihood (mean softmax cross-entropy, natural log).
- TS parameterisation: calibrated logits = `logits / T` with T > 0 (Guo et al. 2017;
  `gpleiss/temperature_scaling`).
  The converged fit optimises `s = log T`, so T > 0 by construction; the stopping rule is stated on dNLL/dT.

This module also holds the optimiser shared by the gradient-fitted calibrators of `scaling.py` and
`binary.py` (optax L-BFGS with a zoom line search inside `lax.while_loop`).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from calibjax.calibration import metrics
from calibjax.errors import ConfigError
from calibjax.masks import mask_inputs

TS_METHODS = ("converged", "lbfgs_reference")
MASK_TARGETS = ("input", "logits")
DEFAULT_MTS_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class FitInfo(NamedTuple):
  """How an iterative fit ended (all fields are JAX scalars).

  Attributes:
    n_iter: optimiser iterations taken.
    grad: size of the objective's gradient at the returned parameters: |dNLL/dT| for temperature scaling,
      the max-abs gradient of the (regularised) objective otherwise.
    converged: `grad <= tol` (for `lbfgs_reference`: the same test with `tol`, which that optimiser does not
      use to stop, so it reports whether the reference stopped short of a converged fit).
    at_bound: the temperature hit the cap `t_bounds` (e.g. T -> inf for 50/50 labels); always False for
      calibrators without a cap.
  """
  n_iter: jax.Array
  grad: jax.Array
  converged: jax.Array
  at_bound: jax.Array


def _mean_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy; integer labels (N,) or soft targets with the shape of `logits`."""
  if labels.ndim == logits.ndim:
    return jnp.mean(optax.softmax_cross_entropy(logits, labels))
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _as_float(x: jax.typing.ArrayLike) -> jax.Array:
  """Float inputs keep their dtype (float32 stays float32); integer ones become float32."""
  x = jnp.asarray(x)
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _max_abs(tree: Any) -> jax.Array:
  return optax.tree.norm(tree, ord=jnp.inf)


def _minimize(fun: Callable[[Any], jax.Array], x0: Any, *, tol: float, max_iter: int,
              grad_error: Callable[[Any, Any], jax.Array] | None = None,
              outside: Callable[[Any], jax.Array] | None = None) -> tuple[Any, FitInfo]:
  """Minimises a smooth function with optax L-BFGS + zoom line search until the gradient is small.

  The loop stops at the first of: `grad_error(x, grad) <= tol` (default: max-abs gradient); `max_iter`
  iterations; an iteration that leaves `x` unchanged (the line search found no decrease, which in float32
  happens at the rounding floor of the objective); `outside(x)` true (a caller-supplied cap).

  Args:
    fun: objective, a pure function of the parameter pytree returning a scalar.
    x0: initial parameters (pytree of float arrays).
    tol: gradient tolerance.
    max_iter: iteration cap.
    grad_error: maps (x, grad) to the scalar compared with `tol`.
    outside: maps x to a bool scalar; True stops the loop (the result is reported `at_bound`).

  Returns:
    (x, FitInfo).
  """
  grad_error = grad_error or (lambda x, g: _max_abs(g))
  outside = outside or (lambda x: jnp.asarray(False))
  opt = optax.lbfgs(linesearch=optax.scale_by_zoom_linesearch(
      max_linesearch_steps=30, initial_guess_strategy="one"))
  value_and_grad = optax.value_and_grad_from_state(fun)

  def step(carry):
    x, state, _ = carry
    value, grad = value_and_grad(x, state=state)
    updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=fun)
    new_x = optax.apply_updates(x, updates)
    moved = jnp.any(jnp.stack([jnp.any(a != b) for a, b in zip(jax.tree.leaves(new_x), jax.tree.leaves(x))]))
    return new_x, state, moved

  def keep_going(carry):
    x, state, moved = carry
    count = optax.tree.get(state, "count")
    error = grad_error(x, optax.tree.get(state, "grad"))
    return (count < max_iter) & ((count == 0) | ((error > tol) & moved & ~outside(x)))

  x, state, _ = jax.lax.while_loop(keep_going, step, (x0, opt.init(x0), jnp.asarray(True)))
  # The state's gradient is only filled in after the first step; recompute it so max_iter=0 is also honest.
  error = grad_error(x, jax.grad(fun)(x))
  return x, FitInfo(n_iter=optax.tree.get(state, "count"), grad=error, converged=error <= tol,
                    at_bound=outside(x))


def _torch_lbfgs(fun: Callable[[jax.Array], jax.Array], x0: jax.Array, *, lr: float, max_iter: int,
                 max_eval: int, tolerance_grad: float, tolerance_change: float,
                 history_size: int) -> tuple[jax.Array, jax.Array]:
  """One `torch.optim.LBFGS(...).step(closure)` without line search, on a flat parameter vector.

  Follows the PyTorch algorithm step for step: the first direction is -g with step length
  `min(1, 1/|g|_1) * lr`, later ones use the two-loop recursion with a fixed step `lr`; a curvature pair is
  stored only if y.s > 1e-10 (oldest dropped beyond `history_size`); the loop stops at the first of
  `max_iter` iterations, `max_eval` function evaluations, max|g| <= tolerance_grad, a directional derivative
  above -tolerance_change, a step with max|t d| <= tolerance_change, or a loss change below tolerance_change.
  The function is not re-evaluated after the final iteration's update (as in PyTorch).

  Returns:
    (x, number of iterations).
  """
  value_and_grad = jax.value_and_grad(fun)
  dtype = x0.dtype
  size = x0.shape[0]
  loss0, g0 = value_and_grad(x0)

  def two_loop(g, dirs, stps, ro, num_old, h_diag):
    def backward(j, carry):
      q, al = carry
      i = num_old - 1 - j
      a = jnp.dot(stps[i], q) * ro[i]
      return q - a * dirs[i], al.at[i].set(a)

    q, al = jax.lax.fori_loop(0, num_old, backward, (-g, jnp.zeros((history_size,), dtype)))

    def forward(i, r):
      be = jnp.dot(dirs[i], r) * ro[i]
      return r + (al[i] - be) * stps[i]

    return jax.lax.fori_loop(0, num_old, forward, q * h_diag)

  def body(c):
    n_iter = c["n_iter"] + 1
    first = n_iter == 1
    y = c["g"] - c["prev_g"]
    s = c["d"] * c["t"]
    ys = jnp.dot(y, s)
    store = ~first & (ys > 1e-10)
    full = c["num_old"] == history_size
    slot = jnp.minimum(c["num_old"], history_size - 1)

    def push(buf, v):
      return jnp.where(full, jnp.roll(buf, -1, axis=0), buf).at[slot].set(v)

    dirs = jnp.where(store, push(c["dirs"], y), c["dirs"])
    stps = jnp.where(store, push(c["stps"], s), c["stps"])
    ro = jnp.where(store, push(c["ro"][:, None], (1.0 / ys)[None])[:, 0], c["ro"])
    num_old = jnp.where(store, jnp.minimum(c["num_old"] + 1, history_size), c["num_old"])
    h_diag = jnp.where(store, ys / jnp.dot(y, y), c["h_diag"])
    d = jnp.where(first, -c["g"], two_loop(c["g"], dirs, stps, ro, num_old, h_diag))
    t = jnp.where(first, jnp.minimum(1.0, 1.0 / jnp.sum(jnp.abs(c["g"]))) * lr, lr).astype(dtype)
    gtd = jnp.dot(c["g"], d)
    no_descent = gtd > -tolerance_change
    x = jnp.where(no_descent, c["x"], c["x"] + t * d)
    loss, g = value_and_grad(x)
    evals = c["evals"] + 1
    done = (no_descent | (n_iter == max_iter) | (evals >= max_eval) | (jnp.max(jnp.abs(g)) <= tolerance_grad)
            | (jnp.max(jnp.abs(d * t)) <= tolerance_change) | (jnp.abs(loss - c["loss"]) < tolerance_change))
    return dict(x=x, loss=loss, g=g, prev_g=c["g"], d=d, t=t, dirs=dirs, stps=stps, ro=ro, num_old=num_old,
                h_diag=h_diag, n_iter=n_iter, evals=evals, done=done)

  init = dict(x=x0, loss=loss0, g=g0, prev_g=jnp.zeros_like(g0), d=jnp.zeros_like(g0), t=jnp.zeros((), dtype),
              dirs=jnp.zeros((history_size, size), dtype), stps=jnp.zeros((history_size, size), dtype),
              ro=jnp.zeros((history_size,), dtype), num_old=jnp.asarray(0), h_diag=jnp.ones((), dtype),
              n_iter=jnp.asarray(0), evals=jnp.asarray(1),
              done=jnp.max(jnp.abs(g0)) <= tolerance_grad)
  final = jax.lax.while_loop(lambda c: ~c["done"], body, init)
  return final["x"], final["n_iter"]


def _grad_t(logits: jax.Array, labels: jax.Array, t: jax.Array) -> jax.Array:
  return jax.grad(lambda t: _mean_nll(logits / t, labels))(t)


@jax.jit(static_argnames=("max_iter",))
def _fit_converged(logits, labels, init, tol, max_iter, t_bounds):
  lo, hi = jnp.log(t_bounds[0]), jnp.log(t_bounds[1])
  s, info = _minimize(
      lambda s: _mean_nll(logits * jnp.exp(-s), labels), jnp.log(init), tol=tol, max_iter=max_iter,
      # dNLL/dT = dNLL/ds / T, so the tolerance is on the temperature's own scale.
      grad_error=lambda s, g: jnp.abs(g) * jnp.exp(-s),
      outside=lambda s: (s < lo) | (s > hi))
  t = jnp.exp(jnp.clip(s, lo, hi))
  grad = jnp.abs(_grad_t(logits, labels, t))
  return t, info._replace(grad=grad, converged=grad <= tol)


@jax.jit(static_argnames=("max_iter",))
def _fit_reference(logits, labels, init, tol, max_iter):
  t, n_iter = _torch_lbfgs(
      lambda t: _mean_nll(logits / t[0], labels), init[None], lr=0.01, max_iter=max_iter,
      max_eval=max_iter * 5 // 4, tolerance_grad=1e-7, tolerance_change=1e-9, history_size=100)
  grad = jnp.abs(_grad_t(logits, labels, t[0]))
  return t[0], FitInfo(n_iter=n_iter, grad=grad, converged=grad <= tol, at_bound=jnp.asarray(False))


def fit_temperature(*, logits: jax.Array, labels: jax.Array, init: float = 1.5, method: str = "converged",
                    tol: float = 1e-6, max_iter: int | None = None,
                    t_bounds: tuple[float, float] = (1e-3, 1e4),
                    return_info: bool = False) -> jax.Array | tuple[jax.Array, FitInfo]:
  """Fits the temperature T minimising the mean NLL of `softmax(logits / T)`.

  Methods:

  - `"converged"` (default): optax L-BFGS with a zoom line search on s = log T, from T = `init`, until
    |dNLL/dT| <= `tol` (default 1e-6). In float32 the rounding of the mean over N samples can put the
    attainable gradient above a very small `tol`; the loop then stops when a step no longer changes T and
    `info.converged` is False. T is capped to `t_bounds`: when the NLL keeps decreasing as T -> inf (e.g.
    50/50 soft labels, or a model that is right at chance) or T -> 0 (every validation prediction correct)
    and the gradient has not yet fallen below `tol`, the fit stops at the cap and reports `info.at_bound`.
    A validation set classified correctly with large margins has NLL ~ 0 and a vanishing gradient for every
    moderate T, so the fit may stop near `init`: such data cannot calibrate (the situation of a network
    evaluated on its own distilled training images, which MTS addresses).
  - `"lbfgs_reference"`: a port of `torch.optim.LBFGS([T], lr=0.01, max_iter=50)` with one `.step(closure)`,
    as in `gpleiss/temperature_scaling` and the MTS code: T itself (not log T, unconstrained) from 1.5,
    max_eval = max_iter*5//4 = 62, tolerance_grad 1e-7, tolerance_change 1e-9, history 100, no line search.
    It stops far short of the NLL optimum (T* = 2.53 -> T = 1.70 on the s2.6 logits of
    tests/test_posthoc.py); use it only to reproduce numbers. It matches torch to float32 rounding; a stop
    on `|loss change| < 1e-9` after many iterations depends on the last bit of the float32 loss, which torch
    and XLA round differently, so with `max_iter` far above 50 the stopping iteration can differ.
    `tol` is not used to stop, only to fill `info.converged`.

  Args:
    logits: (N, C) logits.
    labels: (N,) integer labels or (N, C) soft targets.
    init: starting temperature.
    method: `"converged"` or `"lbfgs_reference"`.
    tol: gradient tolerance on |dNLL/dT|.
    max_iter: iteration cap; default 100 (converged) or 50 (the reference's value).
    t_bounds: (min, max) temperature of the converged fit.
    return_info: also return a `FitInfo`.

  Returns:
    T as a scalar array (the dtype of `logits`), or (T, FitInfo) if `return_info`.
  """
  logits, labels = _as_float(logits), jnp.asarray(labels)
  init_t = jnp.asarray(init, logits.dtype)
  if method == "converged":
    if not 0.0 < t_bounds[0] < t_bounds[1]:
      raise ConfigError(f"t_bounds must satisfy 0 < min < max, got {t_bounds}")
    if isinstance(init, (int, float)) and not t_bounds[0] <= init <= t_bounds[1]:
      raise ConfigError(f"init temperature {init} lies outside t_bounds {t_bounds}; move it inside")
    t, info = _fit_converged(logits, labels, init_t, tol, 100 if max_iter is None else max_iter,
                             jnp.asarray(t_bounds, logits.dtype))
  elif method == "lbfgs_reference":
    t, info = _fit_reference(logits, labels, init_t, tol, 50 if max_iter is None else max_iter)
  else:
    raise ConfigError(f"unknown temperature-scaling method '{method}'; use one of {TS_METHODS}")
  return (t, info) if return_info else t


def apply_temperature(logits: jax.Array, temperature: jax.typing.ArrayLike) -> jax.Array:
  """Returns calibrated logits `logits / T` (same shape; softmax gives the calibrated probabilities)."""
  return logits / temperature


def fit_masked_temperature(*, logits_fn: Callable[[jax.Array], jax.Array], inputs: jax.Array,
                           labels: jax.Array, ratio: jax.typing.ArrayLike, key: jax.Array,
                           method: str = "converged", mask_target: str = "input",
                           granularity: str = "element",
                           **fit_options) -> jax.Array | tuple[jax.Array, FitInfo]:
  """Masked Temperature Scaling (Zhu et al., ICCV 2023, Sec. 4.1): fits T on logits of masked inputs.

  One mask is drawn over the whole validation set (as the reference does per `set_temperature` call), the
  network is run once on the masked inputs, and T is fitted on those fixed logits with `fit_temperature`.
  The returned T is meant for **clean** inputs: calibrated logits are `logits_fn(x) / T`; masking never
  touches test-time predictions, so accuracy is unchanged.

  Two readings of the paper:

  - `mask_target="input"` (default; the code): zero input elements (`calibjax.masks.mask_inputs`, in
    the network's input space, i.e. after normalisation) with probability `ratio`.
  - `mask_target="logits"` (Eq. 4 taken literally, `softmax(z * mask / T)`): zero logit entries of the clean
    inputs with probability `ratio` (element granularity only).

  The validation set should be sampled per class (supplement of the paper), so that no class is missing.

  Direction of the effect: masking lowers accuracy (pushing T up) and, for zeroing, also shrinks logits
  (pushing T down). MTS raises T where the first effect dominates, notably when the validation data are
  classified (almost) perfectly, as samples of a network's own distilled training set are: plain TS then
  sharpens (T < 1 or a flat NLL), MTS does not (tests/test_posthoc.py). For a linear map of many weak
  features with noisy inputs the two effects roughly cancel, and T can even come out lower than plain TS.

  Args:
    logits_fn: maps an input batch (the shape of `inputs`) to (N, C) logits; the caller handles batching
      and jit (e.g. `jax.jit(lambda x: model.apply(params, x, train=False))`).
    inputs: (N, ...) validation inputs, NHWC for images.
    labels: (N,) integer labels or (N, C) soft targets.
    ratio: masking ratio r in [0, 1]; r = 0 is plain temperature scaling.
    key: PRNG key of the mask.
    method: `fit_temperature` method.
    mask_target: `"input"` or `"logits"`.
    granularity: `"element"` or `"pixel"` (input masks only).
    **fit_options: passed to `fit_temperature` (`init`, `tol`, `max_iter`, `t_bounds`, `return_info`).

  Returns:
    T (or (T, FitInfo)), as `fit_temperature`.
  """
  if mask_target == "input":
    logits = logits_fn(mask_inputs(key, inputs, ratio, granularity=granularity))
  elif mask_target == "logits":
    if granularity != "element":
      raise ConfigError("logit masks are element-wise; use granularity='element' with mask_target='logits'")
    logits = mask_inputs(key, logits_fn(inputs), ratio)
  else:
    raise ConfigError(f"unknown MTS mask_target '{mask_target}'; use one of {MASK_TARGETS}")
  return fit_temperature(logits=logits, labels=labels, method=method, **fit_options)


def select_mts_ratio(*, logits_fn: Callable[[jax.Array], jax.Array], fit_inputs: jax.Array,
                     fit_labels: jax.Array, select_inputs: jax.Array, select_labels: jax.Array,
                     key: jax.Array,
                     ratios: tuple[float, ...] = DEFAULT_MTS_RATIOS, n_bins: int = 15,
                     criterion: str = "ece", **mts_options) -> dict[str, Any]:
  """Chooses the MTS masking ratio on held-out data.

  For every ratio, T is fitted with `fit_masked_temperature` on the masked `fit_inputs`, and the clean
  `select_inputs` logits divided by T are scored; the ratio with the lowest score wins (first one on ties).
  All ratios share `key`, so their masks are nested (common random numbers: the comparison between ratios
  is not blurred by different mask draws).

  Never pass test data here: the selection set must be held out from the data the final numbers are reported
  on. The MTS reference code selected the ratio on test-set ECE (10 bins); a caller reproducing that does so
  by passing the test set as `select_inputs` explicitly and labelling the result as test-selected.

  Args:
    logits_fn: maps an input batch to (N, C) logits (see `fit_masked_temperature`).
    fit_inputs: inputs T is fitted on (masked).
    fit_labels: their labels, (N,) or (N, C).
    select_inputs: held-out inputs the ratio is chosen on (clean).
    select_labels: their labels, (M,) or (M, C).
    key: PRNG key of the masks.
    ratios: candidate ratios (the reference grid 0.1, ..., 0.9 by default).
    n_bins: ECE bins (equal width, (lo, hi], top-label).
    criterion: `"ece"` or `"nll"` on the selection set.
    **mts_options: passed to `fit_masked_temperature` (`method`, `mask_target`, `granularity`, fit options;
      `return_info` is ignored).

  Returns:
    dict with `ratio` (float), `temperature` (scalar array) and `table` (one dict per ratio with `ratio`,
    `temperature` and the criterion's value, as Python floats).
  """
  if criterion not in ("ece", "nll"):
    raise ConfigError(f"unknown MTS selection criterion '{criterion}'; use 'ece' or 'nll'")
  if not ratios:
    raise ConfigError("select_mts_ratio needs at least one candidate ratio")
  select_logits = logits_fn(select_inputs)
  table = []
  for ratio in ratios:
    t = fit_masked_temperature(logits_fn=logits_fn, inputs=fit_inputs, labels=fit_labels, ratio=ratio,
                               key=key, **{**mts_options, "return_info": False})
    calibrated = apply_temperature(select_logits, t)
    if criterion == "ece":
      score = metrics.ece(probs=jax.nn.softmax(calibrated, axis=-1), labels=select_labels, n_bins=n_bins)
    else:
      score = _mean_nll(calibrated, select_labels)
    table.append({"ratio": float(ratio), "temperature": float(t), criterion: float(score)})
  best = int(np.argmin([row[criterion] for row in table]))
  return {"ratio": table[best]["ratio"], "temperature": jnp.asarray(table[best]["temperature"]),
          "table": table}


def fit_ets(*, logits: jax.Array, labels: jax.Array, temperature: jax.typing.ArrayLike | None = None,
            tol: float = 1e-6, max_iter: int = 200, return_info: bool = False) -> dict | tuple[dict, FitInfo]:
  """Ensemble temperature scaling (Zhang, Kailkhura and Han, ICML 2020, "Mix-n-Match").

  p = w0 softmax(z / T) + w1 softmax(z) + w2 / C with w on the probability simplex. T is the converged TS
  temperature (fitted here unless given); the weights are then fitted by minimising the mean NLL of the
  mixture (the paper fits them by MSE; NLL keeps all calibrators of this package on one objective). The
  weights are a softmax of three free parameters, so the simplex constraint holds by construction.

  Args:
    logits: (N, C) logits.
    labels: (N,) integer labels or (N, C) soft targets.
    temperature: a fixed T; None fits it with `fit_temperature`.
    tol: max-abs gradient tolerance of the weight fit.
    max_iter: iteration cap of the weight fit.
    return_info: also return the weight fit's `FitInfo`.

  Returns:
    params `{"temperature": T, "weights": (3,)}` (or (params, FitInfo)).
  """
  logits, labels = _as_float(logits), jnp.asarray(labels)
  t = (fit_temperature(logits=logits, labels=labels) if temperature is None
       else jnp.asarray(temperature, logits.dtype))
  log_w, info = _fit_ets_weights(logits, labels, t, tol, max_iter)
  params = {"temperature": t, "weights": jax.nn.softmax(log_w)}
  return (params, info) if return_info else params


def _ets_log_probs(logits: jax.Array, temperature: jax.Array, log_weights: jax.Array) -> jax.Array:
  components = jnp.stack([jax.nn.log_softmax(logits / temperature, axis=-1),
                          jax.nn.log_softmax(logits, axis=-1),
                          jnp.full(logits.shape, -jnp.log(logits.shape[-1]), logits.dtype)])
  return jax.nn.logsumexp(components + log_weights[:, None, None], axis=0)


@jax.jit(static_argnames=("max_iter",))
def _fit_ets_weights(logits, labels, temperature, tol, max_iter):
  targets = (labels if labels.ndim == logits.ndim
             else jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype))

  def objective(w):
    return -jnp.mean(jnp.sum(targets * _ets_log_probs(logits, temperature, jax.nn.log_softmax(w)), axis=-1))

  return _minimize(objective, jnp.zeros((3,), logits.dtype), tol=tol, max_iter=max_iter)


@jax.jit
def apply_ets(params: dict, logits: jax.Array) -> jax.Array:
  """Returns the ETS calibrated **probabilities** (N, C) (a mixture, so there are no calibrated logits)."""
  return jnp.exp(_ets_log_probs(logits, params["temperature"], jnp.log(params["weights"])))
