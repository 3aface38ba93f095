"""User-facing errors: one clear message, no traceback from the launcher."""


class NfjaxError(Exception):
  """Bad input, bad config or a workdir that does not match: something the user must fix."""


class ConfigError(NfjaxError):
  """A config key holds a value nfjax cannot use."""


class DataError(NfjaxError):
  """Input data is missing, unreachable or malformed."""


class ArtifactError(DataError):
  """A file nfjax wrote (or should have written) is missing, truncated or damaged. `path` names it;
  the pipeline adds which stage made it and how to redo that stage."""

  def __init__(self, message: str, path: str):
    super().__init__(message)
    self.path = path

  def __reduce__(self):   # picklable (handed from process 0 to the others, nfjax/processes.py)
    return type(self), (str(self), self.path)


class MissingExtraError(NfjaxError):
  """An optional extra of the package (pyproject.toml) is needed and not installed; the message
  names it and the pip command (nfjax/extras.py)."""
