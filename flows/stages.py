"""The six stages as plain calls of the library functions, cached by artifact identity.

Each stage writes ``<workdir>/artifacts/<stage>/<identity[:16]>/`` through the same library
function the CLI calls, which writes the folder atomically and its record ``stage.json`` last. A
folder whose record names the stage and the identity is complete and is reused by any process
(``cached``); nothing else counts. The identity is computed from the upstream artifacts' output
digests and the config before running, with the same function the library writes into the
record, and the record is checked against it afterwards. No Prefect, no MLflow here: the tasks in
``flows/pipeline.py`` wrap these.

The run root may be a URI (``s3://bucket/prefix``): the stage folders are then prefixes of the
object store, the cache check reads only their records, each library function publishes its
folder with the record last, and a stage that needs an upstream folder's files reads a verified
local copy (``Artifact.local``; shards are read by the shard reader itself).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common import storage
from common.artifacts import STAGES, local_stage_copy, read_record, stage_identity, tree_digest
from common.config import PipelineConfig

log = logging.getLogger("gptbert")
# What the stages after pretraining read of a run folder (its checkpoints stay where they are).
RUN_PARTS = ("model", "milestones")


@dataclass
class Artifact:
    """A finished stage's output: where it is and what it is (passed between Prefect tasks)."""

    stage: str
    path: str  # the stage folder
    identity: str
    digest: str  # content digest of the output (what downstream identities are built from)
    cached: bool = False
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        """Whether the folder is on an object store (or another remote filesystem)."""
        return storage.is_remote(self.path)

    def local(self, parts: tuple[str, ...] | None = None) -> Path:
        """A local folder with this artifact's files (``common.artifacts.local_stage_copy``: for a
        remote folder a verified copy in the local cache, of ``parts`` only when given)."""
        return local_stage_copy(self.path, self.record, parts)

    def file(self, name: str) -> str:
        """A local path of ``name`` inside the stage folder (``local``), as a string."""
        return str(self.local() / name)


def stage_dir(workdir: str | Path, stage: str, identity: str) -> str:
    """Where the output of ``stage`` with ``identity`` lives under the run root (a path or a URI)."""
    return storage.join(storage.normalize(workdir), "artifacts", stage, identity[:16])


def _cached_or_run(cfg: PipelineConfig, stage: str, inputs: dict[str, Any], config: dict[str, Any],
                   run: Callable[[str], Any]) -> Artifact:
    identity = stage_identity(stage, inputs, config)
    folder = stage_dir(cfg.workdir, stage, identity)
    record = read_record(folder, stage, identity)
    # Locally the output is digested again (cheap); on an object store only the record is read.
    if record is not None and not storage.is_remote(folder) and not _output_matches(Path(folder), record):
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
    return Artifact(stage, folder, identity, record["output_digest"], cached, record)


def _output_matches(folder: Path, record: dict[str, Any]) -> bool:
    """Whether the folder's output still has the digest its record holds (a swapped or edited
    output is not reused under the old digest)."""
    try:
        return tree_digest(folder / record["output"]) == record["output_digest"]
    except (FileNotFoundError, KeyError, TypeError):
        return False


def clean(cfg: PipelineConfig) -> Artifact:
    """The clean stage: ``clean.inputs`` -> documents.parquet on ``clean.engine``, reused when
    cached (by any engine: the engine is not part of the identity)."""
    from gptbert.distributed.data_stages import run_clean
    from tokenization.clean import clean_inputs

    return _cached_or_run(cfg, "clean", clean_inputs(cfg.clean), cfg.clean.identity_dict(),
                          lambda out: run_clean(cfg, out))


def train_tokenizer(cfg: PipelineConfig, corpus: Artifact) -> Artifact:
    """The tokenizer stage: train the recipe §4 tokenizer on the cleaned corpus, reused when cached."""
    from tokenization.clean import DOCUMENTS_FILE
    from tokenization.tokenizer import tokenizer_inputs, train_tokenizer as train

    return _cached_or_run(cfg, "tokenizer", tokenizer_inputs(corpus.digest), cfg.tokenizer.identity_dict(),
                          lambda out: train(corpus.file(DOCUMENTS_FILE), cfg.tokenizer, out, progress_bar=False))


def shard(cfg: PipelineConfig, corpus: Artifact, tokenizer: Artifact) -> Artifact:
    """The shard stage: encode the cleaned corpus with the tokenizer into Arrow shards on
    ``shard.engine``, reused when cached. A remote corpus is passed as its URI (Ray workers on
    other nodes read it there)."""
    from gptbert.distributed.data_stages import run_shard
    from tokenization.clean import DOCUMENTS_FILE
    from tokenization.shards import shard_inputs
    from tokenization.tokenizer import TOKENIZER_FILE

    def run(out: str) -> Any:
        documents = storage.join(corpus.path, DOCUMENTS_FILE) if corpus.remote else corpus.file(DOCUMENTS_FILE)
        return run_shard(cfg, documents, tokenizer.file(TOKENIZER_FILE), out)

    return _cached_or_run(cfg, "shard", shard_inputs(corpus.digest, tokenizer.digest), cfg.shard.identity_dict(), run)


def pretrain(cfg: PipelineConfig, shards: Artifact, tokenizer: Artifact, callback: Callable | None = None) -> Artifact:
    """Resumable: the folder keeps its checkpoints (and a Ray run is named after it), so a retried
    or restarted run continues. How the run is launched is not part of its identity (recipe §2: the
    objective is independent of the worker count)."""
    from gptbert.distributed import run_pretraining
    from gptbert.metrics import Chain, ProgressFile
    from gptbert.pretraining import PROGRESS_FILE, pretrain_inputs
    from gptbert.trainer import pretrain_config

    from . import events

    def run(out: str) -> str:
        local = storage.local_home(out)  # a remote run trains in a local folder, then publishes it
        local.mkdir(parents=True, exist_ok=True)
        progress = ProgressFile(local / PROGRESS_FILE, cfg.train.steps)
        events.emit("progress_file", stage="pretrain", path=progress.path, total_steps=cfg.train.steps)
        done = run_pretraining(cfg, shards.path, out, callback=Chain(progress, callback))
        if callback is not None and hasattr(callback, "flush"):
            callback.flush()  # the plain loop's buffered metrics (Ray flushed them on its worker), in this process
        return done

    return _cached_or_run(cfg, "pretrain", pretrain_inputs(shards.digest, tokenizer.digest),
                          pretrain_config(cfg.model, cfg.train), run)


def export(cfg: PipelineConfig, model: Artifact) -> Artifact:
    """The export stage: the pretrained model and its word-milestone models as one ``transformers``
    folder (``export.git_repo``: also a hub-style git repository), reused when cached."""
    from gptbert.export import export_inputs, export_model

    run_dir = model.local(RUN_PARTS)
    return _cached_or_run(cfg, "export", export_inputs(run_dir), cfg.export.identity_dict(),
                          lambda out: export_model(run_dir, out, git_repo=cfg.export.git_repo))


def evaluate(cfg: PipelineConfig, model: Artifact, after: Callable | None = None) -> Artifact:
    """``after(results, folder)`` may add files (plots) to the evaluation folder before its record."""
    from gptbert.evaluation import evaluate_model_dir, evaluation_config, evaluation_inputs

    model_dir = str(model.local(RUN_PARTS) / "model")
    return _cached_or_run(cfg, "evaluate", evaluation_inputs(model_dir, cfg.eval), evaluation_config(cfg.eval),
                          lambda out: evaluate_model_dir(model_dir, cfg.eval, out, after=after))


def submission(cfg: PipelineConfig, model: Artifact) -> Artifact:
    """The submission stage (``submission.data_dir`` set): the model's BabyLM leaderboard submission
    in the official layout with its collated file, reused when cached."""
    from gptbert.submission import STAGE, build_submission, setup

    sub = cfg.submission
    run_dir = model.local(RUN_PARTS)
    kwargs = dict(layout=sub.layout, track=sub.track, backend=sub.backend, name=sub.name or "gptbert",
                  aoa_dir=storage.local_input(sub.aoa_dir) if sub.aoa_dir else None, cfg=cfg.eval)
    data = storage.local_input(sub.data_dir)
    resolved = setup(run_dir, data, **kwargs)
    return _cached_or_run(cfg, STAGE, resolved.inputs, resolved.config,
                          lambda out: build_submission(run_dir, out, data, **kwargs))


@dataclass(frozen=True)
class Stage:
    """One pipeline stage as the flows see it: its cached runner above, the config sections that
    parameterise it (its MLflow child run's params) and the small files of its folder logged as
    MLflow artifacts. Its identity is spelled by its library (``*_inputs`` beside each stage)."""

    name: str
    run: Callable[..., Artifact]
    sections: tuple[str, ...]
    files: tuple[str, ...] = ()


# In pipeline order (common.artifacts.STAGES, which stage records are checked against).
REGISTRY: dict[str, Stage] = {s.name: s for s in (
    Stage("clean", clean, ("clean",)),
    Stage("tokenizer", train_tokenizer, ("tokenizer",), ("tokenizer.json",)),
    Stage("shard", shard, ("shard",), ("manifest.json",)),
    Stage("pretrain", pretrain, ("model", "train", "launch"), ("model/training.json", "model/config.json")),
    Stage("export", export, ("export",), ("config.json",)),
    Stage("evaluate", evaluate, ("eval",), ("results.json", "report.md", "by_phenomenon.png", "milestones.png")),
)}
# Stages after the pipeline's, run when configured (common.artifacts.EXTRA_STAGES).
EXTRA: dict[str, Stage] = {s.name: s for s in (
    Stage("submission", submission, ("submission", "eval"), ("summary.json",)),
)}


def stage_info(name: str) -> Stage:
    """The declaration of a pipeline stage or of an extra one."""
    return REGISTRY.get(name) or EXTRA[name]

__all__ = ["Artifact", "EXTRA", "REGISTRY", "STAGES", "Stage", "clean", "evaluate", "export", "pretrain", "shard", "stage_dir",
           "stage_info", "submission", "train_tokenizer"]
