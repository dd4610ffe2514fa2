"""A pipeline run as MLflow shows it: its summary, parent-run description, headline metrics,
dataset inputs and source tags (shared by the pipeline and the sweep flows)."""

from __future__ import annotations

from typing import Any

from common import storage
from common.config import PipelineConfig

from .stages import Artifact


def scalars(d: dict[str, Any]) -> dict[str, Any]:
    """Numeric stats as flat names; a stage's echo of its own config is left to the params."""
    from .tracking import flat_metrics

    return {k: v for k, v in flat_metrics(d).items() if not k.startswith("config.")}


# --- tasks -----------------------------------------------------------------------------------------

# Errors that a retry would only repeat: bad input, bad config, missing or unwritable files.


# MLflow shows this tag as the run's description (markdown).
NOTE_TAG = "mlflow.note.content"
# Step curves copied from the pretrain run onto the parent run (the runs compared are parents).
CURVES = ("loss", "loss_masked", "loss_causal", "valid_loss_masked", "valid_loss_causal",
          "valid_loss_masked_ema", "valid_loss_causal_ema", "tokens_per_s", "words")
# The training numbers worth a column in the runs table (the rest stay on the pretrain child run).
HEADLINE_TRAINING = ("final.loss", "final.loss_masked", "final.loss_causal", "final.valid_loss_masked",
                     "final.valid_loss_causal", "words", "tokens", "steps")


def source_tags() -> dict[str, str]:
    """What the runs table's source column shows: the Prefect flow that ran the pipeline."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    name = ctx.flow.name if ctx and ctx.flow else "gptbert-pipeline"
    return {"mlflow.source.type": "JOB", "mlflow.source.name": f"prefect flow {name}"}


def dataset_inputs(config: PipelineConfig, arts: dict[str, Artifact]) -> list[dict[str, Any]]:
    """The corpus and the shard set as MLflow dataset inputs (digest, where, how big)."""
    out = []
    clean = arts.get("clean")
    if clean is not None:
        totals = clean.record.get("stats", {}).get("totals", {})
        out.append({"name": "corpus", "digest": clean.digest, "source": ", ".join(config.clean.inputs),
                    "profile": {k: totals[k] for k in ("documents_out", "words_in", "bytes_in") if k in totals}})
    shard = arts.get("shard")
    if shard is not None:
        splits = shard.record.get("stats", {}).get("splits", {})
        profile = {f"{split}.{k}": v for split, d in splits.items() for k, v in d.items()
                   if isinstance(v, (int, float))}
        out.append({"name": "shards", "digest": shard.digest, "source": shard.path, "profile": profile})
    return out


def headline_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The parent run's own metrics: duration and the final training numbers (its evaluation scores
    go through ``Tracker.log_evaluation``)."""
    training = summary.get("training") or {}
    out: dict[str, Any] = {"pipeline.duration_s": summary["duration_s"]}
    out.update({f"train.{k}": training[k] for k in HEADLINE_TRAINING if k in training})
    return out


def description(config: PipelineConfig, summary: dict[str, Any]) -> str:
    """The parent run's markdown description: what ran, from what, where the outputs are."""
    lines = [f"**{summary['run_name']}**: GPT-BERT pipeline run ({', '.join(summary['ran']) or 'nothing'} ran; "
             f"{', '.join(summary['cached']) or 'nothing'} reused from the cache).", "",
             f"Corpus: `{', '.join(config.clean.inputs)}`", "", "| stage | digest | cached | folder |",
             "|---|---|---|---|"]
    for stage, info in summary["stages"].items():
        lines.append(f"| {stage} | `{info['digest'][:12]}` | {'yes' if info['cached'] else 'no'} | `{info['path']}` |")
    reg = summary.get("registered")
    if reg:
        lines += ["", f"Registered model: `{reg['name']}` version {reg['version']} ({reg['alias'] or 'no alias'})."]
    return "\n".join(lines)


def run_summary(config, arts, parent, tracker, registered, duration) -> dict[str, Any]:
    """What a pipeline run returns (and the CLI prints): ids, where things are, each stage's
    identity, digest, cache state and stats, and the training and evaluation numbers."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    out: dict[str, Any] = {
        "flow_run_id": str(ctx.flow_run.id) if ctx and ctx.flow_run else None,
        "mlflow_run_id": parent,
        "tracking_uri": tracker.uri if tracker else None,
        "experiment_id": tracker.experiment_id if tracker else None,
        "workdir": storage.normalize(config.workdir),
        "stages": {},
        "cached": [k for k, a in arts.items() if a.cached],
        "ran": [k for k, a in arts.items() if not a.cached],
        "duration_s": round(duration, 2),
        "registered": registered,
    }
    for k, a in arts.items():
        out["stages"][k] = {"path": a.path, "identity": a.identity, "digest": a.digest, "cached": a.cached,
                            "duration_s": a.record.get("duration_s"), "mlflow_run_id": a.record.get("mlflow_run_id"),
                            "stats": scalars(a.record.get("stats", {}))}
    if "evaluate" in arts:
        from .tracking import evaluation_metrics

        out["evaluation"] = evaluation_metrics(arts["evaluate"].record)
    if "pretrain" in arts:
        out["training"] = scalars(arts["pretrain"].record.get("stats", {}))
    return out


__all__ = ["CURVES", "HEADLINE_TRAINING", "NOTE_TAG", "dataset_inputs", "description", "headline_metrics",
           "run_summary", "scalars", "source_tags"]
