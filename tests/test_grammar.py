"""The demo grammar: deterministic by seed, minimal pairs differ in exactly the intended feature."""

from __future__ import annotations

import gzip
import json

import pytest

from flows.demo import grammar


def test_corpus_is_deterministic_and_counted(tmp_path):
    a = grammar.write_corpus(tmp_path / "a.txt.gz", 50, seed=3)
    b = grammar.write_corpus(tmp_path / "b.txt.gz", 50, seed=3)
    c = grammar.write_corpus(tmp_path / "c.txt.gz", 50, seed=4)
    assert (tmp_path / "a.txt.gz").read_bytes() == (tmp_path / "b.txt.gz").read_bytes()
    assert (tmp_path / "a.txt.gz").read_bytes() != (tmp_path / "c.txt.gz").read_bytes()
    lines = gzip.decompress((tmp_path / "a.txt.gz").read_bytes()).decode().splitlines()
    assert len(lines) == 50 == a["documents"]
    assert a["words"] == sum(len(line.split()) for line in lines)
    for line in lines:  # a document is 3..8 sentences, each capitalised and ending in a period
        assert line.endswith(".") and line[0].isupper()
        assert 3 <= line.count(".") <= 8, line
    assert b == {**a, "path": str(tmp_path / "b.txt.gz")}
    assert c["documents"] == 50


def test_corpus_respects_agreement():
    # Every reflexive in the corpus agrees with its clause's subject head noun.
    import random

    rng = random.Random(0)
    plural_nouns = {n.pl for n in grammar.NOUNS}
    singular_nouns = {n.sg for n in grammar.NOUNS}
    checked = 0
    for _ in range(2000):
        s = grammar._clause(rng)
        words = s.split()
        if words[-1] in ("himself", "herself", "itself", "themselves") and len(words) <= 5:
            head = [w for w in words if w in plural_nouns | singular_nouns][0]
            assert (words[-1] == "themselves") == (head in plural_nouns), s
            checked += 1
    assert checked > 50


def _diff(good: str, bad: str) -> list[tuple[str, str]]:
    g, b = good.rstrip(".").split(), bad.rstrip(".").split()
    assert len(g) == len(b), (good, bad)
    return [(x, y) for x, y in zip(g, b) if x != y]


def test_minimal_pairs_files(tmp_path):
    counts = grammar.write_minimal_pairs(tmp_path, 40, seed=1)
    assert counts == {uid: 40 for uid in grammar.PARADIGMS}
    assert sorted(p.stem for p in tmp_path.glob("*.jsonl")) == sorted(grammar.PARADIGMS)
    again = tmp_path / "again"
    grammar.write_minimal_pairs(again, 40, seed=1)
    for uid in grammar.PARADIGMS:
        text = (tmp_path / f"{uid}.jsonl").read_text()
        assert text == (again / f"{uid}.jsonl").read_text()
        records = [json.loads(line) for line in text.splitlines()]
        assert [r["pair_id"] for r in records] == list(range(40))
        assert len({r["sentence_good"] for r in records}) == 40
        for r in records:
            assert set(r) == {"sentence_good", "sentence_bad", "UID", "linguistics_term", "field", "pair_id"}
            assert r["UID"] == uid and r["field"] in ("syntax", "morphology")
            # Exactly one word differs between the good and the bad sentence.
            assert len(_diff(r["sentence_good"], r["sentence_bad"])) == 1, r


AGREEMENT_SWAPS = {
    "determiner_noun_agreement": {("this", "these"), ("that", "those")},
    "anaphor_number_agreement": {("himself", "themselves"), ("herself", "themselves"), ("itself", "themselves")},
    "copula_agreement": {("is", "are"), ("was", "were")},
}


@pytest.mark.parametrize("uid", sorted(AGREEMENT_SWAPS))
def test_pairs_differ_by_number_and_are_balanced(uid):
    records = grammar.minimal_pairs(uid, 200, seed=0)
    good_is_plural = 0
    for r in records:
        [(g, b)] = _diff(r["sentence_good"], r["sentence_bad"])
        sg, pl = next(pair for pair in AGREEMENT_SWAPS[uid] if {g, b} == set(pair))
        good_is_plural += g == pl
    # Both numbers serve as the good sentence, so a bias for either form cannot beat chance.
    assert 60 <= good_is_plural <= 140


def test_subject_verb_pairs_swap_the_verb_number():
    verbs = {v.base: v.s3 for v in grammar.INTRANSITIVE}
    for uid in ("regular_plural_subject_verb_agreement", "distractor_agreement_relational_noun"):
        for r in grammar.minimal_pairs(uid, 100, seed=2):
            [(g, b)] = _diff(r["sentence_good"], r["sentence_bad"])
            assert verbs.get(g) == b or verbs.get(b) == g, r
            if uid.startswith("distractor"):
                assert any(p in r["sentence_good"].split() for p in grammar.PREPOSITIONS)


def test_argument_structure_and_irregular_pairs():
    trans = {v.past for v in grammar.TRANSITIVE}
    intrans = {v.past for v in grammar.INTRANSITIVE}
    for r in grammar.minimal_pairs("transitive", 50):
        [(g, b)] = _diff(r["sentence_good"], r["sentence_bad"])
        assert g in trans and b in intrans
    for r in grammar.minimal_pairs("intransitive", 50):
        [(g, b)] = _diff(r["sentence_good"], r["sentence_bad"])
        assert g in intrans and b in trans
        assert len(r["sentence_good"].split()) <= 4  # no object
    forms = {(v.past, v.participle) for v in grammar.IRREGULAR}
    for r in grammar.minimal_pairs("irregular_past_participle_verbs", 50):
        [(g, b)] = _diff(r["sentence_good"], r["sentence_bad"])
        perfect = any(w in ("has", "have") for w in r["sentence_good"].split())
        assert ((b, g) if perfect else (g, b)) in forms, r


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_documents"):
        grammar.write_corpus("/tmp/x.txt.gz", 0)
    with pytest.raises(ValueError, match="unknown paradigm"):
        grammar.minimal_pairs("nope", 3)
