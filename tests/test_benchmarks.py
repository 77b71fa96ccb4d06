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


def test_mtt_iteration_is_timed(monkeypatch):
  # The calibjax side of the speed benchmark's MTT row, at a width small enough to compile in seconds.
  monkeypatch.syspath_prepend(str(SPEED.parent))
  import mtt_step
  result = mtt_step.time_iteration(syn_steps=2, memory="none", unroll="auto", width=8, ipc=1, repeats=1)
  assert result["unroll"] == "rolled" and result["compile_s"] > 0 and result["step_s"] > 0


def test_pytorch_reference_mtt_iteration_runs(monkeypatch):
  # The PyTorch side of the MTT row (bench extra), two student steps at IPC 1 on the real data.
  pytest.importorskip("torch")
  monkeypatch.syspath_prepend(str(SPEED.parent))
  import torch_reference
  data_dir = "/usr/share/datasets/fashion-mnist"
  if not Path(data_dir, "train-images-idx3-ubyte.gz").exists():
    pytest.skip("Fashion-MNIST IDX files not installed (make data)")
  result = torch_reference.time_mtt_iteration(ipc=1, syn_steps=2, repeats=1, data_dir=data_dir)
  assert result["step_s"] > 0 and result["first_s"] > 0
