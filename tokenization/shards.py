"""Stage 3, ``gptbert shard``: cleaned documents -> token ids in Arrow IPC shards, and the reader.

A shard is an uncompressed Arrow IPC file holding one record batch with two columns:
``tokens`` (list<uint16>, or list<uint32> when the vocabulary does not fit 16 bits; the list
offsets are the per-document offsets) and ``words`` (int32, whitespace words per document). Its
schema metadata repeats the tokenizer digest. Documents go to ``train`` or ``valid`` by a seeded
hash of their text: exactly ``round(fraction * N)`` documents, the ones with the smallest hashes,
are validation documents, so the split depends neither on batching nor on document order.

``manifest.json`` records per shard: file, documents, tokens, words, sha256; and the corpus and
tokenizer digests. The folder also holds the ``tokenizer.json`` the shards were made with (the
single source of the tokenizer for everything downstream) and the stage record ``stage.json``.
``ShardReader`` memory-maps the shards and hands out numpy views of the mapped file (no copies);
it implements the DocumentSource protocol of ``common/documents.py``. A shard folder on an object
store (a URI, ``common.storage``) is read either through the local cache (``remote="cache"``:
each shard downloaded once with parallel range requests, checked against its sha256, then
memory-mapped like a local one) or into memory (``remote="memory"``: the same range requests and
check, no local disk).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from common import storage
from common.artifacts import (DataError, DigestMismatchError, atomic_write_json, check_outside_inputs, file_digest,
                              make_record, resolve_file, staging_dir, write_record)
from common.config.data import ShardConfig

from .clean import DOCUMENTS_FILE, iter_documents, open_documents
from .cleaner import count_words
from .runtime import background_map, progress, rayon_threads
from .tokenizer import TOKENIZER_FILE, load_tokenizer

STAGE = "shard"
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "valid")
FORMAT_VERSION = 1


def shard_inputs(corpus_sha256: str, tokenizer_sha256: str) -> dict[str, str]:
    """The inputs part of the shard stage's identity: the corpus's and the tokenizer's sha256 (the
    stage and the flows' cache check both spell it here)."""
    return {"corpus": corpus_sha256, "tokenizer": tokenizer_sha256}


def token_dtype(vocab_size: int) -> np.dtype:
    """The shards' token dtype: uint16 for vocabularies up to 65536 ids, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def split_keys(texts: list[str], seed: int) -> np.ndarray:
    """The seeded 64-bit hash of each text that decides the train/valid split."""
    salt = seed.to_bytes(8, "little", signed=True)
    digests = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=8, salt=salt).digest() for t in texts)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def validation_count(n: int, fraction: float) -> int:
    """How many of ``n`` documents are validation documents: round(fraction * n), at least one
    (and at most n - 1) when fraction > 0 and n >= 2."""
    n_valid = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        n_valid = min(max(n_valid, 1), n - 1)
    return n_valid


def validation_positions(n: int, fraction: float,
                         candidates: Callable[[int], tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The positions (sorted) of the validation documents: the ``validation_count`` documents with
    the smallest ``(split key, position)``.

    ``candidates(bound)`` returns ``(positions, keys)`` of the documents whose key is below
    ``bound`` (2**64: all). Keys are uniform, so a bound a few standard deviations above the
    expected count gives enough candidates without all N keys in one place; a bound that gives too
    few (rare) is widened. The result is the same as sorting all keys: every document left out has
    a larger key than every candidate."""
    k = validation_count(n, fraction)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    slack = 8 * math.isqrt(k) + 64
    while True:
        want = k + slack
        bound = 1 << 64 if want >= n else (want << 64) // n
        positions, keys = candidates(bound)
        if len(keys) >= k or bound >= 1 << 64:
            break
        slack *= 4
    chosen = np.lexsort((positions, keys))[:k]  # ties (equal texts) by position
    return np.sort(np.asarray(positions, dtype=np.int64)[chosen])


def below(keys: np.ndarray, bound: int) -> np.ndarray:
    """Which keys are below ``bound`` (which may be 2**64, above every uint64)."""
    return np.ones(len(keys), dtype=bool) if bound >= 1 << 64 else keys < np.uint64(bound)


def validation_mask(documents_parquet: str | Path, fraction: float, seed: int) -> np.ndarray:
    """Boolean per document of a cleaned ``documents.parquet``: True for the validation documents
    (``validation_positions``, the keys computed in this process)."""
    n = open_documents(documents_parquet).metadata.num_rows

    def candidates(bound: int) -> tuple[np.ndarray, np.ndarray]:
        positions, keys, start = [], [], 0
        for texts in iter_documents(documents_parquet, batch_size=4096):
            k = split_keys(texts, seed)
            hit = np.flatnonzero(below(k, bound))
            positions.append(hit + start)
            keys.append(k[hit])
            start += len(texts)
        return np.concatenate(positions), np.concatenate(keys)

    mask = np.zeros(n, dtype=bool)
    mask[validation_positions(n, fraction, candidates)] = True
    return mask


def encode_documents(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(token ids of all texts concatenated, tokens per text, words per text)``: the encoding of
    the shard stage (no specials), the same on every engine."""
    ids = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    words = np.fromiter(map(count_words, texts), dtype=np.int32, count=len(texts))
    return flat, lengths, words


def shard_bytes(schema: pa.Schema, batch: pa.RecordBatch) -> pa.Buffer:
    """A shard file's bytes: uncompressed Arrow IPC with one record batch (the reader maps it and
    views the buffers in place)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as w:
        w.write_batch(batch)
    return sink.getvalue()


def store_in_folder(folder: Path) -> Callable[[str, pa.Schema, pa.RecordBatch], str]:
    """Where the local engine's shards go: files in ``folder``; returns each file's sha256."""
    def store(name: str, schema: pa.Schema, batch: pa.RecordBatch) -> str:
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
            w.write_batch(batch)
        return file_digest(folder / name)
    return store


def store_at(location: str) -> Callable[[str, pa.Schema, pa.RecordBatch], str]:
    """Shards written to a folder or object-store prefix (one atomic write or PUT each)."""
    def store(name: str, schema: pa.Schema, batch: pa.RecordBatch) -> str:
        data = shard_bytes(schema, batch)
        storage.write_bytes(storage.join(location, name), data.to_pybytes())
        return hashlib.sha256(data).hexdigest()
    return store


class ShardWriter:
    """Accumulates documents of one split and cuts a shard at the first document boundary at or
    past ``shard_tokens``; ``store(name, schema, batch)`` writes it and returns its sha256. Shards
    are named ``<split>-<prefix><n>.arrow``."""

    def __init__(self, split: str, dtype: np.dtype, shard_tokens: int, metadata: dict,
                 store: Callable[[str, pa.Schema, pa.RecordBatch], str], prefix: str = ""):
        self.split, self.dtype, self.shard_tokens = split, dtype, shard_tokens
        self.metadata, self.store, self.prefix = metadata, store, prefix
        self.arrays: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.words: list[np.ndarray] = []
        self.tokens = 0
        self.shards: list[dict[str, Any]] = []
        self.schema = pa.schema(
            [("tokens", pa.list_(pa.from_numpy_dtype(dtype))), ("words", pa.int32())])

    def add(self, flat: np.ndarray, lengths: np.ndarray, words: np.ndarray) -> None:
        """Append documents: their concatenated token ids, tokens and words per document."""
        start = offset = 0
        while start < len(lengths):
            window = np.cumsum(lengths[start:], dtype=np.int64) + self.tokens
            full = int(np.searchsorted(window, self.shard_tokens))  # first document reaching the size
            take = full + 1 if full < len(window) else len(window)
            n_tok = int(window[take - 1]) - self.tokens
            self.arrays.append(flat[offset: offset + n_tok])
            self.lengths.append(lengths[start: start + take])
            self.words.append(words[start: start + take])
            self.tokens += n_tok
            start, offset = start + take, offset + n_tok
            if self.tokens >= self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        """Write the documents held as one shard (nothing when none)."""
        if not self.lengths:
            return
        number = f"{self.prefix}{len(self.shards):05d}"
        if self.tokens >= 2**31:
            raise DataError(f"shard {self.split}-{number} would hold {self.tokens} "
                            "tokens, more than int32 offsets allow; lower shard.shard_tokens")
        values = np.concatenate(self.arrays) if self.arrays else np.zeros(0, self.dtype)
        lengths = np.concatenate(self.lengths)
        words = np.concatenate(self.words).astype(np.int32)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        batch = pa.record_batch([tokens, pa.array(words)], schema=self.schema)
        name = f"{self.split}-{number}.arrow"
        meta = dict(self.metadata, split=self.split, shard=str(len(self.shards)))
        schema = self.schema.with_metadata({k: str(v) for k, v in meta.items()})
        sha256 = self.store(name, schema, batch)
        self.shards.append({"file": name, "documents": len(lengths), "tokens": int(self.tokens),
                            "words": int(words.sum()), "sha256": sha256})
        self.arrays, self.lengths, self.words, self.tokens = [], [], [], 0


def split_summary(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """A split's entry in the manifest: its totals and its shards, in order."""
    return {"documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
            "words": sum(s["words"] for s in shards), "shards": shards}


@dataclass
class ShardInputs:
    """What both engines of the shard stage start from: the documents (a local path, or the URI
    of a remote file that is not copied) and the tokenizer (local), the loaded tokenizer, the
    identity's inputs and the shards' dtype and metadata."""

    documents: str | Path
    tokenizer_path: Path
    tokenizer: Tokenizer
    num_docs: int
    inputs: dict[str, str]
    vocab_size: int
    dtype: np.dtype
    metadata: dict[str, Any]


def shard_plan(documents_parquet: str | Path, tokenizer_json: str | Path, out_dir: str | Path,
               copies: bool = True) -> ShardInputs:
    """Check and open the shard stage's inputs (before any output is written). Inputs on an object
    store are read from their copies in the local cache; with ``copies`` False the documents are
    left where they lie (hashed as a stream; the Ray engine's workers read them there)."""
    check_outside_inputs(out_dir, [documents_parquet, tokenizer_json])
    if storage.is_remote(documents_parquet) and not copies:
        docs_path: str | Path = storage.normalize(documents_parquet)
        if not str(docs_path).endswith(".parquet"):
            docs_path = storage.join(docs_path, DOCUMENTS_FILE)
        if not storage.is_file(docs_path):
            raise FileNotFoundError(f"documents file not found: {docs_path}")
    else:
        docs_path = resolve_file(storage.local_input(documents_parquet), DOCUMENTS_FILE, "documents file")
    tok_path = resolve_file(storage.local_input(tokenizer_json), TOKENIZER_FILE, "tokenizer")
    tok = load_tokenizer(tok_path)
    num_docs = open_documents(docs_path).metadata.num_rows
    inputs = shard_inputs(file_digest(docs_path), file_digest(tok_path))
    vocab_size = tok.get_vocab_size()
    metadata = {"format_version": FORMAT_VERSION, "tokenizer_sha256": inputs["tokenizer"],
                "corpus_sha256": inputs["corpus"]}
    return ShardInputs(docs_path, tok_path, tok, num_docs, inputs, vocab_size, token_dtype(vocab_size), metadata)


def finish_shards(plan: ShardInputs, cfg: ShardConfig, folder: Path,
                  shards: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Write the manifest (``shards``: each split's shard entries in document order), the
    tokenizer and the stage record into ``folder``; returns the record with the manifest."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "corpus_sha256": plan.inputs["corpus"],
        "tokenizer_sha256": plan.inputs["tokenizer"],
        "vocab_size": plan.vocab_size,
        "dtype": plan.dtype.name,
        "splits": {s: split_summary(shards[s]) for s in SPLITS},
    }
    atomic_write_json(folder / MANIFEST_FILE, manifest)
    # The shard folder carries its tokenizer: whoever is given the folder (a trainer, a Ray
    # worker, `gptbert score` on the model) finds it there, pinned by the manifest's sha256.
    shutil.copyfile(plan.tokenizer_path, folder / TOKENIZER_FILE)
    stats = {"vocab_size": plan.vocab_size, "dtype": plan.dtype.name,
             "splits": {s: {k: v for k, v in d.items() if k != "shards"} for s, d in manifest["splits"].items()}}
    record = make_record(STAGE, plan.inputs, cfg.identity_dict(), folder, MANIFEST_FILE, stats)
    write_record(folder, record)
    return dict(record, manifest=manifest)


def write_shards(documents_parquet: str | Path, tokenizer_json: str | Path, cfg: ShardConfig,
                 out_dir: str | Path, progress_bar: bool = True) -> dict[str, Any]:
    """Encode the documents into train/valid Arrow shards in this process (the ``local`` engine):
    batches encoded by the tokenizers thread pool, two calls in flight so that it never waits for
    this thread."""
    t0 = time.perf_counter()
    plan = shard_plan(documents_parquet, tokenizer_json, out_dir)
    is_valid = validation_mask(plan.documents, cfg.validation_fraction, cfg.split_seed)

    def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return encode_documents(plan.tokenizer, texts, plan.dtype)

    with staging_dir(out_dir, STAGE) as tmp, rayon_threads(cfg.num_threads):
        writers = {s: ShardWriter(s, plan.dtype, cfg.shard_tokens, plan.metadata, store_in_folder(tmp))
                   for s in SPLITS}
        bar = progress(total=plan.num_docs, enabled=progress_bar, unit="doc", desc="shard")
        index = 0
        # Batches within row groups: several batches even of long documents, so that two encoding
        # calls are in flight and the tokenizers pool does not wait for either thread.
        batches = iter_documents(plan.documents, batch_size=cfg.batch_documents, split_row_groups=True)
        for texts, (flat, lengths, words) in background_map(encode, batches, workers=2):
            route(writers, is_valid[index: index + len(texts)], flat, lengths, words)
            index += len(texts)
            bar.update(len(texts))
        bar.close()
        for w in writers.values():
            w.flush()
        record = finish_shards(plan, cfg, tmp, {s: w.shards for s, w in writers.items()})
    return dict(record, seconds=time.perf_counter() - t0)


def route(writers: dict[str, ShardWriter], valid: np.ndarray, flat: np.ndarray, lengths: np.ndarray,
          words: np.ndarray) -> None:
    """Hand a batch of encoded documents to the writers of their splits (``valid``: per document)."""
    for split, chosen in (("train", ~valid), ("valid", valid)):
        if chosen.all():
            writers[split].add(flat, lengths, words)
        elif chosen.any():
            writers[split].add(flat[np.repeat(chosen, lengths)], lengths[chosen], words[chosen])


def _manifest_entries(manifest: Any, path: Path, split: str) -> list[dict[str, Any]]:
    """The shard entries of ``split``, checked: every field the reader needs, and file names that
    stay inside the shard folder (no paths, no ``..``)."""
    def bad(why: str) -> DataError:
        return DataError(f"{path}: {why} (expected the manifest written by gptbert shard)")

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    for key in ("tokenizer_sha256", "vocab_size", "dtype", "splits"):
        if key not in manifest:
            raise bad(f"no field '{key}'")
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise bad(f"field 'dtype' must be uint16 or uint32, got {manifest['dtype']!r}")
    section = manifest["splits"].get(split) if isinstance(manifest["splits"], dict) else None
    if not isinstance(section, dict) or not isinstance(section.get("shards"), list):
        raise bad(f"no list of shards for split '{split}'")
    for i, entry in enumerate(section["shards"]):
        if not isinstance(entry, dict) or any(k not in entry for k in ("file", "documents", "tokens", "sha256")):
            raise bad(f"shard entry {i} of split '{split}' lacks file, documents, tokens or sha256")
        name = entry["file"]
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise bad(f"shard entry {i} names {name!r}, not a file inside the shard folder")
    return section["shards"]


def _buffer_view(array: pa.Array, path) -> np.ndarray:
    """A numpy view of a primitive Arrow array's values, in place (``Array.to_numpy`` does the same but
    imports pandas, about 45 MB in every process that reads shards)."""
    if not pa.types.is_integer(array.type) or array.null_count:
        raise DataError(f"{path}: a column of {array.type} with {array.null_count} nulls, not integers (expected a "
                        "shard written by gptbert shard)")
    dtype = np.dtype(str(array.type))
    data = array.buffers()[1]
    if data is None:
        return np.zeros(0, dtype)
    return np.frombuffer(data, dtype=dtype)[array.offset: array.offset + len(array)]


class ShardReader:
    """Memory-mapped, zero-copy view of one split of a shard folder (the DocumentSource protocol).

    ``document(i)`` is a numpy view into the mapped file; nothing is read until it is touched.
    Given ``tokenizer_json``, the reader refuses shards made with a different tokenizer.
    ``shard_dir`` may be a URI; ``remote`` then chooses how its shards are read ("cache" or
    "memory", see the module docstring) and ``cache`` which local cache holds them.
    """

    def __init__(self, shard_dir: str | Path, tokenizer_json: str | Path | None = None,
                 split: str = "train", remote: str = "cache", cache: storage.LocalCache | None = None):
        self.remote = storage.is_remote(shard_dir)
        self.dir = storage.normalize(shard_dir) if self.remote else Path(shard_dir)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if remote not in ("cache", "memory"):
            raise ValueError(f"remote must be 'cache' or 'memory', got {remote!r}")
        self._cache = (cache or storage.LocalCache()) if self.remote and remote == "cache" else None
        if self.remote:
            manifest_path = storage.join(self.dir, MANIFEST_FILE)
            raw = storage.read_bytes(manifest_path)
        else:
            manifest_path = resolve_file(self.dir, MANIFEST_FILE, "shard manifest")
            raw = manifest_path.read_bytes()
        self.manifest_digest = hashlib.sha256(raw).hexdigest()
        try:
            self.manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{manifest_path}: not valid JSON ({exc})") from None
        self.split = split
        entries = _manifest_entries(self.manifest, manifest_path, split)
        expected = self.manifest["tokenizer_sha256"]
        vocab_size = int(self.manifest["vocab_size"])
        if tokenizer_json is not None:
            tok_path = resolve_file(tokenizer_json, TOKENIZER_FILE, "tokenizer")
            actual = file_digest(tok_path)
            if actual != expected:
                raise DigestMismatchError(
                    f"{self.dir}: shards were made with tokenizer sha256 {expected[:16]}..., but "
                    f"{tok_path} has sha256 {actual[:16]}...; re-run gptbert shard with it")
        self.dtype = np.dtype(self.manifest["dtype"])
        self._maps: list[pa.NativeFile] = []
        self._values: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        words = []
        for entry in entries:
            source, path = self._open_shard(entry, manifest_path)
            try:
                reader = pa.ipc.open_file(source)
            except pa.ArrowInvalid as exc:
                raise DataError(f"{path}: not a readable Arrow IPC shard ({exc})") from None
            meta = {k.decode(): v.decode() for k, v in (reader.schema.metadata or {}).items()}
            if meta.get("tokenizer_sha256") != expected:
                raise DigestMismatchError(
                    f"{path}: shard tokenizer sha256 {meta.get('tokenizer_sha256', 'missing')[:16]}"
                    f"... differs from the manifest's {expected[:16]}...")
            if reader.num_record_batches != 1:
                raise DataError(f"{path}: expected one record batch, found {reader.num_record_batches}")
            batch = reader.get_batch(0)
            tokens = batch.column(0)
            if batch.num_rows != entry["documents"]:
                raise DataError(f"{path}: holds {batch.num_rows} documents, manifest says "
                                f"{entry['documents']}")
            # Views of the mapped buffers; the list's own offset shifts both (0 when written here).
            offsets = np.frombuffer(tokens.buffers()[1], dtype=np.int32)[
                tokens.offset: tokens.offset + len(tokens) + 1]
            values = _buffer_view(tokens.values, path)
            if len(values) != entry["tokens"] or int(offsets[-1] - offsets[0]) != entry["tokens"]:
                raise DataError(f"{path}: holds {len(values)} tokens, manifest says {entry['tokens']}")
            if len(values) and int(values.max()) >= vocab_size:
                raise DataError(f"{path}: token id {int(values.max())} is outside the tokenizer's vocabulary "
                                f"({vocab_size} ids)")
            self._maps.append(source)
            self._offsets.append(offsets)
            self._values.append(values)
            words.append(_buffer_view(batch.column(1), path))
        self._doc_starts = np.zeros(len(self._offsets) + 1, dtype=np.int64)
        np.cumsum([len(o) - 1 for o in self._offsets], out=self._doc_starts[1:])
        self.lengths = (np.concatenate([np.diff(o).astype(np.int64) for o in self._offsets])
                        if self._offsets else np.zeros(0, np.int64))
        self.words = (np.concatenate(words).astype(np.int64) if words else np.zeros(0, np.int64))
        self.num_tokens = int(self.lengths.sum())
        self.num_words = int(self.words.sum())


    def _open_shard(self, entry: dict[str, Any], manifest_path) -> tuple[pa.NativeFile, Any]:
        """The shard as an Arrow file (memory-mapped, or a buffer for ``remote="memory"``),
        checked against the manifest's sha256 (an edited or damaged shard never trains)."""
        if self.remote:
            location = storage.join(self.dir, entry["file"])
            try:
                if self._cache is not None:  # checked against the sha256 as the cache is filled
                    return pa.memory_map(str(self._cache.file(location, entry["sha256"])), "r"), location
                data = storage.read_ranged(location)
            except FileNotFoundError:
                raise FileNotFoundError(f"shard listed in {manifest_path} not found: {location}") from None
            actual = hashlib.sha256(data).hexdigest()
            if actual != entry["sha256"]:
                raise DigestMismatchError(f"{location}: sha256 {actual[:16]}... differs from the manifest's "
                                          f"{entry['sha256'][:16]}...; the shard was changed after it was written")
            return pa.BufferReader(pa.py_buffer(data)), location
        path = self.dir / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"shard listed in {manifest_path} not found: {path}")
        # Verified on open (~40 ms per 25 MB shard).
        actual = file_digest(path)
        if actual != entry["sha256"]:
            raise DigestMismatchError(f"{path}: sha256 {actual[:16]}... differs from the manifest's "
                                      f"{entry['sha256'][:16]}...; the shard was changed after it was written")
        return pa.memory_map(str(path), "r"), path

    @property
    def tokenizer_path(self) -> Path:
        """The folder's ``tokenizer.json``, checked against the manifest's sha256 (for a remote folder:
        its copy in the local cache). A missing, truncated or replaced file is an error naming it:
        whatever trains on the shards ships this tokenizer with its model."""
        expected = self.manifest["tokenizer_sha256"]
        path = storage.join(self.dir, TOKENIZER_FILE) if self.remote else self.dir / TOKENIZER_FILE
        missing = FileNotFoundError(f"{path}: not found; gptbert shard writes the tokenizer beside the shards "
                                    "(pass the one they were made with as --tokenizer)")
        if self.remote:
            try:
                return storage.LocalCache().file(path, expected)  # a changed object: DigestMismatchError naming it
            except FileNotFoundError:
                raise missing from None
        if not path.is_file():
            raise missing
        actual = file_digest(path)
        if actual != expected:
            raise DigestMismatchError(f"{path}: sha256 {actual[:16]}... differs from the manifest's {expected[:16]}...; "
                                      "the file was changed or truncated after gptbert shard wrote it")
        return path

    def __len__(self) -> int:
        return int(self._doc_starts[-1])

    def document(self, i: int) -> np.ndarray:
        """Token ids of document i (no specials): a read-only view of the mapped shard."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range ({n} documents)")
        i = i % n
        s = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        j = i - int(self._doc_starts[s])
        off = self._offsets[s]
        return self._values[s][off[j]: off[j + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for s, off in enumerate(self._offsets):
            values = self._values[s]
            for j in range(len(off) - 1):
                yield values[off[j]: off[j + 1]]

    def random_windows(self, length: int, count: int, seed: int = 0) -> Iterator[np.ndarray]:
        """``count`` windows of ``length`` consecutive tokens at uniformly random positions of the
        split's token stream (within one shard; they may cross document boundaries)."""
        sizes = np.array([len(v) for v in self._values], dtype=np.int64)
        usable = np.maximum(sizes - length + 1, 0)
        if usable.sum() == 0:
            raise ValueError(f"no shard of {self.dir} ({self.split}) holds {length} tokens")
        rng = np.random.default_rng(seed)
        starts = rng.integers(0, usable.sum(), size=count)
        bounds = np.cumsum(usable)
        shard = np.searchsorted(bounds, starts, side="right")
        starts = (starts - np.where(shard > 0, bounds[shard - 1], 0)).tolist()
        values = self._values
        for s, start in zip(shard.tolist(), starts):
            yield values[s][start: start + length]

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (reads all bytes; a remote folder's
        shards are read from the store again)."""
        for entry in self.manifest["splits"][self.split]["shards"]:
            if self.remote:
                where = storage.join(self.dir, entry["file"])
                actual = hashlib.sha256(storage.read_ranged(where)).hexdigest()
            else:
                where = self.dir / entry["file"]
                actual = file_digest(where)
            if actual != entry["sha256"]:
                raise DigestMismatchError(f"{where}: sha256 {actual[:16]}... "
                                          f"differs from the manifest's {entry['sha256'][:16]}...")

    def close(self) -> None:
        """Drop the shard views and close the memory-mapped shard files (``with`` calls it on exit)."""
        self._values, self._offsets = [], []
        for m in self._maps:
            m.close()
        self._maps = []

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
