"""How a pretraining run is executed: a registry of launchers, and the one entry that uses it.

``run_pretraining(cfg, data, out_dir, ...)`` picks the launcher named by ``launch.backend``:

- ``local``: the plain loop in this process (``gptbert.trainer.pretrain``);
- ``ray``: Ray Train workers, each a DeepSpeed rank (``gptbert.distributed.ray_launcher``).

The CLI (``gptbert pretrain``) and the Prefect stage both call ``run_pretraining``. A new launcher
is one module here plus one ``register_launcher`` line below. This package is the only place ray
and deepspeed are imported, and only inside the launchers that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from common.config import ConfigError, PipelineConfig


class Launcher(Protocol):
    """Trains ``cfg`` on ``data`` into ``out_dir`` (checkpoints, ``model/``, the stage record) and
    returns the model folder (with ``stop_after`` < steps: the checkpoint where it stopped)."""

    def __call__(self, cfg: PipelineConfig, data: Any, out_dir: str | Path, *,
                 tokenizer: str | Path | None = None, callback: Callable[[dict, int], None] | None = None,
                 stop_after: int | None = None, progress: bool = False) -> Path: ...


LAUNCHERS: dict[str, Launcher] = {}


def register_launcher(name: str, launcher: Launcher) -> None:
    """Make ``launch.backend: <name>`` run ``launcher``."""
    LAUNCHERS[name] = launcher


def run_pretraining(cfg: PipelineConfig, data: Any, out_dir: str | Path, *, tokenizer: str | Path | None = None,
                    callback: Callable[[dict, int], None] | None = None, stop_after: int | None = None,
                    progress: bool = False) -> Path:
    """Pretrain with the launcher ``cfg.launch.backend`` names (see the module docstring)."""
    launcher = LAUNCHERS.get(cfg.launch.backend)
    if launcher is None:
        raise ConfigError("launch.backend", f"unknown launcher {cfg.launch.backend!r} "
                                            f"(known: {', '.join(sorted(LAUNCHERS))})")
    return launcher(cfg, data, out_dir, tokenizer=tokenizer, callback=callback, stop_after=stop_after,
                    progress=progress)


def _local(cfg, data, out_dir, *, tokenizer=None, callback=None, stop_after=None, progress=False) -> Path:
    from ..trainer import pretrain

    return pretrain(cfg, data, out_dir, callback=callback, tokenizer=tokenizer, progress=progress,
                    stop_after=stop_after)


def _ray(cfg, data, out_dir, *, tokenizer=None, callback=None, stop_after=None, progress=False) -> Path:
    from .ray_launcher import pretrain_ray

    return pretrain_ray(cfg, data, out_dir, tokenizer=tokenizer, callback=callback, stop_after=stop_after,
                        progress=progress)


register_launcher("local", _local)
register_launcher("ray", _ray)

__all__ = ["LAUNCHERS", "Launcher", "register_launcher", "run_pretraining"]
