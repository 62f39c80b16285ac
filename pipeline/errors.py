"""Errors that mean "the user's input is wrong": the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Bad config, bad data, bad run directory. The message names the field or file."""


class ConfigError(UserError):
    """A config field is missing, unknown, mistyped or out of range."""
