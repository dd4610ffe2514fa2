"""Plain text (optionally gzipped): one document per line; a line of any length is read in blocks."""

from __future__ import annotations

import codecs
import gzip
import zlib
from pathlib import Path
from typing import Iterator

from common.artifacts import DataError
from common.config.data import CleanConfig

from . import base
from .base import (WHOLE, DocumentSink, InputFormat, LineNumbers, Part, binary_error, decode_error,
                   first_line_start, line_parts, open_binary, utf8_errors)


def read(location: str | Path, cfg: CleanConfig, cleaner: DocumentSink, part: Part = WHOLE) -> Iterator[None]:
    """One document per line (the lines that start in ``part``); a line of any length is fed to the
    cleaner in blocks. Yields after each block."""
    decoder = codecs.getincrementaldecoder("utf-8")(utf8_errors(cfg))
    try:
        with open_binary(location) as stream:
            pos = first_line_start(stream, part)
            if pos is None:
                return
            lines = LineNumbers(location, pos)
            line_no, in_line, line_bytes = 1, False, 0
            done = False
            while not done and (block := stream.read(base.BLOCK)):
                start = 0
                while start < len(block):
                    nl = block.find(b"\n", start)
                    end = len(block) if nl < 0 else nl
                    piece = block[start:end]
                    if piece:
                        if b"\x00" in piece:
                            raise binary_error(location, lines(line_no))
                        if not in_line:
                            if not piece.strip():
                                piece = b""  # leading blanks: not yet a document
                            else:
                                in_line = True
                                cleaner.start()
                        if piece:
                            try:
                                cleaner.feed(decoder.decode(piece))
                            except UnicodeDecodeError as exc:
                                raise decode_error(location, f"line {lines(line_no)}", exc, line_bytes) from None
                            line_bytes += len(piece)
                    if nl < 0:
                        start = len(block)
                        break
                    if in_line:
                        try:
                            cleaner.feed(decoder.decode(b"", final=True))
                        except UnicodeDecodeError as exc:
                            raise decode_error(location, f"line {lines(line_no)}", exc, line_bytes) from None
                        cleaner.end()
                    decoder.reset()
                    in_line, line_bytes = False, 0
                    line_no += 1
                    start = nl + 1
                    if part.end >= 0 and pos + start >= part.end:
                        done = True  # the next line starts in the next part
                        break
                cleaner.add_bytes(start)
                pos += len(block)
                yield
            if in_line:
                try:
                    cleaner.feed(decoder.decode(b"", final=True))
                except UnicodeDecodeError as exc:
                    raise decode_error(location, f"line {lines(line_no)}", exc, line_bytes) from None
                cleaner.end()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{location}: not a readable gzip file ({exc})") from None


# BabyLM ships its text as *.train / *.dev / *.test; ".gz" is any gzipped text not claimed by another format.
FORMAT = InputFormat("text", (".txt", ".txt.gz", ".gz", ".train", ".dev", ".test"), read, line_parts,
                     "no non-blank lines")
