"""End to end through the command line: smoke runs, resume after SIGKILL, and bad input.

Every case runs `python -m calibjax.main` in a subprocess, as a user would; `cli` and the helpers below serve
every end-to-end test module.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The session's compilation cache (conftest.py); the size limit turns on jax's file lock, which makes the
# cache safe for concurrent subprocesses. XLA_FLAGS comes from conftest.py: subprocesses compile as the tests do.
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
       "JAX_COMPILATION_CACHE_DIR": os.environ["CALIBJAX_TEST_XLA_CACHE"],
       "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def cli(*args, workdir, timeout=600, devices=1):
  """A CLI run; `devices` > 1 gives it that many fake CPU devices."""
  env = ENV if devices == 1 else {
      **ENV, "XLA_FLAGS": f"{ENV['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"}
  return subprocess.run([sys.executable, "-m", "calibjax.main", *args, f"--workdir={workdir}"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def cli_processes(*args, workdir, processes=2, timeout=600):
  """One run as `processes` CPU processes joined by jax.distributed (a coordinator on a free localhost port);
  returns their CompletedProcess-like results, process 0 first."""
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    port = probe.getsockname()[1]
  commands = [[sys.executable, "-m", "calibjax.main", *args, f"--workdir={workdir}", "--config.distributed=True",
               f"--config.coordinator_address=localhost:{port}", f"--config.num_processes={processes}",
               f"--config.process_id={index}"] for index in range(processes)]
  running = [subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for command in commands]
  results = []
  for command, process in zip(commands, running):
    stdout, stderr = process.communicate(timeout=timeout)
    results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
  return results


def kill_after_checkpoint(args, *, workdir, step):
  """Starts the CLI run and SIGKILLs it as soon as its checkpoint `step` exists."""
  process = subprocess.Popen([sys.executable, "-m", "calibjax.main", *args, f"--workdir={workdir}"], cwd=ROOT,
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.isdir(checkpoints) and str(step) in os.listdir(checkpoints)):
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()


def read_json(path):
  with open(path) as f:
    return json.load(f)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def assert_one_line_error(result, *fragments):
  """Exit status 2 and stderr exactly one line, "error: ..." containing every fragment."""
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def check_smoke_run(workdir):
  for name in ("config.json", "metrics.jsonl", "results.json", "plots/reliability.png", "plots/risk_coverage.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  results = read_json(os.path.join(workdir, "results.json"))
  for name in ("raw", "ts", "mts"):
    report = results[name]
    assert 0.0 <= report["ece"] <= 1.0 and report["nll"] > 0
    # Selective prediction and conformal sets next to every calibration report (10 digit classes).
    assert 0.0 <= report["e_aurc"] <= report["aurc"] == report["selective"]["msp"]["aurc"] <= 1.0
    assert report["set_size"] == report["conformal"]["aps"]["mean_size"] and 0 <= report["set_size"] <= 10
    assert set(report["conformal"]) == {"alpha", "thr", "aps", "raps"} and report["conformal"]["alpha"] == 0.1
    # A temperature keeps the order of the max logits: their areas are those of the raw network.
    assert report["selective"]["max_logit"] == results["raw"]["selective"]["max_logit"]
  assert results["raw"]["accuracy"] == results["ts"]["accuracy"] == results["mts"]["accuracy"]
  assert results["ts"]["temperature"] > 0 and results["mts"]["ratio"] in (0.1, 0.5)
  assert [r["epoch"] for r in read_metrics(workdir)] == [1, 2]


@pytest.mark.slow
def test_quickstart_smoke_run_writes_every_artifact(tmp_path):
  workdir = str(tmp_path / "run")
  result = cli("--config=configs/quickstart.py:smoke", workdir=workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  check_smoke_run(workdir)
  # The run ends with its result table on the terminal: raw / TS / MTS rows and where the plots are.
  results = read_json(os.path.join(workdir, "results.json"))
  rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.split()}
  for name, stage in (("raw", "raw"), ("TS", "ts"), ("MTS", "mts")):
    assert rows[name][1:4] == [f"{100 * results[stage]['accuracy']:.2f}", f"{results[stage]['nll']:.4f}",
                               f"{100 * results[stage]['ece']:.2f}"], result.stdout
  assert f"plots: {os.path.join(workdir, 'plots', 'reliability.png')}" in result.stdout
  # ... and results.json its manifest: versions, the checkout's commit, devices, seeds, protocol.
  manifest = results["manifest"]
  assert manifest["packages"]["jax"] and manifest["devices"]["count"] >= 1 and manifest["seeds"] == {"seed": 0}
  assert manifest["protocol"]["calibrators_fitted_on"] == {"fit_on": "held_out_real", "images": 200,
                                                           "per_class": [20] * 10, "in_training": False}


@pytest.mark.slow
def test_train_smoke_run_writes_every_artifact(smoke_teacher):
  check_smoke_run(smoke_teacher)


@pytest.mark.slow
def test_two_processes_train_to_the_one_process_result(smoke_teacher, tmp_path):
  workdir = str(tmp_path / "run")
  for result in cli_processes("--config=configs/train.py:smoke", workdir=workdir):
    assert result.returncode == 0, result.stderr[-3000:]
  expected = read_json(os.path.join(smoke_teacher, "results.json"))
  got, other = (read_json(os.path.join(workdir, *sub, "results.json")) for sub in ((), ("process_1",)))
  assert got["manifest"]["processes"] == {"count": 2, "index": 0} and got["budget"]["devices"] == 2
  assert other["manifest"]["processes"] == {"count": 2, "index": 1}
  for stage in ("raw", "ts", "mts"):
    assert other[stage] == got[stage]  # every process holds the same replicated results
    assert got[stage]["accuracy"] == expected[stage]["accuracy"]
    for metric in ("ece", "nll", "brier"):  # a batch split over 2 devices sums its gradient in another order
      assert got[stage][metric] == pytest.approx(expected[stage][metric], rel=1e-4), (stage, metric)
  assert read_metrics(workdir)[-1]["epoch"] == 2 and os.path.isdir(os.path.join(workdir, "checkpoints"))
  assert not os.path.exists(os.path.join(workdir, "process_1", "checkpoints"))


@pytest.mark.slow
def test_train_without_per_epoch_validation(tmp_path):
  workdir = str(tmp_path / "run")
  result = cli("--config=configs/train.py:smoke", "--config.train.validate_each_epoch=False", "--quiet",
               workdir=workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "MTS" not in result.stdout and "plots:" not in result.stdout  # --quiet: no result table
  records = read_metrics(workdir)
  assert [r["epoch"] for r in records] == [1, 2] and not any("val_accuracy" in r for r in records)
  assert read_json(os.path.join(workdir, "results.json"))["ts"]["temperature"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("loss, override, hparams", [
    ("mbls", "margin=6", {"alpha": 0.1, "margin": 6}),
    ("acls", "margin=6", {"alpha": 0.1, "pos_lambda": 1.0, "neg_lambda": 0.1, "margin": 6}),
    ("cpc", "lambda_bec=0.5", {"lambda_bdc": 1.0, "lambda_bec": 0.5})])
def test_seed_003_calibration_losses_train_from_the_cli(tmp_path, loss, override, hparams):
  workdir = str(tmp_path / "run")
  result = cli(f"--config=configs/train.py:smoke,loss={loss}", f"--config.loss.hparams.{override}", "--quiet",
               workdir=workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  config = read_json(os.path.join(workdir, "config.json"))
  assert config["loss"] == {"name": loss, "hparams": hparams}
  assert read_json(os.path.join(workdir, "results.json"))["raw"]["accuracy"] > 0.5  # digits, 10 classes


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
  args = ["--config=configs/train.py:smoke", "--config.train.epochs=12", "--config.data.val_per_class=40"]
  reference = str(tmp_path / "uninterrupted")
  assert cli(*args, workdir=reference).returncode == 0

  resumed = str(tmp_path / "killed")
  kill_after_checkpoint(args, workdir=resumed, step=3)
  assert not os.path.exists(os.path.join(resumed, "results.json")), "the run finished before it was killed"

  result = cli(*args, workdir=resumed)
  assert result.returncode == 0, result.stderr[-3000:]
  assert read_json(os.path.join(resumed, "results.json")) == read_json(os.path.join(reference, "results.json"))
  assert read_metrics(resumed) == read_metrics(reference)


@pytest.mark.slow
def test_corrupted_checkpoint_is_reported_and_kept(tmp_path):
  workdir = str(tmp_path / "run")
  args = ["--config=configs/train.py:smoke", "--config.train.epochs=1"]
  assert cli(*args, workdir=workdir).returncode == 0
  results_before = read_json(os.path.join(workdir, "results.json"))
  step_dir = os.path.join(workdir, "checkpoints", "1")
  corrupted = []
  for folder, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "wb") as f:
        f.write(b"\x00garbage")
      corrupted.append(path)
  result = cli(*args, workdir=workdir)
  assert_one_line_error(result, "cannot be restored", "untouched")
  assert all(open(p, "rb").read() == b"\x00garbage" for p in corrupted)
  assert read_json(os.path.join(workdir, "results.json")) == results_before


def test_missing_dataset(tmp_path):
  result = cli("--config=configs/train.py:smoke", "--config.data.name=fashion_mnist",
               f"--config.data.data_dir={tmp_path / 'empty'}", workdir=str(tmp_path / "run"))
  assert_one_line_error(result, "fashion_mnist", str(tmp_path / "empty"))
  assert not os.path.exists(tmp_path / "run" / "results.json")


@pytest.mark.parametrize("args,fragments", [
    (["--config=configs/train.py:smoke", "--config.nonexistent=1"], ["unknown config key 'nonexistent'"]),
    (["--config=configs/train.py:smoke", "--config.train.epochs=abc"], ["--config.train.epochs=abc"]),
    (["--config=configs/train.py:smoke", "--config.num_processes=2"],
     ["num_processes only apply to a multi-process run", "--config.distributed=True"]),
    (["--config=configs/train.py:smoke", "--config.distributed=True", "--config.num_processes=2",
      "--config.process_id=2"], ["process_id=2 is not below num_processes=2"]),
    (["--config=configs/train.py:smoke", "--config.process_id=-2"], ["process_id = -2 is not allowed"]),
    (["--config=configs/train.py:smokee"], ["unknown preset 'smokee'"]),
    (["--config=configs/train.py:smoke,model=resnet9000"], ["unknown model 'resnet9000'"]),
    (["--config=configs/train.py:smoke", "--config.method=distil"], ["unknown method 'distil'"]),
    (["--config=configs/missing.py"], ["cannot load the config file"]),
    (["--config=configs/train.py:smoke,loss=adafocal", "--config.train.validate_each_epoch=False"],
     ["loss adafocal", "validate_each_epoch=True"]),
    (["--config=configs/kd.py:smoke", "--config.train.validate_each_epoch=False"],
     ["kd runs validate after every epoch", "validate_each_epoch=False"]),
])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, args, fragments):
  assert_one_line_error(cli(*args, workdir=str(tmp_path / "run")), *fragments)


def test_workdir_of_another_config_is_refused(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"method": "train", "seed": 123}))
  result = cli("--config=configs/train.py:smoke", workdir=str(workdir))
  assert_one_line_error(result, "different config")
  assert json.loads((workdir / "config.json").read_text()) == {"method": "train", "seed": 123}


@pytest.mark.slow
def test_calibrate_a_train_checkpoint(tmp_path, smoke_teacher):
  source = smoke_teacher
  workdir = str(tmp_path / "calibrate")
  result = cli("--config=configs/calibrate.py:smoke", f"--config.calibrate.source={source}", workdir=workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  results = read_json(os.path.join(workdir, "results.json"))
  expected = {"uncalibrated", "temperature", "temperature_reference", "mts", "ets", "vector", "matrix",
              "dirichlet", "histogram", "isotonic"}
  assert expected <= set(results)
  train_results = read_json(os.path.join(source, "results.json"))
  # The same network, data split and fit as the train run's own report.
  assert results["uncalibrated"] == train_results["raw"]
  assert results["temperature"]["temperature"] == pytest.approx(train_results["ts"]["temperature"], rel=1e-5)
  # Every calibrator also reports selective prediction and conformal sets on its calibrated probabilities.
  assert all(0 <= results[name]["aurc"] <= 1 and set(results[name]["conformal"]) == {"alpha", "thr", "aps", "raps"}
             for name in expected)
  for name in expected - {"histogram", "isotonic"}:  # binning calibrators are not monotone maps
    assert results[name]["accuracy"] == pytest.approx(results["uncalibrated"]["accuracy"]) or name in (
        "vector", "matrix", "dirichlet")
  for name in ("reliability.png", "max_logit.png"):
    assert os.path.exists(os.path.join(workdir, "plots", name))
  assert set(results["ood"]) == {"gaussian_noise_0.5", "gaussian_noise_1"}
  for scores in results["ood"].values():
    assert {"max_logit", "msp_raw", "msp_ts", "msp_mts", "energy_raw"} <= set(scores)
    assert all(0.0 <= v["auroc"] <= 1.0 and 0.0 <= v["fpr95"] <= 1.0 for v in scores.values())


def test_calibrate_refuses_a_directory_that_is_no_run(tmp_path):
  result = cli("--config=configs/calibrate.py:smoke", f"--config.calibrate.source={tmp_path}",
               workdir=str(tmp_path / "out"))
  assert_one_line_error(result, "not a calibjax run")
