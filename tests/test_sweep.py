"""The ratio sweep (flows/sweep.py, `gptbert sweep`): config, aggregation and figure, and the flow
end to end on the tiny preset (one after another, and as Ray tasks on a local Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import ConfigError, load_config


def test_sweep_config_and_trial_config():
    from flows.sweep import trial_config

    cfg = load_config(preset="tiny", overrides=["sweep.fractions=[0.0, 0.5]", "sweep.seeds=[3, 4]"])
    assert cfg.sweep.fractions == [0.0, 0.5] and cfg.sweep.parallel == "sequential"
    assert load_config().sweep.fractions == [0.0, 0.0625, 0.125, 0.5, 0.9375, 1.0]  # the paper's grid
    t = trial_config(cfg, 0.5, 4)
    assert (t.train.causal_fraction, t.train.seed, t.launch.backend) == (0.5, 4, cfg.launch.backend)
    assert t.model == cfg.model and t.eval == cfg.eval  # nothing else changes
    ray = load_config(preset="tiny", overrides=["sweep.parallel=ray", "launch.backend=ray"])
    assert trial_config(ray, 0.0, 0).launch.backend == "local"  # a trial is one Ray task running the plain loop
    for bad, field in (("sweep.fractions=[0.5, 1.5]", "sweep.fractions[1]"), ("sweep.fractions=[]", "sweep.fractions"),
                       ("sweep.seeds=[1, 1]", "sweep.seeds"), ("sweep.fractions=[0.5, 0.5]", "sweep.fractions")):
        with pytest.raises(ConfigError) as info:
            load_config(overrides=[bad])
        assert info.value.field == field


@pytest.mark.parametrize("device, cluster_gpus, wanted", [
    ("cpu", 0, 0), ("cpu", 4, 0),        # CPU trials never hold a GPU
    ("auto", 0, 0), ("auto", 2, 1),      # auto: the GPU Ray would otherwise hide from the trial
    ("cuda", 1, 1), ("cuda:0", 8, 1),
])
def test_a_ray_trial_requests_one_gpu_where_it_trains_on_cuda(device, cluster_gpus, wanted):
    from gptbert.distributed.parallel import gpus_per_task

    assert gpus_per_task(device, cluster_gpus) == wanted


def test_cuda_trials_on_a_cluster_without_gpus_are_refused_in_one_line():
    from gptbert.distributed.parallel import gpus_per_task

    for device, cluster_gpus, says in (("cuda", 0, "the Ray cluster has 0 GPUs"), ("cuda", 0.5, "has 0.5 GPUs"),
                                       ("cuda:1", 4, "sees as cuda:0")):
        with pytest.raises(ConfigError, match=says) as info:
            gpus_per_task(device, cluster_gpus)
        assert info.value.field == "train.device" and "\n" not in str(info.value)


@pytest.mark.slow
def test_ray_map_requests_the_gpu_from_ray_and_refuses_cuda_on_a_cluster_without_one():
    """On a local Ray of this CPU machine (0 GPUs) a cuda trial is refused before any task runs and
    an auto trial runs without a GPU; on a local Ray that declares one GPU (Ray then hands out GPU
    id 0 without a device behind it), the task requests it and is given it."""
    import ray

    from gptbert.distributed.parallel import ray_map

    def gpu_ids(_: int) -> list:
        return [str(i) for i in ray.get_gpu_ids()]

    assert not ray.is_initialized()
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False)
    try:
        with pytest.raises(ConfigError, match="has 0 GPUs") as info:
            ray_map(gpu_ids, [(0,)], device="cuda")
        assert info.value.field == "train.device"
        assert ray_map(gpu_ids, [(0,)], device="auto") == [[]]
    finally:
        ray.shutdown()
    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False)
    try:
        assert ray_map(gpu_ids, [(0,), (1,)], device="auto") == [["0"], ["0"]]  # one at a time on the one GPU
    finally:
        ray.shutdown()


def _row(fraction, seed, **metrics):
    return {"fraction": fraction, "seed": seed, "metrics": metrics, "final_loss": 3.0, "steps": 4, "tokens": 100,
            "first_batch_sha256": "ab" * 32, "cached": False}


def test_aggregate_series_report_and_figure(tmp_path):
    from flows.plots import plot_ratio_sweep
    from flows.sweep import aggregate, figure_series, report_lines

    rows = [_row(0.0, 0, **{"blimp.causal.t1_accuracy": 0.5, "blimp.mntp.t1_accuracy": 0.7, "finetune.rte.accuracy": 0.6}),
            _row(0.0, 1, **{"blimp.causal.t1_accuracy": 0.6, "blimp.mntp.t1_accuracy": 0.7}),
            _row(1.0, 0, **{"blimp.causal.t1_accuracy": 0.8, "blimp.mntp.t1_accuracy": 0.55,
                            "babylm.ewok.fused.t1": 0.52, "blimp.causal.best_temperature": 1.5})]
    table = aggregate(rows)
    assert table["blimp.causal.t1_accuracy"]["0.0"] == {"mean": pytest.approx(0.55), "min": 0.5, "max": 0.6, "n": 2}
    assert table["blimp.causal.t1_accuracy"]["1.0"]["n"] == 1 and "1.0" not in table["finetune.rte.accuracy"]
    series = figure_series(table)
    assert set(series) == {"blimp", "babylm.ewok", "finetune.rte"}  # temperatures are not drawn
    assert series["blimp"]["causal"] == [(0.0, pytest.approx(0.55), 0.5, 0.6), (1.0, 0.8, 0.8, 0.8)]
    assert series["finetune.rte"] == {"accuracy": [(0.0, 0.6, 0.6, 0.6)]}
    text = "\n".join(report_lines(rows, table, load_config(preset="tiny", overrides=["sweep.seeds=[0, 1]"]), 12.0))
    assert "| blimp.causal.t1_accuracy | 0.5500 (0.5000-0.6000) | 0.8000 |" in text
    assert "| 1 | 0 | 4 | 100 | 3.000 |" in text and "blimp.causal.best_temperature" not in text
    assert plot_ratio_sweep(series, tmp_path / "f.png") and (tmp_path / "f.png").stat().st_size > 10_000
    assert not plot_ratio_sweep({}, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def _sweep_config(workdir: Path, parallel: str):
    from flows.demo import with_demo_data

    return with_demo_data(load_config(preset="tiny", overrides=[
        f"workdir={workdir}", "train.steps=4", "train.checkpoint_every=2", "train.validate_every=0",
        "train.batch_tokens_start=512", "train.batch_tokens_end=512", "train.micro_batch_tokens=512",
        "launch.backend=local", "eval.max_pairs_per_paradigm=10", "eval.temperatures=[1.0]", "eval.milestones=none",
        "tracking.experiment=sweep-test", "sweep.fractions=[0.0, 1.0]", f"sweep.parallel={parallel}"]))


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["sequential", "ray"])
def test_ratio_sweep_flow_end_to_end(prefect_harness, tmp_path, parallel):
    """Two fractions of the tiny preset: one parent run, one child run per trial with its scores,
    the figure, report and results as the parent's artifacts, the same data order in every trial,
    and no registered model; a rerun takes every trial from the cache."""
    from flows.sweep import FIGURE, ratio_sweep
    from flows.tracking import client_for

    summary = ratio_sweep(config=_sweep_config(tmp_path / "run", parallel))
    trials = summary["trials"]
    assert [(t["fraction"], t["seed"]) for t in trials] == [(0.0, 0), (1.0, 0)]
    # Same data order and tokens seen; different models.
    assert trials[0]["first_batch_sha256"] and trials[0]["first_batch_sha256"] == trials[1]["first_batch_sha256"]
    assert trials[0]["tokens"] == trials[1]["tokens"] and trials[0]["model"] != trials[1]["model"]
    assert all("blimp.causal.t1_accuracy" in t["metrics"] and "blimp.mntp.t1_accuracy" in t["metrics"] for t in trials)
    folder = Path(summary["folder"])
    assert summary["figure"] == str(folder / FIGURE) and (folder / FIGURE).stat().st_size > 10_000
    results = json.loads((folder / "results.json").read_text())
    assert set(results["table"]["blimp.fused.t1_accuracy"]) == {"0.0", "1.0"}

    client = client_for(summary["tracking_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.tags["gptbert.kind"] == "ratio-sweep" and parent.info.status == "FINISHED"
    runs = client.search_runs([summary["experiment_id"]], max_results=500)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trial_runs = sorted((r for r in children if r.data.tags.get("gptbert.kind") == "ratio-sweep-trial"),
                        key=lambda r: float(r.data.params["causal_fraction"]))
    assert [float(r.data.params["causal_fraction"]) for r in trial_runs] == [0.0, 1.0]
    assert sorted(r.data.tags["gptbert.stage"] for r in children if "gptbert.stage" in r.data.tags) == \
        ["clean", "shard", "tokenizer"]  # shared once, under the sweep
    for run, trial in zip(trial_runs, trials):
        assert run.data.metrics["blimp.causal.t1_accuracy"] == trial["metrics"]["blimp.causal.t1_accuracy"]
        assert run.data.tags["gptbert.first_batch_sha256"] == trial["first_batch_sha256"]
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert names == {f"sweep/{FIGURE}", "sweep/report.md", "sweep/results.json"}
    assert client.search_registered_models() == []  # a sweep registers nothing

    again = ratio_sweep(config=_sweep_config(tmp_path / "run", parallel))
    assert all(t["cached"] for t in again["trials"])
    assert [t["metrics"] for t in again["trials"]] == [t["metrics"] for t in trials]
