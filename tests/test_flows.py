"""Flows: MLflow lineage and registry, the pipeline end to end (the stage cache: test_artifacts.py).

The slow tests run the real
pipeline in Prefect's test harness (a session-scoped temporary server, PREFECT_HOME in a tmp dir)
with MLflow on sqlite in a tmp dir.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

def test_tracking_config_and_uri(tmp_path, monkeypatch):
    from common.config import ConfigError, load_config
    from flows.tracking import default_artifact_root, resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(overrides=[f"workdir={tmp_path}"])
    uri = resolve_tracking_uri(cfg)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    assert default_artifact_root(cfg, uri) == (tmp_path.resolve() / "mlflow" / "artifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(cfg) == "http://127.0.0.1:5000"
    assert default_artifact_root(cfg, "http://127.0.0.1:5000") is None
    with pytest.raises(ConfigError, match="tracking.log_every"):
        load_config(overrides=["tracking.log_every=0"])


# --- MLflow helpers on a real sqlite store -------------------------------------------------------


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    from flows.tracking import Tracker

    root = tmp_path_factory.mktemp("mlflow")
    return Tracker(f"sqlite:///{root}/mlflow.db", "unit", (root / "artifacts").as_uri())


@pytest.mark.slow
def test_step_logger_batches_and_pickles(tracker):
    from flows.tracking import StepMetricsLogger

    run = tracker.start_run("steps")
    logger = StepMetricsLogger(tracker.uri, run, every=10, last_step=23)
    logger({"loss": 5.0, "loss_masked": 5.5, "note": "text is skipped"}, 1)
    assert tracker.client.get_metric_history(run, "loss") == []  # still buffered
    logger = pickle.loads(pickle.dumps(logger))  # what Ray does to ship it to a worker
    for step in range(2, 24):
        logger({"loss": 5.0 - step * 0.1, "loss_masked": 5.5}, step)
    hist = tracker.client.get_metric_history(run, "loss")
    assert sorted(m.step for m in hist) == list(range(1, 24))  # flushed at 10, 20 and the last step
    assert "note" not in tracker.client.get_run(run).data.metrics


@pytest.mark.slow
def test_champion_moves_only_to_a_better_model(tracker):
    from flows.tracking import register_model

    run = tracker.start_run("models")
    tracker.log_text(run, "weights", "model/weights.txt")
    got = [register_model(tracker, "unit-model", run, "model", s, "acc", "max", {"model_digest": str(i)})
           for i, s in enumerate([0.6, 0.5, 0.7, 0.7])]
    assert [g["alias"] for g in got] == ["champion", "challenger", "champion", "challenger"]
    assert [g["version"] for g in got] == [1, 2, 3, 4]
    client = tracker.client
    assert str(client.get_model_version_by_alias("unit-model", "champion").version) == "3"
    assert str(client.get_model_version_by_alias("unit-model", "challenger").version) == "4"
    assert client.get_model_version("unit-model", "1").source == f"runs:/{run}/model"


# --- the pipeline end to end (Prefect test harness + MLflow sqlite) ------------------------------


STEPS = 4


def _test_overrides(*extra: str) -> list[str]:
    return [
        # A few tiny steps: this checks plumbing, not learning (the demo shows learning).
        f"train.steps={STEPS}", "train.checkpoint_every=2", "train.validate_every=2", "train.valid_examples=8",
        "train.batch_tokens_start=512", "train.batch_tokens_end=512", "train.micro_batch_tokens=512",
        "launch.num_workers=1", "eval.max_pairs_per_paradigm=10", "eval.temperatures=[1.0, 2.0]",
        "tracking.log_every=5", "tracking.experiment=flows-test", "tracking.registered_model=flows-test",
        "train.word_milestones=[0.001]", *extra,
    ]


def _test_config(workdir: Path, *extra: str):
    from flows.demo import demo_config, with_demo_data

    return with_demo_data(demo_config(str(workdir), _test_overrides(*extra)))


def _runs(client, experiment_id: str, parent: str):
    runs = client.search_runs([experiment_id], max_results=500)
    return {r.data.tags["gptbert.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}


@pytest.mark.slow
def test_pipeline_end_to_end_then_cached_then_partial_rerun(prefect_harness, tmp_path, capfd):
    from prefect.client.orchestration import get_client

    from flows.pipeline import STAGES, pipeline
    from flows.tracking import client_for

    cfg = _test_config(tmp_path / "run")
    first = pipeline(config=cfg)
    assert first["ran"] == list(STAGES) and first["cached"] == []
    client = client_for(first["tracking_uri"])
    assert first["tracking_uri"] == f"sqlite:///{(tmp_path / 'run').resolve()}/mlflow/mlflow.db"

    # One parent run linked to the Prefect flow run both ways, one child per stage.
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.data.tags["prefect.flow_run_id"] == first["flow_run_id"]
    assert parent.data.params["train.steps"] == str(STEPS)
    assert parent.data.params["tokenizer.vocab_size"] == str(cfg.tokenizer.vocab_size)
    with get_client(sync_client=True) as pc:
        flow_run = pc.read_flow_run(first["flow_run_id"])
    assert f"mlflow_run_id:{first['mlflow_run_id']}" in flow_run.tags
    children = _runs(client, first["experiment_id"], first["mlflow_run_id"])
    assert sorted(children) == sorted(STAGES)
    for stage, run in children.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["gptbert.cached"] == "false"
        assert run.data.tags["gptbert.digest"] == first["stages"][stage]["digest"]
        assert run.data.tags["prefect.flow_run_id"] == first["flow_run_id"]
    # Lineage: each stage's inputs are the digests of the stage before it.
    tags = {s: children[s].data.tags for s in STAGES}
    assert tags["tokenizer"]["gptbert.input.corpus"] == first["stages"]["clean"]["digest"]
    assert tags["shard"]["gptbert.input.tokenizer"] == first["stages"]["tokenizer"]["digest"]
    assert tags["pretrain"]["gptbert.input.data"] == first["stages"]["shard"]["digest"]
    assert tags["pretrain"]["gptbert.input.tokenizer"] == first["stages"]["tokenizer"]["digest"]
    assert tags["evaluate"]["gptbert.input.model"] == first["stages"]["pretrain"]["digest"]
    for stage in STAGES:
        assert parent.data.tags[f"gptbert.lineage.{stage}"] == first["stages"][stage]["digest"]

    # The runs table tells runs apart: a name from model size, causal fraction, words and time; children
    # named after it; a description with the lineage; headline metrics and the datasets on the parent.
    name = first["run_name"]
    assert parent.info.run_name == name and name.startswith("mini · causal 1/4 · ") and " words · " in name
    assert all(run.info.run_name == f"{stage} · {name}" for stage, run in children.items())
    assert parent.data.tags["mlflow.note.content"].startswith(f"**{name}**")
    assert parent.data.tags["mlflow.source.name"] == "prefect flow gptbert-pipeline"
    assert client.get_experiment(first["experiment_id"]).tags["mlflow.experimentKind"] == "custom_model_development"
    parent_metrics = client.get_run(first["mlflow_run_id"]).data.metrics
    assert parent_metrics["train.words"] == first["training"]["words"]
    assert parent_metrics["train.final.loss"] == first["training"]["final.loss"]
    datasets = {d.dataset.name: d for d in parent.inputs.dataset_inputs}
    assert sorted(datasets) == ["corpus", "shards"]
    assert datasets["corpus"].dataset.digest == first["stages"]["clean"]["digest"][:16]
    assert datasets["shards"].dataset.digest == first["stages"]["shard"]["digest"][:16]
    assert json.loads(datasets["corpus"].dataset.profile)["documents_out"] > 0

    # The trainer's per-step metrics reached the pretrain child run, every step.
    pre = children["pretrain"].info.run_id
    assert sorted(m.step for m in client.get_metric_history(pre, "loss")) == list(range(1, STEPS + 1))
    # ... and onto the parent, so that comparing parent runs overlays their loss curves.
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(first["mlflow_run_id"], "loss"),
                                                key=lambda m: m.step)] == \
        [(m.step, m.value) for m in sorted(client.get_metric_history(pre, "loss"), key=lambda m: m.step)]
    # Each stage that ran logged how long it took.
    for stage, run in children.items():
        assert run.data.metrics["stage.duration_s"] > 0, stage
    # Evaluation results are metrics of the evaluate run and of the parent.
    ev = children["evaluate"].data.metrics
    for mode in cfg.eval.modes:
        assert 0.0 <= ev[f"blimp.{mode}.best_accuracy"] <= 1.0
        assert client.get_run(first["mlflow_run_id"]).data.metrics[f"blimp.{mode}.best_accuracy"] == \
            ev[f"blimp.{mode}.best_accuracy"]

    def artifacts(run_id: str, path: str | None = None) -> set[str]:
        return {a.path for a in client.list_artifacts(run_id, path)}

    assert "config.yaml" in artifacts(first["mlflow_run_id"])
    assert "clean/stage.json" in artifacts(children["clean"].info.run_id, "clean")
    assert "tokenizer/tokenizer.json" in artifacts(children["tokenizer"].info.run_id, "tokenizer")
    assert "shard/manifest.json" in artifacts(children["shard"].info.run_id, "shard")
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json", "model/training.json"} <= \
        artifacts(pre, "model")
    assert "pretrain/loss_curves.png" in artifacts(pre, "pretrain")
    exported = {a.path for a in client.list_artifacts(children["export"].info.run_id, "hf")}
    assert {"hf/model.safetensors", "hf/config.json", "hf/modeling_gptbert.py", "hf/tokenizer.json",
            "hf/chck_0.001M"} <= exported
    assert tags["pretrain"]["gptbert.milestones"] == tags["export"]["gptbert.milestones"] == "chck_0.001M"
    assert first["training"]["words"] >= 1000
    assert tags["export"]["gptbert.input.model"] == first["stages"]["pretrain"]["digest"]
    assert {"evaluate/results.json", "evaluate/by_phenomenon.png", "evaluate/report.md",
            "evaluate/milestones.png"} <= artifacts(children["evaluate"].info.run_id, "evaluate")
    # The milestone model was scored; MLflow holds its numbers at step = its word count.
    history = client.get_metric_history(children["evaluate"].info.run_id, "milestone.blimp.causal.t1_accuracy")
    assert [m.step for m in history] == [1000] and 0.0 <= history[0].value <= 1.0

    # Registered: version 1, the first model is the champion.
    reg = first["registered"]
    assert reg["new"] and reg["version"] == 1 and reg["alias"] == "champion"
    v1 = client.get_model_version_by_alias("flows-test", "champion")
    assert str(v1.version) == "1" and v1.tags["model_digest"] == first["stages"]["pretrain"]["digest"]
    assert v1.source == f"runs:/{pre}/model"
    assert v1.tags["data_digest"] == first["stages"]["shard"]["digest"]
    assert v1.tags["pipeline_run_id"] == first["mlflow_run_id"]
    assert "blimp.fused.best_accuracy" in v1.description and first["mlflow_run_id"] in v1.description

    # Same inputs again, through the CLI (`gptbert demo --json` on the same config): every stage
    # is skipped, and MLflow says so.
    from cli.main import main

    capfd.readouterr()
    argv = ["demo", "--workdir", str(tmp_path / "run"), "--json"]
    for item in _test_overrides():
        argv += ["--set", item]
    assert main(argv) == 0
    captured = capfd.readouterr()
    second = json.loads(captured.out)  # stdout holds the JSON document and nothing else
    assert second["cached"] == list(STAGES) and second["ran"] == []
    # The stage list went to stderr; the libraries' output to the log file under the run root.
    assert "pretrain               cached" in captured.err and "register model         cached" in captured.err
    assert Path(second["log"]).parent == (tmp_path / "run" / "logs").resolve() and Path(second["log"]).is_file()
    assert second["run_name"].endswith(" · cached")
    assert second["mlflow_run_id"] != first["mlflow_run_id"]
    assert {s: second["stages"][s]["digest"] for s in STAGES} == \
        {s: first["stages"][s]["digest"] for s in STAGES}
    parent2 = client.get_run(second["mlflow_run_id"])
    assert parent2.data.tags["gptbert.cached_stages"] == ",".join(STAGES)
    children2 = _runs(client, second["experiment_id"], second["mlflow_run_id"])
    for stage in STAGES:
        assert children2[stage].data.tags["gptbert.cached"] == "true"
        assert children2[stage].data.tags["gptbert.source_run_id"] == children[stage].info.run_id
    assert not second["registered"]["new"] and second["registered"]["version"] == 1
    assert second["registered"]["alias"] == "champion"  # read from the version (search results omit aliases)
    assert client.get_metric_history(children2["pretrain"].info.run_id, "loss") == []  # nothing retrained

    # A tokenizer change that changes the tokenizer reruns it and everything after it, not the
    # cleaning. (Identities are built from content digests: a config change that leaves the
    # tokenizer's bytes as they were would rerun only the tokenizer stage.)
    third = pipeline(config=_test_config(tmp_path / "run", "tokenizer.max_token_chars=6"))
    assert third["cached"] == ["clean"] and third["ran"] == ["tokenizer", "shard", "pretrain", "export", "evaluate"]
    assert third["stages"]["clean"]["digest"] == first["stages"]["clean"]["digest"]
    assert third["stages"]["tokenizer"]["identity"] != first["stages"]["tokenizer"]["identity"]
    assert third["stages"]["tokenizer"]["digest"] != first["stages"]["tokenizer"]["digest"]
    reg3 = third["registered"]
    assert reg3["new"] and reg3["version"] == 2
    metric = cfg.tracking.champion_metric
    s1, s3 = first["evaluation"][metric], third["evaluation"][metric]
    assert reg3["alias"] == ("champion" if s3 > s1 else "challenger")
    champion = client.get_model_version_by_alias("flows-test", "champion")
    assert str(champion.version) == ("2" if s3 > s1 else "1")


def test_summary_headline():
    from cli.pipeline import print_summary

    summary = {
        "flow_run_id": "f-1", "mlflow_run_id": "m-1", "experiment_id": "3", "duration_s": 12.0,
        "ran": ["pretrain", "evaluate"], "cached": ["clean", "tokenizer", "shard"], "workdir": "/w",
        "tracking_uri": "sqlite:////w/mlflow/mlflow.db",
        "training": {"final.loss_causal": 2.5, "final.loss_masked": 2.25, "steps": 10},
        "evaluation": {"blimp.causal.best_accuracy": 0.75, "blimp.causal.t1_accuracy": 0.7,
                       "blimp.causal.best_temperature": 1.5, "blimp.mntp.best_accuracy": 0.8,
                       "blimp.mntp.t1_accuracy": 0.8, "blimp.mntp.best_temperature": 1.0},
        "registered": {"name": "gptbert-demo", "version": 2, "alias": "challenger"},
    }
    import io

    buf = io.StringIO()
    print_summary({**summary, "run_name": "mini · causal 1/16 · 1.2M words · 11-30 07:15"}, 61.0, stream=buf,
                  log_path=Path("/w/logs/demo.log"))
    out = buf.getvalue()
    assert "finished in 1 min 1 s: mini · causal 1/16 · 1.2M words · 11-30 07:15" in out
    assert "f-1" in out and "m-1" in out and "library logs     : /w/logs/demo.log" in out
    assert "stages cached    : clean, tokenizer, shard" in out
    assert "final losses     : loss_masked 2.250, loss_causal 2.500" in out
    assert "http://127.0.0.1:5000/#/experiments/3/runs" in out
    assert "chance 50.0%" in out
    assert "causal  T=1:  70.0%   best T=1.5:  75.0%" in out
    assert "mntp    T=1:  80.0%   best T=1:  80.0%" in out
    assert "gptbert-demo version 2, alias challenger (registered)" in out
    assert "mlflow ui --backend-store-uri sqlite:////w/mlflow/mlflow.db --host 127.0.0.1" in out
