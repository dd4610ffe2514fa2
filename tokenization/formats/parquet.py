"""Parquet: one document per row of the ``clean.text_field`` column (string or UTF-8 binary)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from common import storage
from common.artifacts import DataError
from common.config.data import CleanConfig

from .base import WHOLE, DocumentSink, InputFormat, Part, decode_error, utf8_errors


def _open(location: str | Path) -> pq.ParquetFile:
    try:
        if storage.is_remote(location):
            fs, path = storage.filesystem(location)
            return pq.ParquetFile(fs.open_input_file(path))
        return pq.ParquetFile(location)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{location}: not a readable Parquet file ({exc})") from None


def split(location: str, size: int, block_bytes: int) -> list[Part]:
    """Consecutive row groups of about ``block_bytes`` (uncompressed) each."""
    meta = _open(location).metadata
    if block_bytes <= 0 or meta.num_row_groups <= 1:
        return [WHOLE]
    parts, start, size = [], 0, 0
    for i in range(meta.num_row_groups):
        size += meta.row_group(i).total_byte_size
        if size >= block_bytes:
            parts.append(Part(start, i + 1))
            start, size = i + 1, 0
    if start < meta.num_row_groups:
        parts.append(Part(start, meta.num_row_groups))
    return parts


def read(location: str | Path, cfg: CleanConfig, cleaner: DocumentSink, part: Part = WHOLE) -> Iterator[None]:
    """Deliver each row of the ``clean.text_field`` column (of the row groups of ``part``) to
    ``cleaner`` as one document (a null is an empty document); a DataError names the problem.
    Yields after each batch of rows."""
    errors = utf8_errors(cfg)
    key = cfg.text_field
    pf = _open(location)
    names = pf.schema_arrow.names
    if key not in names:
        raise DataError(f"{location}: Parquet file has no column {key!r} (columns: "
                        f"{', '.join(names)}); set clean.text_field")
    kind = pf.schema_arrow.field(key).type
    is_binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    if not (is_binary or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{location}: column {key!r} must hold strings, has type {kind}")
    groups = range(pf.metadata.num_row_groups)[part.start: None if part.end < 0 else part.end]
    row = sum(pf.metadata.row_group(i).num_rows for i in range(groups.start))  # records before the part
    if not groups:
        return
    for batch in pf.iter_batches(batch_size=1024, columns=[key], row_groups=list(groups)):
        for value in batch.column(0).to_pylist():
            row += 1
            if is_binary and value is not None:
                cleaner.add_bytes(len(value))
                try:
                    value = value.decode("utf-8", errors)
                except UnicodeDecodeError as exc:
                    raise decode_error(location, f"record {row - 1}", exc, 0) from None
            elif value is not None:
                cleaner.add_bytes(len(value))  # characters; exact bytes are not worth a copy
            cleaner.start()
            if value:
                cleaner.feed(value)
            cleaner.end()
        yield


FORMAT = InputFormat("parquet", (".parquet",), read, split, "no rows")
