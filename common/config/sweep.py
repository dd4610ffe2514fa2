"""SweepConfig: the ratio sweep (one model per causal fraction, everything else equal)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from .base import ConfigBase, check

# The grid of the paper's ratio ablation (causal:masked): masked-only, 1:15, 1:7, 1:1, 15:1 and causal-only.
PAPER_FRACTIONS = [0.0, 0.0625, 0.125, 0.5, 0.9375, 1.0]


@dataclass
class SweepConfig(ConfigBase):
    """Configures `gptbert sweep` / the gptbert-ratio-sweep flow: the causal fractions (each one
    sets train.causal_fraction of a trial), the seeds each fraction is trained with (train.seed),
    and how trials run."""

    fractions: list[float] = field(default_factory=lambda: list(PAPER_FRACTIONS))
    seeds: list[int] = field(default_factory=lambda: [0])
    # "sequential": one trial after another, each launched as launch.backend says (a Ray Train run
    # on a cluster, or the plain loop). "ray": every trial is one Ray task on launch.ray_address's
    # cluster (or a local Ray) running the plain loop, so trials train side by side; a trial that
    # trains on CUDA (train.device cuda, or auto on a cluster with GPUs) requests one GPU.
    parallel: Literal["sequential", "ray"] = "sequential"
    # CPUs Ray reserves for each trial when parallel is "ray".
    cpus_per_trial: float = 1.0
    # Each trial's pretraining and evaluation in a fresh process (a fresh Ray worker with parallel
    # "ray"), so that its memory all goes back when it ends and the sweep's peak does not grow with
    # its trials (flows.isolation). False: in the sweep's process, which saves each trial a few
    # seconds of start-up and lets its peak grow by about a tenth from the first trial on.
    isolate_trials: bool = True

    def validate(self) -> None:
        """Reject invalid values with a ConfigError naming the field."""
        check(len(self.fractions) > 0, "fractions", "must hold at least one causal fraction")
        for i, f in enumerate(self.fractions):
            check(isinstance(f, (int, float)) and math.isfinite(f) and 0.0 <= f <= 1.0, f"fractions[{i}]",
                  f"must be in [0, 1], got {f!r}")
        check(len(set(self.fractions)) == len(self.fractions), "fractions", f"has duplicates: {self.fractions}")
        check(len(self.seeds) > 0, "seeds", "must hold at least one seed")
        check(len(set(self.seeds)) == len(self.seeds), "seeds", f"has duplicates: {self.seeds}")
        check(self.cpus_per_trial > 0, "cpus_per_trial", "must be positive")
