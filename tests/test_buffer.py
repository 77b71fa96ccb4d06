"""Tests of the MTT expert buffer: contents, resume after SIGKILL, compatibility checks, and MTT built on it (also
resumed through a checkpoint).

The buffer runs (configs/buffer.py:smoke with 3 epochs: 2 experts, a width-16 depth-2 ConvNet on
scikit-learn's digits) execute in subprocesses that share the session's persistent XLA compilation cache
(conftest.py), so only the first one compiles; every expert's `fit` builds a new jitted step, which would
otherwise compile again.
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from calibjax import build, models
from calibjax.data.prepare import prepare
from calibjax.distill import buffer as buffer_lib
from calibjax.distill import mtt
from calibjax.errors import CheckpointError, ConfigError
from calibjax.train import step as step_lib
from calibjax.train.checkpoint import Checkpointer
from test_cli import ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = "smoke,epochs=3"
EXPERTS, EPOCHS = 2, 3

# Runs configs/buffer.py:<preset> into <workdir>; with a third argument "E,S", SIGKILLs itself when expert
# E's fit is about to save its epoch-S checkpoint (epoch S-1's is on disk): a kill in the middle of an expert.
_SCRIPT = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("buffer_config", "configs/buffer.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from calibjax.runs import buffer
from calibjax.train.checkpoint import Checkpointer
if len(sys.argv) > 3:
  expert, step = sys.argv[3].split(",")
  save = Checkpointer.save
  def killing_save(self, s, state, meta=None):
    target = os.path.join("experts", "%03d" % int(expert), "checkpoints")
    if self.directory.endswith(target) and s == int(step):
      self.wait()
      os.kill(os.getpid(), signal.SIGKILL)
    return save(self, s, state, meta)
  Checkpointer.save = killing_save
buffer.run(module.get_config(sys.argv[1]), sys.argv[2])
"""


def _run_buffer(workdir, kill_at=None):
  args = [sys.executable, "-c", _SCRIPT, PRESET, str(workdir)] + ([kill_at] if kill_at else [])
  return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("buffer") / "run"
  result = _run_buffer(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return str(workdir)


def _config():
  spec = importlib.util.spec_from_file_location("buffer_config", os.path.join(ROOT, "configs", "buffer.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(PRESET)


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_buffer_holds_every_epoch_of_every_expert(reference):
  config = _config()
  buffer = buffer_lib.load_buffer(reference)
  leaves = jax.tree.leaves(buffer.params)
  assert all(leaf.shape[:2] == (EXPERTS, EPOCHS + 1) for leaf in leaves)
  assert buffer.info["experts"] == EXPERTS and buffer.info["epochs"] == EPOCHS
  # Real copies: every epoch moved the parameters, and the experts differ from the start.
  for e in range(EXPERTS):
    for k in range(EPOCHS):
      assert any(not np.array_equal(leaf[e, k], leaf[e, k + 1]) for leaf in leaves)
  assert not np.array_equal(leaves[0][0, 0], leaves[0][1, 0])
  # Snapshot 0 is the initialisation fit draws from the expert's seed.
  splits = prepare(config.data, seed=config.seed)
  net = build.network(config.model, splits)
  tx = build.optimizer(config.train, steps_per_epoch=1)
  for e in range(EXPERTS):
    seed = buffer_lib.expert_seed(config.seed, e)
    assert buffer.info["expert_seeds"][e] == seed
    init = step_lib.init_train_state(net, tx, jax.random.fold_in(jax.random.key(seed), 0))["params"]
    for a, b in zip(jax.tree.leaves(init), [leaf[e, 0] for leaf in leaves]):
      np.testing.assert_array_equal(a, b)
  # Partial loads: the first expert, the first two snapshots.
  part = buffer_lib.load_buffer(reference, max_experts=1, snapshots=2)
  for a, b in zip(jax.tree.leaves(part.params), leaves):
    np.testing.assert_array_equal(a, b[:1, :2])
  results = json.load(open(os.path.join(reference, "results.json")))
  assert len(results["test_accuracy"]["per_expert"]) == EXPERTS
  assert [r["expert"] for r in _lines(os.path.join(reference, "metrics.jsonl"))] == [0, 1]
  assert not os.path.exists(os.path.join(reference, "experts", "000", "checkpoints"))  # consolidated


def test_killed_buffer_run_resumes_to_the_same_buffer(reference, tmp_path):
  workdir = tmp_path / "killed"
  killed = _run_buffer(workdir, kill_at="1,2")
  assert killed.returncode == -9, killed.stderr[-3000:]
  with Checkpointer(str(workdir / "trajectories")) as trajectories:
    assert trajectories.latest_step() == 0  # expert 0 finished, expert 1 was killed after its epoch 1
  assert json.load(open(workdir / "buffer.json"))["experts"] == 1

  resumed = _run_buffer(workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  a, b = buffer_lib.load_buffer(reference), buffer_lib.load_buffer(str(workdir))
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  for name in ("metrics.jsonl", os.path.join("experts", "000", "metrics.jsonl"),
               os.path.join("experts", "001", "metrics.jsonl")):
    assert _lines(os.path.join(reference, name)) == _lines(os.path.join(workdir, name)), name
  # Expert 0 was not retrained: its per-epoch log has each epoch once.
  assert [r["epoch"] for r in _lines(workdir / "experts" / "000" / "metrics.jsonl")] == [1, 2, 3]
  assert json.load(open(os.path.join(reference, "results.json"))) == json.load(open(workdir / "results.json"))


def test_a_buffer_for_other_data_or_another_model_is_refused(reference):
  config = _config()
  buffer = buffer_lib.load_buffer(reference, max_experts=1)
  splits = prepare(config.data, seed=config.seed)
  net = build.network(config.model, splits)
  buffer_lib.check_compatible(buffer, net=net, splits=splits)  # the buffer's own settings pass
  zca = dataclasses.replace(splits, transforms=dict(splits.transforms, zca={"eps": 0.1}))
  wide = models.build("convnet", num_classes=splits.num_classes, input_shape=splits.input_shape, width=32,
                      depth=2)
  for kwargs, field in ((dict(net=net, splits=zca), "zca_eps"), (dict(net=wide, splits=splits), "params")):
    with pytest.raises(CheckpointError, match=field) as error:
      buffer_lib.check_compatible(buffer, **kwargs)
    assert "\n" not in str(error.value)


def test_identical_consecutive_snapshots_are_refused(reference, tmp_path):
  # The MTT reference's `.detach().cpu()` snapshots on a CPU: every epoch aliases the same weights.
  buffer = buffer_lib.load_buffer(reference, max_experts=1)
  frozen = jax.tree.map(lambda x: np.repeat(x[0, -1:], EPOCHS + 1, axis=0), buffer.params)
  with Checkpointer(str(tmp_path / "trajectories")) as trajectories:
    trajectories.save(0, frozen)
  with open(os.path.join(reference, buffer_lib.INDEX)) as f:
    index = dict(json.load(f), experts=1)
  with open(tmp_path / buffer_lib.INDEX, "w") as f:
    json.dump(index, f)
  with pytest.raises(CheckpointError, match="identical snapshots 0 and 1"):
    buffer_lib.load_buffer(str(tmp_path))
  with pytest.raises(CheckpointError, match="not a buffer run"):
    buffer_lib.load_buffer(str(tmp_path / "nowhere"))


def test_mtt_distiller_on_the_buffer_learns_images_and_lr_and_resumes_from_a_checkpoint_exactly(
    reference, tmp_path):
  config = _config()
  splits = prepare(config.data, seed=config.seed)
  net = build.network(config.model, splits)
  # A rolled scan and no augmentation: the smallest program to compile at the default optimisation level.
  cfg = ml_collections.ConfigDict(dict(
      ipc=1, init="real", lr_img=100.0, momentum=0.5, dsa_strategy="none", dsa_align_corners=True,
      mdt="dynamic", mdt_ratio=0.1, mdt_granularity="element", mtt=mtt.default_config("digits", 1)))
  cfg.mtt.update(syn_steps=2, expert_epochs=2, max_start_epoch=2, lr_lr=1e-3,
                 buffer_dir=reference, unroll="rolled")
  distiller = mtt.build_distiller(net, cfg, splits)
  initial = jax.tree.map(np.array, distiller.synset(distiller.init(jax.random.key(0))))
  runs = []
  for interrupted in (False, True):  # the second run goes through an orbax checkpoint, as distill.run resumes
    carry = distiller.init(jax.random.key(0))
    metrics = []
    for i in range(2):
      if interrupted and i == 1:
        with Checkpointer(str(tmp_path / "distill")) as checkpoints:
          checkpoints.save(1, carry)
          checkpoints.wait()
          carry, _ = checkpoints.restore(1, distiller.init(jax.random.key(1)))
      carry, m = distiller.step(carry, jax.random.fold_in(jax.random.key(5), i))
      metrics.append(jax.tree.map(np.asarray, m))
    runs.append((jax.tree.map(np.asarray, distiller.synset(carry)), metrics))
  (synset_a, metrics_a), (synset_b, metrics_b) = runs
  np.testing.assert_array_equal(synset_a.images, synset_b.images)
  np.testing.assert_array_equal(synset_a.log_lr, synset_b.log_lr)
  assert [m["loss"] for m in metrics_a] == [m["loss"] for m in metrics_b]
  assert not np.allclose(synset_a.images, initial.images)
  assert synset_a.log_lr != initial.log_lr and np.isclose(np.exp(initial.log_lr), cfg.mtt.lr_teacher)
  for m in metrics_a:
    assert np.isfinite(m["loss"]) and m["lr"] > 0 and 0 <= m["start_epoch"] < 2 and 0 <= m["expert"] < EXPERTS
    assert 0.0 <= m["mdt_ratio"] <= 0.1
  cfg.mtt.max_start_epoch = EPOCHS  # start EPOCHS-1 + 2 expert epochs > EPOCHS
  with pytest.raises(ConfigError, match="expert epochs"):
    mtt.build_distiller(net, cfg, splits)
  cfg.mtt.buffer_dir = ""
  with pytest.raises(ConfigError, match="buffer_dir"):
    mtt.build_distiller(net, cfg, splits)
