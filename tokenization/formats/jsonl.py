"""JSON lines (optionally gzipped): one object per line, its text under ``clean.text_field``."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

from common.artifacts import DataError
from common.config.data import CleanConfig

from .base import DocumentSink, InputFormat, check_binary, decode_error, open_binary, utf8_errors


def read(path: Path, cfg: CleanConfig, cleaner: DocumentSink) -> None:
    """Deliver each record's ``clean.text_field`` to ``cleaner`` as one document (blank lines skipped,
    a null text is an empty document); a DataError names the line."""
    errors = utf8_errors(cfg)
    key, docs = cfg.text_field, 0
    try:
        with open_binary(path) as stream:
            for line_no, raw in enumerate(stream, 1):
                cleaner.add_bytes(len(raw))
                if not raw.strip():
                    continue
                check_binary(raw, path, line_no)
                try:
                    line = raw.decode("utf-8", errors)
                except UnicodeDecodeError as exc:
                    raise decode_error(path, f"line {line_no}", exc, 0) from None
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {line_no}: malformed JSON ({exc.msg} at "
                                    f"column {exc.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}: line {line_no}: expected a JSON object, got "
                                    f"{type(record).__name__}")
                if key not in record:
                    raise DataError(f"{path}: line {line_no}: record has no field {key!r} "
                                    f"(fields: {', '.join(sorted(record)) or 'none'}); set "
                                    "clean.text_field")
                text = record[key]
                if text is not None and not isinstance(text, str):
                    raise DataError(f"{path}: line {line_no}: field {key!r} must be a string, "
                                    f"got {type(text).__name__}")
                cleaner.start()
                if text:
                    cleaner.feed(text)
                cleaner.end()
                docs += 1
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    if docs == 0:
        raise DataError(f"{path}: empty input (no JSON records)")


FORMAT = InputFormat("jsonl", (".jsonl", ".jsonl.gz"), read)
