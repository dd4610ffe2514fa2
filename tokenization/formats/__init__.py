"""The input formats of the clean stage: a registry keyed by file name endings.

A file is read by the format whose longest suffix matches its name (``x.jsonl.gz`` is JSON lines,
``x.gz`` gzipped text); a file named explicitly with no known suffix is read as text. Folders are
searched for files with a registered suffix. Adding a format is one module with a ``FORMAT``
(``base.InputFormat``: its reader and, optionally, how it cuts a file into parts), registered below.
"""

from __future__ import annotations

from pathlib import Path

from . import jsonl, parquet, text
from .base import WHOLE, DocumentSink, InputFormat, Part, replaced_bytes

FORMATS: dict[str, InputFormat] = {}


def register_format(fmt: InputFormat) -> None:
    """Make ``fmt`` read the files whose names end with one of its suffixes."""
    FORMATS[fmt.name] = fmt


for _module in (text, jsonl, parquet):
    register_format(_module.FORMAT)


def suffixes() -> tuple[str, ...]:
    """Every registered file name ending (what a folder is searched for)."""
    return tuple(sorted({s for f in FORMATS.values() for s in f.suffixes}))


def format_for(path: Path) -> InputFormat:
    """The format of ``path``: the longest matching suffix wins; text when none matches."""
    name = path.name.lower()
    best, length = FORMATS["text"], 0
    for fmt in FORMATS.values():
        for suffix in fmt.suffixes:
            if name.endswith(suffix) and len(suffix) > length:
                best, length = fmt, len(suffix)
    return best


__all__ = ["DocumentSink", "FORMATS", "InputFormat", "Part", "WHOLE", "format_for", "register_format", "replaced_bytes",
           "suffixes"]
