"""User-facing errors: one clear message, no traceback from the launcher."""


class NfjaxError(Exception):
  """Bad input, bad config or a workdir that does not match: something the user must fix."""


class ConfigError(NfjaxError):
  """A config key holds a value nfjax cannot use."""


class DataError(NfjaxError):
  """Input data is missing, unreachable or malformed."""
