"""The whole data chain (clean -> train-tokenizer -> shard -> reader) through the CLI, on a capped
subset of the BabyLM sample (~300 KB of text per source)."""

from __future__ import annotations

import gzip
import json
import re
import unicodedata

import pyarrow.parquet as pq
import pytest
from conftest import shared_path

from cli.main import main as cli_main
from common.artifacts import read_record
from tokenization.shards import ShardReader
from tokenization.tokenizer import load_tokenizer

CAP = 300_000  # characters per source


@pytest.mark.slow
def test_babylm_sample_chain(tmp_path):
    # ~10 s on 2 busy cores.
    sample = shared_path("babylm-sample")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    sources = []
    for path in sorted(sample.glob("*.train.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            text = f.read(CAP)
        with gzip.open(inputs / path.name, "wt", encoding="utf-8") as f:
            f.write(text)
        sources.append(path.name.split(".")[0])
    assert len(sources) == 6

    childes_rule = r'clean.rules=[{pattern: "\\*[A-Z][A-Z0-9]{1,3}:\\s*", sources: [childes]}]'
    common = ["--preset", "tiny", "--no-progress"]
    assert cli_main(["clean", str(inputs), "--out", str(tmp_path / "clean"), "--set", childes_rule,
                     "--set", "clean.max_document_chars=20000", *common]) == 0
    assert cli_main(["train-tokenizer", str(tmp_path / "clean"), "--out", str(tmp_path / "tok"),
                     *common]) == 0
    assert cli_main(["shard", str(tmp_path / "clean"), str(tmp_path / "tok"), "--out",
                     str(tmp_path / "shards"), "--set", "shard.validation_fraction=0.05",
                     "--set", "shard.shard_tokens=200000", *common]) == 0

    clean_record = read_record(tmp_path / "clean", "clean")
    tok_record = read_record(tmp_path / "tok", "tokenizer")
    shard_record = read_record(tmp_path / "shards", "shard")
    clean_stats = clean_record["stats"]
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert sorted(clean_stats["sources"]) == sources
    table = pq.read_table(tmp_path / "clean" / "documents.parquet")
    texts = table.column("text").to_pylist()
    assert table.num_rows == clean_stats["totals"]["documents_out"]
    assert max(map(len, texts)) <= 20000
    childes = [t for t, s in zip(texts, table.column("source").to_pylist()) if s == "childes"]
    assert childes and not any(re.search(r"\*[A-Z]{3}:", t) for t in childes)
    assert clean_stats["sources"]["childes"]["words_out"] < clean_stats["sources"]["childes"]["words_in"]

    # Lineage: each stage records the digest of what it was made from.
    assert tok_record["inputs"] == {"corpus": clean_record["output_digest"]}
    assert shard_record["inputs"] == {"corpus": clean_record["output_digest"], "tokenizer": tok_record["output_digest"]}
    assert manifest["corpus_sha256"] == clean_record["output_digest"]
    assert manifest["tokenizer_sha256"] == tok_record["output_digest"]
    assert tok_record["stats"]["vocab_size"] == 512  # the tiny preset's vocabulary
    # The shard folder carries its tokenizer (the single source downstream stages use).
    assert (tmp_path / "shards" / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()

    tok = load_tokenizer(tmp_path / "tok")
    total = 0
    for split in ("train", "valid"):
        with ShardReader(tmp_path / "shards", tmp_path / "tok", split=split) as reader:
            m = manifest["splits"][split]
            assert (len(reader), reader.num_tokens, reader.num_words) == (m["documents"], m["tokens"], m["words"])
            assert sum(len(d) for d in reader) == m["tokens"]
            total += len(reader)
            if split == "valid":
                for i in range(min(5, len(reader))):
                    decoded = tok.decode(reader.document(i).tolist())
                    assert decoded in {re.sub(r" +\n", "\n", unicodedata.normalize("NFKC", t)) for t in texts}
    assert total == table.num_rows
    assert sum(s["words"] for sp in manifest["splits"].values() for s in sp["shards"]) == clean_stats["totals"]["words_out"]
