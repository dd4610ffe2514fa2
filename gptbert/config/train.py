"""TrainConfig: objective, masking, optimisation and loop settings (SPEC sections 2, 3, 5)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ConfigBase, check


@dataclass
class TrainConfig(ConfigBase):
    steps: int = 7812
    lr: float = 1.41e-2
    seq_len: int = 128
    seed: int = 0

    def validate(self) -> None:
        check(self.steps > 0, "steps", "must be positive")
