"""CRD (calibjax.kd.crd) and its wiring into method `kd`: NCE loss, memory update, Z, sampling, gradients, CLI.

The numpy references follow RepDistiller's crd/ code literally (gather bank rows, bmm, exp, divide by Z), so they
also check the (B, n_data) matmul-then-gather shortcut of `crd.contrast`.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from calibjax import models
from calibjax.data.augment import augment_config
from calibjax.errors import ConfigError
from calibjax.kd import crd
from calibjax.kd.objective import make_kd_batch_transform, make_kd_objective, make_teacher_apply, negatives_drawn
from calibjax.train import step as step_lib
from configs import kd as kd_config
from test_cli import cli


# ---------------------------------------------------------------------------------------------------------------
# numpy reference (RepDistiller's CRDLoss / ContrastMemory / ContrastLoss, one forward)


def np_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_nce(probs, n_data):
  m, pn, eps = probs.shape[1] - 1, 1.0 / n_data, 1e-7
  log_d1 = np.log(probs[:, 0] / (probs[:, 0] + m * pn + eps))
  log_d0 = np.log(m * pn / (probs[:, 1:] + m * pn + eps))
  return -(log_d1.sum() + log_d0.sum()) / probs.shape[0]


def np_crd(heads, f_s, f_t, idx, sample_idx, bank_s, bank_t, z, *, temperature, momentum):
  """Returns (loss, new bank_s, new bank_t, z) with z = [Z_v1 (student side), Z_v2 (teacher side)]."""
  heads = jax.tree.map(lambda a: np.asarray(a, np.float64), heads)
  v1 = np_normalize(f_s @ heads["student"]["kernel"] + heads["student"]["bias"])
  v2 = np_normalize(f_t @ heads["teacher"]["kernel"] + heads["teacher"]["bias"])
  out_v2 = np.exp(np.einsum("bkf,bf->bk", bank_s[sample_idx], v2) / temperature)  # teacher vs student bank
  out_v1 = np.exp(np.einsum("bkf,bf->bk", bank_t[sample_idx], v1) / temperature)  # student vs teacher bank
  n_data = bank_s.shape[0]
  z = np.array([out_v1.mean() * n_data if z[0] < 0 else z[0], out_v2.mean() * n_data if z[1] < 0 else z[1]])
  loss = np_nce(out_v1 / z[0], n_data) + np_nce(out_v2 / z[1], n_data)
  bank_s, bank_t = bank_s.copy(), bank_t.copy()
  bank_s[idx] = np_normalize(momentum * bank_s[idx] + (1 - momentum) * v1)
  bank_t[idx] = np_normalize(momentum * bank_t[idx] + (1 - momentum) * v2)
  return loss, bank_s, bank_t, z


# ---------------------------------------------------------------------------------------------------------------
# units


def test_nce_loss_hand_value():
  # n_data 4, K = 2: m·Pn = 0.5. Row 0: log 2 + log(0.51/0.5) + log(0.52/0.5); row 1: log 3.5 + log 1.2 + 0.
  probs = jnp.array([[0.5, 0.01, 0.02], [0.2, 0.1, 0.0]])
  rows = np.array([np.log(2) + np.log(1.02) + np.log(1.04), np.log(3.5) + np.log(1.2)])
  np.testing.assert_allclose(crd.nce_loss(probs=probs, n_data=4, reduction="none"), rows, rtol=1e-5)
  np.testing.assert_allclose(crd.nce_loss(probs=probs, n_data=4), rows.mean(), rtol=1e-5)
  np.testing.assert_allclose(crd.nce_loss(probs=probs, n_data=4), np_nce(np.asarray(probs, np.float64), 4),
                             rtol=1e-6)


def test_memory_update_rule():
  bank = jnp.array([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
  new = crd.update_bank(bank, jnp.array([0, 2]), jnp.array([[0.0, 1.0], [0.0, 1.0]]), momentum=0.5)
  expected = np.array([[0.5, 0.5] / np.sqrt(0.5), [0.0, 1.0], [1.5, 2.5] / np.sqrt(8.5)])
  np.testing.assert_allclose(new, expected, rtol=1e-6)


def test_buffers_init_range():
  buffers = crd.init_buffers(jax.random.key(0), n_data=50, feat_dim=12)
  stdv = 1 / np.sqrt(12 / 3)
  for name in ("student", "teacher"):
    bank = np.asarray(buffers[name])
    assert bank.shape == (50, 12) and -stdv <= bank.min() and bank.max() <= stdv and bank.max() > 0.9 * stdv
  assert not np.allclose(buffers["student"], buffers["teacher"])
  np.testing.assert_array_equal(buffers["z"], [-1.0, -1.0])


def _tiny_case(seed=0, n_data=10, feat_dim=4, d_s=3, d_t=5, batch=2, k=3):
  rng = np.random.default_rng(seed)
  heads = crd.init_heads(jax.random.key(seed), student_dim=d_s, teacher_dim=d_t, feat_dim=feat_dim)
  buffers = crd.init_buffers(jax.random.key(seed + 1), n_data=n_data, feat_dim=feat_dim)
  f_s, f_t = rng.normal(size=(batch, d_s)), rng.normal(size=(batch, d_t))
  index = rng.choice(n_data, batch, replace=False)
  negatives = np.stack([rng.choice(np.setdiff1d(np.arange(n_data), [i]), k, replace=False) for i in index])
  return heads, buffers, f_s, f_t, index, negatives


def test_crd_loss_matches_reference_and_z_is_fixed_after_the_first_batch():
  heads, buffers, f_s, f_t, index, negatives = _tiny_case()
  kwargs = dict(temperature=0.07, momentum=0.5)
  loss1, buffers1 = crd.crd_loss(heads, student_features=jnp.asarray(f_s, jnp.float32),
                                 teacher_features=jnp.asarray(f_t, jnp.float32), index=jnp.asarray(index),
                                 negatives=jnp.asarray(negatives), buffers=buffers, **kwargs)
  bank_s, bank_t = np.asarray(buffers["student"], np.float64), np.asarray(buffers["teacher"], np.float64)
  sample_idx = np.concatenate([index[:, None], negatives], 1)
  ref1, bank_s, bank_t, z1 = np_crd(heads, f_s, f_t, index, sample_idx, bank_s, bank_t, [-1, -1], **kwargs)
  np.testing.assert_allclose(loss1, ref1, rtol=1e-4)
  np.testing.assert_allclose(buffers1["z"], z1, rtol=1e-4)
  np.testing.assert_allclose(buffers1["student"], bank_s, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(buffers1["teacher"], bank_t, rtol=1e-5, atol=1e-6)

  # Second batch: other samples, the banks of batch 1, and batch 1's Z (not one re-estimated from batch 2).
  _, _, f_s2, f_t2, index2, negatives2 = _tiny_case(seed=5)
  loss2, buffers2 = crd.crd_loss(heads, student_features=jnp.asarray(f_s2, jnp.float32),
                                 teacher_features=jnp.asarray(f_t2, jnp.float32), index=jnp.asarray(index2),
                                 negatives=jnp.asarray(negatives2), buffers=buffers1, **kwargs)
  np.testing.assert_array_equal(buffers2["z"], buffers1["z"])
  sample_idx2 = np.concatenate([index2[:, None], negatives2], 1)
  ref2 = np_crd(heads, f_s2, f_t2, index2, sample_idx2, bank_s, bank_t, z1, **kwargs)[0]
  fresh_z = np_crd(heads, f_s2, f_t2, index2, sample_idx2, bank_s, bank_t, [-1, -1], **kwargs)[0]
  np.testing.assert_allclose(loss2, ref2, rtol=1e-4)
  assert abs(ref2 - fresh_z) > 1e-3 * abs(ref2)  # the check above can tell the two apart


def test_negatives_are_other_class_distinct_and_never_the_positive():
  labels = np.repeat(np.arange(4), [9, 5, 7, 3])  # n = 24, largest class 9: pool 15 for every row
  assert crd.clip_nce_k(16384, labels) == 15 and crd.clip_nce_k(4, labels) == 4
  index = jnp.array([0, 9, 14, 21, 23])
  negatives = np.asarray(crd.sample_negatives(jax.random.key(0), index=index, labels=jnp.asarray(labels),
                                              nce_k=15))
  assert negatives.shape == (5, 15) and negatives.dtype == np.int32
  for row, i in zip(negatives, np.asarray(index)):
    assert i not in row and len(set(row)) == 15
    assert np.all(labels[row] != labels[i])
  # Class 0 is the largest: its pool is exactly the other-class samples.
  assert set(negatives[0]) == set(np.flatnonzero(labels != 0))

  # Uniform over the pool: 400 draws of 3 from the 15 samples outside class 0, 80 expected picks each.
  draw = jax.vmap(lambda key: crd.sample_negatives(key, index=jnp.array([0]), labels=jnp.asarray(labels),
                                                   nce_k=3))
  counts = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(1), 400))).ravel(), minlength=24)
  assert counts[:9].sum() == 0 and counts[9:].min() > 40 and counts[9:].max() < 130


def test_nce_k_errors_are_config_errors():
  with pytest.raises(ConfigError, match="nce_k must be >= 1"):
    crd.clip_nce_k(0, np.array([0, 1]))
  with pytest.raises(ConfigError, match="only one class"):
    crd.clip_nce_k(10, np.zeros(5, int))


def test_apply_with_features_is_one_pass_of_apply():
  net = models.build("convnet", num_classes=3, input_shape=(8, 8, 1), width=2, depth=1, norm="batch")
  params, state = net.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))
  logits, new_state = net.apply(params, state, x, train=True)
  logits2, features, new_state2 = step_lib.apply_with_features(net, params, state, x, train=True)
  np.testing.assert_allclose(logits2, logits, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new_state2, new_state)
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, new_state, state)))  # batch statistics moved
  np.testing.assert_allclose(step_lib.apply_with_features(net, params, state, x)[1],
                             net.embed(params, state, x), rtol=1e-5, atol=1e-6)
  assert features.shape == (6, 2 * 6 * 6)


# ---------------------------------------------------------------------------------------------------------------
# the jitted kd step with CRD


def _kd_cfg(weight=0.8):
  return ml_collections.ConfigDict({"loss": "crd", "alpha": 0.0, "temperature": 4.0, "crd": {
      "weight": weight, "feat_dim": 8, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5}})


@pytest.fixture(scope="module")
def crd_setup():
  num_classes, n_data = 3, 12
  student = models.build("convnet", num_classes=num_classes, input_shape=(8, 8, 1), width=4, depth=1)
  teacher = models.build("convnet", num_classes=num_classes, input_shape=(8, 8, 1), width=6, depth=1)
  t_params, t_state = teacher.init(jax.random.key(9))
  teacher_apply = make_teacher_apply(teacher, {"params": t_params, "model_state": t_state}, temperature=1.0,
                                     features=True)
  images = np.asarray(jax.random.normal(jax.random.key(2), (n_data, 8, 8, 1)), np.float32)
  labels = np.arange(n_data) % num_classes
  transform = make_kd_batch_transform(teacher_apply, augment_config(), num_classes=num_classes,
                                      data_transforms={}, teacher_features=True)
  tx = optax.sgd(0.5)  # no weight decay: a parameter moves only if its gradient is non-zero
  objectives = {weight: make_kd_objective(_kd_cfg(weight), mixing="none", key=jax.random.key(3), net=student,
                                          teacher_apply=teacher_apply, train_images=images, train_labels=labels)
                for weight in (0.8, 0.0)}
  state = step_lib.init_train_state(student, tx, jax.random.key(4), objective=objectives[0.8])
  index = np.array([0, 4, 8, 10])
  batch = {"images": images[index], "labels": labels[index], "index": index.astype(np.int32)}
  steps = {weight: jax.jit(step_lib.make_train_step(student, objective, tx, batch_transform=transform))
           for weight, objective in objectives.items()}
  return dict(state=state, batch=batch, steps=steps, transform=transform,
              nce_k=negatives_drawn(_kd_cfg(), labels)["nce_k"], teacher_apply=teacher_apply, index=index,
              n_data=n_data)


def test_transform_adds_teacher_features_and_keeps_the_index(crd_setup):
  batch = crd_setup["batch"]
  out = crd_setup["transform"](jax.random.key(0), jax.tree.map(jnp.asarray, batch))
  np.testing.assert_array_equal(out["index"], batch["index"])
  logits, features = crd_setup["teacher_apply"](jnp.asarray(batch["images"]))
  np.testing.assert_allclose(out["teacher_features"], features, rtol=1e-6)
  assert out["teacher_features"].shape == (4, 6 * 6 * 6)  # 1-channel stem pads 3: 8 -> 12 -> pool 6
  assert out["labels"].shape == (4, 3) and out["teacher_log_probs"].shape == (4, 3)
  assert crd_setup["nce_k"] == 8  # 12 samples, 4 per class


def moved(a, b) -> bool:
  return bool(np.any(np.asarray(a) != np.asarray(b)))


def test_step_trains_student_and_both_heads_and_updates_the_banks(crd_setup):
  state, batch = crd_setup["state"], crd_setup["batch"]
  new, metrics = crd_setup["steps"][0.8](state, jax.random.key(0), batch)
  assert np.isfinite(metrics["loss"])
  for head in ("student", "teacher"):
    for leaf in ("kernel", "bias"):
      assert moved(new["objective"]["params"][head][leaf], state["objective"]["params"][head][leaf]), head
  buffers, old = new["objective"]["state"], state["objective"]["state"]
  touched = np.zeros(crd_setup["n_data"], bool)
  touched[crd_setup["index"]] = True
  for bank in ("student", "teacher"):
    changed = np.any(np.asarray(buffers[bank]) != np.asarray(old[bank]), axis=1)
    np.testing.assert_array_equal(changed, touched)
    np.testing.assert_allclose(np.linalg.norm(buffers[bank][touched], axis=1), 1.0, rtol=1e-5)
  assert np.all(np.asarray(buffers["z"]) > 0)

  # CRD's gradient reaches the student's own params: with weight 0 (CE alone) every update below the classifier
  # differs; the classifier (after the penultimate features) gets none.
  without, _ = crd_setup["steps"][0.0](state, jax.random.key(0), batch)
  for (path, leaf_crd), leaf_ce in zip(jax.tree_util.tree_leaves_with_path(new["params"]),
                                       jax.tree.leaves(without["params"])):
    assert moved(leaf_crd, leaf_ce) != ("head" in jax.tree_util.keystr(path)), jax.tree_util.keystr(path)
  # ... and the CE-only step leaves the heads where they were (only CRD trains them).
  jax.tree.map(np.testing.assert_array_equal, without["objective"]["params"], state["objective"]["params"])

  again, _ = crd_setup["steps"][0.8](new, jax.random.key(0), batch)
  np.testing.assert_array_equal(again["objective"]["state"]["z"], buffers["z"])


def test_config_loss_crd_has_the_repdistiller_recipe():
  c = kd_config.get_config("loss=crd,teacher=t")
  assert c.kd.loss == "crd" and c.kd.alpha == 0.0 and c.kd.temperature == 4.0
  assert c.kd.crd.to_dict() == {"weight": 0.8, "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5}
  assert "crd" not in kd_config.get_config("loss=kd,teacher=t").kd  # other losses' configs are unchanged


# ---------------------------------------------------------------------------------------------------------------
# end to end


def read(path):
  with open(path) as f:
    return f.read()


@pytest.mark.slow
def test_cli_crd_run_checkpoints_the_banks_and_resumes_exactly(tmp_path, smoke_teacher):
  teacher = smoke_teacher
  workdir = str(tmp_path / "crd")
  args = [f"--config=configs/kd.py:smoke,loss=crd,teacher={teacher}"]
  result = cli(*args, workdir=workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(read(os.path.join(workdir, "results.json")))
  assert results["crd"] == {"nce_k": 1030, "n_data": 1147}
  assert results["raw"]["accuracy"] > 0.2 and results["best_epoch"]["last_epoch"] == 2
  metrics = read(os.path.join(workdir, "metrics.jsonl"))

  # Each checkpoint holds the heads and the banks (updated: unit rows) as an item of their own beside the student.
  raw = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "1", "objective"))
  buffers = raw["state"]
  assert buffers["student"].shape == buffers["teacher"].shape == (1147, 128) and np.all(buffers["z"] > 0)
  assert np.mean(np.isclose(np.linalg.norm(buffers["student"], axis=1), 1.0, atol=1e-5)) > 0.9
  assert set(raw["params"]) == {"student", "teacher"}
  final = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "2", "state"))
  assert "objective" not in final

  # The finished run restores as a plain student (e.g. as the next generation's teacher).
  from calibjax.build import restore_run
  assert restore_run(workdir, methods=("kd",))[0].kd.loss == "crd"

  # Resuming from epoch 1 (as after a kill) gives the same results and log.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "2"))
  result = cli(*args, workdir=workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(read(os.path.join(workdir, "results.json"))) == results
  assert read(os.path.join(workdir, "metrics.jsonl")) == metrics
