"""Stage 1, ``gptbert clean``: raw text files -> one Parquet file of clean, deduplicated documents.

Inputs are files or folders of ``.txt`` / ``.gz`` text (one document per line), ``.jsonl``
(``.jsonl.gz``; the text under ``cfg.text_field``) and ``.parquet`` (the ``cfg.text_field``
column). Per document (``tokenization/cleaner.py``): decode UTF-8 (invalid bytes replaced by U+FFFD
and counted, or an error), Unicode normalisation (NFKC), control / invisible format characters
removed, configurable regex rules, whitespace normalised, documents longer than
``max_document_chars`` split at sentence boundaries, empty documents dropped; then exact
duplicates dropped (first occurrence kept). Duplicates are found on the documents as written,
i.e. after splitting. Memory stays bounded for arbitrarily long lines (1 MiB read blocks, ~1 MiB
cleaning segments).

The stage is three steps that both engines share (``clean.engine``; the Ray one is
``gptbert.distributed.ray_data``), so their output is the same by construction:

1. ``PartCleaner`` cleans one *part* of one input file (the whole file here; a byte range or a
   range of row groups on Ray, ``plan_parts``) into chunks: Arrow tables of ``CHUNK_SCHEMA``
   (global order, text, source, 16-byte key, words, characters).
2. Deduplication by key, first occurrence in (file, offset) order kept: ``FirstOccurrences`` in
   one process, or ``keep_first_occurrences`` given the first order of every repeated key.
3. ``DocumentWriter`` writes the kept documents in order into row groups cut by the same rule, and
   ``finish_clean`` checks every file gave documents and writes the stage record.

Writes ``documents.parquet`` (columns ``text``, ``source``) and the stage record ``stage.json``
(identity, input files with their digests, per-source statistics) atomically.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import storage
from common.artifacts import DataError, check_outside_inputs, make_record, staging_dir, write_record
from common.config.data import CleanConfig

from . import formats
from .cleaner import DocumentCleaner, Rules, SourceStats, count_words
from .runtime import progress

STAGE = "clean"
DOCUMENTS_FILE = "documents.parquet"
SCHEMA = pa.schema([("text", pa.string()), ("source", pa.string())])
# A chunk of cleaned documents of one part; ``order`` is (part index << ORDER_BITS) + position.
CHUNK_SCHEMA = pa.schema([("order", pa.int64()), ("text", pa.string()), ("source", pa.string()),
                          ("key", pa.binary()), ("words", pa.int32()), ("chars", pa.int32())])
ORDER_BITS = 40
ROW_GROUP_CHARS = 2 << 20  # a row group also ends once it holds this many characters
CHUNK_DOCUMENTS, CHUNK_CHARS = 4096, 1 << 20  # a chunk is handed on at about this size


@dataclass
class InputFile:
    """One input file of the clean stage: where it is read (a local path, a local copy of a
    remote file, or a URI), its name under its input, source, format and size."""

    location: str
    name: str  # path relative to the input it was found under
    source: str
    kind: str  # a registered format: "text", "jsonl", "parquet", ...
    size: int


def source_name(path: Path) -> str:
    """The source of an input file: its name up to the first dot (``childes`` for ``childes.train.gz``)."""
    return path.name.split(".")[0] or path.name


def _input_file(location: str, name: str, size: int) -> InputFile:
    return InputFile(location, name, source_name(Path(name)), formats.format_for(Path(name)).name, size)


def _wanted(name: str) -> bool:
    """Whether a folder's file (by its relative name) is an input: no hidden part, a known suffix."""
    return not any(part.startswith(".") for part in name.split("/")) and name.lower().endswith(formats.suffixes())


def list_input_files(inputs: list[str], copies: bool = True) -> list[InputFile]:
    """Expand files and folders (recursively, in the order of their relative names' parts) into the
    ordered list of input files. An input on an object store (a URI) is read from its copy in the
    local cache (``storage.local_input``), or with ``copies`` False where it lies (the Ray engine:
    no input passes through this machine's disk); both list the same files."""
    if not inputs:
        raise DataError("clean: no inputs given (set clean.inputs or pass paths)")
    files: list[InputFile] = []
    for entry in inputs:
        if storage.is_remote(entry) and not copies:
            root = storage.normalize(entry)
            if storage.is_file(root):
                files.append(_input_file(root, storage.name_of(root), storage.size(root)))
                continue
            if not storage.exists(root):
                raise FileNotFoundError(f"input not found: {root}")
            found = sorted(((n, size) for n, size in storage.list_files(root).items() if _wanted(n)),
                           key=lambda item: item[0].split("/"))
            if not found:
                raise DataError(f"{root}: folder holds no input files (looked for {', '.join(formats.suffixes())})")
            files += [_input_file(storage.join(root, n), n, size) for n, size in found]
            continue
        root = storage.local_input(entry) if storage.is_remote(entry) else Path(entry)
        if not root.exists():
            raise FileNotFoundError(f"input not found: {root}")
        if root.is_file():
            files.append(_input_file(str(root), root.name, root.stat().st_size))
            continue
        found = sorted(p for p in root.rglob("*") if p.is_file() and _wanted(p.relative_to(root).as_posix()))
        if not found:
            raise DataError(f"{root}: folder holds no input files (looked for {', '.join(formats.suffixes())})")
        files += [_input_file(str(p), p.relative_to(root).as_posix(), p.stat().st_size) for p in found]
    return files


def inputs_digest(files: list[InputFile]) -> tuple[str, list[dict[str, Any]]]:
    """Content digest of the inputs (names relative to their input folder, sizes, sha256)."""
    listing = [{"name": f.name, "source": f.source, "bytes": f.size, "sha256": storage.sha256(f.location)}
               for f in files]
    blob = json.dumps(listing, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest(), listing


def clean_inputs(cfg: CleanConfig) -> dict[str, str]:
    """The inputs part of the clean stage's identity (the input files' content digest; remote
    inputs are hashed where they lie when the stage runs on Ray)."""
    digest, _ = inputs_digest(list_input_files(cfg.inputs, copies=cfg.engine == "local"))
    return {"inputs": digest}


def document_key(text: str) -> bytes:
    """What exact deduplication compares: a 16-byte BLAKE2b digest of the document's UTF-8."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def plan_parts(files: list[InputFile], block_bytes: int) -> list[tuple[int, formats.Part]]:
    """``(file index, part)`` in reading order: each file cut by its format into parts of about
    ``block_bytes`` (0: whole files)."""
    return [(i, part) for i, f in enumerate(files)
            for part in formats.FORMATS[f.kind].split(f.location, f.size, block_bytes)]


class PartCleaner:
    """Cleans one part of one input file into chunks of documents (``CHUNK_SCHEMA``), in order.

    After ``run`` is exhausted, ``stats`` holds the part's input-side counters and ``documents``
    the number of documents it emitted (before deduplication)."""

    def __init__(self, cfg: CleanConfig, rules: Rules | None = None):
        self.cfg = cfg
        self.rules = rules or Rules(cfg)
        self.stats = SourceStats()
        self.documents = 0
        self._texts: list[str] = []
        self._chars = 0

    def run(self, file: InputFile, part: formats.Part, index: int) -> Iterator[pa.Table]:
        """Chunks of the cleaned documents of ``part`` of ``file``, the ``index``-th part of the stage."""
        self.stats, self.documents = SourceStats(), 0
        cleaner = DocumentCleaner(self.cfg, self._add)
        cleaner.stats = self.stats
        cleaner.rules = self.rules.for_source(file.source)
        before = formats.replaced_bytes()
        for _ in formats.FORMATS[file.kind].read(file.location, self.cfg, cleaner, part) or ():
            if len(self._texts) >= CHUNK_DOCUMENTS or self._chars >= CHUNK_CHARS:
                yield self._chunk(file.source, index)
        self.stats.bytes_replaced += formats.replaced_bytes() - before
        if self._texts:
            yield self._chunk(file.source, index)

    def _add(self, text: str) -> None:
        self._texts.append(text)
        self._chars += len(text)

    def _chunk(self, source: str, index: int) -> pa.Table:
        texts, self._texts, self._chars = self._texts, [], 0
        n = len(texts)
        order = np.arange(self.documents, self.documents + n, dtype=np.int64) + (index << ORDER_BITS)
        self.documents += n
        keys = (pa.array([document_key(t) for t in texts], pa.binary()) if self.cfg.deduplicate
                else pa.nulls(n, pa.binary()))
        return pa.Table.from_arrays([
            pa.array(order), pa.array(texts, pa.string()), pa.array([source] * n, pa.string()), keys,
            pa.array([count_words(t) for t in texts], pa.int32()), pa.array([len(t) for t in texts], pa.int32()),
        ], schema=CHUNK_SCHEMA)


class FirstOccurrences:
    """Exact deduplication in one process: a chunk keeps the documents whose key no earlier
    document had."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def keep(self, chunk: pa.Table) -> pa.Table:
        """``chunk`` without the repeats of documents seen before (in this chunk or earlier ones)."""
        seen, mask = self.seen, []
        for key in chunk.column("key").to_pylist():
            mask.append(key not in seen)
            seen.add(key)
        return chunk if all(mask) else chunk.filter(pa.array(mask))


def keep_first_occurrences(chunk: pa.Table, repeated: pa.Table) -> pa.Table:
    """``chunk`` without repeats, given ``repeated`` (columns ``key`` and ``first``: every key that
    occurs more than once, and the smallest ``order`` it occurs at): a document is kept unless its
    key is repeated and it is not that first occurrence."""
    if repeated.num_rows == 0 or chunk.num_rows == 0:
        return chunk
    at = pc.index_in(chunk.column("key"), value_set=repeated.column("key"))
    first = pc.take(repeated.column("first"), at)
    keep = pc.or_kleene(pc.is_null(at), pc.equal(chunk.column("order"), first))
    return chunk.filter(pc.fill_null(keep, True))


class DocumentWriter:
    """Writes kept documents, in order, to ``documents.parquet``: a row group ends after
    ``row_group_documents`` documents or once it holds ``ROW_GROUP_CHARS`` characters, however the
    documents arrive. Counts documents, words and characters per source."""

    def __init__(self, path: Path, cfg: CleanConfig):
        compression = None if cfg.parquet_compression == "none" else cfg.parquet_compression
        self.writer = pq.ParquetWriter(path, SCHEMA, compression=compression, use_dictionary=["source"])
        self.max_rows = cfg.row_group_documents
        self.pending: list[pa.Table] = []
        self.rows = self.chars = 0  # of the pending row group
        self.by_source: dict[str, SourceStats] = {}
        self.total = 0

    def write(self, chunk: pa.Table) -> None:
        """Append the documents of ``chunk`` (columns text, source, words, chars)."""
        n = chunk.num_rows
        if n == 0:
            return
        self._count(chunk)
        chars = chunk.column("chars").to_numpy()
        docs = chunk.select(["text", "source"])
        start = 0
        while start < n:
            window = np.cumsum(chars[start: start + self.max_rows - self.rows], dtype=np.int64) + self.chars
            full = int(np.searchsorted(window, ROW_GROUP_CHARS))  # first document reaching the limit
            take = full + 1 if full < len(window) else len(window)
            self.pending.append(docs.slice(start, take))
            self.rows, self.chars = self.rows + take, int(window[take - 1])
            start += take
            if self.rows >= self.max_rows or self.chars >= ROW_GROUP_CHARS:
                self._flush()

    def _count(self, chunk: pa.Table) -> None:
        sums = chunk.group_by("source").aggregate([("words", "sum"), ("chars", "sum"), ("text", "count")])
        for source, words, chars, docs in zip(*(sums.column(c).to_pylist() for c in
                                                ("source", "words_sum", "chars_sum", "text_count"))):
            s = self.by_source.setdefault(source, SourceStats())
            s.documents_out += docs
            s.words_out += words
            s.chars_out += chars
            self.total += docs

    def _flush(self) -> None:
        if self.pending:
            # One contiguous table per row group: the same bytes however the documents arrived.
            table = pa.concat_tables(self.pending).combine_chunks().cast(SCHEMA)
            self.writer.write_table(table)
            self.pending, self.rows, self.chars = [], 0, 0

    def close(self) -> None:
        """Write the last row group and the file footer."""
        self._flush()
        self.writer.close()


def check_file_read(file: InputFile, documents_in: int) -> None:
    """An input file that held no documents at all is bad input (named, with what it lacked)."""
    if documents_in == 0:
        raise DataError(f"{file.location}: empty input ({formats.FORMATS[file.kind].empty})")


def finish_clean(cfg: CleanConfig, folder: Path, files: list[InputFile], listing: list[dict[str, Any]],
                 in_digest: str, parts: list[tuple[int, SourceStats, int]], writer: DocumentWriter) -> dict[str, Any]:
    """Close ``writer``, check the run and write the stage record into ``folder``; ``parts`` holds
    ``(file index, input-side counters, documents emitted)`` of every part, in order."""
    writer.close()
    per_source: dict[str, SourceStats] = {f.source: SourceStats() for f in files}
    read_by_file = [0] * len(files)
    emitted: dict[str, int] = {}
    for i, stats, documents in parts:
        per_source[files[i].source].add(stats)
        read_by_file[i] += stats.documents_in
        emitted[files[i].source] = emitted.get(files[i].source, 0) + documents
    for f, documents_in in zip(files, read_by_file):
        per_source[f.source].files += 1
        check_file_read(f, documents_in)
    if writer.total == 0:
        raise DataError(f"cleaning {', '.join(cfg.inputs)} left no documents")
    for source, s in per_source.items():
        out = writer.by_source.get(source, SourceStats())
        s.documents_out, s.words_out, s.chars_out = out.documents_out, out.words_out, out.chars_out
        s.dropped_duplicates = emitted.get(source, 0) - out.documents_out
    totals = SourceStats()
    for s in per_source.values():
        totals.add(s)
    stats = {"input_files": listing, "sources": {k: vars(v) for k, v in sorted(per_source.items())},
             "totals": vars(totals)}
    record = make_record(STAGE, {"inputs": in_digest}, cfg.identity_dict(), folder, DOCUMENTS_FILE, stats)
    write_record(folder, record)
    return record


def clean_corpus(cfg: CleanConfig, out_dir: str | Path, progress_bar: bool = True) -> dict[str, Any]:
    """Clean ``cfg.inputs`` into ``out_dir/documents.parquet`` in this process (the ``local``
    engine); returns the stage record (also written as ``out_dir/stage.json``) plus the wall time
    in ``seconds``."""
    t0 = time.perf_counter()
    check_outside_inputs(out_dir, cfg.inputs)
    files = list_input_files(cfg.inputs)
    in_digest, listing = inputs_digest(files)
    cleaner = PartCleaner(cfg)
    seen = FirstOccurrences() if cfg.deduplicate else None
    parts: list[tuple[int, SourceStats, int]] = []

    with staging_dir(out_dir, STAGE) as tmp:
        writer = DocumentWriter(tmp / DOCUMENTS_FILE, cfg)
        bar = progress(total=sum(e["bytes"] for e in listing), enabled=progress_bar, unit="B",
                       unit_scale=True, desc="clean")
        try:
            for i, (f, entry) in enumerate(zip(files, listing)):
                for chunk in cleaner.run(f, formats.WHOLE, i):
                    writer.write(seen.keep(chunk) if seen is not None else chunk)
                check_file_read(f, cleaner.stats.documents_in)
                parts.append((i, cleaner.stats, cleaner.documents))
                bar.update(entry["bytes"])
        finally:
            bar.close()
        record = finish_clean(cfg, tmp, files, listing, in_digest, parts, writer)
    # Timing is reported but not stored, so identical inputs give byte-identical folders.
    return dict(record, seconds=time.perf_counter() - t0)


def iter_documents(documents_parquet: str | Path, columns=("text",), batch_size: int = 1024,
                   limit: int = 0, row_groups: range | None = None, split_row_groups: bool = False) -> Iterator[list]:
    """Batches (lists) of texts from a cleaned ``documents.parquet`` (all columns if several; of
    the ``row_groups`` only, when given; a path or a URI). With ``split_row_groups`` a batch never
    spans two row groups (a row group holds at most ~2 MiB of text, so batches of long documents
    stay small too)."""
    pf = open_documents(documents_parquet)
    seen = 0
    groups = list(range(pf.metadata.num_row_groups) if row_groups is None else row_groups)
    for part in ([[g] for g in groups] if split_row_groups else [groups]):
        for batch in pf.iter_batches(batch_size=batch_size, columns=list(columns), row_groups=part):
            cols = [batch.column(i).to_pylist() for i in range(len(columns))]
            if limit:
                cols = [c[: limit - seen] for c in cols]
            seen += len(cols[0])
            yield cols[0] if len(columns) == 1 else cols
            if limit and seen >= limit:
                return


def open_documents(documents_parquet: str | Path) -> pq.ParquetFile:
    """Open the clean stage's documents.parquet (a path or a URI); a DataError unless it is
    readable, has a ``text`` column and holds at least one document."""
    remote = storage.is_remote(documents_parquet)
    path = documents_parquet if remote else Path(documents_parquet)
    if not remote and not path.exists():
        raise FileNotFoundError(f"documents file not found: {path}")
    try:
        if remote:
            fs, inner = storage.filesystem(path)
            pf = pq.ParquetFile(fs.open_input_file(inner))
        else:
            pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path}: Parquet file has no column 'text' (columns: "
                        f"{', '.join(pf.schema_arrow.names)}); expected the output of gptbert clean")
    if pf.metadata.num_rows == 0:
        raise DataError(f"{path}: empty input (no documents)")
    return pf
