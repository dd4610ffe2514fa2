"""JSON lines (optionally gzipped): one object per line, its text under ``clean.text_field``."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Iterator

from common.artifacts import DataError
from common.config.data import CleanConfig

from .base import (WHOLE, DocumentSink, InputFormat, LineNumbers, Part, binary_error, decode_error,
                   first_line_start, line_parts, open_binary, utf8_errors)

YIELD_EVERY = 1024  # records between two yields


def read(location: str | Path, cfg: CleanConfig, cleaner: DocumentSink, part: Part = WHOLE) -> Iterator[None]:
    """Deliver each record's ``clean.text_field`` to ``cleaner`` as one document (the lines that
    start in ``part``; blank lines skipped, a null text is an empty document); a DataError names
    the line."""
    errors = utf8_errors(cfg)
    key = cfg.text_field
    try:
        with open_binary(location) as stream:
            pos = first_line_start(stream, part)
            if pos is None:
                return
            lines = LineNumbers(location, pos)
            for line_no, raw in enumerate(stream, 1):
                cleaner.add_bytes(len(raw))
                pos += len(raw)
                if raw.strip():
                    if b"\x00" in raw:
                        raise binary_error(location, lines(line_no))
                    _record(raw, errors, key, location, lambda: lines(line_no), cleaner)
                if line_no % YIELD_EVERY == 0:
                    yield
                if 0 <= part.end <= pos:
                    break  # the next line starts in the next part
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{location}: not a readable gzip file ({exc})") from None


def _record(raw: bytes, errors: str, key: str, location, line, cleaner: DocumentSink) -> None:
    """One JSON line to the cleaner; ``line()`` is its (absolute) number, for errors."""
    try:
        text = raw.decode("utf-8", errors)
    except UnicodeDecodeError as exc:
        raise decode_error(location, f"line {line()}", exc, 0) from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{location}: line {line()}: malformed JSON ({exc.msg} at "
                        f"column {exc.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{location}: line {line()}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise DataError(f"{location}: line {line()}: record has no field {key!r} "
                        f"(fields: {', '.join(sorted(record)) or 'none'}); set clean.text_field")
    value = record[key]
    if value is not None and not isinstance(value, str):
        raise DataError(f"{location}: line {line()}: field {key!r} must be a string, "
                        f"got {type(value).__name__}")
    cleaner.start()
    if value:
        cleaner.feed(value)
    cleaner.end()


FORMAT = InputFormat("jsonl", (".jsonl", ".jsonl.gz"), read, line_parts, "no JSON records")
