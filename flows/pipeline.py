"""Prefect flows: one per stage, and ``pipeline`` chaining them; MLflow lineage for each.

Caching is artifact identity (``flows/artifacts.py``), not Prefect's result cache: a stage whose
folder for the same inputs + config is complete is skipped, in any process, and the skip shows in
the logs, the returned summary and the stage's MLflow tags (``gptbert.cached``). Tasks therefore use
``NO_CACHE`` and retry transient failures; pretraining resumes from its checkpoints on a retry.

A stage flow (``clean``, ``train-tokenizer``, ``shard``, ``pretrain``, ``export``, ``evaluate``) runs the
pipeline up to and including its stage: upstream stages are resolved through the same cache (a
no-op when they are done), so each stage can be deployed and triggered on its own.

MLflow: one parent run per flow run, a nested child run per stage (params: that stage's config;
metrics: stage stats, the trainer's step metrics, evaluation; artifacts: stats, tokenizer.json,
the shard manifest, model folder, the exported transformers folder, results, plots). Tags link
Prefect and MLflow both ways and carry the lineage digests.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from common import storage
from common.artifacts import STAGES, update_record
from common.config import PipelineConfig, dump_yaml, flatten, load_config
from common.errors import error_line

from . import events, stages
from .stages import Artifact
from .summary import CURVES, NOTE_TAG, dataset_inputs, description, headline_metrics, run_summary, scalars, source_tags
from .tracking import stage_metrics

def prefect_ids() -> dict[str, str]:
    """Tags naming the current Prefect flow run and task run (for the MLflow runs they create)."""
    from prefect.context import FlowRunContext, TaskRunContext

    ids = {}
    flow_ctx = FlowRunContext.get()
    if flow_ctx and flow_ctx.flow_run:
        ids["prefect.flow_run_id"] = str(flow_ctx.flow_run.id)
        ids["prefect.flow_run_name"] = str(flow_ctx.flow_run.name)
    task_ctx = TaskRunContext.get()
    if task_ctx and task_ctx.task_run:
        ids["prefect.task_run_id"] = str(task_ctx.task_run.id)
    return ids


def tracker_for(config: PipelineConfig):
    """The MLflow ``Tracker`` of ``config`` (None when tracking is off)."""
    if not config.tracking.enabled:
        return None
    from .tracking import Tracker

    return Tracker.from_config(config)


def _child_name(tracker, stage: str, parent_run_id: Optional[str]) -> str:
    from .tracking import child_name

    return child_name(stage, tracker.run_name_of(parent_run_id) if parent_run_id else None)


def _call(fresh_process: bool, fn, *args, in_parent: tuple[str, ...] = (), **kwargs):
    """``fn(*args, **kwargs)``, in a new process when ``fresh_process`` (``flows.isolation``), the
    keyword arguments named in ``in_parent`` (callbacks: the step-metrics logger) running here."""
    if fresh_process:
        from .isolation import InParent, in_fresh_process

        kwargs = {k: InParent(v) if k in in_parent and v is not None else v for k, v in kwargs.items()}
        return in_fresh_process(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def _run_stage_tracked(stage: str, config: PipelineConfig, parent_run_id: Optional[str], run) -> Artifact:
    """Open the stage's child run, run ``run(child_run_id)``, log what the stage produced."""
    logger = get_run_logger()
    events.emit("stage_started", stage=stage)
    tracker = tracker_for(config)
    child = None
    if tracker is not None:
        child = tracker.start_run(_child_name(tracker, stage, parent_run_id), parent_run_id,
                                  tags={"gptbert.stage": stage, **prefect_ids()})
        params = {}
        for section in stages.stage_info(stage).sections:
            params.update(flatten(getattr(config, section), f"{section}."))
        tracker.log_params(child, params)
    try:
        started = time.perf_counter()
        artifact: Artifact = run(child)
        duration = time.perf_counter() - started  # stage records hold no duration
        if artifact.cached:
            logger.info("stage %s: cached, skipped (identity %s, folder %s)", stage, artifact.identity[:16],
                        artifact.path)
        else:
            logger.info("stage %s: ran in %.1f s (identity %s, folder %s)", stage, duration,
                        artifact.identity[:16], artifact.path)
        if tracker is not None:
            _log_stage(tracker, child, stage, artifact, duration)
            if not artifact.cached:
                artifact.record = update_record(artifact.path, mlflow_run_id=child)
            tracker.end_run(child)
        events.emit("stage_finished", stage=stage, cached=artifact.cached, path=artifact.path,
                    duration_s=0.0 if artifact.cached else duration)
        return artifact
    except BaseException as exc:
        events.emit("stage_failed", stage=stage, error=error_line(exc))
        if tracker is not None and child is not None:
            tracker.end_run(child, "FAILED")
        raise


def _log_stage(tracker, run_id: str, stage: str, artifact: Artifact, duration: float) -> None:
    rec = artifact.record
    tags = {
        "gptbert.cached": str(artifact.cached).lower(),
        "gptbert.identity": artifact.identity,
        "gptbert.digest": artifact.digest,
        "gptbert.path": artifact.path,
    }
    tags.update({f"gptbert.input.{k}": v for k, v in rec.get("inputs", {}).items()})
    if artifact.cached and rec.get("mlflow_run_id"):
        tags["gptbert.source_run_id"] = rec["mlflow_run_id"]
    milestones = rec.get("stats", {}).get("milestones")
    if milestones:  # the BabyLM word milestones reached (pretrain) or exported (export)
        tags["gptbert.milestones"] = ",".join(milestones)
    tracker.set_tags(run_id, tags)
    tracker.log_metrics(run_id, stage_metrics(stage, rec.get("stats", {}), artifact.cached, duration))
    # Only the files logged here are fetched of a remote folder (not its shards or checkpoints).
    files = stages.stage_info(stage).files
    folder = artifact.local(files) if files else None
    for name in files:
        path = folder / name
        if path.exists():
            tracker.log_artifact(run_id, path, stage)
    tracker.log_text(run_id, json.dumps(rec, indent=2, sort_keys=True, default=str), f"{stage}/stage.json")


PERMANENT_ERRORS = (ValueError, LookupError, FileNotFoundError, PermissionError, IsADirectoryError,
                    NotADirectoryError, FileExistsError)


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry a failed stage unless its error is permanent (a retry of bad
    input or config would fail the same way, after the same wait)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001  (an unreadable result: retry, as Prefect would)
            return True
    return not isinstance(exc, PERMANENT_ERRORS)



@task(name="clean", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)
def clean_task(config: PipelineConfig, parent_run_id: Optional[str] = None) -> Artifact:
    """Prefect task: the clean stage (cached by identity), tracked as a child MLflow run."""
    return _run_stage_tracked("clean", config, parent_run_id, lambda _: stages.clean(config))


@task(name="train-tokenizer", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)
def tokenizer_task(config: PipelineConfig, corpus: Artifact, parent_run_id: Optional[str] = None) -> Artifact:
    """Prefect task: train the tokenizer on the cleaned corpus, tracked as a child MLflow run."""
    return _run_stage_tracked("tokenizer", config, parent_run_id,
                              lambda _: stages.train_tokenizer(config, corpus))


@task(name="shard", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)
def shard_task(config: PipelineConfig, corpus: Artifact, tokenizer: Artifact,
               parent_run_id: Optional[str] = None) -> Artifact:
    """Prefect task: encode the corpus into token shards, tracked as a child MLflow run."""
    return _run_stage_tracked("shard", config, parent_run_id,
                              lambda _: stages.shard(config, corpus, tokenizer))


# Idempotent: the stage folder keeps checkpoints, so a retry resumes where the failed try stopped.
@task(name="pretrain", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)
def pretrain_task(config: PipelineConfig, shards: Artifact, tokenizer: Artifact,
                  parent_run_id: Optional[str] = None, fresh_process: bool = False) -> Artifact:
    """Prefect task: pretrain on the shards (resuming from checkpoints), tracked as a child MLflow run
    with the step metrics, the model folder and the loss curves. ``fresh_process``: the training
    itself runs in a new process (``flows.isolation``; a sweep's trials), the tracking here."""
    def run(child: Optional[str]) -> Artifact:
        callback = None
        if child is not None:
            from .tracking import StepMetricsLogger, resolve_tracking_uri

            callback = StepMetricsLogger(resolve_tracking_uri(config), child, config.tracking.log_every,
                                         last_step=config.train.steps)
        # The plain loop calls the logger in the training process: from a fresh one, its calls come back
        # here (that process then needs no MLflow); a Ray run ships it to its rank-0 worker as before.
        artifact = _call(fresh_process, stages.pretrain, config, shards, tokenizer, callback=callback,
                         in_parent=("callback",) if config.launch.backend == "local" else ())
        if callback is not None:
            tracker = tracker_for(config)
            model_dir = artifact.local(stages.RUN_PARTS) / "model"
            recorded = artifact.record.get("mlflow_run_id")
            known = tracker.has_run(recorded)  # False also for a run of another tracking store
            if not artifact.cached or not known:
                tracker.log_artifact(child, model_dir, "model")
                if artifact.cached and not recorded:  # first time this model is tracked: this run is its source
                    artifact.record = update_record(artifact.path, mlflow_run_id=child)
            # Loss curves from the run that trained the model (this one, or the cached source).
            source = recorded if artifact.cached and known else child
            # The figure goes beside the run folder's files (for a remote run: its local home).
            _log_loss_plot(tracker, child, source, storage.local_home(artifact.path))
            if parent_run_id:
                curves = [k for k in tracker.client.get_run(source).data.metrics if k in CURVES]
                tracker.copy_history(source, parent_run_id, curves)
        return artifact

    return _run_stage_tracked("pretrain", config, parent_run_id, run)


def _log_loss_plot(tracker, run_id: str, source_run_id: str, folder: Path) -> None:
    from .plots import plot_loss_curves

    png = folder / "loss_curves.png"
    tmp = folder / ".loss_curves.tmp.png"
    if plot_loss_curves(tracker.client, source_run_id, tmp):
        tmp.replace(png)
    if png.exists():
        tracker.log_artifact(run_id, png, "pretrain")


@task(name="export", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)
def export_task(config: PipelineConfig, model: Artifact, parent_run_id: Optional[str] = None) -> Artifact:
    """Prefect task: export the model (and its word milestones) as a ``transformers`` folder, tracked as
    a child MLflow run with the folder as its ``hf`` artifact (what a user downloads to share)."""
    def run(child: Optional[str]) -> Artifact:
        artifact = stages.export(config, model)
        if child is not None and (not artifact.cached or not artifact.record.get("mlflow_run_id")):
            tracker_for(config).log_artifact(child, artifact.local(), "hf")
            if artifact.cached:
                artifact.record = update_record(artifact.path, mlflow_run_id=child)
        return artifact

    return _run_stage_tracked("export", config, parent_run_id, run)


def export_available(config: PipelineConfig) -> Optional[str]:
    """Why the export stage cannot run here (None when it can)."""
    from common.artifacts import DataError
    from gptbert.export import require_transformers

    if not config.export.enabled:
        return "export.enabled is false"
    try:
        require_transformers()
    except DataError as exc:
        return str(exc)
    return None


@task(name="evaluate", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)
def evaluate_task(config: PipelineConfig, model: Artifact, parent_run_id: Optional[str] = None,
                  fresh_process: bool = False) -> Artifact:
    """Prefect task: evaluate the model (recipe §6), tracked as a child MLflow run with its metrics;
    ``fresh_process`` as for ``pretrain_task``."""
    def run(child: Optional[str]) -> Artifact:
        from .plots import evaluation_figures

        artifact = _call(fresh_process, stages.evaluate, config, model, after=evaluation_figures)
        if child is not None:
            # The scores, and each word milestone's with its words as the step (learning curves).
            results = json.loads(Path(artifact.file("results.json")).read_text())
            tracker_for(config).log_evaluation(child, artifact.record, results)
        return artifact

    return _run_stage_tracked("evaluate", config, parent_run_id, run)


@task(name="submission", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)
def submission_task(config: PipelineConfig, model: Artifact, parent_run_id: Optional[str] = None) -> Artifact:
    """Prefect task: the BabyLM submission (``submission.data_dir``), tracked as a child MLflow run:
    the collated file as an artifact, the per-task scores as metrics (``stage.submission.<task>``)."""
    def run(child: Optional[str]) -> Artifact:
        artifact = stages.submission(config, model)
        tracker = tracker_for(config)
        if tracker is not None and child is not None:
            summary = json.loads(Path(artifact.file("summary.json")).read_text())
            tracker.log_artifact(child, artifact.file(summary["file"]), "submission")
        return artifact

    return _run_stage_tracked("submission", config, parent_run_id, run)


@task(name="register-model", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)
def register_task(config: PipelineConfig, model: Artifact, evaluation: Artifact,
                  parent_run_id: Optional[str] = None) -> Optional[dict]:
    """Register the model once per model digest; move `champion` only when it scores better."""
    tracker = tracker_for(config)
    name = config.tracking.registered_model
    if tracker is None or not name:
        return None
    logger = get_run_logger()
    source_run = model.record.get("mlflow_run_id")
    if not source_run:
        return None
    if not tracker.has_run(source_run):
        logger.info("model %s was tracked by another tracking store (run %s); not registered in this one",
                    model.digest[:12], source_run)
        return None
    events.emit("stage_started", stage="register")
    existing = [v for v in tracker.client.search_model_versions(f"name='{name}'")
                if v.tags.get("model_digest") == model.digest]
    if existing:
        # Search results leave the aliases out: read the version itself.
        v = tracker.client.get_model_version(name, existing[0].version)
        aliases = sorted(getattr(v, "aliases", []) or [])
        logger.info("model %s already registered as %s version %s %s", model.digest[:12], name, v.version, aliases)
        events.emit("stage_finished", stage="register", cached=True, duration_s=0.0, path=f"{name} v{v.version}")
        return {"name": name, "version": int(v.version), "alias": aliases[0] if aliases else None,
                "score": float(v.tags["score"]) if "score" in v.tags else None, "new": False}
    from .tracking import register_model

    metric = config.tracking.champion_metric
    score = evaluation.record.get("stats", {}).get(metric)
    if score is None:
        score = scalars(evaluation.record.get("stats", {})).get(metric)
    if score is None:
        logger.warning("champion metric %r not in the evaluation (%s); registering without a score", metric,
                       ", ".join(sorted(scalars(evaluation.record.get("stats", {})))))
    tags = {"model_digest": model.digest, "evaluation_digest": evaluation.digest,
            "data_digest": model.record.get("inputs", {}).get("data", ""),
            "pipeline_run_id": parent_run_id or ""}
    info = register_model(tracker, name, source_run, "model", score, metric, config.tracking.champion_mode,
                          tags, description=_version_description(metric, score, model, evaluation, parent_run_id))
    logger.info("registered %s version %s with alias %s (score %s, previous champion %s)", name,
                info["version"], info["alias"], score, info["previous_champion_score"])
    events.emit("stage_finished", stage="register", cached=False, duration_s=0.0,
                path=f"{name} v{info['version']}")
    return {**info, "new": True}


def _version_description(metric: str, score: Optional[float], model: Artifact, evaluation: Artifact,
                         parent_run_id: Optional[str]) -> str:
    """A registered version's description: what a reviewer checks before promoting it."""
    stats = model.record.get("stats", {})
    final = stats.get("final", {}) if isinstance(stats.get("final"), dict) else {}
    lines = [f"GPT-BERT model {model.digest[:12]}, trained {stats.get('steps', '?')} steps on "
             f"{stats.get('words', '?')} words ({stats.get('tokens', '?')} tokens) of shard set "
             f"{model.record.get('inputs', {}).get('data', '?')[:12]}.",
             f"{metric}: {score if score is not None else 'not measured'}"
             + (f"; final loss {final['loss']:.4f}" if isinstance(final.get("loss"), (int, float)) else ""),
             f"Pipeline run: {parent_run_id or '-'}; pretrain run: {model.record.get('mlflow_run_id', '-')}; "
             f"evaluation {evaluation.digest[:12]}."]
    return "\n\n".join(lines)


# --- flows -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def temporary_server_scope():
    """Stop, on leaving, the temporary Prefect server that a flow called inside started (when no
    PREFECT_API_URL is set), now rather than at interpreter exit, where it logs after the command's
    own output. Servers that were running before (a test harness's) are left alone."""
    from prefect.server.api.server import SubprocessASGIServer

    before = set(map(id, SubprocessASGIServer._instances.values()))  # one per port; usually none
    try:
        yield
    finally:
        started = [s for s in list(SubprocessASGIServer._instances.values()) if id(s) not in before]
        if started:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            # Logs and events still queued for the server go first (else they fail, loudly, at exit).
            for worker in (APILogWorker, EventsWorker):
                worker.drain_all(timeout=10)
            for server in started:
                server.stop()


def resolve_config(config: Optional[PipelineConfig], config_file: Optional[str], demo_data: bool) -> PipelineConfig:
    """A flow's PipelineConfig from its parameters: ``config`` (or a dict of it), else the YAML
    ``config_file``, else the defaults; ``demo_data`` fills in the generated grammar data."""
    if config is None:
        config = load_config(path=config_file) if config_file else PipelineConfig()
    elif isinstance(config, dict):  # a caller that bypassed Prefect's parameter validation
        from common.config import from_dict

        config = from_dict(PipelineConfig, config)
    if demo_data:
        from .demo import with_demo_data

        config = with_demo_data(config)
    return config


def link_prefect(mlflow_run_id: str, uri: str, experiment_id: str) -> None:
    """Show the MLflow run on the Prefect flow run: a markdown artifact and a tag."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    create_markdown_artifact(
        key="mlflow-run",
        markdown=(f"# MLflow\n\n- run id: `{mlflow_run_id}`\n- experiment id: `{experiment_id}`\n"
                  f"- tracking URI: `{uri}`\n"),
        description="MLflow parent run of this pipeline run",
    )
    ctx = FlowRunContext.get()
    if ctx and ctx.flow_run:
        try:
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                tags = sorted(set(ctx.flow_run.tags or []) | {f"mlflow_run_id:{mlflow_run_id}"})
                client.update_flow_run(ctx.flow_run.id, tags=tags)
        except Exception as exc:  # the markdown artifact already carries the link
            get_run_logger().warning("could not tag the flow run with the MLflow run id: %s", exc)


def run_pipeline(config: PipelineConfig, until: str = "evaluate", register: bool = True) -> dict[str, Any]:
    """The body shared by every flow: stages up to ``until``, tracked under one MLflow parent run."""
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r} (known: {', '.join(STAGES)})")
    logger = get_run_logger()
    start = time.time()
    want = STAGES[: STAGES.index(until) + 1]
    if "evaluate" in want:  # unknown tasks, eval.device's CUDA missing: one line before the first stage
        from gptbert.evaluation import preflight

        preflight(config.eval)
    tracker = tracker_for(config)
    parent = None
    if tracker is not None:
        from .tracking import run_name

        parent = tracker.start_run(run_name(config, start, until=until),
                                   tags={"gptbert.until": until, **source_tags(), **prefect_ids()})
        tracker.log_params(parent, flatten(config))
        tracker.log_text(parent, dump_yaml(config), "config.yaml")
        link_prefect(parent, tracker.uri, tracker.experiment_id)
        logger.info("MLflow parent run %s (experiment %s, %s)", parent, tracker.experiment_id, tracker.uri)
    try:
        arts: dict[str, Artifact] = {}
        arts["clean"] = clean_task(config, parent)
        if "tokenizer" in want:
            arts["tokenizer"] = tokenizer_task(config, arts["clean"], parent)
        if "shard" in want:
            arts["shard"] = shard_task(config, arts["clean"], arts["tokenizer"], parent)
        if tracker is not None:
            tracker.log_datasets(parent, dataset_inputs(config, arts))
        if "pretrain" in want:
            arts["pretrain"] = pretrain_task(config, arts["shard"], arts["tokenizer"], parent)
        if "export" in want:
            skip = export_available(config)
            if skip is None:
                arts["export"] = export_task(config, arts["pretrain"], parent)
            else:
                logger.warning("export stage skipped: %s", skip)
                events.emit("stage_skipped", stage="export", reason=skip)
        if "evaluate" in want:
            arts["evaluate"] = evaluate_task(config, arts["pretrain"], parent)
        if "evaluate" in want and config.submission.data_dir:
            arts["submission"] = submission_task(config, arts["pretrain"], parent)
        registered = None
        if register and "evaluate" in want:
            registered = register_task(config, arts["pretrain"], arts["evaluate"], parent)
        summary = run_summary(config, arts, parent, tracker, registered, time.time() - start)
        if tracker is not None:
            from .tracking import run_name

            words = (summary.get("training") or {}).get("words")
            summary["run_name"] = run_name(config, start, words=words, until=until)
            if "pretrain" in summary["cached"]:  # a rerun that trained nothing: say so in its name
                summary["run_name"] += " · cached"
            tracker.rename_family(parent, summary["run_name"])
            lineage = {f"gptbert.lineage.{k}": a.digest for k, a in arts.items()}
            lineage["gptbert.cached_stages"] = ",".join(summary["cached"]) or "-"
            lineage["gptbert.ran_stages"] = ",".join(summary["ran"]) or "-"
            if registered:
                lineage["gptbert.registered_version"] = str(registered["version"])
                lineage["gptbert.registered_alias"] = str(registered["alias"])
            lineage[NOTE_TAG] = description(config, summary)
            tracker.set_tags(parent, lineage)
            tracker.log_metrics(parent, headline_metrics(summary))
            if "evaluate" in arts:
                tracker.log_evaluation(parent, arts["evaluate"].record)
            tracker.log_text(parent, json.dumps(summary, indent=2, default=str), "summary.json")
            tracker.end_run(parent)
        logger.info("pipeline done in %.1f s: ran %s; cached %s", summary["duration_s"],
                    ", ".join(summary["ran"]) or "nothing", ", ".join(summary["cached"]) or "nothing")
        return summary
    except BaseException:
        if tracker is not None and parent is not None:
            tracker.end_run(parent, "FAILED")
        raise


def _flow(name: str, until: str, description: str):
    @flow(name=name, description=description, log_prints=True, validate_parameters=True)
    def stage_flow(config: Optional[PipelineConfig] = None, config_file: Optional[str] = None,
                   demo_data: bool = False) -> dict[str, Any]:
        cfg = resolve_config(config, config_file, demo_data)
        return run_pipeline(cfg, until=until)

    stage_flow.__name__ = name.replace("-", "_")
    return stage_flow


pipeline = _flow("gptbert-pipeline", "evaluate",
                 "Clean -> tokenizer -> shards -> pretrain -> export -> evaluate -> register, cached by artifact identity")
clean_flow = _flow("gptbert-clean", "clean", "Clean the raw corpus into documents.parquet")
tokenizer_flow = _flow("gptbert-train-tokenizer", "tokenizer", "Train the byte-level BPE tokenizer (and upstream)")
shard_flow = _flow("gptbert-shard", "shard", "Tokenize into Arrow shards (and upstream)")
pretrain_flow = _flow("gptbert-pretrain", "pretrain", "Pretrain GPT-BERT (and upstream); resumes from checkpoints")
export_flow = _flow("gptbert-export", "export", "Export the model as a transformers folder (and upstream)")
evaluate_flow = _flow("gptbert-evaluate", "evaluate", "Evaluate on BLiMP-format minimal pairs (and upstream)")

FLOWS = {"pipeline": pipeline, "clean": clean_flow, "tokenizer": tokenizer_flow, "shard": shard_flow,
         "pretrain": pretrain_flow, "export": export_flow, "evaluate": evaluate_flow}

__all__ = ["FLOWS", "STAGES", "clean_flow", "evaluate_flow", "export_available", "export_flow", "export_task", "pipeline", "pretrain_flow", "run_pipeline",
           "shard_flow", "temporary_server_scope", "tokenizer_flow"]
