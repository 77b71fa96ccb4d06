"""Orbax checkpoints behind a small wrapper (so orbax's v1 API can replace CheckpointManager later).

A train state's "objective" entry (training-only state: CRD's heads and memory banks, AdaFocal's gammas; see
`calibjax.train.step`) is saved as a checkpoint item of its own, so a finished run restores as a network
(`restore(step, like)` with a `like` that has no objective leaves) without rebuilding the objective it trained with.

Saves are atomic (orbax writes to a temporary directory and renames it), so a run killed during a save leaves
the previous checkpoint intact. A checkpoint that cannot be restored raises `CheckpointError`; nothing in the
workdir is deleted or overwritten by a failed restore.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from calibjax.errors import CheckpointError


class Checkpointer:
  """Keeps the latest `keep` checkpoints of a pytree plus a JSON metadata dict per step."""

  def __init__(self, directory: str, *, keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation_policy.LatestN(keep), create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict | None = None) -> None:
    items = {name: ocp.args.StandardSave(tree) for name, tree in _items(state).items()}
    self._manager.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta or {})))

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    """Restores step `step` into the structure, shapes, dtypes and shardings of `like` (its objective too when
    `like` has objective leaves; otherwise `like`'s objective is kept)."""
    items = {name: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
             for name, tree in _items(like).items()}
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonRestore()))
    except Exception as error:  # orbax raises many types (ValueError, OSError, tensorstore errors)
      reason = str(error).splitlines()[0] if str(error) else type(error).__name__
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} cannot be restored ({reason[:200]}); it was left "
          f"untouched: move that directory away to start over, or use another --workdir") from error
    state = restored["state"]
    if "objective" in restored:
      state = dict(state, objective=restored["objective"])
    elif isinstance(like, dict) and "objective" in like:
      state = dict(state, objective=like["objective"])
    return state, dict(restored["meta"] or {})

  def wait(self) -> None:
    """Blocks until asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _items(state: Any) -> dict[str, Any]:
  """The checkpoint items of a state: "state", and "objective" when the state has objective leaves."""
  if not (isinstance(state, dict) and "objective" in state):
    return {"state": state}
  items = {"state": {k: v for k, v in state.items() if k != "objective"}}
  if jax.tree.leaves(state["objective"]):
    items["objective"] = state["objective"]
  return items
