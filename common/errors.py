"""Errors as one line: how every layer (the CLI, the flows, storage, checkpoints) words a failure."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data or artifact; the message names the file (and line or record where it applies)."""


class DigestMismatchError(DataError):
    """An artifact was made from something other than what it is being used with."""


def error_line(exc: BaseException, *, first: bool = False, limit: int | None = None) -> str:
    """One line saying what went wrong: the exception's message (the library's messages name the
    file or config field). A message of several lines (a library wrapped a traceback or a remote
    error into it) gives its last ``Name: message`` line, or with ``first`` its first line (the
    summary line of an OS or pickle error). ``limit`` cuts the line to that many characters; an
    empty message gives the exception's type name."""
    text = str(exc).strip()
    if isinstance(exc, KeyError):
        text = f"missing key {text}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if first or len(lines) == 1:
        line = lines[0]
    else:
        named = [line for line in lines if ": " in line and line.split(": ", 1)[0].replace(".", "").isidentifier()]
        line = named[-1] if named else lines[-1]
    return line[:limit] if limit else line


__all__ = ["DataError", "DigestMismatchError", "error_line"]
