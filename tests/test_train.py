"""Training core: schedules, the pure step, prediction batching, data parallelism, config presets."""

import os
import subprocess
import sys
import textwrap
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from calibjax import config_lib, models, parallel
from calibjax.errors import ConfigError
from calibjax.train import schedules
from calibjax.train import step as step_lib


ce = step_lib.label_loss(lambda logits, labels: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())


def tiny_problem(n=64, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
  labels = (images[:, :4].mean(axis=(1, 2, 3)) > 0).astype(np.int32)
  return images, labels


def test_half_schedule_is_the_dd_protocol():
  lr = schedules.make_schedule("half", base_lr=0.01, epochs=10, steps_per_epoch=3)
  assert float(lr(0)) == pytest.approx(0.01) and float(lr(14)) == pytest.approx(0.01)
  assert float(lr(15)) == pytest.approx(0.001) and float(lr(29)) == pytest.approx(0.001)
  one_epoch = schedules.make_schedule("half", base_lr=0.01, epochs=1, steps_per_epoch=3)
  assert float(one_epoch(2)) == pytest.approx(0.01)


def test_multistep_and_cosine_schedules():
  lr = schedules.make_schedule("multistep", base_lr=0.05, epochs=240, steps_per_epoch=1, milestones=(150, 180, 210))
  assert [round(float(lr(s)), 7) for s in (149, 150, 180, 210)] == [0.05, 0.005, 0.0005, 0.00005]
  cos = schedules.make_schedule("cosine", base_lr=0.1, epochs=10, steps_per_epoch=10)
  assert float(cos(0)) == pytest.approx(0.1) and float(cos(50)) == pytest.approx(0.05) and float(cos(100)) < 1e-6
  with pytest.raises(ConfigError, match="milestones"):
    schedules.make_schedule("multistep", base_lr=0.1, epochs=10, steps_per_epoch=1, milestones=(10,))
  with pytest.raises(ConfigError, match="unknown lr schedule"):
    schedules.make_schedule("linear", base_lr=0.1, epochs=10, steps_per_epoch=1)


def test_weight_decay_is_coupled_like_pytorch():
  # PyTorch SGD: g <- g + wd * w, then momentum. With zero gradient one step moves w by -lr * wd * w.
  tx = schedules.make_optimizer(lr_schedule=optax.constant_schedule(0.1), momentum=0.9, weight_decay=0.5)
  w = {"w": np.array([2.0], np.float32)}
  updates, _ = tx.update({"w": np.zeros(1, np.float32)}, tx.init(w), w)
  np.testing.assert_allclose(updates["w"], [-0.1 * 0.5 * 2.0], rtol=1e-6)


@pytest.mark.parametrize("name, options", [("convnet", dict(width=8, depth=1)),
                                           ("densenet121", dict(blocks=(1, 1), growth=4))])
def test_train_step_learns_and_compiles_once(name, options):
  """Also a DenseNet, whose model state carries its dropout stream through the jitted, replicated step."""
  chex.clear_trace_counter()  # the count is kept per function definition, across the parametrized cases
  images, labels = tiny_problem()
  net = models.build(name, num_classes=2, input_shape=(8, 8, 1), **options)
  tx = optax.sgd(0.05, momentum=0.9)
  mesh = parallel.make_mesh()
  step = chex.assert_max_traces(step_lib.make_train_step(net, ce, tx), n=1)
  jitted = step_lib.jit_train_step(step, mesh)
  state = parallel.replicate(step_lib.init_train_state(net, tx, jax.random.key(0)), mesh)
  batch = parallel.shard_batch({"images": images, "labels": labels}, mesh)
  losses = []
  for _ in range(30):
    state, metrics = jitted(state, jax.random.key(1), batch)
    losses.append(float(metrics["loss"]))
  assert int(state["step"]) == 30
  assert losses[-1] < 0.5 * losses[0]


def test_predict_pads_the_last_batch_and_keeps_order():
  images, _ = tiny_problem(n=37)
  net = models.build("convnet", num_classes=2, input_shape=(8, 8, 1), width=4, depth=1)
  params, state = net.init(jax.random.key(0))
  mesh = parallel.make_mesh()
  predict_fn = step_lib.make_predict_fn(net, mesh)
  batch_shapes = []

  def recording_predict_fn(params, state, chunk):
    batch_shapes.append(chunk.shape[0])
    return predict_fn(params, state, chunk)

  batched = step_lib.predict(recording_predict_fn, params, state, images, batch_size=16, mesh=mesh)
  direct = np.asarray(net.apply(params, state, images)[0])
  assert batched.shape == (37, 2)
  np.testing.assert_allclose(batched, direct, rtol=1e-5, atol=1e-6)
  assert batch_shapes == [16, 16, 16]
  # A split smaller than the batch runs as one batch of its own size (rounded up to the mesh), not padded to 16.
  batch_shapes.clear()
  small = step_lib.predict(recording_predict_fn, params, state, images[:5], batch_size=16, mesh=mesh)
  np.testing.assert_allclose(small, direct[:5], rtol=1e-5, atol=1e-6)
  assert batch_shapes == [-(-5 // mesh.size) * mesh.size]


def test_four_devices_match_one_device():
  """The same training run on a 4-device mesh (fake CPU devices) and on 1 device gives the same parameters."""
  script = textwrap.dedent("""
      import jax
      jax.config.update("jax_num_cpu_devices", 4)
      import numpy as np, optax
      from calibjax import models, parallel
      from calibjax.train import step as step_lib
      assert len(jax.devices()) == 4
      rng = np.random.default_rng(0)
      images = rng.normal(size=(32, 8, 8, 1)).astype(np.float32)
      labels = rng.integers(0, 3, 32).astype(np.int32)
      net = models.build("convnet", num_classes=3, input_shape=(8, 8, 1), width=8, depth=1, norm="batch")
      tx = optax.sgd(0.1, momentum=0.9)
      ce = step_lib.label_loss(
          lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
      finals = []
      for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        state = parallel.replicate(step_lib.init_train_state(net, tx, jax.random.key(0)), mesh)
        step = step_lib.jit_train_step(step_lib.make_train_step(net, ce, tx), mesh)
        for i in range(5):
          batch = parallel.shard_batch({"images": images, "labels": labels}, mesh)
          state, metrics = step(state, jax.random.key(1), batch)
        assert len(jax.tree.leaves(state["params"])[0].sharding.device_set) == len(devices)
        finals.append(jax.device_get(state))
      for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=2e-4, atol=2e-5)
      print("OK")
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_batch_size_must_divide_devices():
  four_devices = types.SimpleNamespace(size=4)
  parallel.check_batch_size(64, four_devices)
  with pytest.raises(ConfigError, match="not divisible by the 4 devices"):
    parallel.check_batch_size(66, four_devices)


def test_parse_arg_types_and_errors():
  c = config_lib.parse_arg("dataset=cifar10,ipc=10,smoke", dataset="fashion_mnist", ipc=1, lr=0.1, smoke=False)
  assert (c.dataset, c.ipc, c.lr, c.smoke) == ("cifar10", 10, 0.1, True)
  with pytest.raises(ConfigError, match="unknown preset 'ipcc'"):
    config_lib.parse_arg("ipcc=3", ipc=1)
  with pytest.raises(ConfigError, match="not a valid int"):
    config_lib.parse_arg("ipc=ten", ipc=1)
  with pytest.raises(ConfigError, match="needs a value"):
    config_lib.parse_arg("ipc", ipc=1)


def test_momentum_restart_is_a_new_pytorch_sgd_at_the_milestone():
  """The DD references' evaluation: at the lr decay they build a new torch.optim.SGD, whose momentum buffer starts
  from the gradient again. Written out in numpy (PyTorch's SGD: d = g + wd·w; buf = d on a new optimiser's first
  step, else momentum·buf + d; w -= lr·buf) on a quadratic, against schedules.make_optimizer."""
  lr, momentum, wd, milestone, steps = 0.1, 0.9, 5e-4, 4, 8
  target = np.array([1.0, -2.0, 0.5], np.float32)
  grad = lambda w: 2.0 * (w - target)
  w_ref, buf = np.zeros(3, np.float32), None
  for t in range(steps):
    if t == milestone:  # the reference's `if ep in lr_schedule: lr *= 0.1; optimizer = SGD(...)`
      lr, buf = lr * 0.1, None
    d = grad(w_ref) + wd * w_ref
    buf = d if buf is None else momentum * buf + d
    w_ref = w_ref - lr * buf
  schedule = schedules.make_schedule("multistep", base_lr=0.1, epochs=2, steps_per_epoch=milestone, milestones=(1,))
  restarted = schedules.make_optimizer(lr_schedule=schedule, momentum=momentum, weight_decay=wd,
                                       momentum_restarts=(milestone,))
  kept = schedules.make_optimizer(lr_schedule=schedule, momentum=momentum, weight_decay=wd)
  finals = []
  for tx in (restarted, kept):
    w = jnp.zeros(3)
    state = tx.init(w)
    for _ in range(steps):
      updates, state = tx.update(grad(w), state, w)
      w = optax.apply_updates(w, updates)
    finals.append(np.asarray(w))
  np.testing.assert_allclose(finals[0], w_ref, rtol=1e-6, atol=1e-7)
  assert not np.allclose(finals[1], w_ref, rtol=1e-4)  # keeping the momentum is a different optimiser
