"""Count-based n-gram language models over token ids: the baseline a neural model must beat.

A GPT-BERT run that scores below an n-gram model trained on the same shards with the same
tokenizer has learnt less than word-pair statistics. ``NGramLM.fit`` counts every n-gram of every
order up to ``order`` over the documents of a DocumentSource, each document with ``<s>`` in front
(as training examples and scored sentences have it); a sentence is scored like the causal mode:
``<s>`` prepended, the sum of log P(token | previous order-1 tokens).

Smoothing:
- ``add-k``: P(w | h) = (c(h w) + k) / (c(h) + k V), each order on its own (the textbook baseline);
- ``witten-bell`` (default): interpolation with the next lower order, weighted by how many
  distinct tokens followed the history, P_n(w | h) = (c(h w) + d(h) P_{n-1}(w | h')) / (c(h) + d(h))
  with d(h) = |{w : c(h w) > 0}| (Witten & Bell 1991), down to an add-k unigram.

N-grams are packed into one int64 key (token ids in base V), so the vocabulary and order must satisfy
V ** order < 2 ** 63 (order 4 at V = 32768). Counting 12.6M tokens takes a few seconds per order.
"""

from __future__ import annotations

import math
from typing import Iterable, Literal, Sequence

import numpy as np

BOS_ID = 1
Smoothing = Literal["add-k", "witten-bell"]


class NGramLM:
    """An n-gram model of token ids (counts in sorted key tables; see the module docstring)."""

    def __init__(self, order: int, vocab_size: int, smoothing: Smoothing = "witten-bell", k: float = 0.01,
                 bos_id: int = BOS_ID):
        if order < 1:
            raise ValueError(f"n-gram order must be >= 1, got {order}")
        if vocab_size < 2 or vocab_size ** order >= 2 ** 63:
            raise ValueError(f"vocabulary {vocab_size} and order {order}: keys need vocab_size ** order < 2 ** 63")
        if smoothing not in ("add-k", "witten-bell"):
            raise ValueError(f"smoothing must be 'add-k' or 'witten-bell', got {smoothing!r}")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        self.order, self.vocab_size, self.smoothing = order, vocab_size, smoothing
        self.k, self.bos_id = k, bos_id
        # Per order n (index n-1): sorted n-gram keys and counts; sorted context keys with their
        # counts and their numbers of distinct continuations.
        self._grams: list[tuple[np.ndarray, np.ndarray]] = []
        self._contexts: list[tuple[np.ndarray, np.ndarray]] = []
        self._distinct: list[tuple[np.ndarray, np.ndarray]] = []
        self.num_tokens = 0

    # -- counting --------------------------------------------------------------------------
    @classmethod
    def fit(cls, source, order: int = 2, vocab_size: int | None = None, **kwargs) -> "NGramLM":
        """Count a DocumentSource (e.g. a ShardReader's training split)."""
        if vocab_size is None:
            vocab_size = int(getattr(source, "manifest", {}).get("vocab_size") or 0)
            if not vocab_size:
                raise ValueError("vocab_size is needed (the source does not record one)")
        model = cls(order, vocab_size, **kwargs)
        docs = [np.asarray(source.document(i)) for i in range(len(source))]
        model._count(docs)
        return model

    def _count(self, documents: Sequence[np.ndarray]) -> None:
        V = self.vocab_size
        stream = np.concatenate([np.concatenate(([self.bos_id], np.asarray(d, dtype=np.int64)))
                                 for d in documents]) if documents else np.zeros(0, dtype=np.int64)
        if len(stream) and int(stream.max()) >= V:
            raise ValueError(f"token id {int(stream.max())} is outside the vocabulary ({V})")
        self.num_tokens = int(len(stream) - len(documents))  # real tokens (the <s> are context only)
        is_bos = stream == self.bos_id
        self._grams, self._contexts, self._distinct = [], [], []
        for n in range(1, self.order + 1):
            m = len(stream) - n + 1
            if m <= 0:
                keys = np.zeros(0, dtype=np.int64)
            else:
                keys = np.zeros(m, dtype=np.int64)
                for j in range(n):
                    keys = keys * V + stream[j:j + m]
                # An n-gram may start with <s> but never holds one later (no crossing of documents),
                # and <s> is never predicted.
                valid = np.ones(m, dtype=bool)
                for j in range(1, n):
                    valid &= ~is_bos[j:j + m]
                if n == 1:
                    valid &= ~is_bos[:m]
                keys = keys[valid]
            uniq, counts = np.unique(keys, return_counts=True)
            self._grams.append((uniq, counts.astype(np.int64)))
            ctx, idx = np.unique(uniq // V, return_inverse=True)
            self._contexts.append((ctx, np.bincount(idx, weights=counts, minlength=len(ctx)).astype(np.int64)))
            self._distinct.append((ctx, np.bincount(idx, minlength=len(ctx)).astype(np.int64)))

    # -- probabilities ---------------------------------------------------------------------
    @staticmethod
    def _lookup(table: tuple[np.ndarray, np.ndarray], keys: np.ndarray) -> np.ndarray:
        uniq, counts = table
        if len(uniq) == 0:
            return np.zeros(len(keys), dtype=np.int64)
        pos = np.minimum(np.searchsorted(uniq, keys), len(uniq) - 1)
        return np.where(uniq[pos] == keys, counts[pos], 0)

    def _history_keys(self, seq: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n-gram keys, context keys) for predicting seq[1:], each with its last n-1 tokens of history
        (shorter at the start: the history never reaches before <s>)."""
        V = self.vocab_size
        T = len(seq) - 1
        gram = np.zeros(T, dtype=np.int64)
        for j in range(n - 1, -1, -1):  # tokens t-j for the target at t = i + 1
            idx = np.arange(1, T + 1) - j
            gram = gram * V + seq[np.maximum(idx, 0)]
        return gram, gram // V

    def token_log_probs(self, ids: Sequence[int]) -> np.ndarray:
        """Natural-log probability of every token of ``ids`` (no specials) after ``<s>``."""
        seq = np.concatenate(([self.bos_id], np.asarray(ids, dtype=np.int64)))
        T = len(seq) - 1
        if T == 0:
            return np.zeros(0)
        V, k = self.vocab_size, self.k
        uni = self._grams[0]
        total = self.num_tokens
        targets = seq[1:]
        probs = (self._lookup(uni, targets) + k) / (total + k * V)
        positions = np.arange(1, T + 1)
        for n in range(2, self.order + 1):
            gram, ctx = self._history_keys(seq, n)
            c_gram = self._lookup(self._grams[n - 1], gram)
            c_ctx = self._lookup(self._contexts[n - 1], ctx)
            # Only positions with n-1 real history tokens (including <s>) use order n.
            usable = positions >= n - 1
            if self.smoothing == "add-k":
                p_n = (c_gram + k) / (c_ctx + k * V)
            else:
                d = self._lookup(self._distinct[n - 1], ctx)
                # An unseen history (d = 0) keeps the lower order's probability.
                p_n = np.where(d > 0, (c_gram + d * probs) / np.maximum(c_ctx + d, 1), probs)
            probs = np.where(usable, p_n, probs)
        return np.log(probs)

    def score(self, sequences: Iterable[Sequence[int]]) -> np.ndarray:
        """Summed log-probability of each token sequence (``<s>`` prepended), float64."""
        return np.array([float(self.token_log_probs(s).sum()) for s in sequences], dtype=np.float64)

    def perplexity(self, source, max_documents: int | None = None) -> float:
        """Per-token perplexity over a DocumentSource (e.g. the validation split)."""
        total, count = 0.0, 0
        for i in range(len(source) if max_documents is None else min(len(source), max_documents)):
            lp = self.token_log_probs(source.document(i))
            total += float(lp.sum())
            count += len(lp)
        return math.exp(-total / count) if count else float("nan")

    def score_sentences(self, tokenizer, sentences: Sequence[str]) -> np.ndarray:
        """Scores of text sentences encoded with ``tokenizer`` (no special tokens, ``<s>`` prepended)."""
        encodings = tokenizer.encode_batch(list(sentences), add_special_tokens=False) if sentences else []
        return self.score([e.ids for e in encodings])


__all__ = ["NGramLM"]
