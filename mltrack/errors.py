"""User-facing errors: anything a user can cause ends as one message and exit code 2."""
from __future__ import annotations

import re

# A DataLoader worker re-raises the original exception type with the worker traceback in its text.
_WORKER_WRAPPED = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.S)


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


def user_message(err: BaseException) -> str:
    """The message to show a user: for an error re-raised from a DataLoader worker, only its original
    text ("cannot read image <path>: <reason>"), not the worker traceback wrapped around it."""
    text = str(err)
    if not _WORKER_WRAPPED.match(text):
        return text
    marker = f"{type(err).__module__}.{type(err).__qualname__}: "
    at = text.rfind(marker)
    return text[at + len(marker):].strip() if at >= 0 else text
