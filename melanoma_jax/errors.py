"""Errors that mean "the user must change something", with messages that say what."""


class ConfigError(ValueError):
  """A configuration that cannot run; the message says which field to change."""
