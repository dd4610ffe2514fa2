"""ExportConfig: the Hugging Face export stage (a `transformers` folder, BabyLM milestone branches)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ConfigBase


@dataclass
class ExportConfig(ConfigBase):
    """Configures the export stage: the pretrained model (and its word-milestone models) as one
    ``transformers`` folder that the official BabyLM evaluation pipeline loads."""

    # Run the export stage in the pipeline. It needs the optional `hf` extra (transformers); without
    # it the pipeline skips the stage with a warning saying how to install it.
    enabled: bool = True
    # Also make the folder a git repository laid out like a hub model repository: the final model on
    # `main`, each word milestone on a `chck_{N}M` branch (publishing is one `git push`).
    git_repo: bool = False

    RUNTIME_FIELDS = ("enabled",)
