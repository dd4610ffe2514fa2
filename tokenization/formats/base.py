"""What an input format of the clean stage is, and the reading helpers the formats share.

A format reads one input file, or one part of it, and hands its documents to a ``DocumentSink``
(the cleaner): for each document ``start()``, any number of ``feed(text)`` calls (a document of
any length may arrive in pieces), then ``end()``; and ``add_bytes(n)`` for the bytes read. Its
``read`` may be a generator that yields now and then (after a block or a batch of records): the
caller then takes the documents cleaned so far, so memory stays bounded however large the file.

Parts let the Ray engine clean one file on several workers: ``split`` cuts a file into parts
(byte ranges aligned to lines for line-based formats, ranges of row groups for Parquet) and
``read`` reads one of them; reading every part in order gives exactly what reading the whole file
gives. Locations are local paths or object-store URIs (``common.storage``). Errors name the file
and the line or record.
"""

from __future__ import annotations

import codecs
import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

from common import storage
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
class Part:
    """A piece of one input file that is read on its own: bytes ``[start, end)`` for line-based
    formats (every line that starts inside belongs to the part), row groups ``[start, end)`` for
    Parquet; ``end`` -1 means to the end of the file."""

    start: int = 0
    end: int = -1


WHOLE = Part()


def whole_file(location: str, size: int, block_bytes: int) -> list[Part]:
    """The split of a format that cannot be read in parts: the whole file."""
    return [WHOLE]


@dataclass(frozen=True)
class InputFormat:
    """A registered input format: its name, the file name endings it claims, its reader
    ``read(location, cfg, sink, part)`` (a function, or a generator that yields between blocks),
    how it cuts a file into parts of about ``block_bytes`` (``split(location, size, block_bytes)``),
    and what an input without documents lacks (for the error)."""

    name: str
    suffixes: tuple[str, ...]
    read: Callable[..., Iterator[None] | None]
    split: Callable[[str, int, int], list[Part]] = whole_file
    empty: str = "no documents"


def utf8_errors(cfg: CleanConfig) -> str:
    """The codec error mode of ``clean.invalid_utf8``: strict, or replace-and-count."""
    return "strict" if cfg.invalid_utf8 == "strict" else "gptbert.count_replace"


def open_raw(location: str | Path):
    """The file at a local path or URI, seekable and buffered (an object store's file is read with
    range requests)."""
    if not storage.is_remote(location):
        return open(location, "rb")
    fs, path = storage.filesystem(location)
    try:
        return io.BufferedReader(fs.open_input_file(path), BLOCK)
    except OSError as exc:
        raise FileNotFoundError(f"{location}: cannot open ({exc})") from None


def is_gzip(location: str | Path) -> bool:
    """Whether the file starts with the gzip magic number."""
    with open_raw(location) as f:
        return f.read(2) == b"\x1f\x8b"


def open_binary(location: str | Path):
    """The file's bytes, transparently gunzipped when it starts with the gzip magic number."""
    f = open_raw(location)
    magic = f.read(2)
    f.seek(0)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")
    return f


def line_parts(location: str, size: int, block_bytes: int) -> list[Part]:
    """Byte ranges of about ``block_bytes`` of an uncompressed line-based file (one part when it is
    gzipped or small, or when ``block_bytes`` is 0)."""
    if block_bytes <= 0 or size <= block_bytes or is_gzip(location):
        return [WHOLE]
    starts = list(range(0, size, block_bytes))
    return [Part(s, e) for s, e in zip(starts, starts[1:] + [-1])]


def first_line_start(stream, part: Part) -> int | None:
    """Seek ``stream`` to the first line that starts in ``part`` (a line starts at 0 and after
    each newline) and return its offset; None when no line starts in it. Only the part's own bytes
    are scanned."""
    if part.start == 0:
        return 0
    stream.seek(part.start - 1)
    pos = part.start - 1
    while part.end < 0 or pos < part.end - 1:
        want = BLOCK if part.end < 0 else min(BLOCK, part.end - 1 - pos)
        block = stream.read(want)
        if not block:
            return None
        nl = block.find(b"\n")
        if nl >= 0:
            stream.seek(pos + nl + 1)
            return pos + nl + 1
        pos += len(block)
    return None


class LineNumbers:
    """Line numbers of a part that starts at byte ``offset``: counted from the part's first line,
    made absolute (by counting the newlines before it) only when an error needs one."""

    def __init__(self, location: str | Path, offset: int):
        self.location, self.offset, self._base = location, offset, None if offset else 0

    def __call__(self, relative: int) -> int:
        if self._base is None:
            self._base = 0
            with open_raw(self.location) as f:
                left = self.offset
                while left > 0 and (chunk := f.read(min(BLOCK, left))):
                    self._base += chunk.count(b"\n")
                    left -= len(chunk)
        return self._base + relative


def binary_error(path: str | Path, line: int) -> DataError:
    """The error for a NUL byte: a binary file given as text."""
    return DataError(f"{path}: line {line}: NUL byte found; this looks like a binary file, not text")


def check_binary(chunk: bytes, path: str | Path, line: int) -> None:
    """A NUL byte means a binary file given as text."""
    if b"\x00" in chunk:
        raise binary_error(path, line)


def decode_error(path: str | Path, where: str, exc: UnicodeDecodeError, offset: int) -> DataError:
    """The error for invalid UTF-8 at ``where`` (``line N`` or ``record N``)."""
    return DataError(f"{path}: {where}: invalid UTF-8 at byte {offset + exc.start} of the "
                     f"{'line' if where.startswith('line') else 'value'} "
                     f"({exc.reason}); set clean.invalid_utf8=replace to replace such bytes")


__all__ = ["BLOCK", "DocumentSink", "InputFormat", "LineNumbers", "Part", "WHOLE", "binary_error", "check_binary",
           "decode_error", "first_line_start", "is_gzip", "line_parts", "open_binary", "open_raw",
           "replaced_bytes", "utf8_errors", "whole_file"]
