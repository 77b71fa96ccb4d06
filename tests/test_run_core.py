"""The run core (calibjax.runs.core), the named key streams, the config blocks and the checkpoint items."""

import importlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from calibjax import config_lib, keys
from calibjax.errors import ConfigError, DivergenceError
from calibjax.runs import core
from calibjax.train.checkpoint import Checkpointer


def test_cadence_reads_the_unit_from_the_key_names():
  block = ml_collections.ConfigDict({"log_every_iterations": 10, "checkpoint_every_iterations": 50})
  cadence = core.Cadence.from_config(block, "iteration")
  assert (cadence.unit, cadence.log_every, cadence.checkpoint_every) == ("iteration", 10, 50)
  assert [done for done in range(1, 121) if cadence.checkpoints(done, 120)] == [50, 100, 120]
  assert [done for done in range(1, 26) if cadence.logs(done, 25)] == [10, 20, 25]
  # A block without the keys of this unit logs and checkpoints every unit; epochs are not iterations.
  every_epoch = core.Cadence.from_config(block, "epoch")
  assert (every_epoch.log_every, every_epoch.checkpoint_every) == (1, 1)
  with pytest.raises(ConfigError, match="checkpoint_every_epochs must be a positive number of epochs"):
    core.Cadence.from_config(ml_collections.ConfigDict({"checkpoint_every_epochs": 0}), "epoch")


def test_loop_resumes_from_the_last_checkpoint_and_truncates_the_log(tmp_path):
  config = ml_collections.ConfigDict({"method": "test", "seed": 0})
  cadence = core.Cadence("iteration", log_every=1, checkpoint_every=2)

  def body(state, index, tick):
    return {"x": state["x"] + index}, lambda: {"x": float(state["x"] + index)}

  start = {"x": jnp.zeros(())}
  whole = core.loop(core.Workdir(str(tmp_path / "a"), config), start, body, total=5, cadence=cadence,
                    description="test")
  # A run stopped after iteration 3 (checkpoint 2 on disk, a log record of iteration 3 that the resume drops).
  partial = core.Workdir(str(tmp_path / "b"), config)
  core.loop(partial, start, body, total=2, cadence=cadence, description="test")
  partial.log({"iteration": 3, "x": -1.0})
  resumed_dir = core.Workdir(str(tmp_path / "b"), config)
  resumed = core.loop(resumed_dir, start, body, total=5, cadence=cadence, description="test")
  assert float(resumed["x"]) == float(whole["x"]) == 10.0
  assert resumed_dir.records() == core.Workdir(str(tmp_path / "a"), config).records()
  assert [r["iteration"] for r in resumed_dir.records()] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("checkpointed", [True, False])
def test_a_log_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path, checkpointed):
  """Killed between a checkpoint and the next unit's log line, mid-write: the resumed run's log is valid JSON and
  equals an uninterrupted run's (also when the kill came before the first checkpoint)."""
  config = ml_collections.ConfigDict({"method": "test", "seed": 0})
  cadence = core.Cadence("iteration", log_every=1, checkpoint_every=2)

  def body(state, index, tick):
    return {"x": state["x"] + index}, lambda: {"x": float(state["x"] + index)}

  start = {"x": jnp.zeros(())}
  whole = core.Workdir(str(tmp_path / "whole"), config)
  core.loop(whole, start, body, total=4, cadence=cadence, description="test")
  killed = core.Workdir(str(tmp_path / "killed"), config)
  if checkpointed:
    core.loop(killed, start, body, total=2, cadence=cadence, description="test")
  with open(killed.metrics_path, "a") as f:
    f.write('{"iteration": 3, "x": 3.')  # the kill came mid-line
  core.loop(killed, start, body, total=4, cadence=cadence, description="test")
  assert killed.records() == whole.records()
  with open(killed.metrics_path) as f:
    assert [json.loads(line)["iteration"] for line in f] == [1, 2, 3, 4]


def test_log_records_are_json_and_a_non_finite_loss_stops_the_loop(tmp_path):
  config = ml_collections.ConfigDict({"method": "test", "seed": 0})
  workdir = core.Workdir(str(tmp_path / "run"), config)

  def body(state, index, tick):
    loss = float("nan") if index == 2 else 1.0
    return state, lambda: {"loss": loss, "accuracy": float("inf")}

  with pytest.raises(DivergenceError, match=r"diverged at iteration 3 \(loss = nan\); the last good checkpoint "
                                            r"\(iteration 2\) is kept"):
    core.loop(workdir, {"x": jnp.zeros(())}, body, total=5, cadence=core.Cadence("iteration", 1, 2),
              description="test")
  assert workdir.checkpoints.latest_step() == 2
  with open(workdir.metrics_path) as f:  # non-finite values that are not losses are written as null
    assert [json.loads(line) for line in f] == [{"iteration": i, "loss": 1.0, "accuracy": None} for i in (1, 2)]


def test_key_streams_are_distinct_and_fixed():
  assert len(set(keys.STREAMS.values())) == len(keys.STREAMS)
  np.testing.assert_array_equal(jax.random.key_data(keys.stream(7, "calibration")),
                                jax.random.key_data(jax.random.fold_in(jax.random.key(7), 3)))
  per_network = keys.streams(7, "init", 3)
  assert per_network.shape == (3,)
  np.testing.assert_array_equal(jax.random.key_data(per_network),
                                jax.random.key_data(jax.random.split(jax.random.fold_in(jax.random.key(7), 0), 3)))


@pytest.mark.parametrize("name", ["analyze", "buffer", "calibrate", "distill", "evaluate", "kd", "quickstart",
                                  "train"])
@pytest.mark.parametrize("preset", ["", "smoke"])
def test_each_config_file_has_exactly_the_blocks_its_method_reads(name, preset):
  config = importlib.import_module(f"configs.{name}").get_config(preset)
  config_lib.check_blocks(config)
  assert set(config) == set(config_lib.METHOD_BLOCKS[config.method]) | set(config_lib.COMMON_KEYS)


def test_a_config_with_an_unread_or_a_missing_block_is_refused():
  config = config_lib.base_config("distill")
  config.distill = ml_collections.ConfigDict({"method": "dc"})
  config_lib.check_blocks(config)
  config.calibration = config_lib.calibration_config()
  with pytest.raises(ConfigError, match="method distill does not read config entries calibration"):
    config_lib.check_blocks(config)
  with pytest.raises(ConfigError, match="method calibrate needs config entries calibrate"):
    config_lib.check_blocks(config_lib.base_config("calibrate"))


def test_the_objective_is_a_checkpoint_item_of_its_own(tmp_path):
  """A train state's objective (CRD heads and banks, AdaFocal gammas) is saved beside the network, so a finished
  run restores as a network without it; with a `like` that has one, it comes back too."""
  state = {"step": jnp.ones((), jnp.int32), "params": {"w": jnp.arange(3.0)},
           "objective": {"params": {"head": jnp.full((2,), 5.0)}, "opt_state": {}, "state": {"bank": jnp.ones(4)}}}
  with Checkpointer(str(tmp_path / "checkpoints")) as checkpoints:
    checkpoints.save(1, state, {"epoch": 1})
    checkpoints.wait()
    network_only = {"step": jnp.zeros((), jnp.int32), "params": {"w": jnp.zeros(3)},
                    "objective": {"params": {}, "opt_state": {}, "state": {}}}
    restored, meta = checkpoints.restore(1, network_only)
    assert meta == {"epoch": 1} and restored["objective"] == network_only["objective"]
    np.testing.assert_array_equal(restored["params"]["w"], [0.0, 1.0, 2.0])
    whole, _ = checkpoints.restore(1, jax.tree.map(jnp.zeros_like, state))
    jax.tree.map(np.testing.assert_array_equal, whole, state)
