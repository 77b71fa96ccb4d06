"""Errors a user can fix.

`calibjax.main` prints the message of a `CalibjaxError` as one line and exits with status 2, so every
message says what is wrong and how to fix it.
"""


class CalibjaxError(Exception):
  """Base class of the errors that are reported to the user as one line."""


class DatasetNotFoundError(CalibjaxError, FileNotFoundError):
  """A dataset was not found in any of the places looked."""


class UnknownNameError(CalibjaxError, KeyError):
  """A name (method, model, loss, dataset, ...) is not in its registry."""

  def __str__(self):  # KeyError would quote the message.
    return str(self.args[0])


class CheckpointError(CalibjaxError):
  """A checkpoint in the workdir cannot be read or does not match the run."""


class ConfigError(CalibjaxError, ValueError):
  """A config value is invalid."""


class DivergenceError(CalibjaxError):
  """Training produced a non-finite loss; the run stopped before saving that state."""
