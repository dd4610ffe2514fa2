"""TrackingConfig: MLflow experiment, registry name and run naming."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ConfigBase


@dataclass
class TrackingConfig(ConfigBase):
    experiment: str = "gptbert"
    registered_model: str = "gptbert"
