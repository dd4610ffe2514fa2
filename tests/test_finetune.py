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
