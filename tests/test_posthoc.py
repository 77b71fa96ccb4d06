"""Tests of the post-hoc calibrators (calibjax.calibration.posthoc): analytic optima, torch golden values of
the reference TS optimiser, differential checks against numpy/scikit-learn, and MTS behaviour.

Shapes are reused on purpose: every new (shape, static option) combination is an XLA compile.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from sklearn.isotonic import IsotonicRegression, isotonic_regression
from sklearn.linear_model import LogisticRegression

from calibjax.calibration.posthoc import (CALIBRATORS, apply_temperature, fit_masked_temperature,
                                          fit_temperature, select_mts_ratio)
from calibjax.calibration.posthoc.binary import fit_beta, fit_platt
from calibjax.calibration.posthoc.binning import (_pav, apply_histogram_binning, apply_isotonic,
                                                  fit_histogram_binning, fit_isotonic)
from calibjax.calibration.posthoc.scaling import apply_dirichlet, fit_dirichlet, fit_matrix_scaling
from calibjax.calibration.posthoc.temperature import apply_ets, fit_ets
from calibjax.errors import ConfigError, UnknownNameError


def scaled_softmax_data(n, c, scale, seed):
  """A well-specified softmax model (labels drawn from softmax(z)) whose logits are reported as scale * z.

  The NLL-optimal temperature is therefore close to `scale`. Also used verbatim by the torch golden script.
  """
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, c))
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  labels = (rng.random((n, 1)) > np.cumsum(p, 1)).sum(1).clip(0, c - 1)
  return (scale * z).astype(np.float32), labels


def np_nll(probs, labels, eps=1e-12):
  """Held-out NLL in float64; `eps` guards the exact zeros that binning calibrators can output."""
  probs = np.asarray(probs, np.float64)
  return -np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], eps)))


def np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_grad_t(logits, labels, t):
  """dNLL/dT = mean(z_y - E_p[z]) / T^2 (float64, independent of JAX)."""
  z = np.asarray(logits, np.float64)
  p = np_softmax(z / t)
  return np.mean(z[np.arange(len(labels)), labels] - np.sum(p * z, -1)) / t ** 2


# Constant logit gap d with empirical accuracy a has T* = d / logit(a): 6 of 8 right -> 2 / ln 3 (docs/metrics.md §5).
GAP_LOGITS = np.array([[2.0, 0.0]] * 8, np.float32)
GAP_LABELS = np.array([0, 0, 0, 0, 0, 0, 1, 1])
OVERCONFIDENT = scaled_softmax_data(4000, 5, 3.0, 0)  # first half fits, second half is held out
BINARY = scaled_softmax_data(4000, 2, 3.0, 1)
HALF = 2000


def test_analytic_optimum_two_over_ln3():
  t, info = fit_temperature(logits=GAP_LOGITS, labels=GAP_LABELS, return_info=True)
  np.testing.assert_allclose(float(t), 2 / np.log(3), atol=1e-5)
  np.testing.assert_allclose(2 / np.log(3), 1.820478, atol=1e-6)
  assert bool(info.converged) and not bool(info.at_bound)


def test_general_rule_t_star_is_gap_over_logit_accuracy():
  labels = np.array([0, 0, 0, 0, 0, 0, 0, 1])  # a = 7/8
  logits = GAP_LOGITS * 0.75  # d = 1.5
  np.testing.assert_allclose(float(fit_temperature(logits=logits, labels=labels)), 1.5 / np.log(7), atol=1e-5)


def test_half_half_soft_labels_give_large_t_without_hanging():
  soft = np.full((8, 2), 0.5, np.float32)
  t, info = fit_temperature(logits=GAP_LOGITS, labels=soft, return_info=True)
  # NLL = log(2 cosh(1/T)): |dNLL/dT| ~ 1/T^3 drops below 1e-6 near T = 100.
  assert 10 < float(t) < 1e4 and bool(info.converged) and int(info.n_iter) < 100
  capped, info = fit_temperature(logits=GAP_LOGITS, labels=soft, t_bounds=(1e-3, 50.0), return_info=True)
  np.testing.assert_allclose(float(capped), 50.0, rtol=1e-5)
  assert bool(info.at_bound) and not bool(info.converged)


def np_t_star(logits, labels):
  """NLL-optimal T by scipy's bounded scalar minimiser in float64 (independent of calibjax)."""
  result = minimize_scalar(lambda t: np_nll(np_softmax(logits / t), labels), bounds=(0.05, 50.0),
                           method="bounded", options={"xatol": 1e-9})
  return result.x


def test_gradient_at_fitted_t_below_tolerance_and_scipy_agrees():
  logits, labels = OVERCONFIDENT[0][:HALF], OVERCONFIDENT[1][:HALF]
  t, info = fit_temperature(logits=logits, labels=labels, return_info=True)
  assert abs(np_grad_t(logits, labels, float(t))) < 1e-6
  assert float(info.grad) < 1e-6 and bool(info.converged)
  np.testing.assert_allclose(float(t), np_t_star(logits, labels), rtol=1e-5)


def test_refit_on_calibrated_logits_gives_unit_temperature():
  logits, labels = OVERCONFIDENT[0][:HALF], OVERCONFIDENT[1][:HALF]
  t = fit_temperature(logits=logits, labels=labels)
  t_again = fit_temperature(logits=apply_temperature(logits, t), labels=labels)
  np.testing.assert_allclose(float(t_again), 1.0, atol=1e-4)


def test_temperature_scales_with_the_logits():
  logits, labels = OVERCONFIDENT[0][:HALF], OVERCONFIDENT[1][:HALF]
  t = float(fit_temperature(logits=logits, labels=labels))
  np.testing.assert_allclose(float(fit_temperature(logits=2 * logits, labels=labels)), 2 * t, rtol=1e-5)
  np.testing.assert_allclose(t, 3.0, rtol=0.1)  # the data are softmax(z) labels reported as 3 z


def test_fit_temperature_is_jittable():
  # Lowering traces the whole fit with abstract arrays (what jit needs) without paying another XLA compile.
  for method in ("converged", "lbfgs_reference"):
    jax.jit(fit_temperature, static_argnames=("method",)).lower(logits=GAP_LOGITS, labels=GAP_LABELS,
                                                                method=method)


# Golden values from torch 2.14.1 (CPU, float32), produced by this script (torch is not a test dependency):
#
#   import numpy as np, torch
#   # scaled_softmax_data exactly as defined in this file
#   def reference_t(logits, labels, init=1.5, max_iter=50):
#     logits = torch.from_numpy(np.asarray(logits, np.float32)); labels = torch.from_numpy(np.asarray(labels))
#     t = torch.nn.Parameter(torch.ones(1) * init)
#     opt = torch.optim.LBFGS([t], lr=0.01, max_iter=max_iter)
#     crit = torch.nn.CrossEntropyLoss()
#     def closure():
#       opt.zero_grad(); loss = crit(logits / t.unsqueeze(1).expand(logits.size(0), logits.size(1)), labels)
#       loss.backward(); return loss
#     opt.step(closure)
#     return float(t.item()), opt.state[t]["func_evals"], opt.state[t]["n_iter"]
#   cases = {"s2.6": (scaled_softmax_data(500, 10, 2.6, 0), 1.5),
#            "s0.7": (scaled_softmax_data(500, 10, 0.7, 1), 1.5),
#            "s8": (scaled_softmax_data(500, 10, 8.0, 2), 1.5),
#            "analytic4_init1.82": ((np.array([[2., 0.]] * 4, np.float32), np.array([0, 0, 0, 1])), 1.82)}
#   for name, ((lg, lb), init) in cases.items(): print(name, reference_t(lg, lb, init=init))
#
# Output (T, func_evals, n_iter): s2.6 (1.6959607601165771, 50, 50); s0.7 (1.447039246559143, 50, 50);
# s8 (1.8829903602600098, 50, 50); analytic4_init1.82 (1.8200007677078247, 3, 2).
# Not used: a stop on |loss change| < 1e-9 after many iterations depends on the last bit of the float32 loss,
# which torch and XLA round differently (e.g. s2.6 with init 2.53: torch stops after 5 iterations, JAX later).
REFERENCE_GOLDEN = {
    # name: (data, init, torch T, torch n_iter); few shapes, so the optimiser compiles rarely.
    "s2.6": (scaled_softmax_data(500, 10, 2.6, 0), 1.5, 1.6959607601165771, 50),
    "s0.7": (scaled_softmax_data(500, 10, 0.7, 1), 1.5, 1.447039246559143, 50),
    "s8": (scaled_softmax_data(500, 10, 8.0, 2), 1.5, 1.8829903602600098, 50),
    # Stops after 2 iterations on |loss change| < 1e-9; on 4 identical rows both frameworks round alike.
    "analytic4_init1.82": ((np.array([[2.0, 0.0]] * 4, np.float32), np.array([0, 0, 0, 1])), 1.82,
                           1.8200007677078247, 2),
}


@pytest.mark.parametrize("name", list(REFERENCE_GOLDEN))
def test_reference_mode_matches_torch_lbfgs(name):
  (logits, labels), init, torch_t, torch_iters = REFERENCE_GOLDEN[name]
  t, info = fit_temperature(logits=logits, labels=labels, init=init, method="lbfgs_reference",
                            return_info=True)
  # Same float32 algorithm; only the rounding of the loss/gradient reductions differs (observed: <= 1 ulp).
  np.testing.assert_allclose(float(t), torch_t, rtol=1e-6)
  assert int(info.n_iter) == torch_iters


def test_reference_mode_under_converges():
  logits, labels = REFERENCE_GOLDEN["s2.6"][0]
  t_star = np_t_star(logits, labels)
  t_ref, info = fit_temperature(logits=logits, labels=labels, method="lbfgs_reference", return_info=True)
  assert 2.4 < t_star < 2.7
  # docs/protocols.md §1.8: lr 0.01 moves T only 20-46 % of the way from 1.5 to T*.
  assert (float(t_ref) - 1.5) / (t_star - 1.5) < 0.25
  assert not bool(info.converged)


def test_unknown_method_raises():
  with pytest.raises(ConfigError):
    fit_temperature(logits=GAP_LOGITS, labels=GAP_LABELS, method="newton")


def test_registry_names_and_probability_outputs():
  assert set(CALIBRATORS.names()) == {"temperature", "temperature_reference", "vector", "matrix", "dirichlet",
                                      "histogram", "isotonic", "ets", "platt", "beta"}
  assert CALIBRATORS.get("dirichlet").output == "logits" and CALIBRATORS.get("isotonic").output == "probs"
  with pytest.raises(UnknownNameError):
    CALIBRATORS.get("spline")


@pytest.mark.parametrize("name", ["temperature", "temperature_reference", "vector", "matrix", "dirichlet",
                                  "histogram", "isotonic", "ets", "platt", "beta"])
def test_every_calibrator_improves_held_out_nll(name):
  logits, labels = BINARY if name in ("platt", "beta") else OVERCONFIDENT
  calibrator = CALIBRATORS.get(name)
  params = calibrator.fit(logits=logits[:HALF], labels=labels[:HALF])
  probs = np.asarray(calibrator.apply(params, logits[HALF:]))
  assert probs.shape == (len(logits) - HALF, logits.shape[1])
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  before = np_nll(np_softmax(logits[HALF:]), labels[HALF:])
  after = np_nll(probs, labels[HALF:])
  assert after < before - 0.1, (before, after)


def test_matrix_odir_shrinks_off_diagonal():
  logits, labels = OVERCONFIDENT[0][:HALF], OVERCONFIDENT[1][:HALF]
  off = ~np.eye(5, dtype=bool)
  free = fit_matrix_scaling(logits=logits, labels=labels)
  odir = fit_matrix_scaling(logits=logits, labels=labels, reg_lambda=10.0, reg_mu=10.0)
  assert np.abs(odir["w"])[off].max() < 0.5 * np.abs(free["w"])[off].max()
  assert np.abs(odir["b"]).max() < np.abs(free["b"]).max()
  l2 = fit_matrix_scaling(logits=logits, labels=labels, regularization="l2", reg_lambda=10.0)
  # L2 also shrinks the diagonal, ODIR does not.
  assert np.abs(np.diagonal(l2["w"])).mean() < np.abs(np.diagonal(odir["w"])).mean()
  with pytest.raises(ConfigError):
    fit_matrix_scaling(logits=logits, labels=labels, regularization="l1")


def test_dirichlet_acts_on_log_probabilities():
  logits, labels = OVERCONFIDENT[0][:HALF], OVERCONFIDENT[1][:HALF]
  params, info = fit_dirichlet(logits=logits, labels=labels, return_info=True)
  assert bool(info.converged)
  shifted = logits + np.arange(HALF, dtype=np.float32)[:, None]  # per-row shifts leave log_softmax unchanged
  np.testing.assert_allclose(apply_dirichlet(params, shifted), apply_dirichlet(params, logits), atol=1e-4)


def np_histogram_values(conf, hits, n_bins):
  """Independent equal-width top-label binning: bin (lo, hi], first [0, hi]; empty -> midpoint."""
  idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
  values = (np.arange(n_bins) + 0.5) / n_bins
  for b in range(n_bins):
    if np.any(idx == b):
      values[b] = hits[idx == b].mean()
  return values


def test_histogram_top_label_matches_numpy():
  logits, labels = OVERCONFIDENT[0][:HALF], OVERCONFIDENT[1][:HALF]
  params = fit_histogram_binning(logits=logits, labels=labels, n_bins=10)
  p = np_softmax(logits)
  expected = np_histogram_values(p.max(-1), (p.argmax(-1) == labels).astype(float), 10)
  np.testing.assert_allclose(params["values"], expected, atol=1e-6)


def test_histogram_reapplication_is_idempotent_iff_values_stay_in_their_bins():
  # Four bins of width 0.25 on confidences in (0.5, 1]: only bins 2 and 3 are populated.
  conf = np.array([0.6, 0.6, 0.7, 0.7, 0.9, 0.9, 0.9, 0.9])
  logits = np.stack([np.log(conf), np.log(1 - conf)], -1).astype(np.float32)
  inside = np.array([0, 1, 0, 0, 0, 0, 0, 1])  # bin (.5,.75]: 3/4 right -> 0.75; bin (.75,1]: 3/4 -> 0.75
  params = fit_histogram_binning(logits=logits, labels=inside, n_bins=4)
  np.testing.assert_allclose(params["values"][2:], [0.75, 0.75])
  once = apply_histogram_binning(params, logits)
  twice = apply_histogram_binning(params, jnp.log(once))
  # 0.75 is the upper edge of (0.5, 0.75], i.e. inside bin 2, whose value is 0.75 again: a fixed point.
  np.testing.assert_allclose(twice, once, atol=1e-6)
  outside = np.array([0, 0, 0, 0, 0, 0, 1, 1])  # bin 2 -> 1.0 (lies in bin 3), bin 3 -> 0.5 (lies in bin 1)
  params = fit_histogram_binning(logits=logits, labels=outside, n_bins=4)
  once = np.asarray(apply_histogram_binning(params, logits))
  twice = np.asarray(apply_histogram_binning(params, jnp.log(np.maximum(once, 1e-30))))
  np.testing.assert_allclose(once[:4, 0], 1.0)
  np.testing.assert_allclose(twice[:4, 0], 0.5)  # 1.0 is re-binned into bin 3, whose value is 0.5


def test_histogram_classwise_equal_mass():
  logits, labels = OVERCONFIDENT[0][:HALF], OVERCONFIDENT[1][:HALF]
  params = fit_histogram_binning(logits=logits, labels=labels, n_bins=5, mode="classwise",
                                 binning="equal_mass")
  assert params["edges"].shape == (5, 4) and params["values"].shape == (5, 5)
  p = np_softmax(logits)[:, 0]
  counts = np.bincount(np.searchsorted(np.asarray(params["edges"][0]), p, side="left"), minlength=5)
  np.testing.assert_allclose(counts, HALF / 5, atol=2)
  with pytest.raises(ConfigError):
    fit_histogram_binning(logits=logits, labels=labels, mode="per_class")


def test_pav_matches_sklearn_and_isotonic_apply_interpolates():
  rng = np.random.default_rng(3)
  x = np.round(rng.random(300), 2)  # ties included
  y = (rng.random(300) < x).astype(float)
  knots_x, knots_y = _pav(x, y)
  xs, inverse = np.unique(x, return_inverse=True)
  expected = isotonic_regression(np.bincount(inverse, weights=y) / np.bincount(inverse),
                                 sample_weight=np.bincount(inverse))
  np.testing.assert_allclose(np.interp(xs, knots_x, knots_y), expected, atol=1e-12)
  assert np.all(np.diff(knots_x) > 0) and np.all(np.diff(knots_y) >= 0)
  logits, labels = OVERCONFIDENT[0][:HALF], OVERCONFIDENT[1][:HALF]
  params = fit_isotonic(logits=logits, labels=labels)
  probs = np.asarray(apply_isotonic(params, logits))
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  # Before renormalisation each class's map is the sklearn isotonic fit of 1[y = k] on p_k.
  p0 = np.asarray(jax.nn.softmax(logits), np.float64)[:, 0]  # the float32 probabilities the fit saw
  mapped = np.interp(p0, np.asarray(params["x"][0], np.float64), np.asarray(params["y"][0], np.float64))
  sk = IsotonicRegression(out_of_bounds="clip").fit(p0, labels == 0).predict(p0)
  np.testing.assert_allclose(mapped, sk, atol=1e-6)


def test_platt_matches_unpenalised_logistic_regression():
  logits, labels = BINARY[0][:HALF], BINARY[1][:HALF]
  params = fit_platt(logits=logits, labels=labels, platt_targets=False)
  s = (logits[:, 1] - logits[:, 0]).astype(np.float64)[:, None]
  sk = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(s, labels)
  np.testing.assert_allclose([float(params["a"]), float(params["b"])], [sk.coef_[0, 0], sk.intercept_[0]],
                             atol=1e-3)
  with pytest.raises(ConfigError):
    fit_platt(logits=OVERCONFIDENT[0], labels=OVERCONFIDENT[1])


def test_beta_matches_logistic_regression_and_enforces_nonnegative_coefficients():
  logits, labels = BINARY[0][:HALF], BINARY[1][:HALF]
  params = fit_beta(logits=logits, labels=labels)
  s = (logits[:, 1] - logits[:, 0]).astype(np.float64)
  features = np.stack([-np.logaddexp(0, -s), np.logaddexp(0, s)], -1)  # [ln q, -ln(1 - q)]
  sk = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(features, labels)
  np.testing.assert_allclose([float(params["a"]), float(params["b"]), float(params["c"])],
                             [*sk.coef_[0], sk.intercept_[0]], atol=2e-3)
  # Anti-correlated scores on the negative side: the unconstrained b < 0 is pinned to 0.
  flipped = np.where(s < 0, -s, s)
  params = fit_beta(logits=flipped.astype(np.float32), labels=labels)
  assert float(params["b"]) == 0.0 and float(params["a"]) >= 0.0


def test_ets_weights_on_simplex_and_prefer_ts_for_a_scaled_model():
  logits, labels = OVERCONFIDENT[0][:HALF], OVERCONFIDENT[1][:HALF]
  params = fit_ets(logits=logits, labels=labels)
  np.testing.assert_allclose(float(jnp.sum(params["weights"])), 1.0, atol=1e-6)
  assert float(params["weights"][0]) > 0.9
  # A fixed T = 1 makes the TS and uncalibrated components equal, so the uniform weight must do the work.
  fixed = fit_ets(logits=logits, labels=labels, temperature=1.0)
  assert float(fixed["weights"][2]) > 0.05
  probs = np.asarray(apply_ets(fixed, logits))
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def linear_network(n=2 * HALF, c=5, d=16, sep=1.0, noise=0.4, scale=3.0, seed=0):
  """A toy 'network' logits = x @ W on inputs x = sep * prototype_y + noise."""
  rng = np.random.default_rng(seed)
  protos = rng.normal(size=(c, d))
  labels = rng.integers(0, c, n)
  x = (protos[labels] * sep + noise * rng.normal(size=(n, d))).astype(np.float32)
  w = jnp.asarray(protos.T * scale, jnp.float32)
  return jax.jit(lambda v: v @ w), x, labels


def test_mts_ratio_zero_equals_plain_ts():
  logits_fn, x, labels = linear_network()
  x, labels = x[:HALF], labels[:HALF]
  t_mts = fit_masked_temperature(logits_fn=logits_fn, inputs=x, labels=labels, ratio=0.0,
                                 key=jax.random.key(0))
  assert float(t_mts) == float(fit_temperature(logits=logits_fn(x), labels=labels))


def test_mts_raises_t_on_nearly_separable_validation_data():
  # Validation data classified ~perfectly (as a network's own distilled training images): plain TS sharpens.
  logits_fn, x, labels = linear_network()
  x, labels = x[:HALF], labels[:HALF]
  assert np.mean(np.argmax(logits_fn(x), -1) == labels) > 0.99
  t_ts = float(fit_temperature(logits=logits_fn(x), labels=labels))
  t_mts = float(fit_masked_temperature(logits_fn=logits_fn, inputs=x, labels=labels, ratio=0.5,
                                       key=jax.random.key(0)))
  assert t_ts < 1.0 and t_mts > 3 * t_ts
  t_logits = float(fit_masked_temperature(logits_fn=logits_fn, inputs=x, labels=labels, ratio=0.5,
                                          key=jax.random.key(0), mask_target="logits"))
  assert t_logits > t_ts
  with pytest.raises(ConfigError):
    fit_masked_temperature(logits_fn=logits_fn, inputs=x, labels=labels, ratio=0.5, key=jax.random.key(0),
                           mask_target="logits", granularity="pixel")


def test_select_mts_ratio_uses_only_the_given_data():
  logits_fn, x, labels = linear_network()
  fit_x, select_x = x[:HALF], x[HALF:]
  seen = []

  def recording_fn(v):
    seen.append(np.asarray(v))
    return logits_fn(v)

  grid = (0.1, 0.3, 0.5)
  out = select_mts_ratio(logits_fn=recording_fn, fit_inputs=fit_x, fit_labels=labels[:HALF],
                         select_inputs=select_x, select_labels=labels[HALF:], key=jax.random.key(0),
                         ratios=grid)
  assert out["ratio"] in grid and [row["ratio"] for row in out["table"]] == list(grid)
  best = min(out["table"], key=lambda row: row["ece"])
  assert out["ratio"] == best["ratio"] and float(out["temperature"]) == best["temperature"]
  # Calls: the clean selection set once, then one masked copy of the fit set per ratio; nothing else.
  assert len(seen) == 1 + len(grid)
  np.testing.assert_array_equal(seen[0], select_x)
  for masked in seen[1:]:
    assert masked.shape == fit_x.shape and np.all((masked == fit_x) | (masked == 0))
  with pytest.raises(ConfigError):
    select_mts_ratio(logits_fn=logits_fn, fit_inputs=fit_x, fit_labels=labels[:HALF], select_inputs=select_x,
                     select_labels=labels[HALF:], key=jax.random.key(0), criterion="brier")
