"""How a pretraining run is executed: a registry of launchers, and the one entry that uses it.

``run_pretraining(cfg, data, out_dir, ...)`` picks the launcher named by ``launch.backend``:

- ``local``: the plain loop in this process (``gptbert.pretraining.pretrain``);
- ``ray``: Ray Train workers, each a DeepSpeed rank (``gptbert.distributed.ray_launcher``).

``out_dir`` may be a URI (``s3://...``): the launcher then trains in a local folder named after it
(``common.storage.local_home``, so a rerun on the same machine resumes), Ray Train persists its
checkpoints under ``<out_dir>/ray`` unless ``launch.storage_path`` says otherwise (every node
writes there), and the finished run folder is published to ``out_dir`` with its record last.

The CLI (``gptbert pretrain``) and the Prefect stage both call ``run_pretraining``. A new launcher
is one module here plus one ``register_launcher`` line below. This package is the only place ray
and deepspeed are imported, and only inside the launchers that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from common import storage
from common.config import ConfigError, PipelineConfig


class Launcher(Protocol):
    """Trains ``cfg`` on ``data`` into ``out_dir`` (checkpoints, ``model/``, the stage record) and
    returns the model folder (with ``stop_after`` < steps: the checkpoint where it stopped)."""

    def __call__(self, cfg: PipelineConfig, data: Any, out_dir: str | Path, *,
                 tokenizer: str | Path | None = None, callback: Callable[[dict, int], None] | None = None,
                 stop_after: int | None = None, progress: bool = False) -> Path: ...


LAUNCHERS: dict[str, Launcher] = {}
# launcher name -> its checks of a config that need no work done (the device above all), run by
# ``check_launch`` before a command writes anything.
PREFLIGHT: dict[str, Callable[[PipelineConfig], None]] = {}


def register_launcher(name: str, launcher: Launcher, preflight: Callable[[PipelineConfig], None] | None = None) -> None:
    """Make ``launch.backend: <name>`` run ``launcher``; ``preflight(cfg)`` raises on a config it
    cannot run (before any work)."""
    LAUNCHERS[name] = launcher
    if preflight is not None:
        PREFLIGHT[name] = preflight


def check_launch(cfg: PipelineConfig) -> None:
    """Refuse, before any work, a config its launcher cannot run: an unknown ``launch.backend``, a
    ``train.device`` this machine (or cluster) cannot give."""
    if cfg.launch.backend not in LAUNCHERS:
        raise ConfigError("launch.backend", f"unknown launcher {cfg.launch.backend!r} "
                                            f"(known: {', '.join(sorted(LAUNCHERS))})")
    check = PREFLIGHT.get(cfg.launch.backend)
    if check is not None:
        check(cfg)


def run_pretraining(cfg: PipelineConfig, data: Any, out_dir: str | Path, *, tokenizer: str | Path | None = None,
                    callback: Callable[[dict, int], None] | None = None, stop_after: int | None = None,
                    progress: bool = False) -> Path | str:
    """Pretrain with the launcher ``cfg.launch.backend`` names (see the module docstring); returns
    the model folder (a URI when ``out_dir`` is one)."""
    check_launch(cfg)
    launcher = LAUNCHERS[cfg.launch.backend]
    if not storage.is_remote(out_dir):
        return launcher(cfg, data, out_dir, tokenizer=tokenizer, callback=callback, stop_after=stop_after,
                        progress=progress)
    from common.artifacts import RECORD_FILE, check_output_folder
    from common.config import from_dict, to_dict

    from ..pretraining import MODEL_DIR, STAGE

    out = storage.normalize(out_dir)
    check_output_folder(out, STAGE)  # never over someone else's objects
    # Claim the prefix before training (and fail fast on a missing bucket or no write access).
    storage.write_bytes(storage.join(out, storage.PENDING_FILE), b'{"stage": "%s"}' % STAGE.encode())
    if cfg.launch.backend == "ray" and cfg.launch.storage_path is None:
        raw = to_dict(cfg)
        raw["launch"]["storage_path"] = storage.join(out, RAY_STORAGE_DIR)
        cfg = from_dict(PipelineConfig, raw)
    local = storage.local_home(out)
    result = launcher(cfg, data, local, tokenizer=tokenizer, callback=callback, stop_after=stop_after,
                      progress=progress)
    if stop_after is not None and stop_after < cfg.train.steps:
        return result  # a checkpoint, not a finished run: nothing is published
    # Ray's checkpoints already live under <out>/ray; the rest goes up with the record last.
    storage.publish(local, out, STAGE, RECORD_FILE, keep=(RAY_STORAGE_DIR,))
    return storage.join(out, MODEL_DIR)


RAY_STORAGE_DIR = "ray"  # where a remote run's Ray Train checkpoints live, inside its run folder


def _local(cfg, data, out_dir, *, tokenizer=None, callback=None, stop_after=None, progress=False) -> Path:
    from ..pretraining import pretrain

    return pretrain(cfg, data, out_dir, callback=callback, tokenizer=tokenizer, progress=progress,
                    stop_after=stop_after)


def _ray(cfg, data, out_dir, *, tokenizer=None, callback=None, stop_after=None, progress=False) -> Path:
    from .ray_launcher import pretrain_ray

    return pretrain_ray(cfg, data, out_dir, tokenizer=tokenizer, callback=callback, stop_after=stop_after,
                        progress=progress)


def _local_preflight(cfg: PipelineConfig) -> None:
    from ..device import resolve_device

    resolve_device(cfg.train.device, "train.device")


def _ray_preflight(cfg: PipelineConfig) -> None:
    from .ray_launcher import check_ray_device

    check_ray_device(cfg)


register_launcher("local", _local, _local_preflight)
register_launcher("ray", _ray, _ray_preflight)

__all__ = ["LAUNCHERS", "PREFLIGHT", "Launcher", "check_launch", "register_launcher", "run_pretraining"]
