"""What an input format of the clean stage is, and the decoding helpers the formats share.

A format reads one input file and hands its documents to a ``DocumentSink`` (the cleaner): for each
document ``start()``, any number of ``feed(text)`` calls (a document of any length may arrive in
pieces), then ``end()``; and ``add_bytes(n)`` for the bytes read. Errors name the file and the
line or record.
"""

from __future__ import annotations

import codecs
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from common.artifacts import DataError
from common.config.data import CleanConfig

BLOCK = 1 << 20  # bytes read at a time

# Invalid UTF-8 replaced with U+FFFD is counted through this codec error handler.
_replaced = [0]


def _count_and_replace(exc: UnicodeDecodeError):
    _replaced[0] += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("gptbert.count_replace", _count_and_replace)


def replaced_bytes() -> int:
    """Invalid UTF-8 bytes replaced so far in this process (callers take differences)."""
    return _replaced[0]


class DocumentSink(Protocol):
    """Where a format delivers documents (the cleaner)."""

    def start(self) -> None:
        """Begin a document."""

    def feed(self, text: str) -> None:
        """Append the next piece of the current document's text."""

    def end(self) -> None:
        """Finish the current document."""

    def add_bytes(self, n: int) -> None:
        """Count ``n`` more bytes read from the input file."""


@dataclass(frozen=True)
class InputFormat:
    """A registered input format: its name, the file name endings it claims, and its reader."""

    name: str
    suffixes: tuple[str, ...]
    read: Callable[[Path, CleanConfig, DocumentSink], None]


def utf8_errors(cfg: CleanConfig) -> str:
    """The codec error mode of ``clean.invalid_utf8``: strict, or replace-and-count."""
    return "strict" if cfg.invalid_utf8 == "strict" else "gptbert.count_replace"


def open_binary(path: Path):
    """The file's bytes, transparently gunzipped when it starts with the gzip magic number."""
    f = open(path, "rb")
    magic = f.read(2)
    f.seek(0)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")
    return f


def check_binary(chunk: bytes, path: Path, line: int) -> None:
    """A NUL byte means a binary file given as text."""
    if b"\x00" in chunk:
        raise DataError(f"{path}: line {line}: NUL byte found; this looks like a binary file, not text")


def decode_error(path: Path, where: str, exc: UnicodeDecodeError, offset: int) -> DataError:
    """The error for invalid UTF-8 at ``where`` (``line N`` or ``record N``)."""
    return DataError(f"{path}: {where}: invalid UTF-8 at byte {offset + exc.start} of the "
                     f"{'line' if where.startswith('line') else 'value'} "
                     f"({exc.reason}); set clean.invalid_utf8=replace to replace such bytes")


__all__ = ["BLOCK", "DocumentSink", "InputFormat", "check_binary", "decode_error", "open_binary",
           "replaced_bytes", "utf8_errors"]
