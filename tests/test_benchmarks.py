"""benchmarks/speed.py: its FLOP count and its calibjax measurement (the PyTorch side needs the bench extra)."""

import importlib.util
from pathlib import Path

import pytest

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed():
  spec = importlib.util.spec_from_file_location("speed", SPEED)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_convnet_step_flops_by_hand(speed):
  # Fashion-MNIST pads to 32 px. conv1: 32*32*9*1*128 multiply-adds, forward and kernel gradient (no input
  # gradient); conv2: 16*16*1152*128, conv3: 8*8*1152*128, three products each; head: 2048*10, three products.
  by_hand = 2 * (2 * 32 * 32 * 9 * 128 + 3 * 16 * 16 * 1152 * 128 + 3 * 8 * 8 * 1152 * 128 + 3 * 2048 * 10)
  assert speed.convnet_step_gflop(1, (28, 28, 1)) == pytest.approx(by_hand / 1e9)
  assert speed.convnet_step_gflop(100, (32, 32, 3)) == pytest.approx(
      100 * (by_hand + 2 * 2 * 32 * 32 * 9 * 2 * 128) / 1e9)  # 3 input channels instead of 1


def test_calibjax_step_is_timed(speed):
  result = speed._jax_train_step(batch_size=4, image_shape=(28, 28, 1), repeats=2)
  assert 0 < result["step_s"] < result["first_s"]
