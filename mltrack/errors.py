"""User-facing errors: anything a user can cause ends as one message and exit code 2."""
from __future__ import annotations


class UserError(Exception):
    """An error caused by input the user controls (paths, config, flags, data).

    The CLI prints ``str(err)`` (no traceback) and exits with ``exit_code``. The message should say
    what is wrong, where, and how to fix it.
    """

    exit_code = 2


class ConfigError(UserError):
    """Invalid configuration: unknown key, wrong type, incompatible trainer keys."""


class DataError(UserError):
    """Bad dataset: missing directories, missing index files, corrupt or hostile files."""


class CheckpointError(UserError):
    """A checkpoint that cannot be trusted or used: unsafe pickle, checksum mismatch, incompatible."""
