"""The ``icl`` task: prompts, label scoring, calibration, aggregates and the evaluate path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.config import EvalConfig, from_dict
from gptbert.evaluation import icl
from gptbert.evaluation.finetune import Example, load_task_file
from test_scoring import make_model, make_tokenizer, one_thread  # noqa: F401 (autouse fixture)

TRAIN = [("The cat sat on the mat.", "A cat sat.", 0), ("The dogs were running.", "Dogs ran.", 0),
         ("A child read a book.", "Nobody read.", 1), ("The ships sailed away.", "Ships stayed.", 1),
         ("Every teacher praised them.", "Teachers praised.", 0), ("She has eaten the cake.", "The cake is whole.", 1),
         ("Who should Derek hug?", "Derek hugs.", 1)]
VALID = [("The dogs were running.", "Dogs ran.", 0), ("There were many pictures.", "Pictures existed.", 0),
         ("The old town was quiet.", "The town was loud.", 1)]


def _write_glue(folder, task="rte", train=TRAIN, valid=VALID):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("valid", valid)):
        with open(folder / f"{task}.{split}.jsonl", "w") as f:
            for i, (a, b, y) in enumerate(rows):
                f.write(json.dumps({"sentence1": a, "sentence2": b, "label": y, "idx": i}) + "\n")
    return folder


def test_prompts_have_k_labelled_demos_the_template_and_no_test_item(tmp_path):
    folder = _write_glue(tmp_path / "glue")
    train = load_task_file(folder / "rte.train.jsonl")
    test = load_task_file(folder / "rte.valid.jsonl")
    words = icl.VERBALIZERS["rte"]
    for k in (0, 1, 2, 4, 6):
        demos = icl.draw_demonstrations(train, test, k, seed=3)
        assert len(demos) == k and len(set(demos)) == k
        # The training copy of a validation item is never a demonstration.
        assert Example("The dogs were running.", "Dogs ran.", 0) not in demos
        assert demos == icl.draw_demonstrations(train, test, k, seed=3)  # seeded
        for t in range(len(icl.TEMPLATES)):
            prompt = icl.build_prompt(demos, test[1], t, words)
            parts = prompt.split(icl.SEPARATOR)
            assert len(parts) == k + 1
            assert parts[-1] == icl.TEMPLATES[t][0].format(a=test[1].text_a, b=test[1].text_b)
            for d, part in zip(demos, parts):
                assert part == icl.TEMPLATES[t][0].format(a=d.text_a, b=d.text_b) + " " + words[d.label]
    # Six usable examples (one is a validation item): seven is an error naming the count.
    with pytest.raises(icl.IclError, match="has 6 usable examples"):
        icl.draw_demonstrations(train, test, 7, seed=0)
    assert icl.draw_demonstrations(train, test, 4, 0) != icl.draw_demonstrations(train, test, 4, 1)
    # A single-sentence example uses the template's second form.
    assert icl.render(Example("Hi.", None, 1), 1, "yes") == "Sentence: Hi.\nLabel: yes"


def test_verbalizers_from_the_config_override_the_defaults():
    cfg = from_dict(EvalConfig, {"icl": {"verbalizers": ["rte=true,false", "mytask=a,b,c"]}})
    words = icl.verbalizers(cfg)
    assert words["rte"] == ("true", "false") and words["mytask"] == ("a", "b", "c") and words["mrpc"] == ("no", "yes")


def test_label_scores_equal_score_ids_of_the_label_completion():
    from gptbert.scoring import score_ids, special_ids

    model, tok = make_model(), make_tokenizer()
    prompts = ["The cat sat on the mat. Question: A cat sat. Answer:", "Dogs ran far. Label:"]
    words = ("yes", "not really")  # a word of several tokens too
    scores, cut = icl.score_labels(model, tok, prompts, words, ["causal", "mntp", "fused"], max_tokens=4096)
    sp = special_ids(tok)
    assert not cut.any()
    for i, p in enumerate(prompts):
        for j, w in enumerate(words):
            context = tok.encode(p, add_special_tokens=False).ids
            full = tok.encode(p + " " + w, add_special_tokens=False).ids
            assert full[:len(context)] == context  # the label's tokens follow the prompt's
            ref = score_ids(model, [[sp["bos"]] + full], ["causal", "mntp", "fused"], [1.0], 4096,
                            score_from=[len(context) + 1], mask_id=sp["mask"], pad_id=sp["pad"])
            for mode in ref:
                assert scores[mode][i, j] == pytest.approx(ref[mode][0, 0], abs=1e-9)
    # The direct maths: log p of each label token, causal from its prefix, MNTP with it masked
    # (one copy per token, full attention) read one position left.
    import torch
    ids = [sp["bos"]] + tok.encode(prompts[1] + " not really", add_special_tokens=False).ids
    start = len(tok.encode(prompts[1], add_special_tokens=False).ids) + 1
    assert len(ids) - start >= 2  # several label tokens, each scored
    causal = mntp = 0.0
    with torch.no_grad():
        for j in range(start, len(ids)):
            blocked = torch.ones(j, j, dtype=torch.bool).triu(1)[None]
            logits = model.lm_logits(model(torch.tensor([ids[:j]]), blocked)[0, -1]).double()
            causal += torch.log_softmax(logits, -1)[ids[j]].item()
            copy = torch.tensor([ids])
            copy[0, j] = sp["mask"]
            logits = model.lm_logits(model(copy, torch.zeros(1, len(ids), len(ids), dtype=torch.bool))[0, j - 1]).double()
            mntp += torch.log_softmax(logits, -1)[ids[j]].item()
    assert scores["causal"][1, 1] == pytest.approx(causal, abs=1e-8)
    assert scores["mntp"][1, 1] == pytest.approx(mntp, abs=1e-8)


def test_long_prompts_are_cut_from_the_left_to_the_max_positions():
    ids, start, cut = icl.truncate_left(list(range(1, 11)), 8, 6)
    assert cut and ids == [1, 6, 7, 8, 9, 10] and start == 4 and ids[start:] == [9, 10]  # scored: ids[8:] of the input
    assert icl.truncate_left([1, 2, 3], 2, 6) == ([1, 2, 3], 2, False)
    model, tok = make_model(), make_tokenizer()
    prompt = " ".join(["The cat sat on the mat."] * 20)
    full, _ = icl.score_labels(model, tok, [prompt], ("yes", "no"), ["causal"], 4096)
    short, cut = icl.score_labels(model, tok, [prompt], ("yes", "no"), ["causal"], 4096, max_length=24)
    assert cut.tolist() == [True] and np.isfinite(short["causal"]).all()
    assert not np.allclose(full["causal"], short["causal"])


def test_contextual_calibration_divides_by_the_content_free_probabilities():
    scores = np.log(np.array([[0.6, 0.2], [0.5, 0.45], [0.1, 0.3]]))
    cf = np.log(np.array([0.8, 0.2]))  # a model biased to label 0
    # p/p_cf after normalising over the labels: item 0: .75/.8 vs .25/.2 -> 1; item 1: .526/.8 vs .474/.2 -> 1.
    assert icl.calibrated_predictions(scores, cf).tolist() == [1, 1, 1]
    assert icl.calibrated_predictions(scores, np.log(np.array([0.5, 0.5]))).tolist() == [0, 0, 1]
    # Scaling either side by a constant (unnormalised likelihoods) changes nothing.
    assert icl.calibrated_predictions(scores - 3.0, cf + 1.0).tolist() == [1, 1, 1]


def test_aggregates_and_majority_baseline_on_known_numbers():
    agg = icl.aggregate([0.5, 0.6, 0.7, 0.8])
    assert agg["mean"] == pytest.approx(0.65) and agg["runs"] == 4
    assert agg["std"] == pytest.approx(np.sqrt(((0.15 ** 2 + 0.05 ** 2) * 2) / 3))
    assert agg["se"] == pytest.approx(agg["std"] / 2)
    assert icl.aggregate([0.4]) == {"mean": 0.4, "std": 0.0, "se": 0.0, "runs": 1}
    assert icl.majority_baseline([0, 1, 1, 2, 1], [1, 0, 1, 1]) == (1, 0.75)
    assert icl.majority_baseline([0, 1], [1, 1, 0]) == (0, pytest.approx(1 / 3))  # a tie: the smaller label


def test_evaluate_runs_icl_with_its_metrics_report_and_figure(tmp_path):
    from flows.plots import evaluation_figures
    from gptbert.evaluation import TASKS, evaluate, render_report, summary_metrics

    folder = _write_glue(tmp_path / "glue")
    cfg = from_dict(EvalConfig, {"tasks": ["icl"], "modes": ["causal", "fused"], "max_tokens": 4096,
                                 "icl": {"data_dir": str(folder), "tasks": ["rte"], "shots": [0, 2],
                                         "templates": [0, 2], "seeds": [0, 1]}})
    assert "icl" in TASKS
    results = evaluate(make_model(dtype=__import__("torch").float32), make_tokenizer(), cfg)
    r = results["tasks"]["icl"]["tasks"]["rte"]
    assert r["num_items"] == 3 and r["majority_label"] == 1 and r["majority"] == pytest.approx(1 / 3)
    assert len(r["runs"]) == 2 * 2 * 2 and r["prompts_per_k"] == 12
    for kind in ("accuracy", "calibrated"):
        for mode in ("causal", "fused"):
            for k in ("0", "2"):
                accs = [run[kind][mode] for run in r["runs"] if str(run["k"]) == k]
                assert r["curves"][kind][mode][k] == icl.aggregate(accs)
    # k = 0 has no demonstrations: every seed gives the same accuracy per template.
    zero = [run for run in r["runs"] if run["k"] == 0]
    assert {(run["template"], run["accuracy"]["causal"]) for run in zero} == \
        {(run["template"], run["accuracy"]["causal"]) for run in zero if run["seed"] == 0}
    metrics = summary_metrics(results)
    assert metrics["icl.rte.majority"] == pytest.approx(1 / 3)
    assert metrics["icl.rte.fused.k2"] == r["curves"]["accuracy"]["fused"]["2"]["mean"]
    assert metrics["icl.rte.causal.k0_cal_se"] == r["curves"]["calibrated"]["causal"]["0"]["se"]
    assert len(metrics) == 1 + 2 * 2 * 2 * 2
    assert TASKS["icl"].metric("icl.rte.causal.k2_se").curve is False and TASKS["icl"].metric("icl.rte.causal.k2").curve
    text = render_report(results)
    assert "## In-context learning (icl)" in text and "| 2 |" in text and "majority class 33.3%" in text
    evaluation_figures(results, tmp_path)
    assert (tmp_path / "icl_curve.png").stat().st_size > 0


def test_bad_icl_input_is_one_line_naming_the_field_or_file(tmp_path):
    from common.config import ConfigError

    folder = _write_glue(tmp_path / "glue", task="odd")
    cfg = from_dict(EvalConfig, {"modes": ["causal"], "icl": {"data_dir": str(folder), "tasks": ["odd"], "shots": [0]}})
    with pytest.raises(icl.IclError, match=r"eval\.icl\.verbalizers.*odd=word0,word1"):
        icl.evaluate_icl(make_model(), make_tokenizer(), cfg)
    # A label the verbaliser has no word for: the file and the expected labels.
    cfg = from_dict(EvalConfig, {"modes": ["causal"], "icl": {"data_dir": str(folder), "tasks": ["odd"], "shots": [0],
                                                             "verbalizers": ["odd=a,b"]}})
    _write_glue(folder, task="odd", valid=VALID + [("X.", "Y.", 2)])
    with pytest.raises(icl.IclError, match=r"odd\.valid\.jsonl: label 2 has no label word \(expected labels 0\.\.1"):
        icl.evaluate_icl(make_model(), make_tokenizer(), cfg)
    for bad, field in (({"shots": [-1]}, "shots"), ({"templates": [5]}, "templates"),
                       ({"verbalizers": ["rte=yes"]}, r"verbalizers\[0\]"), ({"tasks": ["rte"]}, "data_dir")):
        with pytest.raises(ConfigError, match=field):
            from_dict(EvalConfig, {"icl": bad})
