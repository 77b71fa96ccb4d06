"""Checks that need several devices, run by tests/test_parallel.py in a subprocess with 4 fake CPU devices
(XLA_FLAGS must be set before JAX starts, so they cannot run inside the pytest process).

`python tests/multidevice_checks.py NAME` runs check NAME: the same step on a mesh of 4 devices and on a mesh of
the first device, from the same inputs and keys, and prints one JSON line {"max_abs_diff": ..., "max_ref": ...,
"hlo": {...}} about the 4-device program (collectives in it, the per-device batch of its first convolution).
"""

import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from calibjax import models, parallel  # noqa: E402
from calibjax.distill import dm, gm, matching, mtt  # noqa: E402
from calibjax.distill.synthetic import class_major_labels  # noqa: E402
from calibjax.train import step as step_lib  # noqa: E402
from calibjax.train.ensemble import epoch_batches, make_ensemble_step  # noqa: E402

C, H, IPC, BATCH_REAL = 3, 8, 2, 16
NET = models.build("convnet", num_classes=C, input_shape=(H, H, 1), width=8, depth=1)
MESHES = {"one": parallel.make_mesh(jax.devices()[:1]), "four": parallel.make_mesh(jax.devices())}


def _data(seed=0, per_class=40):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(C), per_class).astype(np.int32)
  images = rng.normal(size=(C, H, H, 1))[labels] + 0.3 * rng.normal(size=(len(labels), H, H, 1))
  return images.astype(np.float32), labels


def _hlo(jitted, *args, batch: int) -> dict:
  """What the compiled program does across devices: its collectives, and how many of its f32 arrays hold a whole
  `batch` of H x H images (the batch that should be split) or a device's quarter of it."""
  text = jitted.lower(*args).compile().as_text()
  arrays = lambda rows: len(re.findall(rf"f32\[(?:1,)?{rows},{H},{H},", text))
  return {"all_reduce": text.count("all-reduce("), "all_gather": text.count("all-gather("),
          "whole_batch_arrays": arrays(batch), "quarter_batch_arrays": arrays(-(-batch // 4))}


def _matching(make, config) -> tuple[dict, dict]:
  """Two iterations of a DC / DSA / DM `make(net, config, mesh=...)` on each mesh, from the same set and keys."""
  images, labels = _data()
  outputs, hlo = {}, None
  for name, mesh in MESHES.items():
    pool = jax.device_put(matching.make_real_pool(images, labels, num_classes=C, batch_real=BATCH_REAL),
                          parallel.replicated(mesh))
    iteration = make(NET, config, mesh=mesh)
    # Replicated as runs/distill.py puts them: the outputs are, so the second iteration reuses the program.
    x = jnp.asarray(np.random.default_rng(2).normal(size=(C * IPC, H, H, 1)), jnp.float32)
    x, opt_state = jax.device_put((x, matching.image_optimizer(config).init(x)), parallel.replicated(mesh))
    if name == "four":
      hlo = _hlo(iteration, x, opt_state, jax.random.key(5), pool, batch=BATCH_REAL)
    for i in range(2):
      x, opt_state, metrics = iteration(x, opt_state, jax.random.key(5 + i), pool)
    outputs[name] = {"images": x, "loss": metrics["loss"]}
  return outputs, hlo


def check_dsa_mdt_scan():
  return _matching(gm.make_gm_iteration, gm.GMConfig(method="dsa", ipc=IPC, batch_real=BATCH_REAL, outer_loop=2,
                                                     inner_loop=2, mdt="dynamic", dsa_strategy="crop_rotate",
                                                     loop_driver="scan"))


def check_dm_mdt():
  return _matching(dm.make_dm_iteration, dm.DMConfig(ipc=IPC, batch_real=BATCH_REAL, mdt="fixed",
                                                     dsa_strategy="crop_rotate"))


def check_mtt():
  """Two MTT iterations (DSA, MDT, 3 student steps over minibatches of 8 of the 12 images) on each mesh."""
  ipc, batch_syn = 4, 8
  config = mtt.MTTConfig(ipc=ipc, lr_img=100.0, syn_steps=3, expert_epochs=1, max_start_epoch=2, batch_syn=batch_syn,
                         dsa_strategy="crop_rotate", mdt="fixed", lr_teacher=0.01)
  params = NET.init(jax.random.key(0))[0]
  trajectories = jax.tree.map(lambda p: jnp.stack([jnp.stack([p * (1 - 0.1 * t) for t in range(4)])] * 2),
                              params)
  images, labels = _data()
  splits = type("Splits", (), dict(train_images=images, train_labels=labels, num_classes=C))
  outputs, hlo = {}, None
  for name, mesh in MESHES.items():
    distiller = mtt.make_distiller(NET, config, splits, trajectories, mesh=mesh)
    repl = parallel.replicated(mesh)
    carry = jax.device_put(distiller.init(jax.random.key(3)), repl)
    if name == "four":
      # The distiller's program (same shardings and donation), so its step reuses this compilation.
      iteration = jax.jit(mtt.make_iteration(NET, config, jnp.asarray(class_major_labels(C, ipc)), mesh=mesh),
                          in_shardings=repl, out_shardings=repl, donate_argnums=(0,))
      hlo = _hlo(iteration, carry, jax.random.key(7), jax.device_put(trajectories, repl), batch=batch_syn)
    for i in range(2):
      carry, metrics = distiller.step(carry, jax.random.key(7 + i))
    outputs[name] = {"images": carry["synset"].images, "log_lr": carry["synset"].log_lr, "loss": metrics["loss"]}
  return outputs, hlo


def check_ensemble():
  """Three steps of 4 networks trained together, split over the 4 devices vs on one; the metrics too."""
  images, labels = _data()
  tx = optax.sgd(0.01, momentum=0.9)
  objective = step_lib.label_loss(
      lambda logits, labels: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)))
  outputs, hlo = {}, None
  for name, mesh in MESHES.items():
    init, step = make_ensemble_step(NET, objective, tx, mesh=mesh)
    states = init(jax.random.split(jax.random.key(0), 4))
    step_keys, order_keys = jax.random.split(jax.random.key(1), 4), jax.random.split(jax.random.key(2), 4)
    for epoch in range(3):
      for idx in epoch_batches(order_keys, epoch, len(images), 64):
        if name == "four" and hlo is None:
          hlo = _hlo(step, states, step_keys, idx, images, labels, batch=64)
          hlo["states_sharding"] = str(jax.tree.leaves(states)[0].sharding.spec)
        states, metrics = step(states, step_keys, idx, images, labels)
    outputs[name] = {"params": states["params"], "loss": metrics["loss"]}
  return outputs, hlo


def main(name: str) -> None:
  outputs, hlo = globals()[f"check_{name}"]()
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), outputs["four"],
                       outputs["one"])
  scale = jax.tree.map(lambda a: float(np.max(np.abs(np.asarray(a)))), outputs["one"])
  print(json.dumps({"devices": jax.device_count(), "max_abs_diff": max(jax.tree.leaves(diffs)),
                    "max_ref": max(jax.tree.leaves(scale)), "hlo": hlo}))


if __name__ == "__main__":
  main(sys.argv[1])
