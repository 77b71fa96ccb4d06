"""A run's working directory: config.json, metrics.jsonl, results.json, plots/ and checkpoints/.

Writes of config.json and results.json are atomic (write to a temporary file, then rename), so an interrupted
run never leaves a half-written result in place of a good one. metrics.jsonl is append-only; on resume the
records after the restored checkpoint are dropped, so a resumed run's log equals an uninterrupted run's.
"""

import json
import os
import tempfile
from typing import Any

import ml_collections

from calibjax.errors import CheckpointError
from calibjax.train.checkpoint import Checkpointer


def publish(tmp: str, path: str) -> None:
  """Renames the finished temporary file `tmp` over `path` with ordinary permissions (mkstemp creates 0600)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)
  os.replace(tmp, path)


def write_json_atomic(path: str, data: Any) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(data, f, indent=2, sort_keys=True, default=_to_json)
      f.write("\n")
    publish(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _to_json(value):
  if hasattr(value, "tolist"):  # numpy / jax arrays and scalars
    return value.tolist()
  raise TypeError(f"cannot write {type(value).__name__} to JSON")


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
      f.write(json.dumps(record, sort_keys=True, default=_to_json) + "\n")

  def truncate_log(self, *, key: str, last: int) -> None:
    """Drops the records whose `key` (e.g. "epoch") is above `last`: they belong to work that was lost."""
    if not os.path.exists(self.metrics_path):
      return
    with open(self.metrics_path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in records if r.get(key, -1) <= last]
    if len(kept) != len(records):
      tmp = self.metrics_path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
      os.replace(tmp, self.metrics_path)

  def write_results(self, results: dict) -> None:
    write_json_atomic(self.results_path, results)

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
