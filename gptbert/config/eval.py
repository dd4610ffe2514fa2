"""EvalConfig: BLiMP-style minimal pairs, scoring modes, temperature (SPEC section 6)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ConfigBase, check


@dataclass
class EvalConfig(ConfigBase):
    temperature: float = 1.0

    def validate(self) -> None:
        check(self.temperature > 0, "temperature", "must be positive")
