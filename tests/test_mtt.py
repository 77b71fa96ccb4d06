"""Tests of trajectory matching (MTT): the unroll, its loss and gradients, the memory modes, the minibatch
plan, the learned-lr update and the distiller.

Tiny shapes (3 classes of 8x8x1 images, a depth-1 width-8 ConvNet, IPC 2 with batch_syn 4, so a permutation is
a padded short chunk and a full one, 2 student steps). Each distinct config is one XLA compile of a
second-order graph, so compiled functions are cached and built at LLVM -O0 (same program, faster compile).
"""

import dataclasses
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calibjax import models
from calibjax.data.prepare import Splits
from calibjax.distill import matching, mtt
from calibjax.errors import ConfigError

C, H, IPC, STEPS = 3, 8, 2, 2
N = C * IPC
NET = models.build("convnet", num_classes=C, input_shape=(H, H, 1), width=8, depth=1)
START, _ = NET.init(jax.random.key(0))
# The expert moved by a fixed random direction: a target the student cannot reach in 2 steps.
TARGET = jax.tree.map(lambda p, k: p + 0.05 * jax.random.normal(k, p.shape),
                      START, jax.tree.unflatten(jax.tree.structure(START),
                                                list(jax.random.split(jax.random.key(1),
                                                                      len(jax.tree.leaves(START))))))
IMAGES = jax.random.normal(jax.random.key(2), (N, H, H, 1))
LABELS = jnp.repeat(jnp.arange(C, dtype=jnp.int32), IPC)
LOG_LR = jnp.log(jnp.float32(0.05))
# MDT "fixed" with the ratio a traced argument: RATIO (10 %) in most tests, 1 in the mask test, one compile.
BASE = mtt.MTTConfig(ipc=IPC, lr_img=100.0, syn_steps=STEPS, expert_epochs=1, max_start_epoch=2, batch_syn=4,
                     dsa_strategy="crop", mdt="fixed", unroll="full")
# Jitted: eagerly, each of its small ops would compile on its own.
_batch_plan = jax.jit(mtt.batch_plan, static_argnames=("n", "batch", "steps"))
PLAN = _batch_plan(jax.random.key(3), n=N, batch=4, steps=STEPS)
RATIO = jnp.float32(0.1)


@functools.cache
def _value_and_grad(config):
  fn = jax.jit(functools.partial(mtt.value_and_grad, NET, config))
  return fn.lower(IMAGES, LOG_LR, LABELS, START, TARGET, PLAN, RATIO).compile()


@functools.cache
def _unroll(config):
  fn = jax.jit(functools.partial(mtt.unroll_student, NET, config))
  return fn.lower(START, IMAGES, LABELS, LOG_LR, PLAN, RATIO).compile()


def _explicit(images, log_lr, *, detach_params=False):
  """The unroll as a Python loop over `student_step` (no scan); `detach_params` is TESLA's approximation."""
  params = START
  for k in range(STEPS):
    held = jax.lax.stop_gradient(params) if detach_params else params
    new = mtt.student_step(NET, BASE, held, images, LABELS, log_lr, PLAN.idx[k], PLAN.weight[k], PLAN.keys[k],
                           RATIO)
    params = jax.tree.map(lambda p, n, h: p + (n - h), params, new, held)
  return mtt.trajectory_loss(params, START, TARGET)


@functools.cache
def _explicit_value_and_grad(detach_params):
  fn = jax.jit(jax.value_and_grad(functools.partial(_explicit, detach_params=detach_params), argnums=(0, 1)))
  return fn.lower(IMAGES, LOG_LR).compile()


def _cosine(a, b):
  a, b = np.ravel(a), np.ravel(b)
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------------------------------------- loss


def test_loss_is_zero_when_the_student_lands_on_the_target_and_one_at_the_start():
  landed = _unroll(BASE)(START, IMAGES, LABELS, LOG_LR, PLAN, RATIO)
  assert float(mtt.trajectory_loss(landed, START, landed)) == 0.0
  assert float(mtt.trajectory_loss(START, START, TARGET)) == pytest.approx(1.0)
  loss, _ = _value_and_grad(BASE)(IMAGES, LOG_LR, LABELS, START, landed, PLAN, RATIO)
  assert float(loss) == pytest.approx(0.0, abs=1e-10)  # another compile of the same unroll: rounding only
  # Hand check of the normalisation on a two-leaf tree: (1 + 4) / (9 + 16).
  tree = lambda a, b: {"a": jnp.float32(a), "b": jnp.float32(b)}
  assert float(mtt.trajectory_loss(tree(1, 2), tree(3, 4), tree(0, 0))) == pytest.approx(5 / 25)


def test_gradients_reach_the_images_and_the_learned_lr():
  loss, (g_images, g_log_lr) = _value_and_grad(BASE)(IMAGES, LOG_LR, LABELS, START, TARGET, PLAN, RATIO)
  assert np.isfinite(float(loss)) and 0.0 < float(loss)
  assert g_images.shape == IMAGES.shape and np.all(np.isfinite(g_images))
  # The 2 steps cover one permutation (2 + 4 images), so every image gets a gradient.
  assert np.all(np.abs(np.asarray(g_images)).reshape(N, -1).sum(axis=1) > 0)
  # The lr gradient agrees with a central difference of the loss.
  h = 1e-2
  loss_at = lambda log_lr: _value_and_grad(BASE)(IMAGES, log_lr, LABELS, START, TARGET, PLAN, RATIO)[0]
  numeric = (loss_at(LOG_LR + h) - loss_at(LOG_LR - h)) / (2 * h)
  assert float(g_log_lr) != 0.0
  assert float(g_log_lr) == pytest.approx(float(numeric), rel=2e-2)


def test_scan_unroll_equals_an_explicit_step_by_step_unroll():
  loss_ref, (gi_ref, gl_ref) = _explicit_value_and_grad(False)(IMAGES, LOG_LR)
  for unroll in ("full", "rolled"):
    loss, (gi, gl) = _value_and_grad(dataclasses.replace(BASE, unroll=unroll))(
        IMAGES, LOG_LR, LABELS, START, TARGET, PLAN, RATIO)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    np.testing.assert_allclose(gi, gi_ref, rtol=1e-4, atol=1e-6 * float(jnp.abs(gi_ref).max()))
    np.testing.assert_allclose(gl, gl_ref, rtol=1e-4)


def test_remat_gives_the_plain_gradients_and_tesla_its_first_order_approximation():
  loss, (gi, gl) = _value_and_grad(BASE)(IMAGES, LOG_LR, LABELS, START, TARGET, PLAN, RATIO)
  loss_r, (gi_r, gl_r) = _value_and_grad(dataclasses.replace(BASE, memory="remat"))(
      IMAGES, LOG_LR, LABELS, START, TARGET, PLAN, RATIO)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  np.testing.assert_allclose(gi_r, gi, rtol=1e-4, atol=1e-6 * float(jnp.abs(gi).max()))
  np.testing.assert_allclose(gl_r, gl, rtol=1e-4)
  # TESLA's two sweeps = reverse mode through the unroll with θ_k held constant inside each step's gradient.
  loss_t, (gi_t, gl_t) = _value_and_grad(dataclasses.replace(BASE, memory="tesla"))(
      IMAGES, LOG_LR, LABELS, START, TARGET, PLAN, RATIO)
  loss_d, (gi_d, gl_d) = _explicit_value_and_grad(True)(IMAGES, LOG_LR)
  np.testing.assert_allclose(loss_t, loss, rtol=1e-5)
  np.testing.assert_allclose(gi_t, gi_d, rtol=1e-4, atol=1e-6 * float(jnp.abs(gi_d).max()))
  np.testing.assert_allclose(gl_t, gl_d, rtol=1e-4)
  # ... which drops only second-order terms: close to, but not equal to, the exact gradient at this lr.
  assert _cosine(gi_t, gi) > 0.95
  assert not np.allclose(gi_t, gi, rtol=1e-4)


def test_mdt_mask_is_inside_the_unroll():
  # Ratio 1 zeroes every student input: no gradient reaches the images, the lr still gets one (biases).
  loss, (gi, gl) = _value_and_grad(BASE)(IMAGES, LOG_LR, LABELS, START, TARGET, PLAN, jnp.float32(1.0))
  assert np.all(np.asarray(gi) == 0.0) and float(gl) != 0.0 and np.isfinite(float(loss))
  # At 10 % some, not all, input entries are zeroed: the loss differs from the unmasked unroll's.
  unmasked, _ = _value_and_grad(BASE)(IMAGES, LOG_LR, LABELS, START, TARGET, PLAN, jnp.float32(0.0))
  masked, (gi, _) = _value_and_grad(BASE)(IMAGES, LOG_LR, LABELS, START, TARGET, PLAN, RATIO)
  assert float(masked) != float(unmasked) and np.any(np.asarray(gi) != 0.0)


# ----------------------------------------------------------------------------------------- minibatches


def test_batch_plan_chunks_permutations_short_chunk_first():
  plan = _batch_plan(jax.random.key(0), n=10, batch=4, steps=7)
  idx, weight = np.asarray(plan.idx), np.asarray(plan.weight)
  assert idx.shape == weight.shape == (7, 4) and plan.keys.shape == (7,)
  np.testing.assert_allclose(weight.sum(axis=1), 1.0, rtol=1e-6)
  # 10 = 2 (short chunk, 2 padding entries first) + 4 + 4, so each permutation spans 3 rows.
  for p in range(2):
    rows = slice(3 * p, 3 * p + 3)
    valid = weight[rows] > 0
    assert valid[0].tolist() == [False, False, True, True] and valid[1:].all()
    assert sorted(idx[rows][valid].tolist()) == list(range(10))
    np.testing.assert_allclose(weight[rows][valid], np.repeat([0.5, 0.25, 0.25], [2, 4, 4]))
  whole = _batch_plan(jax.random.key(0), n=6, batch=6, steps=2)
  assert all(sorted(row) == list(range(6)) for row in np.asarray(whole.idx).tolist())
  assert not np.array_equal(whole.idx[0], whole.idx[1])  # re-permuted when exhausted


# ------------------------------------------------------------------------------------------ learned lr


def test_log_lr_update_is_the_reference_raw_lr_step_to_first_order_and_stays_positive_and_finite():
  tx = mtt.lr_optimizer(dataclasses.replace(BASE, lr_lr=1e-5))
  lr, g_raw = 0.01, 3.0
  log_lr, state = jnp.log(jnp.float32(lr)), tx.init(jnp.float32(0.0))
  expected, buf = lr, 0.0
  for _ in range(3):  # the reference: buf = 0.5 buf + g; lr -= lr_lr buf
    log_lr, state = mtt.update_log_lr(tx, log_lr, jnp.float32(g_raw * float(jnp.exp(log_lr))), state)
    buf = 0.5 * buf + g_raw
    expected -= 1e-5 * buf
  # The change agrees to first order: the relative step is ~1e-2, so within a few percent.
  assert (lr - float(jnp.exp(log_lr))) / (lr - expected) == pytest.approx(1.0, abs=0.03)
  # A step the reference takes to 0.01 - 1e-3 * 20 < 0 shrinks the lr by exp(-2) here.
  big = mtt.lr_optimizer(dataclasses.replace(BASE, lr_lr=1e-3))
  log_lr, _ = mtt.update_log_lr(big, jnp.log(jnp.float32(0.01)), jnp.float32(20 * 0.01),
                                big.init(jnp.float32(0)))
  assert float(jnp.exp(log_lr)) == pytest.approx(0.01 * np.exp(-2.0), rel=1e-5)
  # An increase is the reference's additive step, also from an lr near zero (a multiplicative one overflows).
  log_lr, _ = mtt.update_log_lr(big, jnp.log(jnp.float32(1e-8)), jnp.float32(-3.0 * 1e-8), big.init(jnp.float32(0)))
  assert float(jnp.exp(log_lr)) == pytest.approx(1e-8 + 3e-3, rel=1e-4)


# ------------------------------------------------------------------------------------------- distiller


def _splits():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(C * 10, H, H, 1)).astype(np.float32)
  labels = np.repeat(np.arange(C), 10).astype(np.int32)
  return Splits(images, labels, images[:3], labels[:3], images[:3], labels[:3], C, ("a", "b", "c"), {})


def _trajectories(experts=2, snapshots=3):
  """Expert e's snapshot k = START + k * step_e: distinct snapshots, leaves (experts, snapshots, ...)."""
  steps = [jax.tree.map(lambda p, e=e: 0.02 * jax.random.normal(jax.random.key(10 + e), p.shape), START)
           for e in range(experts)]
  return jax.tree.map(lambda p, *s: jnp.stack([jnp.stack([p + k * d for k in range(snapshots)]) for d in s]),
                      START, *steps)


def test_distiller_refuses_a_buffer_too_short_for_the_start_epochs():
  with pytest.raises(ConfigError, match="expert epochs"):
    mtt.make_distiller(NET, dataclasses.replace(BASE, max_start_epoch=3), _splits(), _trajectories())
  with pytest.raises(ConfigError, match="batch_syn"):
    mtt.make_distiller(NET, dataclasses.replace(BASE, batch_syn=N + 1), _splits(), _trajectories())


# ---------------------------------------------------------------------------------------------- config


def test_default_config_uses_the_reference_table_and_argparse_defaults():
  c10 = mtt.default_config("cifar10", 10)
  assert (c10.syn_steps, c10.expert_epochs, c10.max_start_epoch, mtt.reference_row("cifar10", 10)["lr_img"],
          c10.lr_lr, c10.lr_teacher, c10.zca_expected) == (30, 2, 20, 100.0, 1e-5, 0.001, True)
  assert mtt.default_config("cifar100", 50).batch_syn == 125
  fmnist = mtt.default_config("fashion_mnist", 10)  # the in-project row
  assert (fmnist.syn_steps, fmnist.expert_epochs, fmnist.max_start_epoch, fmnist.batch_syn,
          mtt.reference_row("fashion_mnist", 10)["lr_img"], fmnist.lr_lr, fmnist.lr_teacher,
          fmnist.zca_expected) == (20, 3, 10, 0, 1000.0, 1e-7, 0.01, False)
  assert "lr_img" not in fmnist  # MTT's image lr is the shared distill.lr_img, set from the row
  mnist = mtt.default_config("mnist", 10)  # the reference's argparse defaults
  assert (mnist.syn_steps, mnist.expert_epochs, mnist.max_start_epoch, mnist.lr_lr) == (20, 3, 25, 1e-5)
  assert (fmnist.buffer_dir, fmnist.memory, fmnist.unroll) == ("", "none", "auto")
  for bad in (dict(memory="sqrt"), dict(unroll="partial"), dict(syn_steps=0), dict(lr_teacher=0.0)):
    with pytest.raises(ConfigError):
      dataclasses.replace(BASE, **bad)
  assert mtt.scan_unroll(dataclasses.replace(BASE, unroll="rolled")) == 1
  assert mtt.scan_unroll(dataclasses.replace(BASE, unroll="full")) is True
  assert matching.mdt_ratio(jax.random.key(0), dataclasses.replace(BASE, mdt="fixed")) == pytest.approx(0.1)


def test_cpu_budget_minibatches_the_ipc10_student_steps_only():
  path = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "distill.py")
  spec = importlib.util.spec_from_file_location("distill_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  budgets = {ipc: module.get_config(f"method=mtt,ipc={ipc},budget=cpu").distill for ipc in (1, 10)}
  assert [(d.iterations, d.mtt.batch_syn, d.mtt.syn_steps) for d in budgets.values()] == [(150, 0, 20),
                                                                                           (150, 10, 20)]
  paper = module.get_config("method=mtt,ipc=10").distill
  assert (paper.iterations, paper.mtt.batch_syn, paper.lr_img) == (5000, 0, 1000.0)
