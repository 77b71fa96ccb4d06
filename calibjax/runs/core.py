"""The run core every method stands on: the workdir, the cadence of logs and checkpoints, resume, the progress bar
and the results.

A run's workdir holds config.json, metrics.jsonl, results.json, plots/ and checkpoints/ (a multi-process run:
process i > 0 writes its own files under process_<i>/; `Workdir`):

- `Workdir` writes config.json on the first start and refuses to reopen the directory with a different config;
  writes of config.json and results.json are atomic; metrics.jsonl is append-only, and on resume the records
  after the restored checkpoint are dropped, so a resumed run's log equals an uninterrupted run's.
- `Cadence` reads `log_every_<unit>s` and `checkpoint_every_<unit>s` from a config block: the unit is in the
  key's name (epochs, iterations), parsed here only.
- `loop` resumes from the latest checkpoint, runs the remaining units with a progress bar, logs and checkpoints
  at the cadence (and always after the last unit). Every unit's randomness is a function of its index, so a run
  killed at any point and started again ends exactly where an uninterrupted run ends.
- `finish` adds the budget and the manifest (`calibjax.runs.manifest`) to the results and writes results.json.
"""

import atexit
import dataclasses
import fcntl
import json
import math
import os
import socket
import sys
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from calibjax.errors import CheckpointError, ConfigError, DivergenceError
from calibjax.files import to_json, write_json_atomic
from calibjax.runs.manifest import build_manifest
from calibjax.train.checkpoint import Checkpointer


class Workdir:
  """Creates or reopens a workdir for `config` and holds its lock until `close` (or the process ends).

  Refused with one line: an empty path, a path that is a file or cannot be written, a workdir another live
  process holds, a workdir with checkpoints but no config.json (whose checkpoints would otherwise be adopted by
  any config), and reopening with a different config.
  """

  def __init__(self, path: str, config: ml_collections.ConfigDict, *, keep_checkpoints: int = 2):
    root = check_workdir_path(path)
    # A multi-process run: process 0 owns the workdir; process i > 0 keeps its own config, log, results and
    # lock in process_<i>/ (the same numbers: every process holds the replicated results); the checkpoints are
    # one set, written by all processes together (orbax).
    self.path = root if jax.process_index() == 0 else os.path.join(root, f"process_{jax.process_index()}")
    try:
      self.plots = os.path.join(self.path, "plots")
      os.makedirs(self.plots, exist_ok=True)
      self._lock = WorkdirLock.acquire(self.path)
    except OSError as error:
      raise ConfigError(f"--workdir {self.path} cannot be written ({error.strerror or error}); choose a "
                        "writable directory") from None
    config_path = os.path.join(self.path, "config.json")
    config_dict = json.loads(config.to_json_best_effort())
    checkpoint_dir = os.path.join(root, "checkpoints")
    if os.path.exists(config_path):
      previous = _read_config(config_path)
      if previous != config_dict:
        changed = sorted(_diff_keys(previous, config_dict))
        raise CheckpointError(
            f"{self.path} holds a run with a different config (differs in: {', '.join(changed)}); "
            f"use another --workdir, or the same command as that run to resume it")
    elif os.path.isdir(checkpoint_dir) and os.listdir(checkpoint_dir):
      raise CheckpointError(f"{self.path} has checkpoints but no config.json, so nothing says which run they "
                            "belong to; use another --workdir, or move that directory away to start over")
    else:
      write_json_atomic(config_path, config_dict)
    self.metrics_path = os.path.join(self.path, "metrics.jsonl")
    self.results_path = os.path.join(self.path, "results.json")
    self.checkpoints = Checkpointer(checkpoint_dir, keep=keep_checkpoints)

  def log(self, record: dict) -> None:
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(_finite_or_null(record), sort_keys=True, default=to_json, allow_nan=False) + "\n")

  def records(self) -> list[dict]:
    """The log's records; a partial last line (a run killed while writing it) is left out."""
    return [record for record in self._read() if record is not None]

  def _read(self) -> list[dict | None]:
    """Every non-empty line of the log parsed, None for a partial last line."""
    if not os.path.exists(self.metrics_path):
      return []
    with open(self.metrics_path) as f:
      lines = [line for line in f.read().split("\n") if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        if number < len(lines):
          raise CheckpointError(f"{self.metrics_path} line {number} is not JSON; move the workdir away to start "
                                "over, or use another --workdir") from None
        records.append(None)  # cut short by a kill: the work it logged is redone from the checkpoint
    return records

  def truncate_log(self, *, key: str, last: int) -> None:
    """Drops the records whose `key` (e.g. "epoch") is above `last` (they belong to work that was lost) and a
    partial last line."""
    lines = self._read()
    kept = [r for r in lines if r is not None and r.get(key, -1) <= last]
    if len(kept) != len(lines):
      tmp = self.metrics_path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
      os.replace(tmp, self.metrics_path)

  def close(self) -> None:
    self.checkpoints.close()
    self._lock.release()


def check_workdir_path(path: str | None) -> str:
  """The absolute path of a usable workdir, without creating it: not empty, not a file, and either a writable
  directory or creatable in its nearest existing parent. Raises `ConfigError` otherwise."""
  if not path or not path.strip():
    raise ConfigError("--workdir is empty; give the directory of the run, e.g. --workdir runs/my_run")
  path = os.path.abspath(path)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    what = "is a file" if existing == path else f"lies under the file {existing}"
    raise ConfigError(f"--workdir {path} {what}, not a directory; choose another --workdir")
  if not os.access(existing, os.W_OK | os.X_OK) or existing.split(os.sep)[1:2] in (["proc"], ["sys"]):
    raise ConfigError(f"--workdir {path} cannot be written ({existing} is not writable); choose a writable "
                      "directory")
  return path


class WorkdirLock:
  """An exclusive lock on a workdir (`fcntl.flock` of `<workdir>/.lock`, which records the holder's pid and host).

  The operating system releases the lock when its process ends, however it ends; a lock file that still names a
  holder then belongs to a process that was killed before releasing it, and taking it over is said on stderr. A
  process holds each workdir once: opening it again in the same process (a resumed loop in a test, say) shares
  the lock.
  """

  _held: dict[str, "WorkdirLock"] = {}

  @classmethod
  def acquire(cls, workdir: str) -> "WorkdirLock":
    return cls._held.get(workdir) or cls(workdir)

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._file = open(os.path.join(workdir, ".lock"), "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = self._file.read().strip() or "another process"
      self._file.close()
      raise CheckpointError(f"{workdir} is in use by {holder}; wait for that run to end, or use another "
                            "--workdir") from None
    self._file.seek(0)
    previous = self._file.read().strip()
    if previous:
      print(f"note: {workdir} was locked by {previous}, which was killed before releasing it; taking it over",
            file=sys.stderr)
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f"process {os.getpid()} on {socket.gethostname()}")
    self._file.flush()
    self._held[workdir] = self
    atexit.register(self.release)  # an error exit releases it too; only a kill leaves the holder's name behind

  @classmethod
  def release_all(cls) -> None:
    for lock in list(cls._held.values()):
      lock.release()

  def release(self) -> None:
    if not self._file.closed:
      self._file.seek(0)
      self._file.truncate()
      self._file.close()  # closing the file releases the flock
      self._held.pop(self.workdir, None)


def _read_config(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise CheckpointError(f"{path} is not valid JSON, so the run it belongs to is unknown; move that workdir "
                          "away to start over, or use another --workdir") from None


def _finite_or_null(value):
  """`value` with every non-finite float replaced by None, so that metrics.jsonl stays valid JSON."""
  if isinstance(value, dict):
    return {k: _finite_or_null(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_null(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
  keys = []
  for k in sorted(set(a) | set(b)):
    if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
      keys += _diff_keys(a[k], b[k], f"{prefix}{k}.")
    elif a.get(k) != b.get(k):
      keys.append(prefix + k)
  return keys


@dataclasses.dataclass(frozen=True)
class Cadence:
  """How often a loop over `unit`s logs and checkpoints (every n units, and always after the last one)."""

  unit: str
  log_every: int = 1
  checkpoint_every: int = 1

  @classmethod
  def from_config(cls, block: ml_collections.ConfigDict, unit: str) -> "Cadence":
    """Reads `log_every_<unit>s` and `checkpoint_every_<unit>s` of `block` (1 where the block has no such key)."""
    every = {}
    for name in ("log_every", "checkpoint_every"):
      key = f"{name}_{unit}s"
      value = block.get(key, 1)
      if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive number of {unit}s; got {value!r}")
      every[name] = value
    return cls(unit, **every)

  def logs(self, done: int, total: int) -> bool:
    return done % self.log_every == 0 or done == total

  def checkpoints(self, done: int, total: int) -> bool:
    return done % self.checkpoint_every == 0 or done == total


# body(state, index, tick) -> (state, record): runs unit `index` (0-based), calls `tick()` after each of its
# `ticks_per_unit` steps, and returns a callable that builds the unit's log record (called only when the cadence
# logs, so a body need not fetch its metrics from the device otherwise).
Body = Callable[[Any, int, Callable[[], None]], tuple[Any, Callable[[], dict]]]


def loop(workdir: Workdir, state: Any, body: Body, *, total: int, cadence: Cadence, description: str,
         ticks_per_unit: int = 1) -> Any:
  """Resumes `state` from the workdir's latest checkpoint and runs units up to `total` (module docstring).

  Args:
    workdir: where the log and the checkpoints are.
    state: the initial state (a pytree: checkpoints restore into its structure, shapes and shardings).
    body: one unit of work (see `Body`).
    total: the number of units of the whole run.
    cadence: when to log and checkpoint; its unit names the log records' counter ("epoch": 3).
    description: the progress bar's label.
    ticks_per_unit: progress-bar steps per unit (a train epoch's optimiser steps).

  Returns:
    The state after unit `total`, with every checkpoint on disk.
  """
  first = 0
  if (saved := workdir.checkpoints.latest_step()) is not None:
    state, _ = workdir.checkpoints.restore(saved, state)
    first = saved
  workdir.truncate_log(key=cadence.unit, last=first)
  with tqdm(total=total * ticks_per_unit, initial=first * ticks_per_unit, desc=description,
            unit=cadence.unit if ticks_per_unit == 1 else "step", disable=None, dynamic_ncols=True) as progress:
    for index in range(first, total):
      state, record = body(state, index, progress.update)
      done = index + 1
      logs, checkpoints = cadence.logs(done, total), cadence.checkpoints(done, total)
      if logs or checkpoints:
        entry = {cadence.unit: done, **record()}
        _stop_if_diverged(entry, workdir, unit=cadence.unit)  # before a non-finite state is logged or saved
      if logs:
        workdir.log(entry)
        progress.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if isinstance(v, float)}, refresh=False)
      if checkpoints:
        workdir.checkpoints.save(done, state, {cadence.unit: done})
      if ticks_per_unit == 1:
        progress.update()
  workdir.checkpoints.wait()
  return state


def _stop_if_diverged(entry: dict, workdir: Workdir, *, unit: str) -> None:
  """Raises `DivergenceError` if a loss of the log record `entry` is not finite (one value or one per network)."""
  for key, value in entry.items():
    values = value if isinstance(value, (list, tuple)) else [value]
    if "loss" in key and any(isinstance(v, float) and not math.isfinite(v) for v in values):
      workdir.checkpoints.wait()
      kept = workdir.checkpoints.latest_step()
      raise DivergenceError(
          f"training diverged at {unit} {entry[unit]} ({key} = {value}); "
          f"{'no checkpoint was saved' if kept is None else f'the last good checkpoint ({unit} {kept}) is kept'}: "
          "lower the learning rate (or check the inputs) and run again in a new --workdir")


def scalars(metrics: dict, prefix: str = "") -> dict:
  """The scalar entries of a metrics dict (device or host values) as Python floats, keys prefixed."""
  metrics = jax.device_get(metrics)
  return {f"{prefix}{k}": float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def finish(workdir: Workdir, results: dict, *, config: ml_collections.ConfigDict, budget: dict,
           protocol: dict, seeds: dict | None = None) -> dict:
  """Writes results.json: the method's `results` plus "budget" and "manifest"; closes the workdir.

  Args:
    workdir: the run's workdir.
    results: the method's numbers.
    config: the run's config (its seed).
    budget: what the numbers cost (epochs, iterations, examples, networks, ...).
    protocol: the settings that decide a result (evaluation epochs, augmentation, where calibrators were
      fitted), recorded in the manifest.
    seeds: seeds beyond `config.seed` (per expert, per network).
  """
  results = dict(results, budget=budget,
                 manifest=build_manifest(seeds={"seed": config.seed, **(seeds or {})}, protocol=protocol))
  write_json_atomic(workdir.results_path, results)
  workdir.close()
  return results
