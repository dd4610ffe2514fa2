"""The BabyLM 2025 reading task (gptbert/evaluation/reading.py): the CSV reader, surprisal by the
pipeline's get_p2 rules (checked against a re-enactment on `transformers` run on our export), and
the regressions (checked against statsmodels' formula API, which the pipeline uses)."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from gptbert.evaluation import reading
from gptbert.evaluation.reading import ReadingFormatError

transformers = pytest.importorskip("transformers")
from test_export import _auto, _hf_tokenizer, exported  # noqa: E402,F401 (module fixture)

SENTENCES = ["The boys liked themselves very much.", "A girl saw the unbelievable spaceship yesterday.",
             "Children read books about dinosaurs.", "The teacher quickly explained everything."]
COLUMNS = ["item", "word", "prev_item", "prev_word", *reading.VARIABLES, "Subtlex_log10", "length",
           "context_length", "prev_length"]


def write_reading_csv(path: Path, seed: int = 0, repeats: int = 6) -> Path:
    """One row per word of SENTENCES (repeated with noise): the context before it, the previous
    word's row, and synthetic measures that grow with word length and carry noise."""
    rng = random.Random(seed)
    rows = []
    for _ in range(repeats):
        for sentence in SENTENCES:
            words = sentence.split(" ")
            for k, word in enumerate(words):
                item = " ".join(words[:k])  # empty for the first word: the pipeline reads "None"
                row = {"item": item, "word": word, "prev_item": " ".join(words[: k - 1]) if k else "",
                       "prev_word": words[k - 1] if k else ""}
                for v in reading.VARIABLES:
                    row[v] = "" if rng.random() < 0.05 else f"{200 + 15 * len(word) + rng.gauss(0, 30):.3f}"
                row.update({"Subtlex_log10": f"{rng.uniform(0.5, 5):.4f}", "length": len(word),
                            "context_length": k, "prev_length": len(words[k - 1]) if k else ""})
                rows.append(row)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _pipeline_surprisal(model, tok, sentence: str, word: str, mntp: bool) -> float:
    """evaluation_functions.get_p2 / get_p2_mntp (3 masks) on transformers alone: -log of the
    product of the word's token probabilities, later tokens after decoding and re-tokenising."""
    def get_p(text: str, piece: str) -> float:
        if mntp:
            text = text + tok.mask_token * 3
        x = tok(text, return_tensors="pt")
        if mntp:
            pos = -4 if x.input_ids[0, -1] == tok.mask_token_id else -5
        else:
            pos = -1
        with torch.no_grad():
            logits = model(**x)["logits"][:, pos, :]
        target = tok(piece, add_special_tokens=False)["input_ids"][0]
        return torch.softmax(logits[0], dim=-1)[target].item()

    target = tok(word, add_special_tokens=False)["input_ids"]
    p = [get_p(sentence, word)]
    sentence = sentence + tok.decode(target[0])
    for token in target[1:]:
        t = tok.decode(token)
        p.append(get_p(sentence, t))
        sentence = sentence + t
    return -math.log(float(np.prod(p)))


def test_reader_columns_and_errors(tmp_path):
    path = write_reading_csv(tmp_path / "reading_data.csv", repeats=1)
    data = reading.load_reading(path)
    assert len(data["word"]) == sum(len(s.split(" ")) for s in SENTENCES)
    assert data["item"][0] == "None" and data["prev_item"][0] is None  # the pipeline's fillna / NaN
    assert data["prev_word"][1] == "The" and math.isnan(data["prev_length"][0]) and data["length"][1] == 4.0
    text = path.read_text().splitlines()
    (tmp_path / "bad.csv").write_text("\n".join([text[0].replace(",N400", ",X400")] + text[1:]) + "\n")
    with pytest.raises(ReadingFormatError, match=r"bad\.csv: missing column\(s\) N400"):
        reading.load_reading(tmp_path / "bad.csv")
    fields = text[3].split(",")
    fields[COLUMNS.index("length")] = "four"
    (tmp_path / "bad2.csv").write_text("\n".join(text[:3] + [",".join(fields)]) + "\n")
    with pytest.raises(ReadingFormatError, match=r"bad2\.csv:4: column 'length' must be a number, got 'four'"):
        reading.load_reading(tmp_path / "bad2.csv")


def test_surprisal_equals_the_pipelines_get_p2_on_the_export(exported):
    """Causal and MNTP surprisal of every (context, word), including words of several tokens and
    the "None" context, equal the pipeline's rules run on the transformers export."""
    tok = _hf_tokenizer(exported["hf"])
    pairs = [("None", "The"), ("The boys", "liked"), ("A girl saw the", "unbelievable"),
             ("Children read books about", "dinosaurs."), ("The teacher", "quickly")]
    assert any(len(tok(w, add_special_tokens=False)["input_ids"]) > 2 for _, w in pairs)  # multi-token words
    for mode, cls in (("causal", "AutoModelForCausalLM"), ("mntp", "AutoModelForMaskedLM")):
        hf = _auto(cls, exported["hf"])
        ours = reading.surprisals(exported["model"], exported["tokenizer"], [c for c, _ in pairs], [w for _, w in pairs], mode)
        theirs = [_pipeline_surprisal(hf, tok, c, w, mntp=mode == "mntp") for c, w in pairs]
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0, err_msg=mode)


def test_regressions_equal_statsmodels(tmp_path):
    """Our OLS R^2, coefficient and t value of surprisal equal statsmodels' formula fits, with the
    pipeline's formulas and its two dropna calls, for the plain and the spillover baselines."""
    smf = pytest.importorskip("statsmodels.formula.api")
    pd = pytest.importorskip("pandas")
    path = write_reading_csv(tmp_path / "reading_data.csv")
    data = reading.load_reading(path)
    rng = np.random.default_rng(0)
    cols = {c: np.asarray(v, dtype=float) for c, v in data.items() if c not in reading.TEXT_COLUMNS}
    cols["pred"] = rng.gamma(2.0, 2.0, len(data["word"])) + 0.05 * cols["RTfirstfix"]
    cols["prev_pred"] = np.where(np.isnan(cols["prev_length"]), np.nan, rng.gamma(2.0, 2.0, len(data["word"])))
    df = pd.DataFrame(cols)
    base = "Subtlex_log10 + length + context_length + Subtlex_log10:length + Subtlex_log10:context_length + length:context_length"
    spill = ("Subtlex_log10 + length + context_length + prev_length + prev_pred + Subtlex_log10:length + "
             "Subtlex_log10:context_length + Subtlex_log10:prev_length + Subtlex_log10:prev_pred + "
             "length:context_length + length:prev_length + length:prev_pred + context_length:prev_length + "
             "context_length:prev_pred + prev_length:prev_pred")
    for dv in reading.VARIABLES:
        for spillover, formula, names in ((False, base, list(reading.PREDICTORS)), (True, spill, list(reading.SPILLOVER))):
            b = smf.ols(f"{dv} ~ {formula}", data=df[[dv, *names]].dropna()).fit()
            m = smf.ols(f"{dv} ~ {formula} + pred", data=df[["pred", dv, *names]].dropna()).fit()
            ours = reading.predictive_power(cols, dv, spillover)
            assert ours["r2_baseline"] == pytest.approx(b.rsquared, abs=1e-10)
            assert ours["r2"] == pytest.approx(m.rsquared, abs=1e-10)
            assert ours["coefficient"] == pytest.approx(m.params["pred"], rel=1e-7)
            assert ours["t"] == pytest.approx(m.tvalues["pred"], rel=1e-6)
            assert ours["score"] == pytest.approx((m.rsquared - b.rsquared) / (1 - b.rsquared) * 100, abs=1e-8)


def test_suite_runs_reading_and_reports_it(exported, tmp_path):
    from common.config import from_dict, to_dict
    from common.config.eval import EvalConfig
    from gptbert.evaluation import babylm, render_report, summary_metrics

    (tmp_path / "full_eval" / "reading").mkdir(parents=True)
    write_reading_csv(tmp_path / "full_eval" / "reading" / "reading_data.csv", repeats=2)
    cfg = from_dict(EvalConfig, {**to_dict(EvalConfig()), "babylm_dir": str(tmp_path), "temperatures": [1.0],
                                 "babylm_tasks": ["reading"]})
    results = {"tasks": {"babylm": babylm.evaluate_suite(exported["model"], exported["tokenizer"], cfg)}}
    r = results["tasks"]["babylm"]["tasks"]["reading"]
    assert set(r["modes"]) == {"causal", "mntp"} and r["num_items"] == 2 * sum(len(s.split(" ")) for s in SENTENCES)
    for m in r["modes"].values():
        assert m["eye_tracking"] == pytest.approx(np.mean([m["fits"][v]["score"] for v in reading.EYE_TRACKING]))
        assert m["self_paced"] == m["spillover_fits"]["self_paced_reading_time"]["score"]
    metrics = summary_metrics(results)
    assert metrics["babylm.reading.causal.eye_tracking"] == r["modes"]["causal"]["eye_tracking"]
    assert "| mntp |" in render_report(results) and "### reading" in render_report(results)
