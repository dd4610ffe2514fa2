"""Training data: opening a shard folder or a token file for pretraining.

The trainer reads documents through the **DocumentSource** protocol (``common/documents.py``):
``tokenization.shards.ShardReader`` implements it over Arrow shards, ``ListDocumentSource`` here
over in-memory arrays (tests, token files). ``open_data`` turns what a user passes (a shard
folder, a token file, or a source) into ``TrainingData``: training and validation documents, the
tokenizer that made them, and the data's digest for the model's lineage.

Token files (so ``pretrain`` works before shards exist):
- ``.txt``: one document per line, token ids separated by spaces (empty lines are empty documents);
- ``.npz``: arrays ``ids`` (all documents concatenated) and ``offsets`` (``len + 1`` int64
  boundaries, document i is ``ids[offsets[i]:offsets[i+1]]``), optionally a scalar ``num_words``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from common import storage
from common.artifacts import DataError, file_digest
from common.documents import DocumentSource


class ListDocumentSource:
    """A DocumentSource over a list of 1-D integer arrays. ``words``: total word count, if known."""

    def __init__(self, documents: Sequence[Sequence[int] | np.ndarray], words: int | None = None):
        self._docs = [np.asarray(d, dtype=np.int64).reshape(-1) for d in documents]
        self._lengths = np.array([len(d) for d in self._docs], dtype=np.int64)
        self._words = None if words is None else int(words)

    def __len__(self) -> int:
        return len(self._docs)

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every document (int64)."""
        return self._lengths

    def document(self, i: int) -> np.ndarray:
        """The token ids of document ``i``."""
        return self._docs[i]

    @property
    def num_tokens(self) -> int:
        """Total tokens over all documents."""
        return int(self._lengths.sum())

    @property
    def num_words(self) -> int | None:
        """Total word count, or None when unknown."""
        return self._words


def load_token_file(path: str | Path) -> ListDocumentSource:
    """Read a ``.txt`` or ``.npz`` token file (formats in the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"token file not found: {p}")
    if p.suffix == ".txt":
        docs = []
        for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            try:
                docs.append(np.array([int(t) for t in line.split()], dtype=np.int64))
            except ValueError:
                raise DataError(f"{p}:{lineno}: expected space-separated integer token ids") from None
        return ListDocumentSource(docs)
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            if "ids" not in z or "offsets" not in z:
                raise DataError(f"{p}: a .npz token file needs arrays 'ids' and 'offsets'")
            ids, offsets = z["ids"], z["offsets"].astype(np.int64)
            words = int(z["num_words"]) if "num_words" in z else None
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(ids) \
                or np.any(np.diff(offsets) < 0):
            raise DataError(f"{p}: 'offsets' must rise from 0 to len(ids) ({len(ids)})")
        return ListDocumentSource([ids[a:b] for a, b in zip(offsets[:-1], offsets[1:])], words=words)
    raise DataError(f"{p}: unknown token file type {p.suffix!r} (expected .txt or .npz)")


def save_token_file(path: str | Path, documents: Sequence[Sequence[int]], num_words: int | None = None) -> None:
    """Write documents as a ``.npz`` token file (atomically)."""
    p = Path(path)
    arrays = [np.asarray(d, dtype=np.int64).reshape(-1) for d in documents]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    extra = {} if num_words is None else {"num_words": np.array(num_words, dtype=np.int64)}
    tmp = p.with_name(p.name + ".tmp.npz")
    np.savez(tmp, ids=ids, offsets=offsets, **extra)
    tmp.replace(p)


@dataclass
class TrainingData:
    """What pretraining reads: documents to train on, validation documents (or None), the
    ``tokenizer.json`` that encoded them (or None for bare token files), the content digest of the
    data (the shard manifest's or the token file's sha256; None for an in-memory source), a name
    for the summary, and the vocabulary the data was made with (the manifest's, else the given
    tokenizer's; None when unknown)."""

    train: DocumentSource
    valid: DocumentSource | None
    tokenizer: Path | None
    digest: str | None
    name: str
    vocab_size: int | None = None


def document_words(source: DocumentSource) -> np.ndarray | None:
    """Whitespace words of every document (int64), or None when the source has no word count.

    Shards store each document's words; a source that only knows its total (a ``.npz`` token file's
    ``num_words``) spreads it over the documents in proportion to their tokens, in integers that sum
    to the total."""
    per_doc = getattr(source, "words", None)
    if isinstance(per_doc, np.ndarray) and len(per_doc) == len(source):
        return per_doc.astype(np.int64)
    total = source.num_words
    if total is None:
        return None
    lengths = np.asarray(source.lengths, dtype=np.int64)
    tokens = int(lengths.sum())
    if tokens == 0:
        return np.zeros(len(lengths), np.int64)
    cumulative = np.concatenate([[0], np.cumsum(lengths)]) * int(total) // tokens
    return np.diff(cumulative).astype(np.int64)


class WordCounter:
    """Exact words consumed by training pieces (BabyLM counts words seen, not tokens).

    A piece ``(doc, offset, n)`` consumes words ``upto(offset + n) - upto(offset)`` of its document,
    where ``upto(x) = words * x // length`` and a document read to its end (the packer drops a
    one-token tail) counts all its words: the pieces of a document always sum to its word count,
    so the count does not depend on how documents were cut or how examples were split over workers."""

    def __init__(self, lengths: np.ndarray, words: np.ndarray):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.words = np.asarray(words, dtype=np.int64)

    def _upto(self, docs: np.ndarray, position: np.ndarray) -> np.ndarray:
        length, words = self.lengths[docs], self.words[docs]
        partial = words * position // np.maximum(length, 1)
        return np.where(length - position < 2, words, partial)

    def count(self, pieces) -> int:
        """Words consumed by ``pieces`` (an iterable of ``(doc, offset, n)``)."""
        arr = np.asarray(list(pieces), dtype=np.int64).reshape(-1, 3)
        if len(arr) == 0:
            return 0
        docs, start, n = arr[:, 0], arr[:, 1], arr[:, 2]
        return int((self._upto(docs, start + n) - self._upto(docs, start)).sum())


def checked_tokenizer_vocab(path: str | Path) -> int:
    """Read ``tokenizer.json`` as the stages do (parsed, the 16 specials at their ids) and return its
    vocabulary size; a malformed or truncated file is a DataError naming it."""
    from tokenization.tokenizer import load_tokenizer

    return load_tokenizer(path).get_vocab_size()


def _folder_tokenizer(reader) -> Path:
    # The shard folder's tokenizer.json: present, the manifest's (sha256), and readable.
    path = reader.tokenizer_path
    checked_tokenizer_vocab(path)
    return path


def open_data(data, tokenizer: str | Path | None = None, valid_data=None, remote: str = "cache") -> TrainingData:
    """Open ``data``: a DocumentSource, a shard folder (its ``valid`` split validates, its own
    ``tokenizer.json`` is the tokenizer; a URI too) or a token file (.txt/.npz). ``tokenizer``: a tokenizer to
    use instead (a shard folder checks it against its manifest); ``valid_data``: a DocumentSource or
    token file of validation documents, instead of the shards' split; ``remote``: how a shard folder
    given as a URI is read (``launch.remote_shards``: "cache" or "memory", see ShardReader).

    The tokenizer that will ship with the model is checked here, before any training: read like every
    stage reads one, and a shard folder's own must be the one its manifest names. A missing,
    truncated or replaced file is one error naming it (FileNotFoundError, DataError,
    DigestMismatchError), never a model folder without a tokenizer."""
    valid = valid_data if (valid_data is None or isinstance(valid_data, DocumentSource)) \
        else load_token_file(valid_data)
    tok = Path(tokenizer) if tokenizer is not None else None
    if tok is not None and not tok.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {tok}")
    # A given tokenizer is read before anything else (a truncated file says so, not only that its digest
    # differs); a shard folder's own is checked against its manifest and read too.
    tok_vocab = checked_tokenizer_vocab(tok) if tok is not None else None
    if isinstance(data, DocumentSource):
        return TrainingData(data, valid, tok, None, type(data).__name__, tok_vocab)
    if storage.is_remote(data):  # a shard folder on an object store (read through the local cache)
        from tokenization.shards import MANIFEST_FILE, ShardReader

        location = storage.normalize(data)
        try:
            train = ShardReader(location, tokenizer_json=tok, split="train", remote=remote)
        except FileNotFoundError as exc:
            if not str(exc).startswith(storage.join(location, MANIFEST_FILE)):
                raise
            raise FileNotFoundError(f"training data not found: {location} has no {MANIFEST_FILE} (a remote "
                                    "location must be a shard folder)") from None
        if valid is None and train.manifest["splits"].get("valid", {}).get("documents"):
            valid = ShardReader(location, tokenizer_json=tok, split="valid", remote=remote)
        return TrainingData(train, valid, tok or _folder_tokenizer(train), train.manifest_digest, location,
                            int(train.manifest["vocab_size"]))
    path = Path(data)
    if path.is_dir():
        from tokenization.shards import MANIFEST_FILE, ShardReader

        if not (path / MANIFEST_FILE).is_file():
            raise FileNotFoundError(f"shard folder {path} has no {MANIFEST_FILE}")
        train = ShardReader(path, tokenizer_json=tok, split="train")
        if valid is None and train.manifest["splits"].get("valid", {}).get("documents"):
            valid = ShardReader(path, tokenizer_json=tok, split="valid")
        return TrainingData(train, valid, tok or _folder_tokenizer(train), train.manifest_digest, str(path),
                            int(train.manifest["vocab_size"]))
    if path.is_file():
        return TrainingData(load_token_file(path), valid, tok, file_digest(path), str(path), tok_vocab)
    raise FileNotFoundError(f"training data not found: {path} (expected a shard folder or a token file)")
