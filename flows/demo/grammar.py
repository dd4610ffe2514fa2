"""The demo corpus: a small probabilistic grammar of simple English, and minimal pairs made from it.

The embedded demo needs a corpus a tiny model can learn in minutes on a laptop, and an evaluation
that shows whether it did. Both come from the same grammar, so the minimal pairs test exactly the
regularities the corpus holds:

- number agreement: subject-verb (also across a prepositional "attractor" noun), determiner-noun,
  reflexive anaphor-antecedent, and is/are, has/have, was/were;
- argument structure: strictly transitive verbs always take an object, intransitive ones never do;
- irregular forms: simple past vs past participle (``ate`` / ``has eaten``).

Everything is seeded with ``random.Random(seed)``: the same seed gives byte-identical files.
Pure Python (no torch, no tokenizers).
"""

from __future__ import annotations

import gzip
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

# --- lexicon -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Noun:
    """A noun of the lexicon: singular and plural forms, gender (for the reflexive) and animacy."""

    sg: str
    pl: str
    gender: str  # "m", "f", "n": picks himself / herself / itself
    animate: bool

    def form(self, plural: bool) -> str:
        """The plural or the singular form."""
        return self.pl if plural else self.sg


@dataclass(frozen=True)
class Verb:
    """A verb of the lexicon: its present, past, participle and -ing forms, and whether it is transitive."""

    base: str  # "eat": also the plural present
    s3: str  # "eats": singular present
    past: str  # "ate"
    participle: str  # "eaten"
    ing: str  # "eating"
    transitive: bool

    def present(self, plural: bool) -> str:
        """The present form that agrees with a plural or a singular subject."""
        return self.base if plural else self.s3


NOUNS = [
    Noun("boy", "boys", "m", True),
    Noun("man", "men", "m", True),
    Noun("king", "kings", "m", True),
    Noun("farmer", "farmers", "m", True),
    Noun("girl", "girls", "f", True),
    Noun("woman", "women", "f", True),
    Noun("queen", "queens", "f", True),
    Noun("sister", "sisters", "f", True),
    Noun("dog", "dogs", "n", True),
    Noun("cat", "cats", "n", True),
    Noun("bird", "birds", "n", True),
    Noun("horse", "horses", "n", True),
    Noun("mouse", "mice", "n", True),
    Noun("child", "children", "n", True),
]
# Objects of transitive verbs may also be things; things never act as subjects of animate verbs.
THINGS = [
    Noun("apple", "apples", "n", False),
    Noun("book", "books", "n", False),
    Noun("ball", "balls", "n", False),
    Noun("box", "boxes", "n", False),
    Noun("cake", "cakes", "n", False),
    Noun("letter", "letters", "n", False),
    Noun("song", "songs", "n", False),
]

# "The child saw itself" reads oddly, so "child" never antecedes a reflexive.
_NO_REFLEXIVE = {"child"}

TRANSITIVE = [
    Verb("see", "sees", "saw", "seen", "seeing", True),
    Verb("take", "takes", "took", "taken", "taking", True),
    Verb("find", "finds", "found", "found", "finding", True),
    Verb("eat", "eats", "ate", "eaten", "eating", True),
    Verb("write", "writes", "wrote", "written", "writing", True),
    Verb("hide", "hides", "hid", "hidden", "hiding", True),
    Verb("chase", "chases", "chased", "chased", "chasing", True),
    Verb("like", "likes", "liked", "liked", "liking", True),
    Verb("help", "helps", "helped", "helped", "helping", True),
    Verb("carry", "carries", "carried", "carried", "carrying", True),
]
INTRANSITIVE = [
    Verb("sleep", "sleeps", "slept", "slept", "sleeping", False),
    Verb("arrive", "arrives", "arrived", "arrived", "arriving", False),
    Verb("laugh", "laughs", "laughed", "laughed", "laughing", False),
    Verb("fall", "falls", "fell", "fallen", "falling", False),
    Verb("go", "goes", "went", "gone", "going", False),
    Verb("smile", "smiles", "smiled", "smiled", "smiling", False),
    Verb("run", "runs", "ran", "run", "running", False),
    Verb("sing", "sings", "sang", "sung", "singing", False),
]
# Verbs whose participle differs from the simple past: the irregular-forms paradigm uses these.
IRREGULAR = [v for v in TRANSITIVE + INTRANSITIVE if v.past != v.participle]
# Verbs that read well with a reflexive object ("saw himself", "helped themselves").
REFLEXIVE_VERBS = [v for v in TRANSITIVE if v.base in ("see", "help", "like", "find", "hide")]

ADJECTIVES = ["big", "small", "happy", "old", "young", "quiet", "brave", "hungry", "tired", "angry"]
ADVERBS = ["quickly", "slowly", "today", "again", "outside", "at night"]
PREPOSITIONS = ["near", "with", "behind", "beside"]
DET_SG = ["the", "a", "this", "that", "every"]
DET_PL = ["the", "these", "those", "some", "many"]
REFLEXIVE = {"m": "himself", "f": "herself", "n": "itself"}
CONNECTIVES = ["and", "because", "but", "while"]


# --- phrase builders ---------------------------------------------------------------------------


def _article(det: str, next_word: str) -> str:
    if det == "a" and next_word[0] in "aeiou":
        return "an"
    return det


def _np(rng: random.Random, noun: Noun, plural: bool, det: str | None = None, adj: bool | None = None) -> str:
    det = det or rng.choice(DET_PL if plural else DET_SG)
    words = []
    if adj if adj is not None else rng.random() < 0.3:
        words.append(rng.choice(ADJECTIVES))
    words.append(noun.form(plural))
    return " ".join([_article(det, words[0])] + words)


def _subject(rng: random.Random, plural: bool, attractor: bool = False) -> tuple[str, Noun]:
    noun = rng.choice(NOUNS)
    text = _np(rng, noun, plural)
    if attractor:
        # A prepositional phrase whose noun has the *other* number: agreement must skip over it.
        other = rng.choice(NOUNS + THINGS)
        text += f" {rng.choice(PREPOSITIONS)} {_np(rng, other, not plural)}"
    return text, noun


def _object(rng: random.Random) -> str:
    return _np(rng, rng.choice(NOUNS + THINGS), rng.random() < 0.5)


def _finite(rng: random.Random, verb: Verb, plural: bool) -> str:
    """A finite verb group that agrees with a subject of the given number."""
    r = rng.random()
    if r < 0.4:
        return verb.present(plural)
    if r < 0.65:
        return verb.past
    if r < 0.85:
        return f"{'have' if plural else 'has'} {verb.participle}"
    return f"{'are' if plural else 'is'} {verb.ing}"


def _clause(rng: random.Random) -> str:
    plural = rng.random() < 0.5
    subj, noun = _subject(rng, plural, attractor=rng.random() < 0.2)
    kind = rng.random()
    if kind < 0.35:
        verb = rng.choice(INTRANSITIVE)
        out = f"{subj} {_finite(rng, verb, plural)}"
        if rng.random() < 0.4:
            out += f" {rng.choice(ADVERBS)}"
        return out
    if kind < 0.75:
        verb = rng.choice(TRANSITIVE)
        return f"{subj} {_finite(rng, verb, plural)} {_object(rng)}"
    if kind < 0.88 and noun.sg not in _NO_REFLEXIVE:
        verb = rng.choice(REFLEXIVE_VERBS)
        refl = "themselves" if plural else REFLEXIVE[noun.gender]
        return f"{subj} {_finite(rng, verb, plural)} {refl}"
    be = rng.choice([("are", "is"), ("were", "was")])
    return f"{subj} {be[0] if plural else be[1]} {rng.choice(ADJECTIVES)}"


def _sentence_text(words: str) -> str:
    return words[0].upper() + words[1:] + "."


def sentence(rng: random.Random) -> str:
    """One sentence: a clause, sometimes two joined by a connective."""
    text = _clause(rng)
    if rng.random() < 0.2:
        text += f" {rng.choice(CONNECTIVES)} {_clause(rng)}"
    return _sentence_text(text)


def document(rng: random.Random, min_sentences: int = 3, max_sentences: int = 8) -> str:
    """One document: ``min_sentences`` to ``max_sentences`` sentences (inclusive), space-joined."""
    return " ".join(sentence(rng) for _ in range(rng.randint(min_sentences, max_sentences)))


# --- writers -----------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_corpus(path: str | Path, n_documents: int, seed: int = 0) -> dict:
    """Write ``n_documents`` documents, one per line, as gzip text (the BabyLM ``*.train.gz`` layout).

    The gzip header carries no timestamp, so the same seed gives byte-identical files.
    Returns ``{"path", "documents", "sentences", "words"}``.
    """
    if n_documents <= 0:
        raise ValueError(f"write_corpus: n_documents must be positive, got {n_documents}")
    path = Path(path)
    rng = random.Random(f"corpus-{seed}")
    docs = [document(rng) for _ in range(n_documents)]
    text = "\n".join(docs) + "\n"
    _write_atomic(path, gzip.compress(text.encode("utf-8"), mtime=0))
    return {
        "path": str(path),
        "documents": len(docs),
        "sentences": sum(d.count(".") for d in docs),
        "words": sum(len(d.split()) for d in docs),
    }


# --- minimal pairs -----------------------------------------------------------------------------
# Each generator returns (good, bad). Where the manipulated feature has two values, half the pairs
# take each value as the good one, so a length or frequency bias alone cannot beat chance.


def _pair_determiner_noun(rng: random.Random) -> tuple[str, str]:
    plural = rng.random() < 0.5
    noun = rng.choice(NOUNS + THINGS)
    sg_det, pl_det = rng.choice([("this", "these"), ("that", "those")])
    good_det, bad_det = (pl_det, sg_det) if plural else (sg_det, pl_det)
    subj_plural = rng.random() < 0.5
    subj, _ = _subject(rng, subj_plural)
    verb = rng.choice(TRANSITIVE)
    head = f"{subj} {verb.present(subj_plural) if rng.random() < 0.5 else verb.past}"
    good = f"{head} {good_det} {noun.form(plural)}"
    bad = f"{head} {bad_det} {noun.form(plural)}"
    return _sentence_text(good), _sentence_text(bad)


def _pair_subject_verb(rng: random.Random, attractor: bool) -> tuple[str, str]:
    plural = rng.random() < 0.5
    subj, _ = _subject(rng, plural, attractor=attractor)
    verb = rng.choice(INTRANSITIVE)
    tail = f" {rng.choice(ADVERBS)}" if rng.random() < 0.3 else ""
    good = f"{subj} {verb.present(plural)}{tail}"
    bad = f"{subj} {verb.present(not plural)}{tail}"
    return _sentence_text(good), _sentence_text(bad)


def _pair_anaphor(rng: random.Random) -> tuple[str, str]:
    plural = rng.random() < 0.5
    noun = rng.choice([n for n in NOUNS if n.sg not in _NO_REFLEXIVE])
    subj = _np(rng, noun, plural)
    verb = rng.choice(REFLEXIVE_VERBS)
    sg_refl = REFLEXIVE[noun.gender]
    good, bad = ("themselves", sg_refl) if plural else (sg_refl, "themselves")
    return _sentence_text(f"{subj} {verb.past} {good}"), _sentence_text(f"{subj} {verb.past} {bad}")


def _pair_transitive(rng: random.Random) -> tuple[str, str]:
    plural = rng.random() < 0.5
    subj, _ = _subject(rng, plural)
    obj = _object(rng)
    good = rng.choice(TRANSITIVE)
    bad = rng.choice(INTRANSITIVE)
    return (_sentence_text(f"{subj} {good.past} {obj}"), _sentence_text(f"{subj} {bad.past} {obj}"))


def _pair_intransitive(rng: random.Random) -> tuple[str, str]:
    plural = rng.random() < 0.5
    subj, _ = _subject(rng, plural)
    good = rng.choice(INTRANSITIVE)
    bad = rng.choice(TRANSITIVE)
    return _sentence_text(f"{subj} {good.past}"), _sentence_text(f"{subj} {bad.past}")


def _pair_irregular(rng: random.Random) -> tuple[str, str]:
    plural = rng.random() < 0.5
    subj, _ = _subject(rng, plural)
    verb = rng.choice(IRREGULAR)
    obj = f" {_object(rng)}" if verb.transitive else ""
    if rng.random() < 0.5:  # simple past wanted: "ate" good, "eaten" bad
        good, bad = f"{subj} {verb.past}{obj}", f"{subj} {verb.participle}{obj}"
    else:  # perfect wanted: "has eaten" good, "has ate" bad
        aux = "have" if plural else "has"
        good, bad = f"{subj} {aux} {verb.participle}{obj}", f"{subj} {aux} {verb.past}{obj}"
    return _sentence_text(good), _sentence_text(bad)


def _pair_copula(rng: random.Random) -> tuple[str, str]:
    plural = rng.random() < 0.5
    subj, _ = _subject(rng, plural, attractor=rng.random() < 0.3)
    sg, pl = rng.choice([("is", "are"), ("was", "were")])
    adj = rng.choice(ADJECTIVES)
    good, bad = (pl, sg) if plural else (sg, pl)
    return _sentence_text(f"{subj} {good} {adj}"), _sentence_text(f"{subj} {bad} {adj}")


# UID -> (linguistics_term, field, generator)
PARADIGMS = {
    "determiner_noun_agreement": ("determiner_noun_agreement", "morphology", _pair_determiner_noun),
    "regular_plural_subject_verb_agreement": (
        "subject_verb_agreement", "morphology", lambda rng: _pair_subject_verb(rng, attractor=False)),
    "distractor_agreement_relational_noun": (
        "subject_verb_agreement", "morphology", lambda rng: _pair_subject_verb(rng, attractor=True)),
    "copula_agreement": ("subject_verb_agreement", "morphology", _pair_copula),
    "anaphor_number_agreement": ("anaphor_agreement", "morphology", _pair_anaphor),
    "transitive": ("argument_structure", "syntax", _pair_transitive),
    "intransitive": ("argument_structure", "syntax", _pair_intransitive),
    "irregular_past_participle_verbs": ("irregular_forms", "morphology", _pair_irregular),
}


def minimal_pairs(uid: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct BLiMP-format records of paradigm ``uid`` (good and bad always differ)."""
    if uid not in PARADIGMS:
        raise ValueError(f"unknown paradigm {uid!r} (known: {', '.join(PARADIGMS)})")
    term, field, gen = PARADIGMS[uid]
    rng = random.Random(f"pairs-{uid}-{seed}")
    records: list[dict] = []
    seen: set[str] = set()
    tries = 0
    while len(records) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"paradigm {uid}: cannot make {n} distinct pairs")
        good, bad = gen(rng)
        if good == bad or good in seen:
            continue
        seen.add(good)
        records.append({
            "sentence_good": good,
            "sentence_bad": bad,
            "field": field,
            "linguistics_term": term,
            "UID": uid,
            "pair_id": len(records),
        })
    return records


def write_minimal_pairs(directory: str | Path, n_per_paradigm: int, seed: int = 0) -> dict[str, int]:
    """Write one ``UID.jsonl`` per paradigm into ``directory``; returns ``{uid: n_pairs}``."""
    if n_per_paradigm <= 0:
        raise ValueError(f"write_minimal_pairs: n_per_paradigm must be positive, got {n_per_paradigm}")
    directory = Path(directory)
    counts = {}
    for uid in PARADIGMS:
        records = minimal_pairs(uid, n_per_paradigm, seed)
        text = "".join(json.dumps(r) + "\n" for r in records)
        _write_atomic(directory / f"{uid}.jsonl", text.encode("utf-8"))
        counts[uid] = len(records)
    return counts


__all__ = ["PARADIGMS", "document", "minimal_pairs", "sentence", "write_corpus", "write_minimal_pairs"]
