"""Parquet: one document per row of the ``clean.text_field`` column (string or UTF-8 binary)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.artifacts import DataError
from common.config.data import CleanConfig

from .base import DocumentSink, InputFormat, decode_error, utf8_errors


def read(path: Path, cfg: CleanConfig, cleaner: DocumentSink) -> None:
    """Deliver each row of the ``clean.text_field`` column to ``cleaner`` as one document (a null is an
    empty document); a DataError names the problem."""
    errors = utf8_errors(cfg)
    key = cfg.text_field
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if key not in names:
        raise DataError(f"{path}: Parquet file has no column {key!r} (columns: "
                        f"{', '.join(names)}); set clean.text_field")
    kind = pf.schema_arrow.field(key).type
    is_binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    if not (is_binary or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {key!r} must hold strings, has type {kind}")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[key]):
        for value in batch.column(0).to_pylist():
            row += 1
            if is_binary and value is not None:
                cleaner.add_bytes(len(value))
                try:
                    value = value.decode("utf-8", errors)
                except UnicodeDecodeError as exc:
                    raise decode_error(path, f"record {row - 1}", exc, 0) from None
            elif value is not None:
                cleaner.add_bytes(len(value))  # characters; exact bytes are not worth a copy
            cleaner.start()
            if value:
                cleaner.feed(value)
            cleaner.end()
    if row == 0:
        raise DataError(f"{path}: empty input (no rows)")


FORMAT = InputFormat("parquet", (".parquet",), read)
