"""The contract between the data stages and the trainer: a source of tokenised documents.

``tokenization.shards.ShardReader`` implements it over memory-mapped Arrow shards;
``gptbert.data.ListDocumentSource`` over in-memory arrays (tests, token files). The trainer and the
n-gram baseline read documents only through it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class DocumentSource(Protocol):
    """Documents of token ids (no special tokens), their lengths, and corpus totals."""

    def __len__(self) -> int:
        """Number of documents."""
        ...

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every document (int64), known without reading any token."""
        ...

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (a view where the source allows one)."""
        ...

    @property
    def num_tokens(self) -> int:
        """Total tokens of all documents."""
        ...

    @property
    def num_words(self) -> int | None:
        """Total whitespace words of all documents, or None when unknown (no words/s then)."""
        ...


__all__ = ["DocumentSource"]
