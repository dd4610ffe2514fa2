"""GLUE-style fine-tuning: data reading, pair encoding, metrics, schedule, and a learnable toy task."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from conftest import shared_path
from common.config import ConfigError, from_dict
from common.config.eval import FinetuneConfig
from gptbert.evaluation.finetune import (
    Example,
    TaskFormatError,
    classification_metrics,
    encode_example,
    finetune,
    finetune_tasks,
    load_task_file,
    lr_factor,
    predict,
    task_metric,
)
from test_scoring import make_model, make_tokenizer, one_thread  # noqa: F401 (autouse fixture)


def test_metrics_match_hand_computation():
    y = [1, 1, 1, 0, 0, 0, 1, 0]
    p = [1, 1, 0, 0, 0, 1, 1, 1]
    m = classification_metrics(p, y)
    tp, tn, fp, fn = 3, 2, 2, 1
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["mcc"] == pytest.approx((tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert classification_metrics([0, 0], [0, 1]) == {"accuracy": 0.5, "f1": 0.0, "mcc": 0.0}  # undefined -> 0
    assert classification_metrics([2, 0, 1], [2, 1, 1]) == {"accuracy": pytest.approx(2 / 3)}  # multi-class
    assert (task_metric("CoLA"), task_metric("mrpc"), task_metric("rte")) == ("mcc", "f1", "accuracy")


def test_lr_schedule_warmup_then_cosine():
    total = 100  # 6% warmup = 6 steps
    f = [lr_factor(s, total, 0.06) for s in range(total)]
    assert f[:6] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert f[6] == pytest.approx(1.0) and f[6 + 47] == pytest.approx(0.5, abs=0.04)
    assert all(a >= b for a, b in zip(f[5:], f[6:])) and f[-1] < 0.001


def test_pair_encoding_and_truncation():
    tok = make_tokenizer()
    a = tok.encode("The cat sat on the mat.", add_special_tokens=False).ids
    b = tok.encode("A child read.", add_special_tokens=False).ids
    assert encode_example(tok, Example("The cat sat on the mat.", "A child read.", 0), 128) == [1] + a + [2] + b
    assert encode_example(tok, Example("The cat sat on the mat.", None, 0), 128) == [1] + a
    assert tok.encode("The cat sat on the mat.", "A child read.").ids == [1] + a + [2] + b  # the post-processor agrees
    cut = encode_example(tok, Example("The cat sat on the mat.", "A child read.", 0), 8)
    assert len(cut) == 8 and cut[0] == 1 and 2 in cut


def test_load_task_file_errors(tmp_path):
    f = tmp_path / "t.train.jsonl"
    f.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "label": 1}) + "\n" + json.dumps({"sentence1": "a"}) + "\n")
    with pytest.raises(TaskFormatError, match=r"t\.train\.jsonl:2: field 'label' must be an integer"):
        load_task_file(f)
    f.write_text('{"sentence1": "a", "label": 0}\n{"sentence1": oops}\n')
    with pytest.raises(TaskFormatError, match=r"t\.train\.jsonl:2: not valid JSON"):
        load_task_file(f)
    assert load_task_file(f, max_examples=1) == [Example("a", None, 0)]
    with pytest.raises(FileNotFoundError):
        load_task_file(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError) as info:
        from_dict(FinetuneConfig, {"tasks": ["rte"]})
    assert info.value.field == "data_dir"


def _toy_task(n, seed):
    # The label is whether the first sentence mentions a cat: learnable from the tokens.
    rng = random.Random(seed)
    nouns = ["dog", "ship", "child", "teacher", "book", "town"]
    out = []
    for _ in range(n):
        label = rng.random() < 0.5
        noun = "cat" if label else rng.choice(nouns)
        out.append(Example(f"The {noun} sat on the mat.", f"A {rng.choice(nouns)} read.", int(label)))
    return out


def test_finetune_learns_toy_task_and_keeps_best_epoch(tmp_path):
    tok = make_tokenizer()
    model = make_model(dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FinetuneConfig(lr=5e-3, batch_size=8, epochs=3, seed=0)
    train, valid = _toy_task(32, 1), _toy_task(24, 2)
    tuned, r = finetune(model, tok, train, valid, cfg, metric="mcc")
    assert [e["epoch"] for e in r["epochs"]] == [1, 2, 3] and r["steps"] == 3 * 4
    scores = [e["mcc"] for e in r["epochs"]]
    assert r["best"]["mcc"] == max(scores) and r["best"]["epoch"] == 1 + scores.index(max(scores))
    assert r["best"]["accuracy"] >= 0.9, r["epochs"]
    assert r["epochs"][-1]["train_loss"] < r["epochs"][0]["train_loss"]
    # The returned weights are the best epoch's: re-predicting reproduces its metric.
    valid_ids = [encode_example(tok, ex, cfg.max_length) for ex in valid]
    again = classification_metrics(predict(tuned, valid_ids, 3), [ex.label for ex in valid])
    assert again["mcc"] == pytest.approx(r["best"]["mcc"])
    # The pretrained model itself is untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_finetune_tasks_reads_folder(tmp_path):
    tok = make_tokenizer()
    for split, n, seed in (("train", 16, 3), ("valid", 8, 4)):
        (tmp_path / f"toy.{split}.jsonl").write_text("".join(
            json.dumps({"sentence1": e.text_a, "sentence2": e.text_b, "label": e.label}) + "\n"
            for e in _toy_task(n, seed)))
    from common.config import EvalConfig
    from gptbert.evaluation import evaluate, summary_metrics, write_results

    cfg = EvalConfig(finetune=FinetuneConfig(data_dir=str(tmp_path), tasks=["toy"], epochs=1, batch_size=8))
    results = evaluate(make_model(dtype=torch.float32), tok, cfg)  # no blimp_dir: fine-tuning only
    r = results["tasks"]["glue"]
    assert list(results["tasks"]) == ["glue"] and results["skipped"] == {"blimp": "no data configured",
                                                                                    "babylm": "no data configured"}
    assert r["toy"]["metric"] == "accuracy" and r["toy"]["train_examples"] == 16 and r["toy"]["valid_examples"] == 8
    metrics = summary_metrics(results)
    assert metrics["finetune.toy.accuracy"] == r["toy"]["best"]["accuracy"] and metrics["finetune.toy.epoch"] == 1
    write_results(results, tmp_path / "out")
    assert "| toy | accuracy | 1 |" in (tmp_path / "out" / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    with pytest.raises(FileNotFoundError, match="toy2.train.jsonl"):
        finetune_tasks(make_model(dtype=torch.float32), tok, FinetuneConfig(data_dir=str(tmp_path), tasks=["toy2"]))


def test_shared_glue_dev_files_load():
    folder = shared_path("glue-dev")
    train = load_task_file(folder / "rte.train.jsonl", max_examples=50)
    valid = load_task_file(folder / "mrpc.valid.jsonl")
    assert len(train) == 50 and len(valid) == 204
    assert {e.label for e in valid} == {0, 1} and all(e.text_b for e in valid)


# ---------------------------------------------------------------------------------------------
# The official BabyLM 2025 fine-tuning set (recipe "babylm")

from gptbert.evaluation.finetune import BABYLM_TASKS, LAYOUTS, TaskSettings, task_settings  # noqa: E402


def test_official_layouts_read_each_task(tmp_path):
    records = {
        "boolq": ({"question": "is it wet", "passage": "It rained.", "label": True}, ("is it wet", "It rained.", 1)),
        "multirc": ({"question": "Who ran?", "answer": "Kim", "paragraph": "Kim ran.", "label": 0},
                    ("Question: Who ran? Answer: Kim", "Kim ran.", 0)),
        "wsc": ({"span1_text": "the cup", "span2_text": "it", "text": "The cup fell; it broke.", "label": 1},
                ('Does "it" refer to "the cup" in this passage?', "The cup fell; it broke.", 1)),
        "qqp": ({"question1": "a?", "question2": "b?", "label": 0}, ("a?", "b?", 0)),
        "mnli": ({"premise": "p.", "hypothesis": "h.", "label": 2}, ("p.", "h.", 2)),
        "rte": ({"sentence1": "s1", "sentence2": "s2", "label": 1}, ("s1", "s2", 1)),
        "cola": ({"sentence": "One.", "label": 1}, ("One.", None, 1)),
    }
    for task, (record, (a, b, label)) in records.items():
        f = tmp_path / f"{task}.train.jsonl"
        f.write_text(json.dumps(record) + "\n")
        assert load_task_file(f) == [Example(a, b, label)], task
    # A missing field names the file, the line and the field.
    (tmp_path / "wsc.valid.jsonl").write_text(json.dumps(records["wsc"][0]) + "\n" + json.dumps({"text": "x", "label": 0}) + "\n")
    with pytest.raises(TaskFormatError, match=r"wsc\.valid\.jsonl:2: field 'span2_text' must be a string"):
        load_task_file(tmp_path / "wsc.valid.jsonl")
    # Booleans are labels only where the official layout applies (SuperGLUE's true/false).
    (tmp_path / "toy.train.jsonl").write_text(json.dumps({"sentence1": "a", "label": True}) + "\n")
    with pytest.raises(TaskFormatError, match="'label' must be an integer"):
        load_task_file(tmp_path / "toy.train.jsonl")
    assert set(BABYLM_TASKS) <= set(LAYOUTS)


def test_babylm_recipe_settings_and_schedule():
    from common.config.eval import BABYLM_FINETUNE_TASKS

    assert tuple(BABYLM_TASKS) == BABYLM_FINETUNE_TASKS  # the config validates names against that list
    cfg = FinetuneConfig(data_dir="x", tasks=list(BABYLM_FINETUNE_TASKS), recipe="babylm", lr=1.0, epochs=1)
    got = {t: task_settings(t, cfg) for t in cfg.tasks}
    # eval_finetuning.sh: lr 3e-5, batch 16 for BoolQ/MultiRC else 32, 10 epochs (WSC 30), length 512,
    # F1 picks the epoch for MRPC and QQP, MNLI has 3 labels.
    assert {t: (s.lr, s.batch_size, s.epochs, s.max_length, s.metric, s.num_labels) for t, s in got.items()} == {
        "boolq": (3e-5, 16, 10, 512, "accuracy", 2), "multirc": (3e-5, 16, 10, 512, "accuracy", 2),
        "rte": (3e-5, 32, 10, 512, "accuracy", 2), "wsc": (3e-5, 32, 30, 512, "accuracy", 2),
        "mrpc": (3e-5, 32, 10, 512, "f1", 2), "qqp": (3e-5, 32, 10, 512, "f1", 2),
        "mnli": (3e-5, 32, 10, 512, "accuracy", 3)}
    assert all(s.seed == 42 and s.decay_all and s.drop_last for s in got.values())
    paper = task_settings("mrpc", FinetuneConfig(data_dir="x", tasks=["mrpc"], lr=2e-4, batch_size=8, epochs=3))
    assert (paper.lr, paper.batch_size, paper.epochs, paper.metric, paper.decay_all) == (2e-4, 8, 3, "f1", False)
    with pytest.raises(ConfigError) as info:
        from_dict(FinetuneConfig, {"data_dir": "x", "tasks": ["cola"], "recipe": "babylm"})
    assert info.value.field == "tasks[0]"

    # The official scheduler (LambdaLR over cosine_schedule_with_warmup with min factor 0.1), re-enacted.
    def official(step, total, warmup_prop=0.06, min_factor=0.1):
        warmup = int(warmup_prop * total)
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(min_factor, min_factor + (1 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress)))

    for total in (10, 33, 100, 1000):
        ours = [lr_factor(s, total, 0.06, 0.1, from_zero=True) for s in range(total)]
        assert ours == pytest.approx([official(s, total) for s in range(total)], abs=1e-12)
    assert lr_factor(0, 100, 0.06, 0.1, from_zero=True) == 0.0 and lr_factor(99, 100, 0.06, 0.1, True) > 0.1


def test_babylm_recipe_trains_full_batches_and_records_hyperparameters(tmp_path):
    tok = make_tokenizer()
    model = make_model(dtype=torch.float32)
    settings = TaskSettings(lr=5e-3, batch_size=8, epochs=2, max_length=64, warmup_ratio=0.06, weight_decay=0.01,
                            seed=42, metric="accuracy", num_labels=2, min_lr_factor=0.1, decay_all=True,
                            drop_last=True, warmup_from_zero=True)
    _, r = finetune(model, tok, _toy_task(21, 1), _toy_task(8, 2), settings)
    assert r["steps"] == 2 * (21 // 8)  # the last partial batch (5 examples) is dropped each epoch
    assert r["hyperparameters"] == {"lr": 5e-3, "batch_size": 8, "epochs": 2, "max_length": 64, "seed": 42}
    with pytest.raises(TaskFormatError, match="label 2 found, but the task has 2 labels"):
        finetune(model, tok, [Example("a", None, 2)] * 8, [Example("a", None, 0)], settings)


def test_evaluate_suite_babylm_finetunes_what_glue_filtered_holds(tmp_path, capsys):
    """`gptbert evaluate MODEL --suite babylm --data DIR` fine-tunes the official tasks found in
    full_eval/glue_filtered with their own hyperparameters and notes the missing ones."""
    from cli.evaluate import _babylm_finetune

    glue = tmp_path / "evaluation_data" / "full_eval" / "glue_filtered"
    glue.mkdir(parents=True)
    for split in ("train", "valid"):
        (glue / f"rte.{split}.jsonl").write_text("".join(
            json.dumps({"sentence1": e.text_a, "sentence2": e.text_b, "label": e.label}) + "\n" for e in _toy_task(40, 5)))
    (glue / "wsc.train.jsonl").write_text(json.dumps({"span1_text": "a", "span2_text": "b", "text": "a b", "label": 0}) + "\n")
    fields, note = _babylm_finetune(str(tmp_path / "evaluation_data"), fast=False, skip=False)
    assert fields == {"data_dir": str(glue), "tasks": ["rte", "wsc"], "recipe": "babylm", "skip_missing": True}
    assert note is None
    assert _babylm_finetune(str(tmp_path / "evaluation_data"), fast=True, skip=False)[0] == {}
    assert "--no-finetune" in _babylm_finetune(str(tmp_path / "evaluation_data"), fast=False, skip=True)[1]

    from common.config import EvalConfig
    from gptbert.evaluation import evaluate, render_report

    cfg = EvalConfig(tasks=["glue"], finetune=FinetuneConfig(**fields, max_train_examples=32))
    cfg.finetune.validate()
    results = evaluate(make_model(dtype=torch.float32), make_tokenizer(), cfg)
    r = results["tasks"]["glue"]
    assert r["missing"] == {"wsc": f"wsc.valid.jsonl not in {glue}"}
    assert r["rte"]["hyperparameters"]["batch_size"] == 32 and r["rte"]["steps"] == 10  # 32 // 32 x 10 epochs
    assert len(r["rte"]["epochs"]) == 10
    report = render_report(results)
    assert "| rte | accuracy |" in report and f"- wsc: skipped, wsc.valid.jsonl not in {glue}" in report
