"""Error classes, by what the user must do: the CLI prints each as one line, no traceback.

UserError (exit 2): something the user must change (config, data, run directory, disk space);
the message names the field or file and what to change. RetryableError (exit 1): nothing to
change, the same command may pass when run again; only these messages say "resume again".
"""


class UserError(Exception):
    """Bad config, bad data, bad run directory. The message names the field or file."""


class ConfigError(UserError):
    """A config field is missing, unknown, mistyped or out of range."""


class RetryableError(Exception):
    """May pass on retry (a lost client group, a transient I/O error): exit 1."""


class Interrupted(Exception):
    """Stopped by a signal with everything resumable; the message says how to continue."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code  # 128 + the signal's number, as a shell reports a process it stopped
