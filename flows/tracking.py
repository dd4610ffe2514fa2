"""MLflow for the pipeline: one parent run per pipeline run, one child run per stage.

Everything goes through ``MlflowClient`` with explicit run ids (no fluent "active run" state), so
the same code works from Prefect task threads, from another process, and from rank 0 of a Ray
worker. The embedded default is a sqlite store plus a local artifact folder under the run root.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from common import storage
from common.config import PipelineConfig

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"


def resolve_tracking_uri(cfg: PipelineConfig) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else sqlite under the workdir (a workdir on an
    object store keeps this embedded store on the local disk: ``storage.local_home``)."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = storage.local_home(cfg.workdir) / "mlflow" / "mlflow.db"
    return f"sqlite:///{db}"


def default_artifact_root(cfg: PipelineConfig, uri: str) -> str | None:
    """An absolute artifact location for new experiments when the store is local: Ray workers run
    in other working folders, so a relative default would land inside Ray's session folder."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        return None  # the server decides (--artifacts-destination / --default-artifact-root)
    return (storage.local_home(cfg.workdir) / "mlflow" / "artifacts").as_uri()


def client_for(uri: str):
    """An MlflowClient for tracking and registry at ``uri`` (a sqlite store's folder is created)."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# MLflow 3's UI opens an experiment on the view its kind names; without the tag it guesses, and
# often lands on the GenAI views (traces), which this project never writes.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def ensure_experiment(client, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created with ``artifact_location`` when missing (race-safe),
    marked as a model-training experiment."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:
            # Two processes may race to create it; the loser reads the winner's.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):  # an experiment made by an older version
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def model_size_name(cfg: PipelineConfig) -> str:
    """The preset whose model shape the config uses (``mini``), else ``<layers>x<hidden>``."""
    from common.config import load_config, preset_names

    shape = lambda m: (m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size)  # noqa: E731
    for name in preset_names():
        if shape(load_config(preset=name).model) == shape(cfg.model):
            return name
    return f"{cfg.model.num_layers}x{cfg.model.hidden_size}"


def fraction_label(x: float) -> str:
    """A causal fraction as people write it: 0, 1/16, 1/2, 1."""
    from fractions import Fraction

    f = Fraction(x).limit_denominator(64)
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def _amount(n: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def run_name(cfg: PipelineConfig, started: float, words: float | None = None, until: str = "evaluate") -> str:
    """The parent run's name: ``tracking.run_name``, else model size, causal fraction, words seen
    (the planned tokens until training has counted words) and the start time."""
    if cfg.tracking.run_name.strip():
        return cfg.tracking.run_name.strip()
    tc = cfg.train
    seen = f"{_amount(words)} words" if words else \
        f"{_amount(tc.steps * (tc.batch_tokens_start + tc.batch_tokens_end) / 2)} tokens"
    parts = [model_size_name(cfg), f"causal {fraction_label(tc.causal_fraction)}", seen,
             time.strftime("%m-%d %H:%M", time.localtime(started))]
    if until != "evaluate":
        parts.append(f"until {until}")
    return " · ".join(parts)


def child_name(stage: str, parent_name: str | None) -> str:
    """A stage's child run name, ``<stage> · <parent name>``."""
    return f"{stage} · {parent_name}" if parent_name else stage


def _clean_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return float(value)
    return None


def flat_metrics(data: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as dotted metric names."""
    out: dict[str, float] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_metrics(v, key + "."))
        else:
            num = _numeric(v)
            if num is not None:
                out[_clean_key(key)] = num
    return out


# --- metric names ---------------------------------------------------------------------------------
# Metrics reach MLflow from four places: a stage's own numbers (``stage_metrics``: ``stage.<stat>``,
# cached, duration), the evaluation's scores (``evaluation_metrics``, under the names the tasks of
# gptbert.evaluation declare, and each word milestone's under ``milestone.`` at step = its words),
# the trainer's step metrics (``StepMetricsLogger``) and the loss curves copied onto the parent run
# (``Tracker.copy_history``). Each evaluation score goes through ``Tracker.log_evaluation`` only:
# on the evaluate run, the pipeline's parent run and a ratio-sweep trial's run.

MILESTONE_PREFIX = "milestone."


def stage_metrics(stage: str, stats: dict[str, Any], cached: bool, duration: float) -> dict[str, float]:
    """A stage run's own metrics: ``stage.<stat>`` for each numeric stat outside the stage's echo of
    its config, ``stage.cached`` and ``stage.duration_s`` (0 when cached). The evaluate stage's
    stats are its scores: they go through ``Tracker.log_evaluation`` under their own names."""
    own = {} if stage == "evaluate" else stats
    out = {f"stage.{k}": v for k, v in flat_metrics(own).items() if not k.startswith("config.")}
    out["stage.cached"] = float(cached)
    out["stage.duration_s"] = 0.0 if cached else duration
    return out


def evaluation_metrics(record: dict[str, Any]) -> dict[str, float]:
    """An evaluate stage record's scores as MLflow metrics: its stats (the names each task declares,
    ``gptbert.evaluation.summary_metrics``), finite numbers only."""
    return flat_metrics(record.get("stats", {}))


def milestone_metrics(results: dict[str, Any] | None) -> list[tuple[int, dict[str, float]]]:
    """``(words, {"milestone.<name>": value})`` for each word-milestone model of an evaluation's
    results (MLflow draws them as curves over the words seen)."""
    return [(int(m["words"]), {f"{MILESTONE_PREFIX}{k}": v for k, v in flat_metrics(m["metrics"]).items()})
            for m in (results or {}).get("milestones") or []]


class Tracker:
    """Thin wrapper: runs, params, metrics, tags, artifacts, by run id."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        self.uri = uri
        self.client = client_for(uri)
        self.experiment_id = ensure_experiment(self.client, experiment, artifact_location)

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> "Tracker":
        """A tracker for the config's tracking URI and experiment."""
        uri = resolve_tracking_uri(cfg)
        return cls(uri, cfg.tracking.experiment, default_artifact_root(cfg, uri))

    def start_run(self, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        """Create a run ``name`` (a child of ``parent_run_id`` if given) with ``tags``; return its id."""
        all_tags = {RUN_NAME_TAG: name, **(tags or {})}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def has_run(self, run_id: str | None) -> bool:
        """Whether this store holds run ``run_id`` (a record may name a run of another store: the
        same bucket-backed run root tracked by a team server and by a local sqlite file)."""
        from mlflow.exceptions import MlflowException

        if not run_id:
            return False
        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def run_name_of(self, run_id: str) -> str:
        """The display name of run ``run_id``."""
        return self.client.get_run(run_id).info.run_name

    def rename_family(self, parent_run_id: str, name: str) -> None:
        """Rename the parent run and its children (``<stage> · <name>``)."""
        self.client.update_run(parent_run_id, name=name)
        children = self.client.search_runs([self.experiment_id], f"tags.{PARENT_TAG} = '{parent_run_id}'",
                                           max_results=100)
        for child in children:
            stage = child.data.tags.get("gptbert.stage")
            if stage:
                self.client.update_run(child.info.run_id, name=child_name(stage, name))

    def log_datasets(self, run_id: str, datasets: list[dict[str, Any]]) -> None:
        """Log datasets as the run's MLflow inputs (the runs table's dataset column). Each dict:
        name, digest, source (a path or URI), context (training, evaluation) and a profile dict."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(name=d["name"], digest=d["digest"][:16], source_type="local",
                                       source=json.dumps({"uri": d["source"]}),
                                       profile=json.dumps(d.get("profile") or {})),
                               tags=[InputTag("mlflow.data.context", d.get("context", "training"))])
                  for d in datasets]
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)

    def copy_history(self, source_run_id: str, run_id: str, keys: list[str]) -> int:
        """Copy the step histories of metrics ``keys`` from one run to another (the loss curves onto
        the parent run, so that comparing parent runs overlays them); returns the points copied."""
        from mlflow.entities import Metric

        points = [Metric(key, m.value, m.timestamp, m.step) for key in keys
                  for m in self.client.get_metric_history(source_run_id, key)]
        for i in range(0, len(points), 1000):
            self.client.log_batch(run_id, metrics=points[i:i + 1000])
        return len(points)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark the run terminated with ``status``."""
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log ``params`` (keys sanitised, values as strings of at most 6000 characters)."""
        from mlflow.entities import Param

        items = [Param(_clean_key(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # the API takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
        """Log the numeric leaves of ``metrics`` under dotted names at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in flat_metrics(metrics).items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def log_evaluation(self, run_id: str, record: dict[str, Any], results: dict[str, Any] | None = None) -> None:
        """The one route of evaluation scores to MLflow: the evaluate stage ``record``'s metrics
        (``evaluation_metrics``) and, given its ``results``, each word milestone's at step = words."""
        self.log_metrics(run_id, evaluation_metrics(record))
        for words, metrics in milestone_metrics(results):
            self.log_metrics(run_id, metrics, step=words)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Set ``tags`` on the run (keys sanitised, values as strings)."""
        from mlflow.entities import RunTag

        items = [RunTag(_clean_key(k), str(v)) for k, v in tags.items()]
        if items:
            self.client.log_batch(run_id, tags=items)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a folder under ``artifact_path``; a missing path is skipped."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Log ``text`` as the run's artifact file ``artifact_file``."""
        self.client.log_text(run_id, text, artifact_file)


class StepMetricsLogger:
    """The trainer's ``callback(metrics, step)``: batches step metrics into ``log_batch`` calls.

    Picklable (only the URI, run id and a buffer travel), so Ray can ship it to rank 0 of a
    worker group; the client is created lazily in whichever process calls it. The buffer is
    flushed every ``every`` steps and at the last step, and by ``flush()`` from the driver.
    """

    def __init__(self, tracking_uri: str, run_id: str, every: int = 10, last_step: int | None = None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.every = max(1, every)
        self.last_step = last_step
        self._buffer: list = []
        self._client = None
        self.steps_logged = 0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    def __call__(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for k, v in flat_metrics(metrics).items():
            self._buffer.append(Metric(k, v, now, int(step)))
        self.steps_logged += 1
        at_end = self.last_step is not None and step >= self.last_step
        if self.steps_logged % self.every == 0 or at_end:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics to MLflow (batches of 1000), creating the client on first use; no-op when
        the buffer is empty."""
        if not self._buffer:
            return
        if self._client is None:
            self._client = client_for(self.tracking_uri)
        for i in range(0, len(self._buffer), 1000):
            self._client.log_batch(self.run_id, metrics=self._buffer[i:i + 1000])
        self._buffer = []


# --- registry ------------------------------------------------------------------------------------


def register_model(tracker: Tracker, name: str, run_id: str, artifact_path: str, score: float | None,
                   metric: str, mode: str, tags: dict[str, str], description: str | None = None) -> dict[str, Any]:
    """Register ``runs:/<run_id>/<artifact_path>`` as a new version of ``name``.

    Alias ``champion`` moves to it only when its score beats the current champion's (or there is
    none); otherwise it gets ``challenger``. Returns version, alias and both scores.
    """
    from mlflow.exceptions import MlflowException

    client = tracker.client
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="GPT-BERT models trained by the gptbert pipeline")
        except MlflowException:
            client.get_registered_model(name)  # created concurrently
    all_tags = {**tags, "champion_metric": metric}
    if score is not None:
        all_tags["score"] = repr(score)
    version = client.create_model_version(
        name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
        tags={k: str(v) for k, v in all_tags.items()}, description=description, await_creation_for=0)
    champion_score = None
    try:
        champ = client.get_model_version_by_alias(name, "champion")
        raw = champ.tags.get("score")
        champion_score = float(raw) if raw is not None else None
        has_champion = True
    except MlflowException:
        has_champion = False
    better = score is not None and (
        not has_champion or champion_score is None
        or (score > champion_score if mode == "max" else score < champion_score))
    alias = "champion" if better else "challenger"
    client.set_registered_model_alias(name, alias, version.version)
    return {"name": name, "version": int(version.version), "alias": alias, "score": score,
            "previous_champion_score": champion_score}
