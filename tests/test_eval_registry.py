"""The evaluation task registry (a task declared once, by its module) and ``eval.device``."""

from __future__ import annotations

import dataclasses
import json
import pkgutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError, EvalConfig, from_dict, load_config
from gptbert import evaluation
from gptbert.evaluation import TASKS, Metric, Task
from test_evaluate import HAND_MADE, _bias_model_and_tokenizer, _write
from test_scoring import one_thread  # noqa: F401 (autouse fixture)

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")


# ---------------------------------------------------------------------------------------------
# The declarations


def test_every_module_declaring_a_task_is_registered_and_the_rest_are_helpers():
    package = Path(evaluation.__file__).parent
    declared = {}
    for info in pkgutil.iter_modules([str(package)]):
        module = __import__(f"gptbert.evaluation.{info.name}", fromlist=["TASK"])
        if isinstance(getattr(module, "TASK", None), Task):
            declared[module.TASK.name] = info.name
    assert declared == {"blimp": "minimal_pairs", "babylm": "babylm", "glue": "finetune", "global_piqa": "global_piqa",
                        "icl": "icl"}
    assert set(TASKS) == set(declared)
    # What the three declare about their config: the sections and data fields EvalConfig has.
    assert {n: (t.section, t.location_fields()) for n, t in TASKS.items()} == {
        "blimp": ("", ["blimp_dir"]), "babylm": ("", ["babylm_dir"]), "glue": ("finetune", ["finetune.data_dir"]),
        "global_piqa": ("", ["babylm_dir"]), "icl": ("", ["icl.data_dir"])}
    assert [n for n, t in TASKS.items() if t.zero_shot] == ["babylm", "global_piqa", "icl", "blimp"]


def test_register_task_checks_the_declaration_against_the_config():
    base = dict(name="t", section="", locations=("blimp_dir",), data=lambda c: None, run=lambda *a, **k: {},
                summary=lambda r: {}, report=lambda r: [], metrics=(Metric("t.{mode}.x", "number"),))
    for changes, match in (({"section": "nope"}, "no section 'nope'"),
                           ({"locations": ("nope_dir",)}, r"eval\.nope_dir is not a string field"),
                           ({"section": "finetune", "locations": ("lr",)}, r"eval\.finetune\.lr is not a string"),
                           ({"metrics": ()}, "declares no metrics"),
                           ({"name": "blimp"}, "already registered"), ({"name": "a.b"}, "dotted")):
        with pytest.raises(ValueError, match=match):
            evaluation.register_task(Task(**{**base, **changes}))
    assert "t" not in TASKS


def test_metric_patterns_units_and_figure_panels():
    wug = Metric("babylm.{task:wug_adj|wug_past}.{mode}.t1", "rho", curve=True)
    assert wug.match("babylm.wug_adj.mntp.t1") == {"task": "wug_adj", "mode": "mntp"}
    assert wug.match("babylm.ewok.mntp.t1") is None and wug.match("babylm.wug_adj.mntp.t1_strict") is None
    assert wug.panel_and_line("babylm.wug_past.fused.t1") == ("babylm.wug_past", "fused")
    # Every name the three tasks can emit has a declared unit; the curves are what the figures draw.
    assert evaluation.metric_unit("babylm.wug_adj.causal.t1") == "rho"
    assert evaluation.metric_unit("babylm.ewok.causal.t1") == "percent"
    assert evaluation.metric_unit("blimp.2-gram.t1_accuracy") == "fraction"  # the n-gram baseline's mode
    assert evaluation.metric_unit("babylm.reading.causal.self_paced") == "percent"
    assert evaluation.metric_unit("finetune.rte.train_loss") == "number"
    assert evaluation.metric_unit("nobody.declares.this") is None
    assert evaluation.curve_metrics(["blimp.causal.t1_accuracy", "blimp.causal.best_accuracy",
                                     "babylm.ewok.fused.t1", "babylm.ewok.fused.t1_strict", "finetune.rte.mcc",
                                     "finetune.rte.epoch"]) == \
        ["babylm.ewok.fused.t1", "blimp.causal.t1_accuracy", "finetune.rte.mcc"]
    assert evaluation.format_value("blimp.causal.t1_accuracy", 0.5) == "50.0"
    assert evaluation.format_value("babylm.ewok.causal.t1", 61.234) == "61.23"


def test_a_summary_may_only_emit_the_metrics_its_task_declares():
    results = {"tasks": {"glue": {"rte": {"best": {"epoch": 2, "accuracy": 0.5, "sneaky": 1.0}}}}}
    with pytest.raises(ValueError, match="'glue' reported metrics its declaration does not name: finetune.rte.sneaky"):
        evaluation.summary_metrics(results)


# ---------------------------------------------------------------------------------------------
# Adding a task: one declaration, and dispatch, results, report, identity, milestones, MLflow
# names and the sweep's figure follow from it.


def _mean_score(model, tokenizer, cfg, progress=None):
    """A real (if small) task: the mean causal and mntp log-likelihood of the good sentences."""
    from gptbert.evaluation.minimal_pairs import load_blimp
    from gptbert.scoring import score_sentences

    pairs = load_blimp(cfg.blimp_dir)
    scores = score_sentences(model, tokenizer, [p.good for p in pairs], modes=["causal", "mntp"],
                             temperatures=[1.0], max_tokens=cfg.max_tokens)
    return {"num": len(pairs), "modes": {m: float(np.mean(s[:, 0])) for m, s in scores.items()}}


@pytest.fixture
def toy_task():
    task = Task(
        name="toy", section="", locations=("blimp_dir",),
        data=lambda cfg: Path(cfg.blimp_dir) if cfg.blimp_dir else None, run=_mean_score,
        summary=lambda r: {f"toy.{m}.mean_logprob": v for m, v in r["modes"].items()},
        report=lambda r: ["## Toy", "", f"{r['num']} sentences", ""],
        metrics=(Metric("toy.{mode}.mean_logprob", "number", curve=True),), zero_shot=True,
        milestone=lambda cfg: {"max_tokens": 64})
    evaluation.register_task(task)
    yield task
    del TASKS["toy"]


def test_a_new_task_is_one_declaration(tmp_path, toy_task):
    from flows.tracking import evaluation_metrics

    model, tok = _bias_model_and_tokenizer()
    for name, items in HAND_MADE.items():
        _write(tmp_path / "blimp", name, items)
    cfg = from_dict(EvalConfig, {"tasks": ["toy", "blimp"], "blimp_dir": str(tmp_path / "blimp"),
                                 "temperatures": [1.0], "modes": ["causal"], "max_tokens": 256})
    results = evaluation.evaluate(model, tok, cfg)
    assert list(results["tasks"]) == ["toy", "blimp"] and results["tasks"]["toy"]["num"] == 6
    metrics = evaluation.summary_metrics(results)
    assert {"toy.causal.mean_logprob", "toy.mntp.mean_logprob", "blimp.causal.t1_accuracy"} <= set(metrics)
    assert metrics["toy.causal.mean_logprob"] < 0
    assert "## Toy\n\n6 sentences" in evaluation.render_report(results)
    assert evaluation.curve("toy.mntp.mean_logprob") == ("toy", "mntp")
    assert evaluation_metrics({"stats": metrics}) == metrics  # the MLflow names are the declared ones
    # Its data is an input of the stage; its location is not part of the config identity.
    assert set(evaluation.data_digests(cfg)) == {"toy", "blimp"}
    assert "blimp_dir" not in evaluation.evaluation_config(cfg)
    # A zero-shot task is scored at the word milestones, with its own changes.
    sub = evaluation.milestone_config(cfg)
    assert sub.tasks == ["toy", "blimp"] and sub.max_tokens == 64 and sub.temperatures == [1.0]
    # Not configured: skipped with a note; asked for alone without data: what to set.
    _, skipped = evaluation.configured_tasks(from_dict(EvalConfig, {"tasks": ["toy", "glue"]}))
    assert skipped == {"toy": "no data configured", "glue": "no data configured"}
    with pytest.raises(ValueError, match=r"set eval\.blimp_dir, or eval\.finetune\.data_dir and eval\.finetune\.tasks"):
        evaluation.evaluate(model, tok, from_dict(EvalConfig, {"tasks": ["toy", "glue"]}))


def test_the_sweep_figure_and_milestone_report_draw_the_declared_curves(toy_task):
    from flows.sweep import figure_series

    table = {"toy.causal.mean_logprob": {"0.0": {"mean": -3.0, "min": -3.0, "max": -3.0, "n": 1}},
             "toy.causal.undeclared_suffix": {"0.0": {"mean": 1.0, "min": 1.0, "max": 1.0, "n": 1}}}
    assert figure_series(table) == {"toy": {"causal": [(0.0, -3.0, -3.0, -3.0)]}}
    lines = evaluation.milestone_report([{"name": "chck_1M", "words": 1_000_000,
                                          "metrics": {"toy.causal.mean_logprob": -3.5, "blimp.causal.t1_accuracy": 0.5,
                                                      "blimp.causal.best_accuracy": 0.6}}])
    assert "| chck_1M | 1,000,000 | 50.0 | -3.50 |" in lines


# ---------------------------------------------------------------------------------------------
# eval.device


def test_eval_device_is_validated_and_is_not_part_of_the_identity():
    assert EvalConfig().device == "auto"
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["eval.device=gpu"])
    assert info.value.field == "eval.device"
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["eval.device=cuda:1", "eval.milestones=ray"])
    assert info.value.field == "eval.milestones" and "CPU Ray tasks" in info.value.reason
    for spec in ("cpu", "cuda", "cuda:3"):
        cfg = from_dict(EvalConfig, {"device": spec})
        assert evaluation.evaluation_config(cfg) == evaluation.evaluation_config(EvalConfig())
        assert evaluation.milestone_config(cfg).device == spec  # milestone models compute there too
    assert "device" not in evaluation.evaluation_config(EvalConfig(device="cpu"))


def test_models_load_where_eval_device_says(tmp_path):
    from gptbert.io import load_model_dir, save_model_dir

    model, tok = _bias_model_and_tokenizer()
    tok.save(str(tmp_path / "tok.json"))
    folder = save_model_dir(tmp_path / "model", model, model.config, tmp_path / "tok.json", {})
    auto = evaluation.resolve_eval_device(EvalConfig())
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    for device in (auto, torch.device("cpu"), "cpu", "auto"):
        loaded, _ = load_model_dir(folder, device=device)
        assert {p.device.type for p in loaded.parameters()} == {torch.device(device).type if device != "auto"
                                                                else auto.type}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluation_computes_on_cuda_when_asked(tmp_path):
    from gptbert.io import load_model_dir, save_model_dir

    model, tok = _bias_model_and_tokenizer()
    tok.save(str(tmp_path / "tok.json"))
    folder = save_model_dir(tmp_path / "model", model, model.config, tmp_path / "tok.json", {})
    for name, items in HAND_MADE.items():
        _write(tmp_path / "blimp", name, items)
    cfg = from_dict(EvalConfig, {"device": "cuda", "blimp_dir": str(tmp_path / "blimp"), "temperatures": [1.0]})
    on_gpu, _ = load_model_dir(folder, device=evaluation.resolve_eval_device(cfg))
    assert next(on_gpu.parameters()).is_cuda
    record = evaluation.evaluate_model_dir(folder, cfg, tmp_path / "out")
    on_cpu = evaluation.evaluate(model, tok, dataclasses.replace(cfg, device="cpu"))
    assert record["stats"]["blimp.causal.t1_accuracy"] == evaluation.summary_metrics(on_cpu)["blimp.causal.t1_accuracy"]


@needs_no_cuda
def test_cuda_asked_for_where_there_is_none_is_one_line_before_any_work(tmp_path, capsys):
    from cli.main import main
    from gptbert.device import DeviceError
    from gptbert.io import save_model_dir

    model, tok = _bias_model_and_tokenizer()
    tok.save(str(tmp_path / "tok.json"))
    folder = save_model_dir(tmp_path / "model", model, model.config, tmp_path / "tok.json", {})
    for name, items in HAND_MADE.items():
        _write(tmp_path / "blimp", name, items)
    cuda = from_dict(EvalConfig, {"device": "cuda", "blimp_dir": str(tmp_path / "blimp")})
    out = tmp_path / "eval"
    with pytest.raises(DeviceError, match="config field 'eval.device': 'cuda' requested but this machine has no CUDA"):
        evaluation.evaluate_model_dir(folder, cuda, out)
    with pytest.raises(DeviceError, match="eval.device"):
        evaluation.preflight(cuda)  # what the pipeline and the sweep call before their first stage
    with pytest.raises(DeviceError, match="eval.device"):
        evaluation.evaluate_folder(str(folder), {"device": "cuda:0", "blimp_dir": str(tmp_path / "blimp")})
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        evaluation.preflight(EvalConfig(tasks=["blimp", "nope"]))
    assert not out.exists()

    for argv in (["evaluate", str(folder), "--blimp", str(tmp_path / "blimp"), "--out", str(out), "--device", "cuda"],
                 ["evaluate", str(folder), "--blimp", str(tmp_path / "blimp"), "--out", str(out),
                  "--set", "eval.device=cuda:1"],
                 ["evaluate", str(tmp_path), "--baseline", "ngram", "--blimp", str(tmp_path / "blimp"), "--out",
                  str(out), "--device", "cuda"],
                 ["score", str(folder), "The cat sat.", "--device", "cuda"],
                 ["generate", str(folder), "The cat", "--set", "eval.device=cuda"]):
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "eval.device" in err and "no CUDA device" in err, (argv, err)
        assert "Traceback" not in err
    assert not out.exists()  # nothing written
    capsys.readouterr()
    assert main(["score", str(folder), "The cat sat.", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["scores"]["causal"]["1.0"] < 0
    assert main(["evaluate", str(folder), "--blimp", str(tmp_path / "blimp"), "--out", str(out),
                 "--device", "cpu", "--set", "eval.temperatures=[1.0]"]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["device"] == "cpu"


# ---------------------------------------------------------------------------------------------
# The one route of evaluation scores to MLflow


def test_evaluation_scores_reach_mlflow_by_one_route(tmp_path):
    from flows.tracking import Tracker, milestone_metrics, stage_metrics

    record = {"stats": {"blimp.causal.t1_accuracy": 0.5, "blimp.causal.best_temperature": 1.5,
                        "babylm.wug_adj.causal.t1": float("nan")}}
    results = {"milestones": [{"name": "chck_1M", "words": 1000, "metrics": {"blimp.causal.t1_accuracy": 0.25}},
                              {"name": "chck_2M", "words": 2000, "metrics": {"blimp.causal.t1_accuracy": 0.375}}]}
    # The evaluate stage's own metrics are its bookkeeping; its scores are not repeated as stage.*.
    assert stage_metrics("evaluate", record["stats"], False, 2.0) == {"stage.cached": 0.0, "stage.duration_s": 2.0}
    assert stage_metrics("shard", {"tokens": 7, "config": {"x": 1}}, True, 2.0) == \
        {"stage.tokens": 7.0, "stage.cached": 1.0, "stage.duration_s": 0.0}
    assert milestone_metrics(results)[1] == (2000, {"milestone.blimp.causal.t1_accuracy": 0.375})
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "unit", (tmp_path / "artifacts").as_uri())
    run = tracker.start_run("evaluate")
    tracker.log_evaluation(run, record, results)
    metrics = tracker.client.get_run(run).data.metrics
    assert metrics == {"blimp.causal.t1_accuracy": 0.5, "blimp.causal.best_temperature": 1.5,
                       "milestone.blimp.causal.t1_accuracy": 0.375}  # nan is not a metric
    history = tracker.client.get_metric_history(run, "milestone.blimp.causal.t1_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(1000, 0.25), (2000, 0.375)]
