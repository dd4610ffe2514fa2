"""Stage 1, ``gptbert clean``: raw text files -> one Parquet file of clean, deduplicated documents.

Inputs are files or folders of ``.txt`` / ``.gz`` text (one document per line), ``.jsonl``
(``.jsonl.gz``; the text under ``cfg.text_field``) and ``.parquet`` (the ``cfg.text_field``
column). Per document: decode UTF-8 (invalid bytes replaced by U+FFFD and counted, or an error),
Unicode normalisation (NFKC), control / invisible format characters removed, configurable regex
rules, whitespace normalised (runs of spaces -> one space, at most one blank line), documents
longer than ``max_document_chars`` split at sentence boundaries, empty and exact duplicate
documents dropped (first occurrence kept).

Memory stays bounded for arbitrarily long lines: text is read in 1 MiB blocks and a long document
is processed in ~1 MiB segments cut just before whitespace, which leaves normalisation and
whitespace handling unchanged (rules are matched within a segment, so a rule match that spans a
cut, at most once per MiB, is missed). Duplicates are found on the documents as written, i.e.
after splitting.

Writes ``documents.parquet`` (columns ``text``, ``source``) and the stage record ``stage.json``
(identity, input files with their digests, per-source statistics) atomically.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from common import storage
from common.artifacts import (DataError, check_outside_inputs, file_digest, make_record, staging_dir,
                              write_record)
from common.config.data import CleanConfig

from . import formats
from .runtime import progress

STAGE = "clean"
DOCUMENTS_FILE = "documents.parquet"
SCHEMA = pa.schema([("text", pa.string()), ("source", pa.string())])

SEGMENT = 1 << 20  # characters of one long document cleaned at a time

# Control characters (C0/C1 minus the whitespace ones), lone surrogates, and invisible format
# characters that carry no text: soft hyphen, zero-width space, bidi marks/embeddings/isolates,
# word joiner, BOM, interlinear annotation. Zero-width (non-)joiners stay: emoji and scripts need them.
_CONTROL = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u00ad\u200b\u200e\u200f\u202a-\u202e\u2060"
    "\u2066-\u2069\ufeff\ufff9-\ufffb\ud800-\udfff]+"
)
_NEWLINES = re.compile("\r\n?|[\x0b\x0c\x85\u2028\u2029]")
_SPACES = re.compile(r"[^\S\n]{2,}|[^\S\n ]")  # a run, or one unusual space
_DOUBLE_SPACES = re.compile(r" {2,}")
_SPACE_NEWLINE = re.compile(r" ?\n ?")
_MANY_NEWLINES = re.compile(r"\n{3,}")
# A sentence end (terminator plus closing quotes/brackets) followed by whitespace, or a newline.
# The greedy ".*" makes match() find the last one, scanning back from the end of the window.
_LAST_SENTENCE_END = re.compile(
    r".*(?:[.!?\u2026\u3002\uff01\uff1f][\"'\u201d\u2019)\]]*(?=\s)|\n)", re.S)

@dataclass
class SourceStats:
    """Counters of the clean stage for one source (and, summed, for all), recorded in stage.json."""

    files: int = 0
    bytes_in: int = 0
    documents_in: int = 0
    words_in: int = 0
    bytes_replaced: int = 0
    documents_split: int = 0
    dropped_empty: int = 0
    dropped_duplicates: int = 0
    documents_out: int = 0
    words_out: int = 0
    chars_out: int = 0


@dataclass
class InputFile:
    """One input file of the clean stage: its path, name under its input, source and format."""

    path: Path
    name: str  # path relative to the input it was found under
    source: str
    kind: str  # "text", "jsonl" or "parquet"


def count_words(text: str) -> int:
    """Whitespace-separated words of whitespace-normalised text (single spaces/newlines, at
    most one blank line), without building the list that ``len(text.split())`` would."""
    core = text.strip(" \n")
    if not core:
        return 0
    return core.count(" ") + core.count("\n") - core.count("\n\n") + 1


def source_name(path: Path) -> str:
    """The source of an input file: its name up to the first dot (``childes`` for ``childes.train.gz``)."""
    return path.name.split(".")[0] or path.name


def list_input_files(inputs: list[str]) -> list[InputFile]:
    """Expand files and folders (recursively, sorted) into the ordered list of input files. An input
    on an object store (a URI) is read from its copy in the local cache (``storage.local_input``)."""
    if not inputs:
        raise DataError("clean: no inputs given (set clean.inputs or pass paths)")
    files: list[InputFile] = []
    for entry in inputs:
        root = storage.local_input(entry) if storage.is_remote(entry) else Path(entry)
        if not root.exists():
            raise FileNotFoundError(f"input not found: {root}")
        if root.is_file():
            files.append(InputFile(root, root.name, source_name(root), formats.format_for(root).name))
            continue
        found = sorted(
            p for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and p.name.lower().endswith(formats.suffixes())
        )
        if not found:
            raise DataError(f"{root}: folder holds no input files (looked for {', '.join(formats.suffixes())})")
        for p in found:
            files.append(InputFile(p, p.relative_to(root).as_posix(), source_name(p), formats.format_for(p).name))
    return files


def inputs_digest(files: list[InputFile]) -> tuple[str, list[dict[str, Any]]]:
    """Content digest of the inputs (names relative to their input folder, sizes, sha256)."""
    listing = [{"name": f.name, "source": f.source, "bytes": f.path.stat().st_size,
                "sha256": file_digest(f.path)} for f in files]
    blob = json.dumps(listing, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest(), listing


def clean_inputs(cfg: CleanConfig) -> dict[str, str]:
    """The inputs part of the clean stage's identity (the input files' content digest)."""
    digest, _ = inputs_digest(list_input_files(cfg.inputs))
    return {"inputs": digest}


class _Rules:
    def __init__(self, cfg: CleanConfig):
        self.rules = [(re.compile(r.pattern), r.replacement, set(r.sources)) for r in cfg.rules]
        self._cache: dict[str, list] = {}

    def for_source(self, source: str) -> list:
        if source not in self._cache:
            self._cache[source] = [(p, rep) for p, rep, srcs in self.rules if not srcs or source in srcs]
        return self._cache[source]


class _DocumentCleaner:
    """Cleans one document at a time, fed as text segments; emits finished documents (the
    ``DocumentSink`` the input formats deliver to)."""

    def __init__(self, cfg: CleanConfig, emit: Callable[[str], None]):
        self.cfg = cfg
        self.emit = emit
        self.form = None if cfg.unicode_normalization == "none" else cfg.unicode_normalization
        self.rules: list = []
        self.stats = SourceStats()

    def add_bytes(self, n: int) -> None:
        self.stats.bytes_in += n

    def start(self) -> None:
        self.raw = ""  # decoded input not yet cleaned
        self.out = ""  # cleaned text not yet emitted as a document
        self.pos = 0  # start of the unemitted part of self.out
        self.pending_ws = ""  # whitespace held back between two cleaned segments
        self.started = False  # any non-whitespace text in this document yet
        self.split = False

    def feed(self, text: str) -> None:
        raw = self.raw + text if self.raw else text
        pos = 0  # an index rather than re-slicing keeps a huge single feed linear
        while len(raw) - pos > 2 * SEGMENT:
            cut = self._safe_cut(raw, pos, pos + SEGMENT)
            self._clean_segment(raw[pos:cut])
            pos = cut
        self.raw = raw[pos:] if pos else raw

    def end(self) -> None:
        if self.raw:
            self._clean_segment(self.raw)
            self.raw = ""
        self.stats.documents_in += 1
        self._split(final=True)

    @staticmethod
    def _safe_cut(text: str, lo: int, near: int) -> int:
        """A cut in (lo, near] at the start of a whitespace run, else before a non-mark."""
        i = max(text.rfind(" ", lo + 1, near), text.rfind("\n", lo + 1, near))
        if i > lo:
            while i > lo + 1 and text[i - 1].isspace():
                i -= 1
            if not text[i - 1].isspace():
                return i
        # No usable whitespace in a whole segment: cut where no combining mark follows.
        i = near
        while i > lo + 1 and unicodedata.category(text[i])[0] == "M":
            i -= 1
        return i

    def _clean_segment(self, seg: str) -> None:
        if self.form is not None:
            seg = unicodedata.normalize(self.form, seg)
        seg = self._normalise_whitespace(seg, controls=True)
        self.stats.words_in += count_words(seg)
        if self.rules:
            for pattern, replacement in self.rules:
                seg = pattern.sub(replacement, seg)
            seg = self._normalise_whitespace(seg, controls=False)
        core = seg.strip(" \n")
        if not core:
            self.pending_ws += seg
            return
        lead = seg[: len(seg) - len(seg.lstrip(" \n"))]
        trail = seg[len(seg.rstrip(" \n")):]
        ws = self.pending_ws + lead
        if self.started and ws:
            # The same result as normalising the two segments' whitespace run in one piece.
            n = ws.count("\n")
            self.out += "\n\n" if n >= 2 else "\n" if n == 1 else " "
        self.out += core
        self.pending_ws = trail
        self.started = True
        self._split(final=False)

    def _normalise_whitespace(self, seg: str, controls: bool) -> str:
        # Regexes scan at ~40 MB/s while isprintable(), `in` and replace() run at GB/s, so the
        # common characters (tab, CR, newline) are handled with the latter and the regexes run
        # only when other control or format characters are present.
        if seg.isprintable():
            return _DOUBLE_SPACES.sub(" ", seg) if "  " in seg else seg
        if "\r" in seg:
            seg = seg.replace("\r\n", "\n").replace("\r", "\n")
        if "\t" in seg:
            seg = seg.replace("\t", " ")
        has_newline = "\n" in seg
        if not (seg.replace("\n", "") if has_newline else seg).isprintable():
            if controls:
                seg = _NEWLINES.sub("\n", seg)
                seg = _CONTROL.sub("", seg)
            seg = _SPACES.sub(" ", seg)
            has_newline = "\n" in seg
        elif "  " in seg:
            seg = _DOUBLE_SPACES.sub(" ", seg)
        if has_newline:
            if not self.cfg.keep_newlines:
                return _DOUBLE_SPACES.sub(" ", seg.replace("\n", " "))
            seg = _SPACE_NEWLINE.sub("\n", seg)
            if "\n\n\n" in seg:
                seg = _MANY_NEWLINES.sub("\n\n", seg)
        return seg

    def _split(self, final: bool) -> None:
        limit = self.cfg.max_document_chars
        out, pos = self.out, self.pos
        while len(out) - pos > limit:
            cut = self._split_point(out, pos, pos + limit)
            self._emit(out[pos:cut])
            pos = cut
            self.split = True
        if final:
            if pos < len(out):
                self._emit(out[pos:])
            elif not self.started:
                self.stats.dropped_empty += 1
            if self.split:
                self.stats.documents_split += 1
            self.out, self.pos = "", 0
        else:
            self.out, self.pos = out[pos:], 0

    @staticmethod
    def _split_point(text: str, start: int, end: int) -> int:
        """Where to end a piece of text[start:end+1]: after the last sentence end in its second
        half, else at its last whitespace, else at ``end`` (a hard cut)."""
        half = start + (end - start) // 2
        m = _LAST_SENTENCE_END.match(text, half, end)
        if m is not None and m.end() > start:
            return m.end()
        i = max(text.rfind(" ", start + 1, end + 1), text.rfind("\n", start + 1, end + 1))
        if i > start:
            return i
        while end > start + 1 and unicodedata.category(text[end])[0] == "M":
            end -= 1
        return end

    def _emit(self, text: str) -> None:
        text = text.strip(" \n")
        if len(text) < self.cfg.min_document_chars:
            self.stats.dropped_empty += 1
            return
        self.emit(text)


class _Writer:
    """Deduplicates and writes documents to Parquet in bounded row groups."""

    def __init__(self, path: Path, cfg: CleanConfig):
        compression = None if cfg.parquet_compression == "none" else cfg.parquet_compression
        self.writer = pq.ParquetWriter(path, SCHEMA, compression=compression,
                                       use_dictionary=["source"])
        self.cfg = cfg
        self.seen: set[bytes] = set()
        self.texts: list[str] = []
        self.chars = 0
        self.source = ""
        self.sources: list[str] = []
        self.stats = SourceStats()
        self.total = 0

    def add(self, text: str) -> None:
        if self.cfg.deduplicate:
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if key in self.seen:
                self.stats.dropped_duplicates += 1
                return
            self.seen.add(key)
        self.texts.append(text)
        self.sources.append(self.source)
        self.chars += len(text)
        self.stats.documents_out += 1
        self.stats.words_out += count_words(text)
        self.stats.chars_out += len(text)
        self.total += 1
        if len(self.texts) >= self.cfg.row_group_documents or self.chars >= 2 << 20:
            self.flush()

    def flush(self) -> None:
        if self.texts:
            # from_arrays: pa.table(dict) would import pandas (~1 s) to check the input type.
            table = pa.Table.from_arrays([pa.array(self.texts, pa.string()),
                                          pa.array(self.sources, pa.string())], schema=SCHEMA)
            self.writer.write_table(table)
            self.texts, self.sources, self.chars = [], [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


def clean_corpus(cfg: CleanConfig, out_dir: str | Path, progress_bar: bool = True) -> dict[str, Any]:
    """Clean ``cfg.inputs`` into ``out_dir/documents.parquet``; returns the stage record (also
    written as ``out_dir/stage.json``) plus the wall time in ``seconds``."""
    t0 = time.perf_counter()
    check_outside_inputs(out_dir, cfg.inputs)
    files = list_input_files(cfg.inputs)
    in_digest, listing = inputs_digest(files)
    rules = _Rules(cfg)
    per_source: dict[str, SourceStats] = {}

    with staging_dir(out_dir, STAGE) as tmp:
        writer = _Writer(tmp / DOCUMENTS_FILE, cfg)
        cleaner = _DocumentCleaner(cfg, writer.add)
        bar = progress(total=sum(e["bytes"] for e in listing), enabled=progress_bar, unit="B",
                       unit_scale=True, desc="clean")
        try:
            for f, entry in zip(files, listing):
                stats = per_source.setdefault(f.source, SourceStats())
                stats.files += 1
                writer.stats = cleaner.stats = stats
                writer.source = f.source
                cleaner.rules = rules.for_source(f.source)
                before = formats.replaced_bytes()
                formats.FORMATS[f.kind].read(f.path, cfg, cleaner)
                stats.bytes_replaced += formats.replaced_bytes() - before
                bar.update(entry["bytes"])
        finally:
            bar.close()
            writer.close()
        if writer.total == 0:
            raise DataError(f"cleaning {', '.join(cfg.inputs)} left no documents")

        totals = SourceStats()
        for s in per_source.values():
            for k, v in vars(s).items():
                setattr(totals, k, getattr(totals, k) + v)
        stats = {"input_files": listing, "sources": {k: vars(v) for k, v in sorted(per_source.items())},
                 "totals": vars(totals)}
        record = make_record(STAGE, {"inputs": in_digest}, cfg.identity_dict(), tmp, DOCUMENTS_FILE, stats)
        write_record(tmp, record)
    # Timing is reported but not stored, so identical inputs give byte-identical folders.
    return dict(record, seconds=time.perf_counter() - t0)


def iter_documents(documents_parquet: str | Path, columns=("text",), batch_size: int = 1024,
                   limit: int = 0) -> Iterator[list]:
    """Batches (lists) of texts from a cleaned ``documents.parquet`` (all columns if several)."""
    pf = open_documents(documents_parquet)
    seen = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=list(columns)):
        cols = [batch.column(i).to_pylist() for i in range(len(columns))]
        if limit:
            cols = [c[: limit - seen] for c in cols]
        seen += len(cols[0])
        yield cols[0] if len(columns) == 1 else cols
        if limit and seen >= limit:
            return


def open_documents(documents_parquet: str | Path) -> pq.ParquetFile:
    """Open the clean stage's documents.parquet; a DataError unless it is readable, has a ``text``
    column and holds at least one document."""
    path = Path(documents_parquet)
    if not path.exists():
        raise FileNotFoundError(f"documents file not found: {path}")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path}: Parquet file has no column 'text' (columns: "
                        f"{', '.join(pf.schema_arrow.names)}); expected the output of gptbert clean")
    if pf.metadata.num_rows == 0:
        raise DataError(f"{path}: empty input (no documents)")
    return pf
