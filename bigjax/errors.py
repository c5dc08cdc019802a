"""User-facing errors: one line that names the problem and the fix."""


class UserError(Exception):
  """A mistake in the config, command line or environment the user can fix.

  The CLI prints its message on one line and exits with status 2; nothing is written to the workdir
  when it is raised before training starts.
  """


class DataError(UserError):
  """A dataset is missing, unprepared or holds a malformed record."""


class NonFiniteError(RuntimeError):
  """The loss or gradient norm became NaN/Inf under `config.nan_policy='raise'`."""


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after saving a checkpoint."""
