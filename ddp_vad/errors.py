"""The one exception type that means "the user gave bad input", and one-line messages for every other error."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a path, a value, a file). The CLI prints it on one line and exits with status 2."""


class NonFiniteLossError(UserError):
    """A training loss became NaN/inf; the run stopped without checkpointing the bad state."""


def os_error_message(exc: OSError) -> str:
    """``<path>: <reason>`` for an operating-system error (disk full, not a directory, permission denied)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def error_message(exc: BaseException) -> str:
    """One line describing ``exc``: a UserError's text, an OSError's path and reason, else type and first line."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError):
        return os_error_message(exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
