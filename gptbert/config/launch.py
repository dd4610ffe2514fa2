"""LaunchConfig: how pretraining is run (single process, or Ray Train + DeepSpeed)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ConfigBase, check


@dataclass
class LaunchConfig(ConfigBase):
    num_workers: int = 1

    def validate(self) -> None:
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
