"""The n-gram count baseline (gptbert/ngram.py): exact counts, normalised distributions, no counts
across documents, and its use as an evaluation baseline (library and CLI)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gptbert.data import ListDocumentSource
from gptbert.ngram import NGramLM

V = 20
BOS = 1


def _docs():
    # Token ids >= 16 are ordinary tokens (0..15 are specials, as in the tokenizer contract).
    return [[16, 17, 18], [16, 17, 19, 17], [18, 18]]


def test_add_k_bigram_probabilities_by_hand():
    lm = NGramLM.fit(ListDocumentSource(_docs()), order=2, vocab_size=V, smoothing="add-k", k=0.5)
    assert lm.num_tokens == 9
    # Bigrams with <s> in front of each document: (s,16) x2, (16,17) x2, (17,18), (17,19), (19,17), (s,18), (18,18).
    lp = lm.token_log_probs([16, 17, 18])
    p_16_after_s = (2 + 0.5) / (3 + 0.5 * V)  # c(<s> 16) = 2, <s> starts 3 documents
    p_17_after_16 = (2 + 0.5) / (2 + 0.5 * V)
    p_18_after_17 = (1 + 0.5) / (2 + 0.5 * V)  # 17 is followed by 18 and 19 (a final 17 is no history)
    assert np.allclose(np.exp(lp), [p_16_after_s, p_17_after_16, p_18_after_17])
    uni = NGramLM.fit(ListDocumentSource(_docs()), order=1, vocab_size=V, smoothing="add-k", k=0.5)
    assert np.allclose(np.exp(uni.token_log_probs([17])), [(3 + 0.5) / (9 + 0.5 * V)])


@pytest.mark.parametrize("smoothing", ["add-k", "witten-bell"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_distributions_sum_to_one(order, smoothing):
    lm = NGramLM.fit(ListDocumentSource(_docs()), order=order, vocab_size=V, smoothing=smoothing)
    for history in ([], [16], [16, 17], [19, 19]):  # seen, seen, seen, unseen histories
        total = sum(math.exp(lm.token_log_probs(history + [w])[-1]) for w in range(V))
        assert total == pytest.approx(1.0, abs=1e-9), (history, total)


def test_witten_bell_by_hand_and_no_counts_across_documents():
    lm = NGramLM.fit(ListDocumentSource(_docs()), order=2, vocab_size=V, smoothing="witten-bell", k=1.0)
    p_uni_18 = (3 + 1.0) / (9 + V)
    # After 17: followed by 18 once and 19 once -> c(17) = 2, two distinct continuations.
    expect = (1 + 2 * p_uni_18) / (2 + 2)
    assert math.exp(lm.token_log_probs([17, 18])[-1]) == pytest.approx(expect)
    # The last token of document 1 (18) and the first of document 2 (16) never form a bigram.
    p_uni_16 = (2 + 1.0) / (9 + V)
    # 18 is followed only by 18 (in document 3): one distinct continuation, c(18 .) = 1.
    assert math.exp(lm.token_log_probs([18, 16])[-1]) == pytest.approx((0 + 1 * p_uni_16) / (1 + 1))


def test_bad_arguments_and_vocabulary():
    with pytest.raises(ValueError, match="order"):
        NGramLM(0, V)
    with pytest.raises(ValueError, match="vocab_size"):
        NGramLM(5, 2 ** 16)
    with pytest.raises(ValueError, match="smoothing"):
        NGramLM(2, V, smoothing="kneser")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        NGramLM.fit(ListDocumentSource([[16, 25]]), order=2, vocab_size=V)


def test_ngram_baseline_ranks_agreement_pairs_of_the_demo_grammar(tmp_path):
    """On the demo grammar's corpus, counts of word pairs separate most of its minimal pairs:
    through the CLI (`gptbert evaluate SHARDS --baseline ngram`), well above chance."""
    from flows.demo import write_demo_data
    from cli.main import main
    from common.config import load_config
    from tokenization.clean import clean_corpus
    from tokenization.shards import write_shards
    from tokenization.tokenizer import train_tokenizer

    corpus, pairs = write_demo_data(tmp_path / "data", n_documents=400, n_pairs=30, seed=1)
    cfg = load_config("tiny", overrides=[f"clean.inputs={json.dumps([str(corpus)])}"])
    clean_corpus(cfg.clean, tmp_path / "clean", progress_bar=False)
    train_tokenizer(tmp_path / "clean", cfg.tokenizer, tmp_path / "tok", progress_bar=False)
    write_shards(tmp_path / "clean", tmp_path / "tok", cfg.shard, tmp_path / "shards", progress_bar=False)
    assert main(["evaluate", str(tmp_path / "shards"), "--baseline", "ngram", "--order", "3",
                 "--blimp", str(pairs), "--out", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    blimp = results["tasks"]["blimp"]
    assert list(blimp["modes"]) == ["3-gram"] and blimp["temperatures"] == [1.0]
    modes = blimp["modes"]
    assert modes["3-gram"]["t1"]["accuracy"] > 0.7
