"""One persistent XLA compilation cache for every CLI subprocess of a test session, and the shared smoke runs.

Many end-to-end tests run the same smoke programs (configs/train.py:smoke alone runs in seven subprocesses);
with the cache only the first compiles them (a repeated train smoke run took 20 s instead of 51 s here, two
other jobs sharing the cores). The directory is made by the controlling process, inherited by pytest-xdist
workers through the environment, and removed at the end of the session. The cache key covers the program, jax
version and flags, so a hit runs the same executable a compilation would have produced.

`smoke_teacher` is a finished configs/train.py:smoke run shared by the train smoke, calibrate, kd and crd
tests, `smoke_evaluation` a finished evaluate smoke run shared by the calibration-data and analyze tests (each
made once per test session, whichever pytest-xdist worker asks first).

Everything the tests run, in this process and in every subprocess, compiles with XLA's backend (LLVM)
optimisation level 0: the same XLA programs, compiled 2-3x faster (the tests' programs are small, so their run
time is moot; in-process tests took 154 instead of 234 s here, a kd smoke run 20 instead of 33 CPU seconds).
Numbers compared bit for bit between a subprocess and this process are therefore compiled alike. The flag is set
here, before any test module starts JAX, and inherited by the subprocesses through the environment.
"""

import fcntl
import os
import shutil
import tempfile

import pytest

CACHE_VARIABLE = "CALIBJAX_TEST_XLA_CACHE"
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if FAST_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), FAST_COMPILE_FLAG]))


def pytest_configure(config):
  if CACHE_VARIABLE not in os.environ:
    os.environ[CACHE_VARIABLE] = tempfile.mkdtemp(prefix="calibjax-xla-cache-")
    config._calibjax_owns_cache = True


def pytest_unconfigure(config):
  if getattr(config, "_calibjax_owns_cache", False):
    shutil.rmtree(os.environ.pop(CACHE_VARIABLE), ignore_errors=True)


def pytest_collection_modifyitems(items):
  """The end-to-end (`slow`) tests first, in their collected order: a long test started near the end would leave
  the other pytest-xdist worker idle while it runs; short tests fill the tail instead."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def shared_run(tmp_path_factory, worker_id: str, name: str, *args: str) -> str:
  """The workdir of a CLI run made once per test session: under pytest-xdist, the first worker to ask makes it in
  the directory all workers share while holding a file lock, and the others wait for it and reuse it."""
  from test_cli import cli
  if worker_id == "master":  # no xdist: this process is the whole session
    root = tmp_path_factory.getbasetemp()
  else:  # the session's base directory, above each worker's own
    root = tmp_path_factory.getbasetemp().parent
  workdir, done = root / "shared" / name, root / "shared" / f"{name}.done"
  workdir.parent.mkdir(exist_ok=True)
  with open(root / "shared" / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      result = cli(*args, workdir=str(workdir))
      assert result.returncode == 0, result.stderr[-3000:]
      done.touch()
  return str(workdir)


@pytest.fixture(scope="session")
def smoke_evaluation(tmp_path_factory, worker_id):
  """A finished configs/evaluate.py:smoke,baseline=random run (2 networks on 2 random real digits per class,
  calibrators on its distilled split, and also on held-out real images, on the whole set, and on the split with the
  MTS ratio chosen on test): the source of the calibrate-on-evaluate and analyze tests."""
  return shared_run(tmp_path_factory, worker_id, "random_eval",
                    "--config=configs/evaluate.py:smoke,baseline=random,"
                    "also_fit_on=held_out_real+distilled_full+distilled_split@test_reference@lbfgs_reference")


@pytest.fixture(scope="session")
def smoke_teacher(tmp_path_factory, worker_id):
  """A finished configs/train.py:smoke run (2 epochs of a width-16 ConvNet on digits): the subject of the train
  smoke test and the teacher or calibration source of the kd, crd and calibrate tests, which only read it."""
  return shared_run(tmp_path_factory, worker_id, "train", "--config=configs/train.py:smoke")
