"""Atomic file writes: a reader never sees a half-written file, and a crash leaves any previous version intact."""

import json
import os
import tempfile
from typing import Any


def publish(tmp: str, path: str) -> None:
  """Renames the finished temporary file `tmp` over `path` with ordinary permissions (mkstemp creates 0600)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)
  os.replace(tmp, path)


def to_json(value):
  """`json.dump`'s `default`: numpy / jax arrays and scalars as lists and numbers."""
  if hasattr(value, "tolist"):
    return value.tolist()
  raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_json_atomic(path: str, data: Any) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(data, f, indent=2, sort_keys=True, default=to_json)
      f.write("\n")
    publish(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
