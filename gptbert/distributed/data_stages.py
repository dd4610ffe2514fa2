"""How the data stages run: ``run_clean`` and ``run_shard`` pick the engine that ``clean.engine`` /
``shard.engine`` names from ``ENGINES``.

- ``local``: this process (``tokenization.clean.clean_corpus``, ``tokenization.shards.write_shards``);
- ``ray``: Ray Data pipelines on the cluster of ``launch.ray_address`` or a local Ray
  (``gptbert.distributed.ray_data``).

Both engines write the same documents in the same order and the same token ids per document and
split (only the cutting of shard files differs), and the engine fields are runtime fields, so
stage identities and caches do not depend on the engine. The CLI (``gptbert clean``, ``gptbert
shard``) and the flows' stage runners both call these two functions, as both call
``run_pretraining`` for pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common.config import PipelineConfig


def _clean_local(cfg: PipelineConfig, out_dir: str | Path, *, progress: bool = False) -> dict[str, Any]:
    from tokenization.clean import clean_corpus

    return clean_corpus(cfg.clean, out_dir, progress_bar=progress)


def _shard_local(cfg: PipelineConfig, documents: str | Path, tokenizer: str | Path, out_dir: str | Path, *,
                 progress: bool = False) -> dict[str, Any]:
    from tokenization.shards import write_shards

    return write_shards(documents, tokenizer, cfg.shard, out_dir, progress_bar=progress)


def _clean_ray(cfg: PipelineConfig, out_dir: str | Path, *, progress: bool = False) -> dict[str, Any]:
    from .ray_data import clean_ray

    return clean_ray(cfg, out_dir, progress=progress)


def _shard_ray(cfg: PipelineConfig, documents: str | Path, tokenizer: str | Path, out_dir: str | Path, *,
               progress: bool = False) -> dict[str, Any]:
    from .ray_data import shard_ray

    return shard_ray(cfg, documents, tokenizer, out_dir, progress=progress)


@dataclass(frozen=True)
class DataEngine:
    """How one engine runs the clean stage and the shard stage (each returns the stage record
    plus ``seconds``)."""

    clean: Callable[..., dict[str, Any]]
    shard: Callable[..., dict[str, Any]]


ENGINES: dict[str, DataEngine] = {
    "local": DataEngine(_clean_local, _shard_local),
    "ray": DataEngine(_clean_ray, _shard_ray),
}


def run_clean(cfg: PipelineConfig, out_dir: str | Path, *, progress: bool = False) -> dict[str, Any]:
    """The clean stage of ``cfg.clean`` into ``out_dir`` on the engine ``clean.engine`` names."""
    return ENGINES[cfg.clean.engine].clean(cfg, out_dir, progress=progress)


def run_shard(cfg: PipelineConfig, documents: str | Path, tokenizer: str | Path, out_dir: str | Path, *,
              progress: bool = False) -> dict[str, Any]:
    """The shard stage (``documents.parquet`` and ``tokenizer.json``, or their folders; paths or
    URIs) into ``out_dir`` on the engine ``shard.engine`` names."""
    return ENGINES[cfg.shard.engine].shard(cfg, documents, tokenizer, out_dir, progress=progress)


__all__ = ["DataEngine", "ENGINES", "run_clean", "run_shard"]
