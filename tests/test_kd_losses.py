"""KD losses: hand-computed values, T² and class-mean scaling, analytic gradients, RKD invariances."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calibjax.errors import ConfigError, UnknownNameError
from calibjax.kd import losses as kd
from calibjax.kd.objective import KD_LOSSES

# One sample, two classes: teacher logits (log 3, 0) give p_t = (3/4, 1/4) at T = 1; the student is uniform.
TEACHER = jnp.array([[math.log(3.0), 0.0]])
STUDENT = jnp.zeros((1, 2))
KL_T1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(p_t || p_s) = 0.130812...


def _random_logits(seed, shape=(5, 7), scale=3.0):
  return scale * jax.random.normal(jax.random.key(seed), shape)


def test_kd_hand_computed_value_and_t_squared_scaling():
  assert float(kd.kd_loss(student_logits=STUDENT, teacher_logits=TEACHER, temperature=1.0)) == pytest.approx(
      KL_T1, rel=1e-6)
  # T = 2: p_t = softmax((log 3) / 2, 0) = (sqrt 3, 1) / (sqrt 3 + 1); the student stays uniform.
  p = np.array([math.sqrt(3.0), 1.0]) / (math.sqrt(3.0) + 1.0)
  expected = 4.0 * float(np.sum(p * np.log(p / 0.5)))
  assert float(kd.kd_loss(student_logits=STUDENT, teacher_logits=TEACHER, temperature=2.0)) == pytest.approx(
      expected, rel=1e-6)
  # In general kd(s, t, T) = T² kd(s / T, t / T, 1).
  s, t = _random_logits(0), _random_logits(1)
  np.testing.assert_allclose(kd.kd_loss(student_logits=s, teacher_logits=t, temperature=3.0),
                             9.0 * kd.kd_loss(student_logits=s / 3, teacher_logits=t / 3, temperature=1.0),
                             rtol=1e-5)


def test_scaled_kd_is_the_class_mean():
  # Two classes: the hand value above divided by K = 2 (T = 1); T² is kept (the docstring says why).
  assert float(kd.scaled_kd_loss(student_logits=STUDENT, teacher_logits=TEACHER, temperature=1.0)) == (
      pytest.approx(KL_T1 / 2, rel=1e-6))
  s, t = _random_logits(2), _random_logits(3)
  np.testing.assert_allclose(kd.scaled_kd_loss(student_logits=s, teacher_logits=t),  # default T = 50
                             kd.kd_loss(student_logits=s, teacher_logits=t, temperature=50.0) / 7, rtol=1e-6)
  # = T² times the element-mean KL over the B x K entries (PyTorch KLDivLoss(reduction='mean')).
  p_t, log_p_s = jax.nn.softmax(t / 50.0), jax.nn.log_softmax(s / 50.0)
  element_mean = float(np.mean(p_t * (np.log(p_t) - log_p_s)))
  assert float(kd.scaled_kd_loss(student_logits=s, teacher_logits=t)) == pytest.approx(2500 * element_mean,
                                                                                       rel=1e-4)


@pytest.mark.parametrize("loss", [kd.kd_loss, kd.scaled_kd_loss])
def test_zero_when_student_equals_teacher_and_positive_otherwise(loss):
  t = _random_logits(4)
  np.testing.assert_allclose(loss(student_logits=t, teacher_logits=t, temperature=2.0, reduction="none"),
                             0.0, atol=1e-6)
  assert float(loss(student_logits=_random_logits(5), teacher_logits=t, temperature=2.0)) > 0


def test_reductions():
  s, t = _random_logits(6), _random_logits(7)
  per_sample = kd.kd_loss(student_logits=s, teacher_logits=t, reduction="none")
  assert per_sample.shape == (5,)
  np.testing.assert_allclose(kd.kd_loss(student_logits=s, teacher_logits=t, reduction="sum"),
                             per_sample.sum(), rtol=1e-6)
  np.testing.assert_allclose(kd.kd_loss(student_logits=s, teacher_logits=t), per_sample.mean(), rtol=1e-6)
  with pytest.raises(ConfigError, match="reduction"):
    kd.kd_loss(student_logits=s, teacher_logits=t, reduction="batchmean")


def test_kd_gradient_is_t_times_the_probability_gap():
  """d/ds [T² KL(p_t || softmax(s / T))] = T (softmax(s / T) - p_t); none flows into the teacher."""
  s, t, temperature = _random_logits(8), _random_logits(9), 4.0
  loss = lambda s, t: kd.kd_loss(student_logits=s, teacher_logits=t, temperature=temperature, reduction="sum")
  grad_s, grad_t = jax.grad(loss, argnums=(0, 1))(s, t)
  expected = temperature * (jax.nn.softmax(s / temperature) - jax.nn.softmax(t / temperature))
  np.testing.assert_allclose(grad_s, expected, atol=1e-5)
  assert not np.asarray(grad_t).any()


def test_kd_is_finite_for_extreme_logits():
  s = jnp.array([[1e4, -1e4, 0.0]])
  t = jnp.array([[-1e4, 1e4, 0.0]])
  loss = lambda s: kd.kd_loss(student_logits=s, teacher_logits=t, temperature=1.0)
  value, grad = jax.value_and_grad(loss)(s)
  assert np.isfinite(value) and value > 1e4 and np.isfinite(grad).all()


def test_cxkd_combines_alpha_t_squared_kl_and_ce():
  labels = jnp.array([1])
  ce = math.log(2.0)  # uniform student
  expected = 0.9 * KL_T1 + 0.1 * ce  # T = 1
  value = kd.cxkd_loss(student_logits=STUDENT, teacher_logits=TEACHER, labels=labels, temperature=1.0)
  assert float(value) == pytest.approx(expected, rel=1e-6)
  s, t, y = _random_logits(10), _random_logits(11), jnp.arange(5) % 7
  np.testing.assert_allclose(  # defaults T = 20, alpha = 0.9; one-hot targets give the same CE
      kd.cxkd_loss(student_logits=s, teacher_logits=t, labels=jax.nn.one_hot(y, 7), reduction="none"),
      0.9 * kd.kd_loss(student_logits=s, teacher_logits=t, temperature=20.0, reduction="none")
      + 0.1 * -jnp.take_along_axis(jax.nn.log_softmax(s), y[:, None], axis=1)[:, 0], rtol=1e-5)
  # alpha = 1: pure KD, the labels do not matter.
  np.testing.assert_allclose(kd.cxkd_loss(student_logits=s, teacher_logits=t, labels=y, alpha=1.0),
                             kd.kd_loss(student_logits=s, teacher_logits=t, temperature=20.0), rtol=1e-6)


def test_combined_and_its_validation():
  assert float(kd.combined(distill=jnp.asarray(2.0), task=jnp.asarray(4.0), alpha=0.25)) == 3.5
  np.testing.assert_allclose(kd.combined(distill=jnp.ones(3), task=jnp.zeros(3), alpha=0.5), 0.5)
  with pytest.raises(ConfigError, match="alpha"):
    kd.combined(distill=1.0, task=1.0, alpha=1.5)
  with pytest.raises(ConfigError, match="temperature"):
    kd.kd_loss(student_logits=STUDENT, teacher_logits=TEACHER, temperature=0.0)
  with pytest.raises(ConfigError, match="logits"):
    kd.kd_loss(student_logits=STUDENT, teacher_logits=jnp.zeros((1, 3)))


def test_rkd_distance_hand_computed():
  """Collinear student (0,0), (1,0), (2,0) vs right-angled teacher (0,0), (1,0), (0,1)."""
  student = jnp.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
  teacher = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  # Distances of the pairs (01, 02, 12) over their mean: student (1, 2, 1) / (4/3), teacher
  # (1, 1, √2) / ((2 + √2) / 3).
  s = np.array([1.0, 2.0, 1.0]) * 3 / 4
  t = np.array([1.0, 1.0, math.sqrt(2.0)]) * 3 / (2 + math.sqrt(2.0))
  expected = 2 * np.sum(0.5 * (s - t) ** 2) / 9  # every |gap| < 1; each pair twice among the 9 entries
  assert float(kd.rkd_distance_loss(student_embeddings=student, teacher_embeddings=teacher)) == pytest.approx(
      expected, rel=1e-5)


def _angle_loss_by_loops(student, teacher):
  """Plain re-implementation: cosines of the angle at i between j and k, over all B³ triplets."""
  def cosines(x):
    out = np.zeros((len(x),) * 3)
    for i, j, k in itertools.product(range(len(x)), repeat=3):
      a, b = x[j] - x[i], x[k] - x[i]
      if np.linalg.norm(a) > 0 and np.linalg.norm(b) > 0:
        out[i, j, k] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return out
  gap = cosines(np.asarray(student, np.float64)) - cosines(np.asarray(teacher, np.float64))
  return np.mean(np.where(np.abs(gap) < 1, 0.5 * gap**2, np.abs(gap) - 0.5))


def test_rkd_angle_matches_a_loop_implementation():
  angle = jax.jit(kd.rkd_angle_loss)
  student = jax.random.normal(jax.random.key(12), (5, 3))
  teacher = jax.random.normal(jax.random.key(13), (5, 8))
  assert float(angle(student_embeddings=student, teacher_embeddings=teacher)) == pytest.approx(
      _angle_loss_by_loops(student, teacher), rel=1e-4)
  # The right-angled teacher above: at vertex 0 the angle is 90°, the collinear student has 0°: gap 1 there.
  student = jnp.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
  teacher = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  assert float(angle(student_embeddings=student, teacher_embeddings=teacher)) == pytest.approx(
      _angle_loss_by_loops(student, teacher), rel=1e-5)


def test_rkd_is_invariant_to_rotation_translation_and_scale_of_the_student():
  teacher = jax.random.normal(jax.random.key(14), (6, 4, 2))  # (B, ...) features are flattened
  student = jax.random.normal(jax.random.key(15), (6, 5))
  rotation, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((5, 5)))
  moved = 3.0 * student @ jnp.asarray(rotation, jnp.float32) + 1.5
  losses = (kd.rkd_distance_loss, kd.rkd_angle_loss, kd.rkd_loss)
  all_three = jax.jit(
      lambda s, t: jnp.stack([loss(student_embeddings=s, teacher_embeddings=t) for loss in losses]))
  np.testing.assert_allclose(all_three(moved, teacher), all_three(student, teacher), rtol=1e-4)
  np.testing.assert_allclose(all_three(moved, student), 0.0, atol=1e-5)
  np.testing.assert_allclose(all_three(teacher, teacher), 0.0, atol=1e-12)


def test_rkd_weights_and_finite_gradients():
  student = jax.random.normal(jax.random.key(16), (4, 6))
  teacher = jax.random.normal(jax.random.key(17), (4, 3))
  parts = jax.jit(lambda s, t: [loss(student_embeddings=s, teacher_embeddings=t)
                                 for loss in (kd.rkd_loss, kd.rkd_distance_loss, kd.rkd_angle_loss)])
  total, distance, angle = parts(student, teacher)
  np.testing.assert_allclose(total, 25 * distance + 50 * angle, rtol=1e-6)
  loss = lambda s, t: kd.rkd_loss(student_embeddings=s, teacher_embeddings=t)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  # A collapsed student (all embeddings equal): every distance is clamped and every direction is zero.
  for s in (student, jnp.ones_like(student)):
    grad_s, grad_t = grad(s, teacher)
    assert np.isfinite(grad_s).all() and not np.asarray(grad_t).any()
  assert np.abs(grad(student, teacher)[0]).sum() > 0


def test_registry():
  """One registry of the losses a kd run selects, with each recipe's defaults (RepDistiller's for kd, crd, rkd;
  paper 004's for scaled_kd; CalibrationXferViaKD's for cxkd)."""
  assert KD_LOSSES.names() == ["crd", "cxkd", "kd", "rkd", "scaled_kd"]
  assert KD_LOSSES.get("scaled_kd").distill is kd.scaled_kd_loss
  defaults = {name: (KD_LOSSES.get(name).alpha, KD_LOSSES.get(name).temperature, KD_LOSSES.get(name).relation)
              for name in KD_LOSSES.names()}
  assert defaults == {"kd": (0.9, 4.0, None), "scaled_kd": (0.5, 50.0, None), "cxkd": (0.9, 20.0, None),
                      "crd": (0.0, 4.0, "crd"), "rkd": (0.0, 4.0, "rkd")}
  assert KD_LOSSES.get("rkd").relation_defaults == {"weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0}
  with pytest.raises(UnknownNameError, match="unknown KD loss 'fitnet'"):
    KD_LOSSES.get("fitnet")


def test_jittable():
  s, t = _random_logits(18), _random_logits(19)
  jitted = jax.jit(lambda s, t, temperature: kd.kd_loss(student_logits=s, teacher_logits=t,
                                                         temperature=temperature))
  np.testing.assert_allclose(jitted(s, t, 4.0), kd.kd_loss(student_logits=s, teacher_logits=t), rtol=1e-6)
