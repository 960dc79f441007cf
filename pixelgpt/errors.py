"""Errors a user can cause: the CLI turns them into one line on stderr and exit status 2.

Deeper code asserts invariants; only boundary code (config, CLI, data sources, palette files) raises UserError.
"""


class UserError(Exception):
  """A mistake in the user's input (config, flags, files); its message is the whole report."""


class Diverged(Exception):
  """Training produced a non-finite loss or gradient; the message names the step. Nothing after it was saved."""


class StorageError(Exception):
  """Writing the run's files failed even after the storage clients' own retries; the message says what is kept."""
