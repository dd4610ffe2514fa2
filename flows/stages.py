"""The five stages as plain functions: library call + identity-keyed folder (no Prefect, no MLflow).

Each returns an ``Artifact``: the stage folder, its identity and its output digest, and whether it
was reused from an earlier run. The Prefect tasks in ``flows/pipeline.py`` wrap these.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from common.config import PipelineConfig, to_dict

from .artifacts import Artifact, config_identity, run_stage, tree_digest

STAGES = ("clean", "tokenizer", "shard", "pretrain", "evaluate")


def clean(cfg: PipelineConfig) -> Artifact:
    from tokenization.clean import clean_corpus, inputs_digest, list_input_files

    corpus_digest, listing = inputs_digest(list_input_files(cfg.clean.inputs))

    def body(out: Path) -> dict[str, Any]:
        return clean_corpus(cfg.clean, out, progress_bar=False)

    return run_stage(cfg.workdir, "clean", {"inputs": corpus_digest}, cfg.clean, body,
                     extra={"input_files": listing})


def train_tokenizer(cfg: PipelineConfig, corpus: Artifact) -> Artifact:
    from tokenization.tokenizer import train_tokenizer as train

    def body(out: Path) -> dict[str, Any]:
        stats = train(corpus.file("documents.parquet"), cfg.tokenizer, out, progress_bar=False)
        return stats if isinstance(stats, dict) else _read_stats(out)

    return run_stage(cfg.workdir, "tokenizer", {"corpus": corpus.digest}, cfg.tokenizer, body)


def shard(cfg: PipelineConfig, corpus: Artifact, tokenizer: Artifact) -> Artifact:
    from tokenization.shards import write_shards

    def body(out: Path) -> dict[str, Any]:
        stats = write_shards(corpus.file("documents.parquet"), tokenizer.file("tokenizer.json"), cfg.shard, out,
                             progress_bar=False)
        # The shard folder carries its tokenizer, so a trainer (or a Ray worker) given only the
        # folder finds it (the manifest pins its sha256).
        shutil.copyfile(tokenizer.file("tokenizer.json"), out / "tokenizer.json")
        return stats if isinstance(stats, dict) else _read_json(out / "manifest.json", summary=True)

    return run_stage(cfg.workdir, "shard", {"corpus": corpus.digest, "tokenizer": tokenizer.digest},
                     cfg.shard, body)


def launch_backend(cfg: PipelineConfig) -> str:
    return str(getattr(cfg.launch, "backend", "plain"))


def pretrain(cfg: PipelineConfig, shards: Artifact, tokenizer: Artifact, callback: Callable | None = None,
             run_name: str | None = None) -> Artifact:
    """Resumable: the folder keeps its checkpoints, so a retried or restarted run continues.

    With Ray, ``run_name`` None lets the launcher name the run after the stage folder, so a retry
    finds (and resumes) the same run's checkpoints."""
    tokenizer_json = tokenizer.file("tokenizer.json")

    def body(out: Path) -> dict[str, Any]:
        if launch_backend(cfg) == "ray":
            from gptbert.launch import pretrain_distributed

            kwargs = {"callback": callback}
            if "tokenizer" in inspect.signature(pretrain_distributed).parameters:
                kwargs["tokenizer"] = tokenizer_json
            model_dir = pretrain_distributed(cfg, shards.path, str(out), run_name, **kwargs)
        else:
            from gptbert.trainer import pretrain as train

            model_dir = train(cfg, shards.path, str(out), callback=callback, tokenizer=tokenizer_json)
        model_dir = Path(model_dir)
        if model_dir.resolve() != (out / "model").resolve():
            raise RuntimeError(f"pretrain wrote its model to {model_dir}, expected {out / 'model'}")
        if not (model_dir / "tokenizer.json").exists():
            # The model folder contract includes the tokenizer; a launcher that could not find it
            # from the shard manifest leaves it out, so the stage adds the one it trained with.
            tmp = model_dir / ".tokenizer.json.tmp"
            shutil.copyfile(tokenizer_json, tmp)
            os.replace(tmp, model_dir / "tokenizer.json")
        return _read_json(model_dir / "training.json")

    # Model + training config decide the weights; how the run is launched does not (SPEC 2: the
    # objective is independent of the worker count).
    config = {"model": config_identity(cfg.model), "train": config_identity(cfg.train)}
    return run_stage(cfg.workdir, "pretrain", {"shards": shards.digest, "tokenizer": tokenizer.digest}, config, body,
                     resumable=True, output_subdir="model")


def evaluate(cfg: PipelineConfig, model: Artifact) -> Artifact:
    from gptbert import evaluate as ev

    if not cfg.eval.blimp_dir:
        raise ValueError("config field 'eval.blimp_dir': the evaluate stage needs a folder of BLiMP-format jsonl")
    data_digest = ev.data_digest(cfg.eval.blimp_dir)

    def body(out: Path) -> dict[str, Any]:
        from gptbert.io import load_model_dir

        from .tracking import plot_by_phenomenon

        net, tok = load_model_dir(model.file("model"))
        net.eval()
        results = ev.evaluate(net, tok, cfg.eval, model_dir=model.file("model"))
        results["lineage"] = {"model": model.digest, "eval_data": data_digest}
        ev.write_results(results, out)
        by_phenomenon = phenomenon_table(results)
        if by_phenomenon:
            plot_by_phenomenon(by_phenomenon, out / "by_phenomenon.png")
        return ev.summary_metrics(results)

    config = {k: v for k, v in to_dict(cfg.eval).items() if k != "blimp_dir"}  # data is in the digest
    return run_stage(cfg.workdir, "evaluate", {"model": model.digest, "eval_data": data_digest}, config, body)


def phenomenon_table(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{phenomenon: {mode: accuracy at the mode's best temperature}}."""
    table: dict[str, dict[str, float]] = {}
    for mode, r in results.get("blimp", {}).get("modes", {}).items():
        for name, acc in r["best"]["phenomena"].items():
            table.setdefault(name, {})[mode] = acc
    return table


def _read_stats(folder: Path) -> dict[str, Any]:
    return _read_json(folder / "stats.json")


def _read_json(path: Path, summary: bool = False) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if summary and isinstance(data, dict):
        # Keep scalars only (a manifest lists every shard file).
        return {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool))}
    return data if isinstance(data, dict) else {}


__all__ = ["STAGES", "clean", "evaluate", "launch_backend", "phenomenon_table", "pretrain", "shard",
           "train_tokenizer", "tree_digest"]
