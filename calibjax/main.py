"""calibjax command line: `python -m calibjax.main --config configs/<file>.py[:presets] --workdir DIR`.

Thin by design: flags, optional multi-host initialisation, dispatch on `config.method` to a `run(config,
workdir)` in the library. Errors a user can fix are printed as one line and exit with status 2.
"""

import importlib
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from calibjax import parallel
from calibjax.errors import CalibjaxError, UnknownNameError

# Method name -> "module:function", imported on use so one method's dependencies do not slow the others.
METHODS = {
    "train": "calibjax.train.run:run",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/quickstart.py:smoke.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (created; reused to resume).")
flags.mark_flags_as_required(["config", "workdir"])


def resolve_method(name: str):
  if name not in METHODS:
    raise UnknownNameError(f"unknown method '{name}'; choose one of: {', '.join(sorted(METHODS))}")
  module, function = METHODS[name].split(":")
  return getattr(importlib.import_module(module), function)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  try:
    parallel.maybe_initialize_distributed(config.distributed)
    logging.info("process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())
    resolve_method(config.method)(config, _WORKDIR.value)
  except CalibjaxError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def run_cli():
  try:
    app.run(main)
  except CalibjaxError as error:  # raised while the config file is loaded (bad preset)
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run_cli()
