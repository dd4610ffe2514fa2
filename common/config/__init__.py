"""One typed configuration tree for the whole pipeline.

Load order: dataclass defaults <- preset (``common/config/presets/NAME.yaml``) <- user YAML <- dotted CLI
overrides (``train.lr=0.01``). The same ``PipelineConfig`` is used as Prefect flow parameters and is
flattened into MLflow params. This package imports no torch, so every layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import (
    ConfigBase,
    ConfigError,
    check,
    check_location,
    deep_merge,
    digest,
    dump_yaml,
    flatten,
    from_dict,
    load_yaml,
    parse_overrides,
    to_dict,
)
from .data import CleanConfig, ShardConfig, TokenizerConfig
from .eval import EvalConfig
from .export import ExportConfig
from .launch import LaunchConfig
from .model import ModelConfig
from .submission import SubmissionConfig
from .sweep import SweepConfig
from .tracking import TrackingConfig
from .train import TrainConfig

PRESET_DIR = Path(__file__).resolve().parent / "presets"


@dataclass
class PipelineConfig(ConfigBase):
    """The whole pipeline's configuration: the run root (``workdir``) and one section per stage."""

    workdir: str = "runs"
    clean: CleanConfig = field(default_factory=CleanConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def validate(self) -> None:
        """Reject model.vocab_size != tokenizer.vocab_size with a ConfigError naming model.vocab_size,
        and a workdir URI of an unknown scheme."""
        check_location(self.workdir, "workdir")
        check(self.tokenizer.vocab_size == self.model.vocab_size, "model.vocab_size",
              f"tokenizer.vocab_size ({self.tokenizer.vocab_size}) and model.vocab_size ({self.model.vocab_size}) "
              "must be equal")


def preset_names() -> list[str]:
    """Names of the shipped presets (``presets/*.yaml``), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_dict(name: str) -> dict[str, Any]:
    """The raw mapping of preset ``name``; an unknown name is a ConfigError listing the known ones."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError("preset", f"unknown preset {name!r} (known: {', '.join(preset_names())})")
    return load_yaml(path)


def load_config(
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> PipelineConfig:
    """Build the validated config: preset <- YAML file <- dotted overrides.

    A YAML file may name its own base with a top-level ``preset:`` key.
    """
    data: dict[str, Any] = {}
    user = load_yaml(path) if path is not None else {}
    preset = user.pop("preset", None) if preset is None else preset
    user.pop("preset", None)
    if preset:
        data = preset_dict(preset)
    data = deep_merge(data, user)
    data = deep_merge(data, parse_overrides(list(overrides)))
    return from_dict(PipelineConfig, data)


def preset(name: str) -> PipelineConfig:
    """The validated config of preset ``name``."""
    return load_config(preset=name)


__all__ = [
    "CleanConfig",
    "ConfigError",
    "EvalConfig",
    "ExportConfig",
    "LaunchConfig",
    "ModelConfig",
    "SubmissionConfig",
    "PipelineConfig",
    "ShardConfig",
    "SweepConfig",
    "TokenizerConfig",
    "TrackingConfig",
    "TrainConfig",
    "check",
    "check_location",
    "deep_merge",
    "digest",
    "dump_yaml",
    "flatten",
    "from_dict",
    "load_config",
    "preset",
    "preset_dict",
    "preset_names",
    "to_dict",
]
