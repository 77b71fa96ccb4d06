"""The manifest recorded in every results.json: what produced a result, so a number can be traced and compared.

Two results are comparable only when the code, the software stack, the hardware and the protocol that decide
them are known. `build_manifest` gathers the versions of the packages that change numerics, the git commit of the
calibjax checkout (and whether it had uncommitted changes), the devices and processes, the seeds and the
protocol settings the method chose. Command-line arguments are left out: their paths differ between machines.

Gathering never fails a finished run: a package that is not installed reads None, and so does the git state
outside a git checkout or without git.
"""

import importlib.metadata
import os
import platform
import subprocess

import jax

import calibjax

# Distributions whose versions can change a result (numerics, checkpoints, configs) and calibjax itself.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml-collections", "calibjax")
# A manifest must not hold up the end of a run on a slow or locked repository.
GIT_TIMEOUT_S = 10


def build_manifest(*, seeds: dict, protocol: dict) -> dict:
  """The JSON-able manifest of the current process.

  Args:
    seeds: the seeds of the run (e.g. {"seed": 0}), recorded as given.
    protocol: the settings that decide the result, chosen by each method, recorded as given.

  Returns:
    {"packages": {name: version or None}, "python": "3.11.7", "git": {"commit": 40 hex digits, "dirty": bool}
    or None, "devices": {"platform", "kind", "count", "local_count"}, "processes": {"count", "index"},
    "seeds": seeds, "protocol": protocol}.
  """
  return {
      "packages": package_versions(),
      "python": platform.python_version(),
      "git": git_state(directory=os.path.dirname(os.path.abspath(calibjax.__file__))),
      "devices": {"platform": jax.default_backend(), "kind": jax.devices()[0].device_kind,
                  "count": jax.device_count(), "local_count": jax.local_device_count()},
      "processes": {"count": jax.process_count(), "index": jax.process_index()},
      "seeds": seeds,
      "protocol": protocol,
  }


def package_versions(*, names: tuple[str, ...] = PACKAGES) -> dict:
  """{name: installed version} for each distribution name; None for one that is not installed."""
  versions = {}
  for name in names:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def git_state(*, directory: str) -> dict | None:
  """{"commit": full hash of HEAD, "dirty": tracked files changed} of the git checkout that tracks `directory`.

  None when `directory` is not tracked by a git checkout, git is not installed, or git does not answer in time.
  Untracked files do not make a checkout dirty (outputs such as runs/ and caches live next to the code).
  """
  # A package installed into a virtual environment that happens to sit inside some checkout is not that
  # checkout's code: only a package whose own files git tracks is attributed to HEAD.
  if _git(directory, "ls-files", "--error-unmatch", "--", "__init__.py") is None:
    return None
  commit = _git(directory, "rev-parse", "HEAD")
  status = _git(directory, "status", "--porcelain", "--untracked-files=no")
  if commit is None or status is None:
    return None
  return {"commit": commit.strip(), "dirty": bool(status.strip())}


def _git(directory: str, *args: str) -> str | None:
  """stdout of `git -C directory args...`, or None when git fails, is missing or times out."""
  try:
    completed = subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True,
                               timeout=GIT_TIMEOUT_S, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return completed.stdout if completed.returncode == 0 else None
