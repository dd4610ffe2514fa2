"""Reading jsonl evaluation data with errors that name ``file:line``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


def iter_objects(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Yield ``(where, lineno, object)`` for each non-blank line; a line that is not a JSON object
    raises ``error`` naming ``file:line`` and what was expected."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(f"{where}: not UTF-8 text (byte {exc.start} of the line: {exc.reason})") from None
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(item, dict):
                raise error(f"{where}: expected a JSON object, got {type(item).__name__}")
            yield where, lineno, item
