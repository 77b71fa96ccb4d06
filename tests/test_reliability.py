"""Bad input through the command line: every case exits with status 2 and exactly one stderr line (no traceback),
before any training where the input is knowable up front, and leaves a finished good workdir byte-identical.
Also the workdir lock, the divergence guard, SIGINT, and a log cut between a checkpoint and its line.
"""

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from test_cli import ENV, ROOT, assert_one_line_error, cli

TRAIN = "--config=configs/train.py:smoke"


def digest(workdir: str) -> dict[str, str]:
  """sha256 of every file under `workdir` (the lock file, emptied between runs, included)."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture
def good_copy(tmp_path, smoke_teacher):
  """A copy of the finished smoke train run, and its digest."""
  workdir = str(tmp_path / "good")
  shutil.copytree(smoke_teacher, workdir)
  return workdir, digest(workdir)


@pytest.mark.parametrize("args, fragments", [
    ([TRAIN, "--config.train.epochs=0"], ["train.epochs = 0", "a positive integer"]),
    ([TRAIN, "--config.train.epochs=-1"], ["train.epochs = -1"]),
    ([TRAIN, "--config.train.lr=-0.1"], ["train.lr = -0.1", "> 0"]),
    ([TRAIN, "--config.train.lr=nan"], ["train.lr = nan is not finite"]),
    ([TRAIN, "--config.train.batch_size=0"], ["train.batch_size = 0"]),
    ([TRAIN, "--config.train.momentum=1.0"], ["train.momentum = 1.0", "[0, 1)"]),
    ([TRAIN, "--config.calibration.n_bins=0"], ["calibration.n_bins = 0"]),
    ([TRAIN, "--config.calibration.mts_ratios=(0.1,1.5)"], ["calibration.mts_ratios", "(0, 1)"]),
    ([TRAIN, "--config.calibration.ts_method=grid"], ["calibration.ts_method = 'grid'", "'converged'"]),
    (["--config=configs/evaluate.py:smoke,baseline=random", "--config.train.log_every_epochs=0"],
     ["train.log_every_epochs = 0"]),
    (["--config=configs/evaluate.py:smoke,baseline=random,num_nets=0"], ["evaluate.num_nets = 0"]),
    (["--config=configs/kd.py:smoke", "--config.kd.temperature=0.0"], ["kd.temperature = 0.0"]),
    (["--config=configs/calibrate.py:smoke", "--config.calibrate.ood_dataset=nope"],
     ["calibrate.ood_dataset = 'nope'", "a dataset"]),
    ([TRAIN, "extra"], ["unexpected arguments: extra"]),
    (["--config=configs/calibrate.py:smoke", "--config.calibrate.source=/nonexistent"],
     ["'/nonexistent' is not a calibjax run"]),
    (["--config=configs/kd.py:smoke", "--config.kd.teacher=/nonexistent"], ["is not a calibjax run"]),
])
def test_bad_values_are_refused_before_any_work(tmp_path, args, fragments):
  workdir = str(tmp_path / "run")
  assert_one_line_error(cli(*args, workdir=workdir), *fragments)
  assert not os.path.exists(workdir)


def test_a_batch_larger_than_the_data_is_refused_once_the_data_is_known(tmp_path):
  workdir = str(tmp_path / "run")
  assert_one_line_error(cli(TRAIN, "--config.train.batch_size=5000", workdir=workdir),
                        "train.batch_size 5000 is larger than the", "training images")
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


@pytest.mark.parametrize("workdir, fragments", [
    ("", ["--workdir is empty"]), ("/proc/calibjax", ["cannot be written"]),
    ("FILE", ["is a file, not a directory"]), ("FILE/sub", ["lies under the file"])])
def test_unusable_workdirs(tmp_path, workdir, fragments):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  assert_one_line_error(cli(TRAIN, workdir=workdir.replace("FILE", str(a_file))), *fragments)
  assert a_file.read_text() == "x"


@pytest.mark.parametrize("text, fragments", [
    ("x = (\n", ["cannot load the config file", "never closed at line 1"]),
    ("x = 1\n", ["defines no get_config"]),
    ("def get_config(arg=None):\n  raise ValueError('no such preset here')\n", ["no such preset here"])])
def test_broken_config_files(tmp_path, text, fragments):
  path = tmp_path / "broken.py"
  path.write_text(text)
  assert_one_line_error(cli(f"--config={path}", workdir=str(tmp_path / "run")), *fragments)


@pytest.mark.parametrize("content", [b"PK\x03\x04 truncated", b"not an archive at all"])
def test_corrupt_synthetic_set(tmp_path, content):
  path = tmp_path / "synthetic.npz"
  path.write_bytes(content)
  assert_one_line_error(cli("--config=configs/evaluate.py:smoke", f"--config.evaluate.source={path}",
                     workdir=str(tmp_path / "run")), "cannot be read as a synthetic-set .npz")


@pytest.mark.parametrize("files", ["none", "truncated"])
def test_named_fashion_mnist_directory_is_used_or_refused(tmp_path, files):
  directory = tmp_path / "fmnist"
  directory.mkdir()
  if files == "truncated":
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
      (directory / name).write_bytes(b"\x1f\x8b\x08\x00 cut short")
  result = subprocess.run(
      [sys.executable, "-m", "calibjax.main", "--config=configs/train.py:dataset=fashion_mnist,epochs=1",
       f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env={**ENV, "CALIBJAX_FASHION_MNIST_DIR": str(directory)},
      capture_output=True, text=True, timeout=300)
  assert_one_line_error(result, *(["not found", str(directory)] if files == "none" else ["cannot be read",
                                                                                   "replace it"]))


def test_a_bad_workdir_state_is_refused_and_left_as_it_was(good_copy):
  workdir, before = good_copy
  config_path = os.path.join(workdir, "config.json")
  with open(config_path) as f:
    config = f.read()
  # A different config, a config.json that is not JSON, checkpoints without a config.json: refused, untouched.
  assert_one_line_error(cli(TRAIN, "--config.seed=1", workdir=workdir), "different config", "seed")
  assert digest(workdir) == before
  with open(config_path, "w") as f:
    f.write(config[:40])
  assert_one_line_error(cli(TRAIN, workdir=workdir), "is not valid JSON")
  os.remove(config_path)
  assert_one_line_error(cli(TRAIN, "--config.seed=1", workdir=workdir), "has checkpoints but no config.json")
  assert not os.path.exists(config_path)  # the seed-0 checkpoints were not adopted by a seed-1 run


def test_a_corrupt_checkpoint_fails_in_one_line(good_copy):
  workdir, _ = good_copy
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "2", "state", "d")):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(20)
  assert_one_line_error(cli(TRAIN, workdir=workdir), "checkpoint step 2", "cannot be restored")


def test_a_locked_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path, good_copy):
  workdir, before = good_copy
  with open(os.path.join(workdir, ".lock"), "a+") as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held.write("process 4242 on elsewhere")
    held.flush()
    assert_one_line_error(cli(TRAIN, workdir=workdir), "is in use by process 4242 on elsewhere", "wait for that run")
  os.remove(os.path.join(workdir, ".lock"))  # the fake holder's line is the only change
  assert digest(workdir) == {name: sha for name, sha in before.items() if name != ".lock"}
  # The holder was "killed": its name is still in the file, but nothing holds the lock.
  fresh = tmp_path / "fresh"
  fresh.mkdir()
  (fresh / ".lock").write_text("process 4242 on elsewhere")
  result = cli(TRAIN, "--quiet", workdir=str(fresh))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "was locked by process 4242 on elsewhere" in result.stderr
  assert (fresh / ".lock").read_text() == ""  # released at the end


def test_divergence_stops_at_the_first_log_with_one_line(tmp_path):
  workdir = str(tmp_path / "run")
  result = cli(TRAIN, "--config.train.lr=1e6", "--config.train.epochs=4", workdir=workdir)
  assert_one_line_error(result, "training diverged at epoch 1", "lower the learning rate")
  assert not os.listdir(os.path.join(workdir, "checkpoints"))  # no non-finite state was saved
  metrics = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics):
    with open(metrics) as f:
      [json.loads(line) for line in f]


def _terminal_sigint():
  """In the child: SIGINT delivered and handled as in a terminal. A child inherits an ignored or blocked SIGINT
  from its parent, and in the full suite (xdist) the run sometimes ended with exit 0 after the SIGINT, as if
  the worker had left it ignored by then (not pinned down which earlier test or library does)."""
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
  signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_sigint_ends_in_one_line_and_the_run_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  args = [TRAIN, "--config.train.epochs=40", "--quiet"]
  process = subprocess.Popen([sys.executable, "-m", "calibjax.main", *args, f"--workdir={workdir}"], cwd=ROOT,
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_terminal_sigint)
  checkpoints = os.path.join(workdir, "checkpoints")

  def saved():  # any checkpoint: older ones are pruned as newer ones are saved, so no fixed epoch is waited for
    return os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))

  deadline = time.time() + 300
  while time.time() < deadline and not saved():
    time.sleep(0.05)
  assert process.poll() is None, "the run ended before it could be interrupted; give it more epochs"
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("train")]
  assert process.returncode == 130 and lines == [
      "error: interrupted; the same command resumes the run from its last checkpoint"], stderr[-3000:]
  result = cli(*args, workdir=workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.exists(os.path.join(workdir, "results.json"))
