"""Configs of the data stages: cleaning, tokenizer training, sharding (recipe §4)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from .base import ConfigBase, check, check_location

ENGINES = ("local", "ray")  # where the clean and shard stages run (gptbert.distributed.data_stages)


def check_engine(engine: str, ray_workers: int, ray_block_bytes: int) -> None:
    """The engine fields of the clean and shard sections (a ConfigError names the field)."""
    check(engine in ENGINES, "engine", f"must be one of {', '.join(ENGINES)}, got {engine!r}")
    check(ray_workers >= 0, "ray_workers", f"must be >= 0 (0 = one per CPU of the cluster), got {ray_workers}")
    check(ray_block_bytes >= 1 << 10, "ray_block_bytes", f"must be at least 1024, got {ray_block_bytes}")


# Strips CHILDES speaker prefixes such as "*CHI:" or "*MOT:" (a usable value for CleanRule).
CHILDES_SPEAKER_PATTERN = r"\*[A-Z][A-Z0-9]{1,3}:\s*"


@dataclass
class CleanRule(ConfigBase):
    """A regex substitution applied after normalisation, optionally only to some sources.

    A source is the input file's name up to its first dot (``childes`` for ``childes.train.gz``).
    """

    pattern: str = ""
    replacement: str = ""
    sources: list[str] = field(default_factory=list)  # empty: every source

    def validate(self) -> None:
        """Reject invalid values with a ConfigError naming the field."""
        check(bool(self.pattern), "pattern", "must be a non-empty regular expression")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            check(False, "pattern", f"not a valid regular expression ({exc})")


@dataclass
class CleanConfig(ConfigBase):
    """Configures the clean stage: inputs, decoding, Unicode normalisation, rules, deduplication,
    document length limits and the Parquet output."""

    # Files or folders: .txt / .gz (one document per line), .jsonl (.jsonl.gz), .parquet.
    inputs: list[str] = field(default_factory=list)
    text_field: str = "text"  # jsonl key / parquet column holding the text
    invalid_utf8: Literal["replace", "strict"] = "replace"  # replace with U+FFFD (counted) or fail
    unicode_normalization: Literal["NFKC", "NFC", "none"] = "NFKC"
    keep_newlines: bool = True  # inside a document (jsonl/parquet); False turns them into spaces
    rules: list[CleanRule] = field(default_factory=list)
    deduplicate: bool = True  # drop exact duplicate documents (first occurrence kept)
    max_document_chars: int = 100_000  # longer documents are split at sentence boundaries
    min_document_chars: int = 1  # shorter documents are dropped (empties always are)
    parquet_compression: Literal["zstd", "snappy", "none"] = "zstd"
    row_group_documents: int = 10_000
    # Where the stage runs: "local" (this process) or "ray" (a Ray Data pipeline on the cluster of
    # launch.ray_address, or a local Ray): the same documents either way.
    engine: Literal["local", "ray"] = "local"
    ray_workers: int = 0  # Ray engine: parallel tasks of one CPU each (0 = one per CPU of the cluster)
    ray_block_bytes: int = 32 << 20  # Ray engine: input bytes per task (a file is cut at line starts)

    # The inputs are identified by their content digest, not by where they lie; how the stage runs
    # does not change what it writes.
    RUNTIME_FIELDS = ("inputs", "row_group_documents", "engine", "ray_workers", "ray_block_bytes")

    def validate(self) -> None:
        """Reject invalid values with a ConfigError naming the field."""
        check(bool(self.text_field), "text_field", "must be non-empty")
        for i, path in enumerate(self.inputs):
            check_location(path, f"inputs[{i}]")
        check(self.max_document_chars >= 100, "max_document_chars", "must be at least 100")
        check(self.min_document_chars >= 1, "min_document_chars", "must be at least 1")
        check(self.min_document_chars <= self.max_document_chars, "min_document_chars",
              "must not exceed max_document_chars")
        check(self.row_group_documents > 0, "row_group_documents", "must be positive")
        check_engine(self.engine, self.ray_workers, self.ray_block_bytes)


@dataclass
class TokenizerConfig(ConfigBase):
    """Configures the tokenizer stage (recipe §4): vocabulary size, BPE merges, training subset, threads."""

    vocab_size: int = 8192  # must equal model.vocab_size (PipelineConfig checks)
    min_frequency: int = 0  # BPE trainer: minimum pair count for a merge (0 = the library default)
    max_token_chars: int = 24  # recipe §4: pre-tokenized chunks (and so tokens) of at most 24 chars
    max_documents: int = 0  # train on the first N documents only (0 = all)
    num_threads: int = 0  # RAYON_NUM_THREADS for training (0 = library default: all cores)

    RUNTIME_FIELDS = ("num_threads",)

    def validate(self) -> None:
        """Reject invalid values with a ConfigError naming the field."""
        check(self.vocab_size >= 16 + 256, "vocab_size", "must hold 16 specials and 256 bytes")
        check(self.vocab_size <= 2**32, "vocab_size", "must fit in uint32")
        check(self.min_frequency >= 0, "min_frequency", "must be >= 0")
        check(self.max_token_chars >= 1, "max_token_chars", "must be positive")
        check(self.max_documents >= 0, "max_documents", "must be >= 0 (0 = all)")
        check(self.num_threads >= 0, "num_threads", "must be >= 0 (0 = library default)")


@dataclass
class ShardConfig(ConfigBase):
    """Configures the shard stage: the validation split, shard size, encoding batch and threads."""

    validation_fraction: float = 0.01  # of documents, chosen by a seeded hash of their text
    split_seed: int = 0
    shard_tokens: int = 2**27  # a shard is cut at the first document boundary past this
    batch_documents: int = 2048  # documents per encode_batch_fast call (larger: less idle time)
    num_threads: int = 0  # RAYON_NUM_THREADS for encoding (0 = library default: all cores; 1 per Ray task)
    # Where the stage runs: "local" (this process) or "ray" (a Ray Data pipeline): the same token
    # ids per document and the same split either way; only the cutting of shard files differs.
    engine: Literal["local", "ray"] = "local"
    ray_workers: int = 0  # Ray engine: parallel tasks of one CPU each (0 = one per CPU of the cluster)
    ray_block_bytes: int = 32 << 20  # Ray engine: bytes of text per task

    RUNTIME_FIELDS = ("batch_documents", "num_threads", "engine", "ray_workers", "ray_block_bytes")

    def validate(self) -> None:
        """Reject invalid values with a ConfigError naming the field."""
        check(0.0 <= self.validation_fraction < 1.0, "validation_fraction", "must be in [0, 1)")
        check(self.shard_tokens > 0, "shard_tokens", "must be positive")
        check(self.shard_tokens < 2**31, "shard_tokens", "must be below 2**31 (int32 offsets)")
        check(self.batch_documents > 0, "batch_documents", "must be positive")
        check(self.num_threads >= 0, "num_threads", "must be >= 0 (0 = library default)")
        check_engine(self.engine, self.ray_workers, self.ray_block_bytes)
