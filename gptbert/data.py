"""Document sources: where the trainer reads token ids from.

The trainer only needs the **DocumentSource** protocol: the number of documents, every document's
length (to plan packing without reading tokens), one document's ids (no special tokens), and corpus
totals for words/s. ``tokenization.shards.ShardReader`` implements it over Arrow shards;
``ListDocumentSource`` implements it over in-memory arrays (tests, token files).

Token files (so ``pretrain`` works before shards exist):
- ``.txt``: one document per line, token ids separated by spaces (empty lines are empty documents);
- ``.npz``: arrays ``ids`` (all documents concatenated) and ``offsets`` (``len + 1`` int64
  boundaries, document i is ``ids[offsets[i]:offsets[i+1]]``), optionally a scalar ``num_words``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class DocumentSource(Protocol):
    def __len__(self) -> int: ...

    @property
    def lengths(self) -> np.ndarray: ...

    def document(self, i: int) -> np.ndarray: ...

    @property
    def num_tokens(self) -> int: ...

    @property
    def num_words(self) -> int | None: ...


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
        return self._lengths

    def document(self, i: int) -> np.ndarray:
        return self._docs[i]

    @property
    def num_tokens(self) -> int:
        return int(self._lengths.sum())

    @property
    def num_words(self) -> int | None:
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
                raise ValueError(f"{p}:{lineno}: expected space-separated integer token ids") from None
        return ListDocumentSource(docs)
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            if "ids" not in z or "offsets" not in z:
                raise ValueError(f"{p}: a .npz token file needs arrays 'ids' and 'offsets'")
            ids, offsets = z["ids"], z["offsets"].astype(np.int64)
            words = int(z["num_words"]) if "num_words" in z else None
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(ids) \
                or np.any(np.diff(offsets) < 0):
            raise ValueError(f"{p}: 'offsets' must rise from 0 to len(ids) ({len(ids)})")
        return ListDocumentSource([ids[a:b] for a, b in zip(offsets[:-1], offsets[1:])], words=words)
    raise ValueError(f"{p}: unknown token file type {p.suffix!r} (expected .txt or .npz)")


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
