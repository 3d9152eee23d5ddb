"""Errors a user can fix are reported in one line, without a traceback (``SAPIENS_TRACEBACK=1`` shows it).

One place decides what counts as such an error, for ``train.py`` and for the pre-flight check that
runs before Hydra creates the run directory (:mod:`sapiens.preflight`).
"""

from __future__ import annotations

import os
import sys

from hydra.errors import InstantiationException

from sapiens.config import ConfigError
from sapiens.data.skips import StopRequested, UnusableDataError
from sapiens.disk import describe_os_error
from sapiens.lit.base import NonFiniteLossError

# Mistakes in the config, the data or the file system: reported in one line.
USER_ERRORS = (ConfigError, NonFiniteLossError, FileNotFoundError, ValueError, UnusableDataError)


def _message(err: BaseException) -> str:
    """The error's own message; for one re-raised from a DataLoader worker (whose message is
    "Caught X in DataLoader worker process N. Original Traceback ...") its last line."""
    message = str(err)
    if message.startswith("Caught ") and "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        message = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith(type(err).__name__) else last
    return message


def user_error(err: BaseException) -> tuple[str, int] | None:
    """``(message, exit status)`` for an error the user can act on; None for anything else (a bug,
    whose traceback must be seen)."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__  # a bad value met while building a component from the config
    if isinstance(err, StopRequested):
        return _message(err), 128 + err.signum
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
        message = describe_os_error(err)
        return (message, 2) if message else None
    if isinstance(err, USER_ERRORS):
        return _message(err), 2
    return None


def exit_on_user_error(err: BaseException) -> None:
    """Print the one-line report of ``err`` and exit, if it is a user error (and tracebacks are not
    asked for); return otherwise, so that the caller re-raises."""
    report = user_error(err)
    if report is None or os.environ.get("SAPIENS_TRACEBACK"):
        return
    message, status = report
    print(f"error: {message}\n(set SAPIENS_TRACEBACK=1 to see where it was raised)", file=sys.stderr)
    sys.exit(status)
