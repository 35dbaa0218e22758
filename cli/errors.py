"""User mistakes end in one line on stderr and exit 2, never a traceback."""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import typer

F = TypeVar("F", bound=Callable)

# Library code signals a user mistake with these; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)

# Writes the machine refuses (not bugs): an OSError with one of these errnos is a one-line error too.
WRITE_ERRNOS = {
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
}


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: message` on stderr and return the Exit to raise."""
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


def non_negative(option: str, value: int | None) -> None:
    """ValueError naming `option` when `value` is negative (seeds: numpy takes no negative seed)."""
    if value is not None and value < 0:
        raise ValueError(f"{option} must be a non-negative integer, got {value}")


def write_error(exc: BaseException) -> str | None:
    """`cannot write <path>: <reason>` for an OSError of a full, quota-bound or read-only disk, else None."""
    if not isinstance(exc, OSError) or exc.errno not in WRITE_ERRNOS:
        return None
    reason = (exc.strerror or WRITE_ERRNOS[exc.errno]).strip()
    reason = reason[:1].lower() + reason[1:]
    return f"cannot write {exc.filename}: {reason}" if exc.filename else f"cannot write: {reason}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def user_errors(fn: F) -> F:
    """Decorate a command so that a user mistake raised by library code exits 2 with one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            raise fail(_first_line(exc)) from None
        except OSError as exc:
            message = write_error(exc)
            if message is None:
                raise
            raise fail(message) from None

    return wrapper  # type: ignore[return-value]
