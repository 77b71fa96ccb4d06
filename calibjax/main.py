"""calibjax command line: `python -m calibjax.main --config configs/<file>.py[:presets] --workdir DIR`.

Thin by design: flags, optional multi-host initialisation, dispatch on `config.method` to a `run(config,
workdir)` of `calibjax.runs`, and the method's result table printed at the end (`--quiet` skips it). Errors a
user can fix are printed as one line and exit with status 2.
"""

import importlib
import os
import sys
import threading

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from calibjax import config_check, config_lib, parallel
from calibjax.errors import CalibjaxError, UnknownNameError
from calibjax.runs import core, summary

# Method name -> "module:function", imported on use so one method's dependencies do not slow the others.
METHODS = {
    "train": "calibjax.runs.train:run",
    "calibrate": "calibjax.runs.calibrate:run",
    "distill": "calibjax.runs.distill:run",
    "evaluate": "calibjax.runs.evaluate:run",
    "buffer": "calibjax.runs.buffer:run",
    "kd": "calibjax.runs.kd:run",
    "analyze": "calibjax.runs.analyze:run",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/quickstart.py:smoke.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (created; reused to resume).")
_QUIET = flags.DEFINE_bool("quiet", False, "Do not print the result table at the end of the run.")
flags.mark_flags_as_required(["config", "workdir"])


def resolve_method(name: str):
  if name not in METHODS:
    raise UnknownNameError(f"unknown method '{name}'; choose one of: {', '.join(sorted(METHODS))}")
  module, function = METHODS[name].split(":")
  return getattr(importlib.import_module(module), function)


def run(spec: str, workdir: str, overrides: dict | None = None, *, quiet: bool = False) -> dict:
  """The command line as a function, for notebooks and scripts: `run("configs/train.py:smoke", "runs/t",
  {"train.epochs": 3})` is `--config configs/train.py:smoke --workdir runs/t --config.train.epochs=3`; prints
  the result table unless `quiet` and returns the results.

  Raises:
    CalibjaxError: bad input (the one line the command line prints before exiting with status 2).
  """
  config = config_lib.load(spec, overrides)
  results = run_config(config, workdir)
  if not quiet and jax.process_index() == 0:
    print(summary.format_results(config.method, results, workdir=os.path.abspath(workdir)))
  return results


def run_config(config, workdir: str) -> dict:
  """Checks a loaded config and runs its method in `workdir`; returns the results (no table)."""
  config_lib.check_blocks(config)
  config_check.check_values(config)
  core.check_workdir_path(workdir)
  parallel.initialize_distributed(config)
  logging.info("process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())
  return resolve_method(config.method)(config, workdir)


def _quiet_closed_loop_errors(hook):
  """Wraps an exception hook so that it drops RuntimeError("Event loop is closed"): after a failed checkpoint
  restore, tensorstore callbacks still in flight call into orbax's closed event loop from their threads; the
  failure itself is reported in one line."""
  def quiet(*args):
    error = args[0].exc_value if len(args) == 1 else args[1]
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      hook(*args)
  return quiet


def main(argv):
  sys.excepthook = _quiet_closed_loop_errors(sys.excepthook)
  sys.unraisablehook = _quiet_closed_loop_errors(sys.unraisablehook)
  threading.excepthook = _quiet_closed_loop_errors(threading.excepthook)
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every save at INFO and the file it cannot parse at ERROR, tfds warns about unprepared folders it
    # skips: an error is our one line on stderr unless -v asks for the libraries' logs
    logging.set_verbosity(logging.FATAL)
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}; every option is a flag, e.g. --config.train.epochs=5")
  try:
    config = _CONFIG.value
    config.method  # the config file is loaded lazily: a missing or broken file raises here
  except OSError as error:
    _fail(f"cannot load the config file: {str(error).splitlines()[-1].strip()}")
  except Exception as error:  # an exception raised inside the file's get_config()
    _fail(_config_error_line(str(error)))
  try:
    results = run_config(config, _WORKDIR.value)
  except CalibjaxError as error:
    _fail(str(error))
  except KeyboardInterrupt:
    _fail("interrupted; the same command resumes the run from its last checkpoint", status=130)
  if not _QUIET.value and jax.process_index() == 0:
    print(summary.format_results(config.method, results, workdir=os.path.abspath(_WORKDIR.value)))


def _fail(message: str, status: int = 2):
  """Prints `message` as one line and ends the process at once: the interpreter's shutdown would otherwise let
  the checkpointer's background threads print tracebacks after a failed restore. Workdir locks are released
  first (every checkpoint save has finished before a user error is raised)."""
  print(f"error: {message}", file=sys.stderr)
  core.WorkdirLock.release_all()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def _parse_flags(argv):
  """absl flag parsing with one-line errors for bad config files, presets, keys and values."""
  try:
    return flags.FLAGS(argv)
  except CalibjaxError as error:  # raised by a config file's get_config (an unknown loss, say)
    _fail(str(error))
  except SyntaxError as error:
    _fail(f"cannot load the config file {error.filename}: {error.msg} at line {error.lineno}")
  except flags.UnrecognizedFlagError as error:
    name = str(error).split("'")[1] if "'" in str(error) else str(error)
    _fail(f"unknown option --{name}: the config has no such key (its keys are defined in the config file)")
  except flags.Error as error:
    _fail(_config_error_line(str(error)))
  except AttributeError as error:  # ml_collections: an override names a key the locked config lacks
    cause = error.args[0] if error.args else error  # ml_collections wraps the KeyError, whose str is a repr
    text = cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)
    key, _, hint = str(text).partition("\n")
    if "get_config" in key:
      _fail("the config file defines no get_config(arg=None) function returning its ConfigDict; see configs/")
    _fail(f"unknown config key {key} on the command line{'; ' + hint if hint else ''} (the config file "
          f"defines its keys)")


def _config_error_line(text: str) -> str:
  """The informative line of an absl/ml_collections error, whose message may embed a whole traceback."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if "Traceback" in text:  # error raised inside get_config(): its last line names the exception
    last = lines[-1]
    return last.split(": ", 1)[1] if ": " in last else last
  return " ".join(lines[:3]) if len(lines) > 1 else lines[0]


def run_cli():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run_cli()
