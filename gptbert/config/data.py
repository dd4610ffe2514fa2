"""Configs of the data stages: cleaning, tokenizer training, sharding (SPEC section 4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base import ConfigBase, check


@dataclass
class CleanConfig(ConfigBase):
    inputs: list[str] = field(default_factory=list)
    text_field: str = "text"
    invalid_utf8: Literal["replace", "strict"] = "replace"
    max_document_chars: int = 100_000

    def validate(self) -> None:
        check(self.max_document_chars > 0, "max_document_chars", "must be positive")


@dataclass
class TokenizerConfig(ConfigBase):
    vocab_size: int = 8192

    def validate(self) -> None:
        check(self.vocab_size >= 16 + 256, "vocab_size", "must hold 16 specials and 256 bytes")


@dataclass
class ShardConfig(ConfigBase):
    validation_fraction: float = 0.01

    def validate(self) -> None:
        check(0.0 <= self.validation_fraction < 1.0, "validation_fraction", "must be in [0, 1)")
