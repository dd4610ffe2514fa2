"""The tokenizer stage: SPEC section 4 pipeline, specials, round trip, chunking, digits, digests."""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config.data import TokenizerConfig
from common.artifacts import DataError, read_record
from tokenization.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

WORDS = ["the", "cat", "sat", "on", "mat", "Hello", "WORLD", "CamelCase", "naïve", "café", "日本語",
         "über", "straße", "😀", "👍🏽", "x=y+z", "don't", "ALLCaps", "e-mail", "co-operate",
         "antidisestablishmentarianism", "==========", "http://example.com/a/b"]


def make_corpus(path, n_docs=400, seed=0):
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        parts = []
        for _ in range(rng.randint(5, 40)):
            r = rng.random()
            if r < 0.1:
                parts.append(str(rng.randint(0, 10**rng.randint(1, 8))))
            elif r < 0.15:
                parts.append("\n" if rng.random() < 0.5 else "\n\n")
            else:
                parts.append(rng.choice(WORDS))
        docs.append(" ".join(parts).replace(" \n ", "\n").strip() + ".")
    pq.write_table(pa.table({"text": docs, "source": ["synthetic"] * len(docs)}), path)
    return docs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    docs = make_corpus(root / "documents.parquet")
    stats = train_tokenizer(root / "documents.parquet", TokenizerConfig(vocab_size=400), root / "tok",
                            progress_bar=False)
    return root, docs, stats, load_tokenizer(root / "tok")


def normaliser_view(text: str) -> str:
    """What a round trip may change: NFKC, and spaces directly before a newline."""
    return re.sub(r" +\n", "\n", unicodedata.normalize("NFKC", text))


ROUND_TRIP = [
    "Hello world", "  leading spaces", "trailing spaces  ", "a \n b", "line\n\n\nbreaks\n",
    "\nstarts with newline", "tabs\tand\r\nCRLF", "digits 0123456789 and 3.14159 and 1,000,000",
    "emoji 😀👍🏽🇳🇴 family 👨‍👩‍👧", "ﬁnancial ＦＵＬＬＷＩＤＴＨ ①②", "Ünïcödé ελληνικά русский 中文 العربية",
    "a" * 100, "supercalifragilisticexpialidocious" * 3, "CamelCaseWordsAndALLCAPSWords",
    "x  \n  y", "symbols !!!???... /// \\\\ ~~~", "", " ", "\n",
]


def test_special_tokens_and_post_processor(trained):
    _, _, stats, tok = trained
    assert [tok.id_to_token(i) for i in range(16)] == SPECIAL_TOKENS
    assert SPECIAL_TOKENS[:5] == ["<unk>", "<s>", "</s>", "<pad>", "<mask>"]
    assert SPECIAL_TOKENS[15] == "<special_10>"
    single = tok.encode("cat sat")
    assert single.ids[0] == 1 and single.ids[1:] == tok.encode("cat sat", add_special_tokens=False).ids
    pair = tok.encode("cat", "mat")
    a, b = (tok.encode(x, add_special_tokens=False).ids for x in ("cat", "mat"))
    assert pair.ids == [1] + a + [2] + b
    assert stats["stats"]["vocab_size"] == tok.get_vocab_size() == 400


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_up_to_the_normaliser(trained, text):
    tok = trained[3]
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == normaliser_view(text)
    assert 0 not in ids  # byte level: never <unk>


def test_round_trip_on_corpus_documents(trained):
    _, docs, _, tok = trained
    for doc, enc in zip(docs, tok.encode_batch_fast(docs, add_special_tokens=False)):
        assert tok.decode(enc.ids) == normaliser_view(doc)


def test_tokens_at_most_24_chars_and_digits_one_per_token(trained):
    tok = trained[3]
    vocab = tok.get_vocab()
    assert max(len(t) for t in vocab if t not in SPECIAL_TOKENS) <= 24
    assert any(len(t) > 8 for t in vocab)  # long words did merge (the cap is what binds)
    text = "1234567890 x2024y " + "=" * 80 + " " + "a" * 100
    enc = tok.encode(text, add_special_tokens=False)
    assert all(len(t) <= 24 for t in enc.tokens)
    for t in enc.tokens:
        assert sum(c.isdigit() for c in t) <= 1, t
    assert sum(c.isdigit() for t in enc.tokens for c in t) == 14
    for token in set(vocab) - set(SPECIAL_TOKENS):
        assert sum(c.isdigit() for c in token) <= 1, token


def test_pre_tokenizer_splits_case_changes_digits_and_newlines(trained):
    tok = trained[3]
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(
        "CamelCase ALLCAPS iPhone 42\nnext"))]
    # Lower -> upper is a split point; an upper run followed by lower case stays one piece
    # (o200k-style alternatives, as SPEC section 4 lists them).
    assert pieces == ["ĠCamel", "Case", "ĠALLCAPS", "Ġi", "Phone", "Ġ4", "2", "Ċ", "Ġnext"]
    assert tok.normalizer.normalize_str("a  \nb") == " a\n b"


def test_training_is_deterministic_and_records_digests(trained, tmp_path):
    root, _, stats, _ = trained
    again = train_tokenizer(root / "documents.parquet", TokenizerConfig(vocab_size=400, num_threads=1),
                            tmp_path / "tok", progress_bar=False)
    for name in ("tokenizer.json", "stage.json"):
        assert (root / "tok" / name).read_bytes() == (tmp_path / "tok" / name).read_bytes()
    on_disk = read_record(root / "tok", "tokenizer")
    assert on_disk["output_digest"] == again["output_digest"] == stats["output_digest"]
    assert on_disk["output_digest"] == hashlib.sha256((root / "tok" / "tokenizer.json").read_bytes()).hexdigest()
    assert on_disk["inputs"] == {"corpus": hashlib.sha256((root / "documents.parquet").read_bytes()).hexdigest()}
    other = train_tokenizer(root / "documents.parquet", TokenizerConfig(vocab_size=420),
                            tmp_path / "tok2", progress_bar=False)
    assert other["identity"] != stats["identity"] and other["inputs"] == stats["inputs"]


def test_bad_tokenizer_and_documents_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="broken.json: not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="documents file not found"):
        train_tokenizer(tmp_path / "nope.parquet", TokenizerConfig(vocab_size=300), tmp_path / "o",
                        progress_bar=False)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet: Parquet file has no column 'text'"):
        train_tokenizer(tmp_path / "d.parquet", TokenizerConfig(vocab_size=300), tmp_path / "o",
                        progress_bar=False)
    assert not (tmp_path / "o").exists()


def test_wrong_special_ids_are_rejected(trained, tmp_path):
    root = trained[0]
    data = json.loads((root / "tok" / "tokenizer.json").read_text())
    for t in data["added_tokens"]:
        if t["content"] == "<mask>":
            t["content"] = "<MASK>"
    data["model"]["vocab"]["<MASK>"] = data["model"]["vocab"].pop("<mask>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="special token <mask> must have id 4"):
        load_tokenizer(tmp_path)


def test_training_is_identical_in_a_fresh_parallel_process(trained, tmp_path):
    # Rust's hash maps are seeded per process and rayon splits work by thread count: neither may
    # change the result. (The tests run with TOKENIZERS_PARALLELISM=false; the child runs parallel.)
    import os
    import subprocess
    import sys

    root = trained[0]
    code = ("from common.config.data import TokenizerConfig\n"
            "from tokenization.tokenizer import train_tokenizer\n"
            f"train_tokenizer({str(root / 'documents.parquet')!r}, TokenizerConfig(vocab_size=400), "
            f"{str(tmp_path / 'tok')!r}, progress_bar=False)\n")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true", RAYON_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (root / "tok" / "tokenizer.json").read_bytes()


def test_max_documents_limits_the_training_text(trained, tmp_path):
    root, docs, _, _ = trained
    stats = train_tokenizer(root / "documents.parquet", TokenizerConfig(vocab_size=400, max_documents=50),
                            tmp_path / "tok", progress_bar=False)
    assert stats["stats"]["documents"] == 50 and stats["stats"]["characters"] == sum(map(len, docs[:50]))
