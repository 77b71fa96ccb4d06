"""Data parallelism on 4 fake CPU devices (tests/multidevice_checks.py, in a subprocess): every jitted step of
DC / DSA / DM / MTT and evaluate's K networks gives what one device gives, and the 4-device program splits the
work it should split (the real batches, the student minibatches, the networks) without gathering it back. (The
CPU's Python loop driver of DC / DSA runs split over two processes in tests/test_distill_cli.py.)"""

import json
import os
import subprocess
import sys

import jax
import pytest

from calibjax import parallel
from calibjax.errors import ConfigError
from test_cli import ENV

HERE = os.path.dirname(os.path.abspath(__file__))


def run_check(name: str) -> dict:
  result = subprocess.run([sys.executable, os.path.join(HERE, "multidevice_checks.py"), name], env=ENV,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["devices"] == 4
  return report


# Float32 sums in another order: the differences stay at a few ulps of the largest value.
def assert_same_as_one_device(report):
  assert report["max_abs_diff"] <= 1e-6 * max(1.0, report["max_ref"]), report


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dsa_mdt_scan", "dm_mdt", "mtt"])
def test_matching_steps_split_the_real_or_student_batch_and_match_one_device(name):
  report = run_check(name)
  assert_same_as_one_device(report)
  hlo = report["hlo"]
  # The gradient / embedding all-reduce is there, no batch is gathered back, and no array holds a whole batch.
  assert hlo["all_reduce"] >= 1 and hlo["all_gather"] == 0, hlo
  assert hlo["whole_batch_arrays"] == 0 and hlo["quarter_batch_arrays"] > 0, hlo


@pytest.mark.slow
def test_evaluation_networks_are_split_over_devices_and_never_communicate():
  report = run_check("ensemble")
  assert_same_as_one_device(report)
  hlo = report["hlo"]
  assert hlo["states_sharding"] == "P('data',)"
  assert hlo["all_reduce"] == 0 and hlo["all_gather"] == 0, hlo


def test_mesh_dividing_uses_the_devices_that_split_the_count(monkeypatch):
  devices = [object() for _ in range(8)]
  monkeypatch.setattr(jax, "devices", lambda: devices)
  monkeypatch.setattr(parallel, "make_mesh", lambda used: used)
  assert len(parallel.mesh_dividing(8, what="n")) == 8
  assert len(parallel.mesh_dividing(16, what="n")) == 8
  assert len(parallel.mesh_dividing(4, what="n")) == 4
  assert len(parallel.mesh_dividing(5, what="n")) == 1
  assert len(parallel.mesh_dividing(6, what="n")) == 2
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert len(parallel.mesh_dividing(16, what="n")) == 8
  with pytest.raises(ConfigError, match="evaluate.num_nets=5 does not split over the 8 devices of 2 processes"):
    parallel.mesh_dividing(5, what="evaluate.num_nets")


def test_split_along_is_the_identity_on_one_device():
  x = jax.numpy.ones((2, 3))
  assert parallel.split_along(x, None, axis=1) is x
  assert parallel.split_along(x, parallel.make_mesh(jax.devices()[:1]), axis=1) is x
