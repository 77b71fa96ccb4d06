"""Tests of gradient matching (DC/DSA), distribution matching (DM), MDT and the synthetic-set pytree.

Tiny shapes (3 classes of 8x8x1 images, a depth-1 width-8 ConvNet) and a handful of compiled functions shared
by the tests (each distinct config or shape is an XLA compile of a second-order graph, seconds on CPU).
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from calibjax import models
from calibjax.data.transforms import Normalize
from calibjax.distill import dm, gm, matching
from calibjax.distill.synthetic import SyntheticSet, export_npz, init_synthetic, load_npz
from calibjax.errors import ConfigError

# IPC == BATCH: a real batch may be the synthetic images themselves without a new compile.
C, H, IPC, BATCH = 3, 8, 4, 4
NET = models.build("convnet", num_classes=C, input_shape=(H, H, 1), width=8, depth=1)
PARAMS, _ = NET.init(jax.random.key(0))
# Two families (an affine one and the one-hot crop) keep the compiles short; test_dsa covers all families.
STRATEGY = "crop_rotate"
# The "scan" driver compiles one function (fast at -O0); the CPU default "python" is compared against it.
DC = gm.GMConfig(method="dc", ipc=IPC, batch_real=BATCH, outer_loop=2, inner_loop=2, lr_img=1.0,
                 loop_driver="scan")
DC_MDT = dataclasses.replace(DC, mdt="fixed")
DSA_MDT = gm.GMConfig(method="dsa", ipc=IPC, batch_real=BATCH, outer_loop=2, inner_loop=2, mdt="fixed",
                      dsa_strategy=STRATEGY)
DM_MDT = dm.DMConfig(ipc=IPC, batch_real=BATCH, mdt="fixed", dsa_strategy=STRATEGY)


def _toy_data(seed=0, per_class=40, noise=0.3):
  """A separable problem: class c is a fixed random template plus Gaussian noise."""
  rng = np.random.default_rng(seed)
  templates = rng.normal(size=(C, H, H, 1))
  labels = np.repeat(np.arange(C), per_class).astype(np.int32)
  images = templates[labels] + noise * rng.normal(size=(len(labels), H, H, 1))
  return images.astype(np.float32), labels


IMAGES, LABELS = _toy_data()
POOL = jax.device_put(matching.make_real_pool(IMAGES, LABELS, num_classes=C, batch_real=BATCH))
REAL = matching.sample_real(jax.random.key(1), POOL, BATCH)
SYN = jnp.asarray(np.random.default_rng(2).normal(size=(C * IPC, H, H, 1)), jnp.float32)


@functools.cache
def _loss_and_grad(module, config):
  """Compiled value_and_grad of `module.matching_loss` w.r.t. the images; params, real, key, ratio traced."""
  def loss(images, params, real, key, ratio):
    return module.matching_loss(NET, config, images, params, real, key, ratio)
  jitted = jax.jit(jax.value_and_grad(loss, has_aux=True))
  return jitted.lower(SYN, PARAMS, REAL, jax.random.key(0), 0.0).compile()


@functools.cache
def _iteration_cache(make, config):
  iteration = make(NET, config)
  return iteration.lower(SYN, matching.image_optimizer(config).init(SYN), jax.random.key(0), POOL).compile()


def _iteration(module, config):
  return _iteration_cache(gm.make_gm_iteration if module is gm else dm.make_dm_iteration, config)


def _run(module, config, images, key, iterations=1):
  images = jnp.array(images)  # a fresh buffer: the iteration donates it
  opt_state = matching.image_optimizer(config).init(images)
  metrics = []
  for i in range(iterations):
    images, opt_state, m = _iteration(module, config)(images, opt_state, jax.random.fold_in(key, i), POOL)
    metrics.append(m)
  return np.asarray(images), metrics


# ------------------------------------------------------------------------------------------ match_distance


_distance = jax.jit(matching.match_distance, static_argnames="metric")


def _np_distance_ours(real, syn):
  """The reference's distance_wb in numpy on PyTorch layouts: rows are output units, 1-D params give 0."""
  total = 0.0
  for r, s in zip(real, syn):
    if r.ndim == 1:
      continue
    r = r.reshape(r.shape[0], -1).astype(np.float64)
    s = s.reshape(s.shape[0], -1).astype(np.float64)
    cos = np.sum(r * s, -1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(s, axis=-1) + 1e-6)
    total += np.sum(1.0 - cos)
  return total


def _grad_tree(rng):
  return {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
                   "bias": rng.normal(size=(4,)).astype(np.float32)},
          "head": {"kernel": rng.normal(size=(5, 3)).astype(np.float32),
                   "bias": rng.normal(size=(3,)).astype(np.float32)}}


def _torch_layout(tree):
  # Flax conv (kh, kw, in, out) -> PyTorch (out, in, kh, kw); dense (in, out) -> (out, in).
  return [tree["conv"]["kernel"].transpose(3, 2, 0, 1), tree["conv"]["bias"],
          tree["head"]["kernel"].T, tree["head"]["bias"]]


def test_match_distance_matches_hand_computation_on_two_layers():
  rng = np.random.default_rng(0)
  real, syn = _grad_tree(rng), _grad_tree(rng)
  expected = _np_distance_ours(_torch_layout(real), _torch_layout(syn))
  np.testing.assert_allclose(_distance(real, syn), expected, rtol=1e-5)
  # Rows are OUTPUT units: the same sum over input-unit rows (no transpose) is a different number.
  wrong = _np_distance_ours([real["conv"]["kernel"].reshape(9, 2, 4).transpose(1, 0, 2),
                             real["head"]["kernel"]],
                            [syn["conv"]["kernel"].reshape(9, 2, 4).transpose(1, 0, 2),
                             syn["head"]["kernel"]])
  assert abs(expected - wrong) > 0.1
  # Biases contribute nothing.
  syn_other_bias = jax.tree.map(lambda x: x, syn)
  syn_other_bias["conv"]["bias"] = -syn["conv"]["bias"]
  syn_other_bias["head"]["bias"] = rng.normal(size=(3,)).astype(np.float32)
  np.testing.assert_allclose(_distance(real, syn_other_bias), expected, rtol=1e-5)
  # mse and cos flatten everything, biases included.
  r = np.concatenate([x.ravel() for x in jax.tree.leaves(real)]).astype(np.float64)
  s = np.concatenate([x.ravel() for x in jax.tree.leaves(syn)]).astype(np.float64)
  np.testing.assert_allclose(_distance(real, syn, metric="mse"), np.sum((r - s) ** 2), rtol=1e-5)
  np.testing.assert_allclose(_distance(real, syn, metric="cos"),
                             1 - r @ s / (np.linalg.norm(r) * np.linalg.norm(s) + 1e-6), rtol=1e-5)


def test_match_distance_zero_for_identical_and_finite_gradient_at_zero_rows():
  g = _grad_tree(np.random.default_rng(1))
  for metric in matching.METRICS:
    assert abs(float(_distance(g, g, metric=metric))) < 1e-5
  zeros = jax.tree.map(jnp.zeros_like, g)
  # Every one of the 4 + 3 output rows has cosine 0 against an all-zero row.
  np.testing.assert_allclose(_distance(g, zeros), 7.0, rtol=1e-6)
  grad = jax.jit(jax.grad(lambda z: matching.match_distance(g, z)))(zeros)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(grad))
  with pytest.raises(ConfigError):
    matching.match_distance(g, g, metric="l1")


# --------------------------------------------------------------------------------------------- matching


def test_gradients_reach_synthetic_images():
  for module, config in ((gm, DC), (dm, DM_MDT)):
    (loss, per_class), grad = _loss_and_grad(module, config)(SYN, PARAMS, REAL, jax.random.key(3), 0.1)
    grad = np.asarray(grad)
    assert np.isfinite(grad).all() and np.abs(grad).max() > 1e-6, module.__name__
    assert per_class.shape == (C,) and np.isclose(loss, per_class.sum())
    assert float(loss) > 0
    # Every class's images receive gradient (the map over classes is wired to the right slices).
    assert (np.abs(grad.reshape(C, -1)).max(axis=1) > 1e-7).all()


def test_vmap_over_classes_equals_python_loop_and_chunked_map():
  # DM with DSA and MDT exercises the shared per-class plumbing (views, keys, masks); the GM criterion is
  # compared at the level of a whole iteration in test_per_class_loop_reference_iteration_matches_vmap.
  key = jax.random.key(4)
  (_, per_v), grad_v = _loss_and_grad(dm, DM_MDT)(SYN, PARAMS, REAL, key, 0.3)
  # Chunks of 2 of the 3 classes: one vmapped chunk and a remainder, run by lax.map.
  for other in (dataclasses.replace(DM_MDT, class_map="loop"), dataclasses.replace(DM_MDT, class_chunk=2)):
    (_, per_o), grad_o = _loss_and_grad(dm, other)(SYN, PARAMS, REAL, key, 0.3)
    np.testing.assert_allclose(per_v, per_o, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_v, grad_o, rtol=1e-4, atol=1e-7)


def test_siamese_augmentation_identical_real_and_synthetic_give_zero_loss():
  # The real batch of class c IS its synthetic images, so only a shared draw per class makes the two views
  # equal (crop and rotate differ between two independent draws). MDT at ratio 0 is the identity.
  same = SYN.reshape(C, IPC, H, H, 1)
  for seed in range(3):
    key = jax.random.key(10 + seed)
    (gm_loss, _), _ = _loss_and_grad(gm, DSA_MDT)(SYN, PARAMS, same, key, 0.0)
    (dm_loss, _), _ = _loss_and_grad(dm, DM_MDT)(SYN, PARAMS, same, key, 0.0)
    # "ours" of identical gradients is not exactly 0: each row adds 1e-6 / (|g_row|^2 + 1e-6).
    assert abs(float(gm_loss)) < 1e-2 and abs(float(dm_loss)) < 1e-8
  # With other images (a real batch) the same functions are far from zero.
  (gm_loss, _), _ = _loss_and_grad(gm, DSA_MDT)(SYN, PARAMS, REAL, key, 0.0)
  (dm_loss, per_shared), _ = _loss_and_grad(dm, DM_MDT)(SYN, PARAMS, REAL, key, 0.0)
  assert float(gm_loss) > 0.3 and float(dm_loss) > 1e-3
  # One draw per class (the reference's seeding) is Siamese too, and draws differently from the shared key.
  per_class_keys = dataclasses.replace(DM_MDT, dsa_per_class_keys=True)
  (dm_loss, _), _ = _loss_and_grad(dm, per_class_keys)(SYN, PARAMS, same, key, 0.0)
  assert abs(float(dm_loss)) < 1e-8
  (_, per_own), _ = _loss_and_grad(dm, per_class_keys)(SYN, PARAMS, REAL, key, 0.0)
  assert not np.allclose(per_own, per_shared)


def test_mask_ratio_zero_is_no_mdt_and_ratio_one_zeroes_the_synthetic_input():
  key = jax.random.key(5)
  (loss_off, _), grad_off = _loss_and_grad(gm, DC)(SYN, PARAMS, REAL, key, 0.0)
  (loss_r0, _), grad_r0 = _loss_and_grad(gm, DC_MDT)(SYN, PARAMS, REAL, key, 0.0)
  np.testing.assert_allclose(loss_r0, loss_off, rtol=1e-6)
  np.testing.assert_allclose(grad_r0, grad_off, rtol=1e-5, atol=1e-8)
  (loss_r1, _), grad_r1 = _loss_and_grad(gm, DC_MDT)(SYN, PARAMS, REAL, key, 1.0)
  (loss_zero, _), _ = _loss_and_grad(gm, DC)(jnp.zeros_like(SYN), PARAMS, REAL, key, 0.0)
  np.testing.assert_allclose(loss_r1, loss_zero, rtol=1e-6)
  np.testing.assert_array_equal(grad_r1, 0.0)
  (dm_r1, _), dm_grad_r1 = _loss_and_grad(dm, DM_MDT)(SYN, PARAMS, REAL, key, 1.0)
  (dm_zero, _), _ = _loss_and_grad(dm, DM_MDT)(jnp.zeros_like(SYN), PARAMS, REAL, key, 0.0)
  np.testing.assert_allclose(dm_r1, dm_zero, rtol=1e-6)
  np.testing.assert_array_equal(dm_grad_r1, 0.0)
  # An intermediate ratio does change the loss.
  (loss_half, _), _ = _loss_and_grad(gm, DC_MDT)(SYN, PARAMS, REAL, key, 0.5)
  assert abs(float(loss_half) - float(loss_off)) > 1e-3


# ------------------------------------------------------------------------------------------- iterations


def test_dc_dsa_and_dm_iterations_are_deterministic():
  dsa = dataclasses.replace(DSA_MDT, loop_driver="scan")
  for module, config in ((gm, DC), (gm, dsa), (dm, DM_MDT)):
    first, m1 = _run(module, config, SYN, jax.random.key(6), iterations=2)
    second, m2 = _run(module, config, SYN, jax.random.key(6), iterations=2)
    np.testing.assert_array_equal(first, second)
    assert float(m1[-1]["loss"]) == float(m2[-1]["loss"])
    assert not np.array_equal(first, np.asarray(SYN))


def test_dc_iterations_reduce_the_matching_loss_on_a_separable_problem():
  keys = jax.random.split(jax.random.key(7), 4)
  nets = [NET.init(k)[0] for k in keys]

  def held_out_loss(images):
    # The matching loss on fixed networks and real batches, none of which the distillation saw.
    return np.mean([float(_loss_and_grad(gm, DC)(jnp.asarray(images), p, matching.sample_real(k, POOL, BATCH),
                                                 k, 0.0)[0][0]) for p, k in zip(nets, keys)])

  before = held_out_loss(SYN)
  distilled, metrics = _run(gm, DC, SYN, jax.random.key(8), iterations=10)
  after = held_out_loss(distilled)
  assert after < 0.5 * before, (before, after)  # measured: 24.1 -> 6.4
  assert metrics[-1]["loss_per_step"].shape == (2,)


def test_per_class_loop_reference_iteration_matches_vmap():
  results = []
  for make in (gm.make_gm_iteration, gm.per_class_loop_reference):
    x = jnp.array(SYN)
    iteration = _iteration_cache(make, DC)
    images, _, metrics = iteration(x, matching.image_optimizer(DC).init(x), jax.random.key(9), POOL)
    results.append((np.asarray(images), float(metrics["loss"])))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
  assert not np.allclose(results[0][0], SYN)


def test_python_driver_matches_scan_driver():
  # Inner training of 3 epochs over 12 images in batches of 5: two full batches and a remainder of 2.
  config = dataclasses.replace(DC, mdt="dynamic", mdt_inner=True, batch_train=5, inner_loop=3)
  outputs = []
  python_driver = gm.make_gm_iteration(NET, dataclasses.replace(config, loop_driver="python"))
  for iteration in (_iteration(gm, config), python_driver):
    x = jnp.array(SYN)
    opt_state = matching.image_optimizer(config).init(x)
    # Two iterations: the second starts from the first's image momentum.
    for i in range(2):
      x, opt_state, metrics = iteration(x, opt_state, jax.random.key(20 + i), POOL)
    outputs.append((np.asarray(x), np.asarray(metrics["loss_per_step"]), float(metrics["mdt_ratio"])))
  np.testing.assert_allclose(outputs[0][0], outputs[1][0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(outputs[0][1], outputs[1][1], rtol=1e-4)
  assert outputs[0][2] == outputs[1][2] and 0 < outputs[0][2] < config.mdt_ratio
  assert gm.resolve_loop_driver(dataclasses.replace(config, loop_driver="auto")) == "python"  # CPU tests


# -------------------------------------------------------------------------------------- config and data


def test_loops_table_and_overrides():
  assert [gm.outer_inner_loops(i) for i in (1, 10, 20, 30, 40, 50)] == [
      (1, 1), (10, 50), (20, 25), (30, 20), (40, 15), (50, 10)]
  assert gm.outer_inner_loops(10, inner_loop=5) == (10, 5)
  assert gm.outer_inner_loops(100, outer_loop=100, inner_loop=2) == (100, 2)
  with pytest.raises(ConfigError, match="table"):
    gm.GMConfig(ipc=7)
  with pytest.raises(ConfigError):
    gm.GMConfig(ipc=1, method="mtt")
  with pytest.raises(ConfigError):
    dm.DMConfig(ipc=1, mdt="always")
  assert gm.GMConfig(ipc=1).strategy == "none" and gm.GMConfig(ipc=1, method="dsa").strategy != "none"
  assert gm.GMConfig(ipc=1).lr_img == 0.1 and dm.DMConfig(ipc=1).lr_img == 1.0


def test_batch_norm_networks_are_rejected():
  bn = models.build("convnet", num_classes=C, input_shape=(H, H, 1), width=8, depth=1, norm="batch")
  with pytest.raises(ConfigError, match="batch statistics"):
    gm.make_gm_iteration(bn, DC)
  with pytest.raises(ConfigError, match="batch statistics"):
    dm.make_dm_iteration(bn, DM_MDT)


def test_real_pool_sampling_is_per_class_and_without_replacement():
  labels = np.array([0] * 5 + [1] * 9 + [2] * 6, np.int32)
  images = np.arange(len(labels), dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1), np.float32)
  pool = matching.make_real_pool(images, labels, num_classes=3, batch_real=5)
  assert pool.images.shape == (3, 9, 2, 2, 1)
  batch = np.asarray(matching.sample_real(jax.random.key(0), jax.device_put(pool), 5))[..., 0, 0, 0]
  for c in range(3):
    assert len(set(batch[c])) == 5 and set(batch[c]) <= set(np.flatnonzero(labels == c))
  assert set(batch[0]) == set(range(5))  # class 0 has exactly 5: all of them, none of the padding
  with pytest.raises(ConfigError, match="batch_real"):
    matching.make_real_pool(images, labels, num_classes=3, batch_real=6)


def test_init_synthetic_real_and_noise():
  real = init_synthetic(jax.random.key(0), IMAGES, LABELS, ipc=IPC, num_classes=C, init="real")
  assert real.images.shape == (C * IPC, H, H, 1)
  assert real.labels.tolist() == np.repeat(np.arange(C), IPC).tolist()
  for i, label in enumerate(np.asarray(real.labels)):
    matches = np.all(IMAGES == np.asarray(real.images[i]), axis=(1, 2, 3))
    assert matches.any() and LABELS[matches][0] == label
  again = init_synthetic(jax.random.key(0), IMAGES, LABELS, ipc=IPC, num_classes=C, init="real")
  np.testing.assert_array_equal(real.images, again.images)
  noise = init_synthetic(jax.random.key(0), IMAGES, LABELS, ipc=50, num_classes=C, init="noise")
  assert abs(float(noise.images.mean())) < 0.05 and abs(float(noise.images.std()) - 1) < 0.05
  np.testing.assert_allclose(np.exp(noise.log_lr), 0.01, rtol=1e-6)
  # One pytree: optax updates it as a whole.
  tx = optax.sgd(0.1)
  leaves = jax.tree.leaves(real)
  assert len(leaves) == 3 and len(jax.tree.leaves(tx.init(real))) == 0


def test_npz_export_round_trip(tmp_path):
  labels = jnp.repeat(jnp.arange(C, dtype=jnp.int32), IPC)
  synset = SyntheticSet(images=SYN, labels=labels, log_lr=jnp.float32(-3.0), soft_labels=jnp.eye(C)[labels])
  normalize = Normalize(np.array([0.2861]), np.array([0.353]))
  path = tmp_path / "out" / "synset.npz"
  config = json.dumps({"method": "dc", "ipc": IPC})
  export_npz(str(path), synset, config_json=config, transforms={"normalize": normalize.to_dict()})
  assert [p.name for p in path.parent.iterdir()] == ["synset.npz"]  # the temporary file was renamed
  loaded, config_back, transforms = load_npz(str(path))
  for a, b in zip(synset, loaded):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert config_back == config and list(transforms) == ["normalize"]
  np.testing.assert_array_equal(Normalize.from_dict(transforms["normalize"]).mean, normalize.mean)
  export_npz(str(path), synset._replace(soft_labels=None), config_json="{}", transforms={})
  assert load_npz(str(path))[0].soft_labels is None
  with pytest.raises(ConfigError):
    export_npz(str(path), synset, config_json="not json", transforms={})
