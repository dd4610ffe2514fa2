"""SubmissionConfig: the BabyLM leaderboard submission stage (``gptbert submission`` and the pipeline's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import ConfigBase, check, check_location


@dataclass
class SubmissionConfig(ConfigBase):
    """Configures the submission stage: which challenge layout, track and backend, from which
    official ``evaluation_data/`` folder. The pipeline runs it after evaluate when ``data_dir`` is set."""

    # The official evaluation_data/ folder (full_eval/, fast_eval/); "" = no submission stage.
    data_dir: str = ""
    # The challenge year whose collate_preds.py the file follows: 2026 adds Global PIQA, drops WUG,
    # filters entity tracking and writes None for a missing task; 2025 refuses one.
    layout: Literal["2025", "2026"] = "2026"
    track: Literal["strict-small", "strict"] = "strict-small"
    backend: Literal["causal", "mntp"] = "causal"
    # The model's folder name under results/ ("" = the run folder's name).
    name: str = ""
    # A folder with the official AoA outputs (surprisal.json, aoa_score.json): gptbert does not score AoA.
    aoa_dir: str = ""

    RUNTIME_FIELDS = ("data_dir", "aoa_dir")  # their content digests are the stage's inputs

    def validate(self) -> None:
        """Locations must be paths (or URIs of a known scheme)."""
        for name in ("data_dir", "aoa_dir"):
            value = getattr(self, name)
            if value:
                check_location(value, name)
        check("/" not in self.name, "name", f"must be a folder name, got {self.name!r}")
