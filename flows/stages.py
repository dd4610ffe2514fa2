"""The six stages as plain calls of the library functions, cached by artifact identity.

Each stage writes ``<workdir>/artifacts/<stage>/<identity[:16]>/`` through the same library
function the CLI calls, which writes the folder atomically and its record ``stage.json`` last. A
folder whose record names the stage and the identity is complete and is reused by any process
(``cached``); nothing else counts. The identity is computed from the upstream artifacts' output
digests and the config before running, with the same function the library writes into the
record, and the record is checked against it afterwards. No Prefect, no MLflow here: the tasks in
``flows/pipeline.py`` wrap these.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common.artifacts import STAGES, read_record, stage_identity, tree_digest
from common.config import PipelineConfig

log = logging.getLogger("gptbert")


@dataclass
class Artifact:
    """A finished stage's output: where it is and what it is (passed between Prefect tasks)."""

    stage: str
    path: str  # the stage folder
    identity: str
    digest: str  # content digest of the output (what downstream identities are built from)
    cached: bool = False
    record: dict[str, Any] = field(default_factory=dict)

    def file(self, name: str) -> str:
        """The path of ``name`` inside the stage folder, as a string."""
        return str(Path(self.path) / name)


def stage_dir(workdir: str | Path, stage: str, identity: str) -> Path:
    """Where the output of ``stage`` with ``identity`` lives under the run root."""
    return Path(workdir).resolve() / "artifacts" / stage / identity[:16]


def _cached_or_run(cfg: PipelineConfig, stage: str, inputs: dict[str, Any], config: dict[str, Any],
                   run: Callable[[Path], Any]) -> Artifact:
    identity = stage_identity(stage, inputs, config)
    folder = stage_dir(cfg.workdir, stage, identity)
    record = read_record(folder, stage, identity)
    if record is not None and not _output_matches(folder, record):
        log.warning("stage %s: %s no longer holds the output its record describes (digest changed); "
                    "running the stage again", stage, folder)
        record = None
    cached = record is not None
    if not cached:
        run(folder)
        record = read_record(folder, stage)
        if record is None or record.get("identity") != identity:
            raise RuntimeError(f"stage {stage} wrote {folder} with identity "
                               f"{(record or {}).get('identity', 'none')[:16]}, expected {identity[:16]}: "
                               "its inputs or config changed while it ran")
    return Artifact(stage, str(folder), identity, record["output_digest"], cached, record)


def _output_matches(folder: Path, record: dict[str, Any]) -> bool:
    """Whether the folder's output still has the digest its record holds (a swapped or edited
    output is not reused under the old digest)."""
    try:
        return tree_digest(folder / record["output"]) == record["output_digest"]
    except (FileNotFoundError, KeyError, TypeError):
        return False


def clean(cfg: PipelineConfig) -> Artifact:
    """The clean stage: ``clean.inputs`` -> documents.parquet, reused when cached."""
    from tokenization.clean import clean_corpus, clean_inputs

    return _cached_or_run(cfg, "clean", clean_inputs(cfg.clean), cfg.clean.identity_dict(),
                          lambda out: clean_corpus(cfg.clean, out, progress_bar=False))


def train_tokenizer(cfg: PipelineConfig, corpus: Artifact) -> Artifact:
    """The tokenizer stage: train the recipe §4 tokenizer on the cleaned corpus, reused when cached."""
    from tokenization.clean import DOCUMENTS_FILE
    from tokenization.tokenizer import train_tokenizer as train

    return _cached_or_run(cfg, "tokenizer", {"corpus": corpus.digest}, cfg.tokenizer.identity_dict(),
                          lambda out: train(corpus.file(DOCUMENTS_FILE), cfg.tokenizer, out, progress_bar=False))


def shard(cfg: PipelineConfig, corpus: Artifact, tokenizer: Artifact) -> Artifact:
    """The shard stage: encode the cleaned corpus with the tokenizer into Arrow shards, reused when cached."""
    from tokenization.clean import DOCUMENTS_FILE
    from tokenization.shards import write_shards
    from tokenization.tokenizer import TOKENIZER_FILE

    inputs = {"corpus": corpus.digest, "tokenizer": tokenizer.digest}
    return _cached_or_run(cfg, "shard", inputs, cfg.shard.identity_dict(),
                          lambda out: write_shards(corpus.file(DOCUMENTS_FILE), tokenizer.file(TOKENIZER_FILE),
                                                   cfg.shard, out, progress_bar=False))


def pretrain(cfg: PipelineConfig, shards: Artifact, tokenizer: Artifact, callback: Callable | None = None) -> Artifact:
    """Resumable: the folder keeps its checkpoints (and a Ray run is named after it), so a retried
    or restarted run continues. How the run is launched is not part of its identity (recipe §2: the
    objective is independent of the worker count)."""
    from gptbert.distributed import run_pretraining
    from gptbert.trainer import pretrain_config

    from gptbert.metrics import Chain, ProgressFile
    from gptbert.trainer import PROGRESS_FILE

    from . import events

    def run(out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        progress = ProgressFile(out / PROGRESS_FILE, cfg.train.steps)
        events.emit("progress_file", stage="pretrain", path=progress.path, total_steps=cfg.train.steps)
        return run_pretraining(cfg, shards.path, out, callback=Chain(progress, callback))

    inputs = {"data": shards.digest, "tokenizer": tokenizer.digest}
    return _cached_or_run(cfg, "pretrain", inputs, pretrain_config(cfg.model, cfg.train), run)


def export(cfg: PipelineConfig, model: Artifact) -> Artifact:
    """The export stage: the pretrained model and its word-milestone models as one ``transformers``
    folder (``export.git_repo``: also a hub-style git repository), reused when cached."""
    from gptbert.export import export_inputs, export_model

    return _cached_or_run(cfg, "export", export_inputs(model.path), cfg.export.identity_dict(),
                          lambda out: export_model(model.path, out, git_repo=cfg.export.git_repo))


def evaluate(cfg: PipelineConfig, model: Artifact, after: Callable | None = None) -> Artifact:
    """``after(results, folder)`` may add files (plots) to the evaluation folder before its record."""
    from gptbert.evaluation import evaluate_model_dir, evaluation_config, evaluation_inputs

    model_dir = model.file("model")
    return _cached_or_run(cfg, "evaluate", evaluation_inputs(model_dir, cfg.eval), evaluation_config(cfg.eval),
                          lambda out: evaluate_model_dir(model_dir, cfg.eval, out, after=after))


__all__ = ["Artifact", "STAGES", "clean", "evaluate", "export", "pretrain", "shard", "stage_dir", "train_tokenizer"]
