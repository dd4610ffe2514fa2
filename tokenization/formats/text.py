"""Plain text (optionally gzipped): one document per line; a line of any length is read in blocks."""

from __future__ import annotations

import codecs
import gzip
import zlib
from pathlib import Path

from common.artifacts import DataError
from common.config.data import CleanConfig

from . import base
from .base import DocumentSink, InputFormat, check_binary, decode_error, open_binary, utf8_errors


def read(path: Path, cfg: CleanConfig, cleaner: DocumentSink) -> None:
    """One document per line; a line of any length is fed to the cleaner in blocks."""
    decoder = codecs.getincrementaldecoder("utf-8")(utf8_errors(cfg))
    line_no, in_line, line_bytes, docs = 1, False, 0, 0
    try:
        with open_binary(path) as stream:
            while block := stream.read(base.BLOCK):
                cleaner.add_bytes(len(block))
                start = 0
                while start < len(block):
                    nl = block.find(b"\n", start)
                    end = len(block) if nl < 0 else nl
                    piece = block[start:end]
                    if piece:
                        check_binary(piece, path, line_no)
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
                                raise decode_error(path, f"line {line_no}", exc, line_bytes) from None
                            line_bytes += len(piece)
                    if nl < 0:
                        break
                    if in_line:
                        try:
                            cleaner.feed(decoder.decode(b"", final=True))
                        except UnicodeDecodeError as exc:
                            raise decode_error(path, f"line {line_no}", exc, line_bytes) from None
                        cleaner.end()
                        docs += 1
                    decoder.reset()
                    in_line, line_bytes = False, 0
                    line_no += 1
                    start = nl + 1
            if in_line:
                try:
                    cleaner.feed(decoder.decode(b"", final=True))
                except UnicodeDecodeError as exc:
                    raise decode_error(path, f"line {line_no}", exc, line_bytes) from None
                cleaner.end()
                docs += 1
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    if docs == 0:
        raise DataError(f"{path}: empty input (no non-blank lines)")


# BabyLM ships its text as *.train / *.dev / *.test; ".gz" is any gzipped text not claimed by another format.
FORMAT = InputFormat("text", (".txt", ".txt.gz", ".gz", ".train", ".dev", ".test"), read)
