"""Tests of calibjax.calibration.losses: hand values, numpy transcriptions of the references, invariants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calibjax.calibration import losses
from calibjax.errors import ConfigError, UnknownNameError

LN2 = math.log(2.0)
# Two samples with probabilities chosen to make hand computation easy: logits = log p.
P_A = np.array([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]])
Y_A = np.array([0, 2])
LOGITS_A = np.log(P_A).astype(np.float32)


def _softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _random_batch(seed, batch=24, classes=5, scale=2.0):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.normal(size=(batch, classes))).astype(np.float32)
  labels = rng.integers(0, classes, size=batch)
  # Make about half the predictions correct so MMCE and DCA see both groups.
  labels[::2] = logits[::2].argmax(axis=1)
  return logits, labels


def _call(name, logits, labels, reduction, **hparams):
  entry = losses.LOSSES.get(name)
  extra = {"state": losses.adafocal_init()} if entry.stateful else {}
  return entry.fn(logits=logits, labels=labels, reduction=reduction, **extra, **hparams)


def test_registry_names_and_defaults():
  assert losses.LOSSES.names() == sorted(["ce", "label_smoothing", "focal", "flsd53", "adafocal", "mmce",
                                          "mdca", "focal_mdca", "dca", "logit_norm", "mbls", "acls", "cpc"])
  assert losses.LOSSES.get("cpc").defaults == {"lambda_bdc": 1.0, "lambda_bec": 1.0}
  assert losses.LOSSES.get("mbls").defaults == {"margin": 10.0, "alpha": 0.1}
  assert losses.LOSSES.get("acls").defaults == {"margin": 10.0, "alpha": 0.1, "pos_lambda": 1.0, "neg_lambda": 0.1}
  assert losses.LOSSES.get("focal").defaults == {"gamma": 1.0}
  assert losses.LOSSES.get("flsd53").defaults == {"gamma": 3.0}
  assert losses.LOSSES.get("mmce").defaults == {"beta": 2.0}
  assert losses.LOSSES.get("label_smoothing").defaults == {"alpha": 0.1, "form": "uniform"}
  assert losses.LOSSES.get("logit_norm").defaults == {"tau": 0.04}
  assert [n for n in losses.LOSSES.names() if losses.LOSSES.get(n).stateful] == ["adafocal"]


def test_cross_entropy_hand_values():
  got = losses.cross_entropy(logits=LOGITS_A, labels=Y_A, reduction="none")
  np.testing.assert_allclose(got, [LN2, -math.log(0.3)], rtol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_focal_hand_values(gamma):
  got = losses.focal(logits=LOGITS_A, labels=Y_A, gamma=gamma, reduction="none")
  want = [-(0.5**gamma) * math.log(0.5), -(0.7**gamma) * math.log(0.3)]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_focal_gamma_zero_and_smoothing_zero_are_cross_entropy():
  logits, labels = _random_batch(0)
  ce = losses.cross_entropy(logits=logits, labels=labels, reduction="none")
  np.testing.assert_allclose(losses.focal(logits=logits, labels=labels, gamma=0.0, reduction="none"), ce,
                             rtol=1e-6)
  for form in ("uniform", "others"):
    ls = losses.label_smoothing_ce(logits=logits, labels=labels, alpha=0.0, form=form, reduction="none")
    np.testing.assert_allclose(ls, ce, rtol=1e-6)


def test_label_smoothing_forms_against_explicit_targets():
  uniform = losses.label_smoothing_ce(logits=LOGITS_A, labels=Y_A, alpha=0.1, form="uniform",
                                      reduction="none")
  # alpha/K = 0.1/3 on every class, 0.9 + 0.1/3 on the target.
  want_uniform = [-(0.9 + 0.1 / 3) * math.log(0.5) - 2 * (0.1 / 3) * math.log(0.25),
                  -(0.1 / 3) * (math.log(0.1) + math.log(0.6)) - (0.9 + 0.1 / 3) * math.log(0.3)]
  np.testing.assert_allclose(uniform, want_uniform, rtol=1e-5)
  others = losses.label_smoothing_ce(logits=LOGITS_A, labels=Y_A, alpha=0.1, form="others", reduction="none")
  # CXKD: 1 - alpha on the target, alpha/(K-1) = 0.05 elsewhere.
  want_others = [-0.9 * math.log(0.5) - 2 * 0.05 * math.log(0.25),
                 -0.05 * (math.log(0.1) + math.log(0.6)) - 0.9 * math.log(0.3)]
  np.testing.assert_allclose(others, want_others, rtol=1e-5)
  with pytest.raises(ConfigError, match="form"):
    losses.label_smoothing_ce(logits=LOGITS_A, labels=Y_A, form="triangle")


def test_flsd53_gamma_at_thresholds():
  p = jnp.array([0.0, 0.1999, 0.2, 0.3, 0.4999, 0.5, 0.9, 1.0])
  np.testing.assert_array_equal(losses.flsd53_gamma(p, gamma=4.0), [5, 5, 3, 3, 3, 4, 4, 4])
  np.testing.assert_array_equal(losses.flsd53_gamma(p), [5, 5, 3, 3, 3, 3, 3, 3])


def test_flsd53_hand_values():
  probs = np.array([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.1, 0.6, 0.3], [0.1, 0.6, 0.3]])
  labels = np.array([0, 2, 0, 1])  # p_t = 0.5, 0.3, 0.1, 0.6
  got = losses.flsd53(logits=np.log(probs).astype(np.float32), labels=labels, gamma=4.0, reduction="none")
  want = [-(0.5**4) * math.log(0.5), -(0.7**3) * math.log(0.3), -(0.9**5) * math.log(0.1),
          -(0.4**4) * math.log(0.6)]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_adafocal_bin_lookup():
  edges = jnp.array([0.0, 0.25, 0.5, 0.75, 1.0])
  p = jnp.array([0.0, 0.1, 0.25, 0.5, 0.74, 0.75, 0.99, 1.0])
  np.testing.assert_array_equal(losses.adafocal_bin_index(p, edges), [0, 0, 1, 2, 2, 3, 3, 3])
  # Repeated edges make an empty bin that the reference's first-match scan skips.
  np.testing.assert_array_equal(losses.adafocal_bin_index(jnp.array([0.5, 0.6]), jnp.array([0, .5, .5, 1.])),
                                [2, 2])


def test_adafocal_loss_positive_and_negative_gamma():
  state = losses.AdaFocalState(gammas=jnp.array([-1.5, 2.0]), edges=jnp.array([0.0, 0.5, 1.0]))
  probs = np.array([[0.25, 0.5, 0.25], [0.6, 0.3, 0.1]])
  logits = np.log(probs).astype(np.float32)
  labels = np.array([0, 0])  # p_t = 0.25 -> bin 0 (inverse focal, |gamma| 1.5); 0.6 -> bin 1 (focal, 2)
  want = [-(1.25**1.5) * math.log(0.25), -(0.4**2) * math.log(0.6)]
  got = losses.adafocal(logits=logits, labels=labels, state=state, reduction="none")
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(losses.adafocal(logits=logits, labels=labels, state=state), sum(want), rtol=1e-5)


def test_adafocal_init():
  state = losses.adafocal_init()
  np.testing.assert_allclose(state.edges, np.linspace(0, 1, 16), atol=1e-7)
  np.testing.assert_array_equal(state.gammas, np.ones(15))


def _numpy_adafocal_update(gammas, val_logits, val_labels, lam, switch=0.2, gamma_min=-2.0, gamma_max=20.0):
  """The reference rules written out with numpy and Python floats."""
  probs = _softmax(val_logits.astype(np.float64)).astype(np.float32)
  conf = probs.max(axis=1)
  acc = (probs.argmax(axis=1) == val_labels).astype(np.float64)
  n_bins = len(gammas)
  edges = np.interp(np.linspace(0, len(conf), n_bins + 1), np.arange(len(conf)), np.sort(conf))
  new = []
  for b, gamma in enumerate(gammas):
    in_bin = (conf > edges[b]) & (conf <= edges[b + 1])
    gap = float(conf[in_bin].mean() - acc[in_bin].mean()) if in_bin.any() else 0.0
    gamma = gamma * math.exp(lam * gap) if gamma > 0 else gamma * math.exp(-lam * gap)
    if abs(gamma) < switch:
      gamma = -switch if gamma > 0 else switch
    new.append(max(min(gamma, gamma_max), gamma_min))
  return np.array(new), edges


@pytest.mark.parametrize("lam", [1.0, 40.0])
def test_adafocal_update_matches_numpy_reference(lam):
  rng = np.random.default_rng(3)
  n_val, n_bins = 300, 15
  val_logits = (rng.normal(size=(n_val, 4)) * rng.uniform(0.2, 4.0, size=(n_val, 1))).astype(np.float32)
  val_labels = rng.integers(0, 4, size=n_val)
  val_labels[: n_val // 2] = val_logits[: n_val // 2].argmax(axis=1)
  gammas = np.array([1.0, -1.0, 0.21, -0.21, 19.0, -1.9, 3.0, -0.5, 0.5, 2.0, -2.0, 0.2, 5.0, -0.3, 1.5])
  state = losses.AdaFocalState(gammas=jnp.asarray(gammas, jnp.float32), edges=jnp.linspace(0, 1, n_bins + 1))
  new = jax.jit(losses.adafocal_update)(state, val_logits=val_logits, val_labels=val_labels, lam=lam)
  want_gammas, want_edges = _numpy_adafocal_update(gammas, val_logits, val_labels, lam)
  np.testing.assert_allclose(new.edges, want_edges, atol=1e-6)
  np.testing.assert_allclose(new.gammas, want_gammas, rtol=1e-4, atol=1e-6)
  if lam > 1:  # the large rate drives bins into both switches and both clips
    for value in (0.2, -0.2, 20.0, -2.0):
      assert np.any(np.isclose(want_gammas, value)), value


def test_mdca_zero_when_mean_probabilities_match_frequencies():
  doubly_stochastic = np.array([[0.6, 0.3, 0.1], [0.1, 0.6, 0.3], [0.3, 0.1, 0.6]])
  got = losses.mdca(logits=np.log(doubly_stochastic).astype(np.float32), labels=np.array([0, 1, 2]))
  np.testing.assert_allclose(got, 0.0, atol=1e-6)


def test_mdca_dca_hand_values():
  # mean p = (0.3, 0.425, 0.275), class frequencies (0.5, 0, 0.5): (0.2 + 0.425 + 0.225) / 3.
  np.testing.assert_allclose(losses.mdca(logits=LOGITS_A, labels=Y_A), 0.85 / 3, rtol=1e-5)
  # confidences 0.5 (correct) and 0.6 (wrong): |0.55 - 0.5|.
  np.testing.assert_allclose(losses.dca(logits=LOGITS_A, labels=Y_A), 0.05, rtol=1e-4)
  ce = losses.cross_entropy(logits=LOGITS_A, labels=Y_A)
  np.testing.assert_allclose(losses.ce_mdca(logits=LOGITS_A, labels=Y_A, beta=2.0), ce + 2 * 0.85 / 3,
                             rtol=1e-5)
  np.testing.assert_allclose(losses.ce_dca(logits=LOGITS_A, labels=Y_A, beta=3.0), ce + 3 * 0.05, rtol=1e-5)
  fl = losses.focal(logits=LOGITS_A, labels=Y_A, gamma=2.0)
  np.testing.assert_allclose(losses.focal_mdca(logits=LOGITS_A, labels=Y_A, gamma=2.0, beta=5.0),
                             fl + 5 * 0.85 / 3, rtol=1e-5)


def _numpy_mmce_weighted(logits, labels):
  """Double loops over the correct / incorrect groups, with the reference's mean-inside-sum quirk."""
  probs = _softmax(logits.astype(np.float64))
  conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
  rc, ri = conf[correct], conf[~correct]
  m, n = len(rc), len(ri)
  if m == 0 or n == 0:
    return 0.0

  def kernel(x, y):
    return math.exp(-abs(x - y) / 0.4)

  cc = np.mean([[kernel(x, y) * (1 - x) * (1 - y) for y in rc] for x in rc])
  ii = np.mean([[kernel(x, y) * x * y for y in ri] for x in ri])
  ci = np.mean([[kernel(x, y) * (1 - x) * y for y in ri] for x in rc])
  mmd2 = cc / (m * m + 1e-5) + ii / (n * n + 1e-5) - 2 * ci / (m * n + 1e-5)
  return math.sqrt(mmd2 + 1e-10)


def test_mmce_hand_value_and_numpy_double_loop():
  want = math.sqrt((0.25 + 0.36 - 0.6 * math.exp(-0.25)) / (1 + 1e-5) + 1e-10)
  np.testing.assert_allclose(losses.mmce_weighted(logits=LOGITS_A, labels=Y_A), want, rtol=1e-5)
  for seed in (1, 2):
    logits, labels = _random_batch(seed, batch=17)
    got = losses.mmce_weighted(logits=logits, labels=labels)
    np.testing.assert_allclose(got, _numpy_mmce_weighted(logits, labels), rtol=1e-4)
  ce = losses.cross_entropy(logits=logits, labels=labels)
  np.testing.assert_allclose(losses.ce_mmce(logits=logits, labels=labels),
                             ce + 2.0 * _numpy_mmce_weighted(logits, labels), rtol=1e-5)


def test_mmce_zero_when_all_correct():
  logits, _ = _random_batch(4)
  assert float(losses.mmce_weighted(logits=logits, labels=logits.argmax(axis=1))) == 0.0


def test_logit_norm_against_numpy():
  logits, labels = _random_batch(5)
  for tau in (0.04, 1.0):
    scaled = logits.astype(np.float64) / (tau * (np.linalg.norm(logits, axis=1, keepdims=True) + 1e-7))
    want = -np.log(_softmax(scaled)[np.arange(len(labels)), labels])
    got = losses.logit_norm_ce(logits=logits, labels=labels, tau=tau, reduction="none")
    # float32 log-softmax of logits of size ~1/tau resolves losses near 0 only to ~1e-6.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("name", losses.LOSSES.names())
def test_one_hot_targets_equal_integer_labels(name):
  logits, labels = _random_batch(6)
  one_hot = np.eye(logits.shape[1], dtype=np.float32)[labels]
  np.testing.assert_allclose(_call(name, logits, one_hot, "mean"), _call(name, logits, labels, "mean"),
                             rtol=1e-6)


@pytest.mark.parametrize("name", ["ce", "label_smoothing", "focal", "flsd53", "adafocal", "logit_norm", "mbls",
                                  "acls", "cpc"])
def test_per_sample_losses_are_linear_in_the_target(name):
  logits, labels = _random_batch(7)
  other = np.roll(labels, 1)
  lam = 0.3
  eye = np.eye(logits.shape[1], dtype=np.float32)
  mixed = _call(name, logits, lam * eye[labels] + (1 - lam) * eye[other], "none")
  want = lam * _call(name, logits, labels, "none") + (1 - lam) * _call(name, logits, other, "none")
  np.testing.assert_allclose(mixed, want, rtol=1e-5)


@pytest.mark.parametrize("name", losses.LOSSES.names())
def test_reduction_switch(name):
  logits, labels = _random_batch(8)
  per_sample = _call(name, logits, labels, "none")
  assert per_sample.shape == (len(labels),)
  np.testing.assert_allclose(_call(name, logits, labels, "mean"), np.mean(per_sample), rtol=1e-6)
  np.testing.assert_allclose(_call(name, logits, labels, "sum"), np.sum(per_sample), rtol=1e-6)
  with pytest.raises(ConfigError, match="reduction"):
    _call(name, logits, labels, "max")


@pytest.mark.parametrize("name", losses.LOSSES.names())
def test_make_loss_jit_and_finite_gradients(name):
  # Saturated rows (p_t rounds to 1 or 0 in float32) are where focal-type powers break without care.
  logits = jnp.array([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-50.0, 50.0, 0.0], [1.0, 2.0, 3.0]])
  labels = jnp.array([0, 1, 0, 2])
  state = losses.AdaFocalState(gammas=jnp.array([0.5, -0.5]), edges=jnp.array([0.0, 0.5, 1.0])) \
      if name == "adafocal" else None
  loss_fn = losses.make_loss(name)
  eager = loss_fn(logits, labels, state)
  jitted = jax.jit(loss_fn)(logits, labels, state)
  assert eager.shape == ()
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)
  grad = jax.jit(jax.grad(loss_fn))(logits, labels, state)
  assert np.all(np.isfinite(grad)), grad


@pytest.mark.parametrize("gamma", [0.3, 1.0, 3.0])
def test_focal_gradient_finite_when_saturated(gamma):
  logits = jnp.array([[40.0, 0.0], [0.0, 40.0]])
  grad = jax.grad(lambda z: losses.focal(logits=z, labels=jnp.array([0, 0]), gamma=gamma))(logits)
  assert np.all(np.isfinite(grad))
  grad = jax.grad(lambda z: losses.flsd53(logits=z, labels=jnp.array([0, 0]), gamma=gamma))(logits)
  assert np.all(np.isfinite(grad))


def test_make_loss_binds_and_validates():
  logits, labels = _random_batch(9)
  ce = losses.cross_entropy(logits=logits, labels=labels)
  np.testing.assert_allclose(losses.make_loss("focal", gamma=0.0)(logits, labels), ce, rtol=1e-6)
  np.testing.assert_allclose(losses.make_loss("ce", reduction="sum")(logits, labels), ce * len(labels),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.make_loss("label_smoothing", alpha=0.2, form="others")(logits, labels),
                             losses.label_smoothing_ce(logits=logits, labels=labels, alpha=0.2,
                                                       form="others"))
  with pytest.raises(ConfigError, match="allowed: beta, gamma, reduction"):
    losses.make_loss("focal_mdca", alpha=0.1)
  with pytest.raises(ConfigError, match="reduction"):
    losses.make_loss("ce", reduction="none")
  with pytest.raises(UnknownNameError, match="choose one of"):
    losses.make_loss("brier")
  with pytest.raises(ConfigError, match="needs its state"):
    losses.make_loss("adafocal")(logits, labels)
  with pytest.raises(ConfigError, match="takes no state"):
    losses.make_loss("ce")(logits, labels, losses.adafocal_init())
  state = losses.adafocal_init()
  per_sample = losses.adafocal(logits=logits, labels=labels, state=state, reduction="none")
  np.testing.assert_allclose(losses.make_loss("adafocal")(logits, labels, state), np.mean(per_sample),
                             rtol=1e-6)


def test_label_shape_mismatch_raises():
  with pytest.raises(ConfigError, match="labels of shape"):
    losses.cross_entropy(logits=LOGITS_A, labels=np.zeros((2, 4), np.float32))
  with pytest.raises(ConfigError, match="labels of shape"):
    losses.cross_entropy(logits=LOGITS_A, labels=np.zeros((2,), np.float32))


# Two samples, margin 10: sample 0 has logit distances 15 and 13 to its max (beyond the margin), sample 1 none.
MARGIN_LOGITS = np.array([[15.0, 0.0, 2.0], [1.0, 2.0, 3.0]], np.float32)
MARGIN_LABELS = np.array([0, 2])


def _regulariser(name, logits):
  """The loss minus its cross-entropy: the margin term alone."""
  return (losses.make_loss(name)(logits, MARGIN_LABELS)
          - losses.cross_entropy(logits=logits, labels=MARGIN_LABELS))


def test_mbls_hand_value_and_gradient_through_the_max():
  # relu(d - 10) = (0, 5, 3) and (0, 0, 0): mean over the 6 entries 8 / 6, times alpha 0.1.
  np.testing.assert_allclose(_regulariser("mbls", MARGIN_LOGITS), 0.1 * 8 / 6, rtol=1e-5)
  grad = jax.grad(lambda z: _regulariser("mbls", z))(MARGIN_LOGITS)
  # The max logit gains 0.1 / 6 per class beyond the margin (two of them), each such class loses 0.1 / 6.
  np.testing.assert_allclose(grad, 0.1 / 6 * np.array([[2.0, -1.0, -1.0], [0.0, 0.0, 0.0]]), atol=1e-6)


def test_acls_hand_value_and_its_stopped_max():
  # pos: relu(15 - 10)^2 = 25 (sample 0), 0 (sample 1); neg: (25 + 9) / (K - 1 = 2) = 17, and 0.
  # Averaged: 1.0 * 25 / 2 + 0.1 * 17 / 2 = 13.35; times alpha 0.1.
  np.testing.assert_allclose(_regulariser("acls", MARGIN_LOGITS), 0.1 * 13.35, rtol=1e-5)
  grad = jax.grad(lambda z: _regulariser("acls", z))(MARGIN_LOGITS)
  # d/dz_00 = 0.1 * 2 * 5 / 2 (pos only: the neg term's max is stopped); d/dz_01 = -0.1 * 0.1 * 2 * 5 / 2 / 2,
  # d/dz_02 = -0.1 * 0.1 * 2 * 3 / 2 / 2.
  np.testing.assert_allclose(grad, [[0.5, -0.025, -0.015], [0.0, 0.0, 0.0]], atol=1e-6)


@pytest.mark.parametrize("name", ["mbls", "acls"])
def test_margin_losses_are_cross_entropy_within_the_margin(name):
  logits, labels = _random_batch(5)  # logits of a few units: every distance is below the margin of 10
  np.testing.assert_allclose(losses.make_loss(name)(logits, labels),
                             losses.cross_entropy(logits=logits, labels=labels), rtol=1e-6)


def test_cpc_against_the_constraints_written_out():
  logits, labels = _random_batch(11, batch=6, classes=4)
  lsig = lambda x: -np.log1p(np.exp(-x))
  want = []
  for z, y in zip(logits.astype(np.float64), labels):
    rest = [k for k in range(4) if k != y]
    ce = -(z[y] - np.log(np.exp(z).sum()))
    bdc = -sum(lsig(z[y] - z[k]) for k in rest) / 3
    bec = -sum(0.5 * lsig(z[a] - z[b] + 1e-10) for a in rest for b in rest) / 3 / 2  # (K-1)(K-2) = 6
    want.append(ce + 2.0 * bdc + 0.5 * bec)
  got = losses.cpc(logits=logits, labels=labels, lambda_bdc=2.0, lambda_bec=0.5, reduction="none")
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ConfigError, match="at least 3 classes"):
    losses.cpc(logits=logits[:, :2], labels=labels % 2)
