"""The run core every method stands on: the workdir, the cadence of logs and checkpoints, resume, the progress bar
and the results.

A run's workdir holds config.json, metrics.jsonl, results.json, plots/ and checkpoints/:

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

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from calibjax.errors import CheckpointError, ConfigError
from calibjax.files import to_json, write_json_atomic
from calibjax.runs.manifest import build_manifest
from calibjax.train.checkpoint import Checkpointer


class Workdir:
  """Creates or reopens a workdir for `config`; reopening with a different config is refused."""

  def __init__(self, path: str, config: ml_collections.ConfigDict, *, keep_checkpoints: int = 2):
    self.path = os.path.abspath(path)
    self.plots = os.path.join(self.path, "plots")
    os.makedirs(self.plots, exist_ok=True)
    config_path = os.path.join(self.path, "config.json")
    config_dict = json.loads(config.to_json_best_effort())
    if os.path.exists(config_path):
      with open(config_path) as f:
        previous = json.load(f)
      if previous != config_dict:
        changed = sorted(_diff_keys(previous, config_dict))
        raise CheckpointError(
            f"{self.path} holds a run with a different config (differs in: {', '.join(changed)}); "
            f"use another --workdir, or the same command as that run to resume it")
    else:
      write_json_atomic(config_path, config_dict)
    self.metrics_path = os.path.join(self.path, "metrics.jsonl")
    self.results_path = os.path.join(self.path, "results.json")
    self.checkpoints = Checkpointer(os.path.join(self.path, "checkpoints"), keep=keep_checkpoints)

  def log(self, record: dict) -> None:
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(record, sort_keys=True, default=to_json) + "\n")

  def records(self) -> list[dict]:
    if not os.path.exists(self.metrics_path):
      return []
    with open(self.metrics_path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def truncate_log(self, *, key: str, last: int) -> None:
    """Drops the records whose `key` (e.g. "epoch") is above `last`: they belong to work that was lost."""
    records = self.records()
    kept = [r for r in records if r.get(key, -1) <= last]
    if len(kept) != len(records):
      tmp = self.metrics_path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
      os.replace(tmp, self.metrics_path)

  def close(self) -> None:
    self.checkpoints.close()


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
    workdir.truncate_log(key=cadence.unit, last=saved)
  with tqdm(total=total * ticks_per_unit, initial=first * ticks_per_unit, desc=description,
            unit=cadence.unit if ticks_per_unit == 1 else "step", disable=None, dynamic_ncols=True) as progress:
    for index in range(first, total):
      state, record = body(state, index, progress.update)
      done = index + 1
      if cadence.logs(done, total):
        entry = {cadence.unit: done, **record()}
        workdir.log(entry)
        progress.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if isinstance(v, float)}, refresh=False)
      if cadence.checkpoints(done, total):
        workdir.checkpoints.save(done, state, {cadence.unit: done})
      if ticks_per_unit == 1:
        progress.update()
  workdir.checkpoints.wait()
  return state


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
