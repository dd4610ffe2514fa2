"""TrackingConfig: MLflow store, experiment, model registry and the champion rule."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .base import ConfigBase, check


@dataclass
class TrackingConfig(ConfigBase):
    """Configures MLflow tracking: store, experiment, model registry, champion rule, metric batching."""

    # Off: the pipeline runs and caches the same, only nothing is logged to MLflow.
    enabled: bool = True
    # Empty: $MLFLOW_TRACKING_URI if set, else sqlite:///<workdir>/mlflow/mlflow.db (the embedded default).
    tracking_uri: str = ""
    experiment: str = "gptbert"
    # The parent run's name in the runs table; empty: named from the model size (preset), causal
    # fraction, words seen and the start time, e.g. "mini · causal 1/16 · 1.2M words · 11-30 07:15".
    run_name: str = ""
    # Model registry name the final model is registered under; empty disables registration.
    registered_model: str = "gptbert"
    # Evaluation metric (a key of the evaluation's flat metrics) that decides the `champion` alias.
    champion_metric: str = "blimp.fused.best_accuracy"
    champion_mode: Literal["max", "min"] = "max"
    # Trainer step metrics are sent to MLflow in batches of this many steps.
    log_every: int = 10

    def validate(self) -> None:
        """Reject invalid values with a ConfigError naming the field."""
        # The registry is searched with a filter string: a name must not be able to change its meaning.
        check(not self.registered_model or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\- ]*", self.registered_model)
              is not None, "registered_model",
              f"may hold letters, digits, '_', '.', '-' and spaces only, got {self.registered_model!r}")
        check(bool(self.experiment.strip()), "experiment", "must not be empty")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(bool(self.champion_metric.strip()), "champion_metric", "must not be empty")
