"""The shard stage and ShardReader: counts, split, zero copy, digests, atomicity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config.data import ShardConfig, TokenizerConfig
from tokenization import shards as shards_mod
from common.artifacts import DataError, DigestMismatchError
from tokenization.shards import ShardReader, token_dtype, validation_mask, write_shards
from tokenization.tokenizer import load_tokenizer, train_tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "Épée", "naïve", "x", "42", "日本", "!", "co-op", "😀"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = random.Random(1)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    docs[7] = "one"  # a one-token document
    pq.write_table(pa.table({"text": docs, "source": ["s"] * len(docs)}), root / "documents.parquet")
    train_tokenizer(root / "documents.parquet", TokenizerConfig(vocab_size=300), root / "tok",
                    progress_bar=False)
    cfg = ShardConfig(validation_fraction=0.1, shard_tokens=1500, batch_documents=37)
    record = write_shards(root / "documents.parquet", root / "tok", cfg, root / "out",
                            progress_bar=False)
    return root, docs, cfg, record


def test_manifest_counts_equal_what_the_reader_yields(corpus):
    root, docs, _, record = corpus
    manifest = record["manifest"]
    on_disk = json.loads((root / "out" / "manifest.json").read_text())
    assert on_disk["splits"] == manifest["splits"] and on_disk["dtype"] == "uint16"
    total_docs = 0
    for split in ("train", "valid"):
        m = manifest["splits"][split]
        with ShardReader(root / "out", root / "tok", split=split) as reader:
            assert len(reader) == m["documents"] == sum(1 for _ in reader)
            assert reader.num_tokens == m["tokens"] == sum(len(d) for d in reader)
            assert reader.num_tokens == int(reader.lengths.sum())
            assert reader.lengths.dtype == np.int64 and len(reader.lengths) == len(reader)
            assert reader.num_words == m["words"] == int(reader.words.sum())
            assert [len(reader.document(i)) for i in range(len(reader))] == reader.lengths.tolist()
            for entry in m["shards"]:
                part = pa.ipc.open_file(str(root / "out" / entry["file"])).get_batch(0)
                assert part.num_rows == entry["documents"]
                assert len(part.column(0).values) == entry["tokens"]
        total_docs += m["documents"]
    assert total_docs == len(docs)
    assert len(manifest["splits"]["train"]["shards"]) >= 3  # shard_tokens forced several


def test_documents_match_encoding_and_split_is_exact(corpus):
    root, docs, cfg, _ = corpus
    tok = load_tokenizer(root / "tok")
    mask = validation_mask(root / "documents.parquet", cfg.validation_fraction, cfg.split_seed)
    assert mask.sum() == round(0.1 * len(docs))
    for split, keep in (("train", ~mask), ("valid", mask)):
        expected = [d for d, k in zip(docs, keep) if k]
        with ShardReader(root / "out", split=split) as reader:
            got = [reader.document(i) for i in range(len(reader))]
            assert all(g.dtype == np.uint16 for g in got)
            assert [g.tolist() for g in got] == [e.ids for e in tok.encode_batch(expected, add_special_tokens=False)]
            assert reader.words.tolist() == [len(d.split()) for d in expected]
            assert reader.document(-1).tolist() == got[-1].tolist()
            with pytest.raises(IndexError):
                reader.document(len(reader))
    other = validation_mask(root / "documents.parquet", cfg.validation_fraction, cfg.split_seed + 1)
    assert other.sum() == mask.sum() and (other != mask).any()


def test_reader_is_zero_copy(corpus):
    root = corpus[0]
    before = pa.total_allocated_bytes()
    with ShardReader(root / "out", root / "tok") as reader:
        spans = []
        for source, values in zip(reader._maps, reader._values):
            # The token array is the mapped file's own memory, not a copy of it.
            assert values.ctypes.data == pa.ipc.open_file(source).get_batch(0).column(0).values.buffers()[1].address
            spans.append((values.ctypes.data, values.ctypes.data + values.nbytes))
        for i in range(len(reader)):
            doc = reader.document(i)
            assert not doc.flags.owndata and not doc.flags.writeable
            assert any(lo <= doc.ctypes.data <= hi for lo, hi in spans)
        windows = list(reader.random_windows(16, 50, seed=3))
        assert all(len(w) == 16 and not w.flags.owndata for w in windows)
        assert pa.total_allocated_bytes() == before  # nothing went through Arrow's memory pool


def test_random_windows_are_slices_of_the_token_stream(corpus):
    root = corpus[0]
    with ShardReader(root / "out") as reader:
        grams = [np.lib.stride_tricks.sliding_window_view(v, 8) for v in reader._values]
        for w in reader.random_windows(8, 100, seed=0):
            assert any((g == w).all(axis=1).any() for g in grams)
        a = [w.tolist() for w in reader.random_windows(8, 20, seed=5)]
        assert a == [w.tolist() for w in reader.random_windows(8, 20, seed=5)]
        with pytest.raises(ValueError, match="holds 100000 tokens"):
            next(reader.random_windows(100_000, 1))


def test_byte_identical_rerun_independent_of_batching(corpus, tmp_path):
    root, _, cfg, record = corpus
    again = write_shards(root / "documents.parquet", root / "tok",
                         ShardConfig(validation_fraction=0.1, shard_tokens=1500, batch_documents=300,
                                     num_threads=1), tmp_path / "out", progress_bar=False)
    names = sorted(p.name for p in (root / "out").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out").iterdir())
    for name in names:
        assert (root / "out" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
    assert again["identity"] == record["identity"] and again["output_digest"] == record["output_digest"]


def test_tokenizer_and_shard_digest_mismatch_refused(corpus, tmp_path):
    root = corpus[0]
    train_tokenizer(root / "documents.parquet", TokenizerConfig(vocab_size=280), tmp_path / "tok2",
                    progress_bar=False)
    with pytest.raises(DigestMismatchError, match="re-run gptbert shard"):
        ShardReader(root / "out", tmp_path / "tok2")
    # A manifest edited to claim another tokenizer no longer matches its shards.
    (tmp_path / "out").mkdir()
    for p in (root / "out").iterdir():
        (tmp_path / "out" / p.name).write_bytes(p.read_bytes())
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    manifest["tokenizer_sha256"] = "0" * 64
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DigestMismatchError, match="train-00000.arrow: shard tokenizer sha256"):
        ShardReader(tmp_path / "out")
    (tmp_path / "out" / "train-00001.arrow").write_bytes(b"garbage")
    manifest["tokenizer_sha256"] = json.loads((root / "out" / "manifest.json").read_text())["tokenizer_sha256"]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DigestMismatchError, match="train-00001.arrow: sha256 .* differs from the manifest"):
        ShardReader(tmp_path / "out")
    manifest["splits"]["train"]["shards"][1]["sha256"] = hashlib.sha256(b"garbage").hexdigest()
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="train-00001.arrow: not a readable Arrow IPC shard"):
        ShardReader(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="shard manifest not found"):
        ShardReader(tmp_path / "nowhere")


def test_failed_shard_run_leaves_nothing_partial(corpus, tmp_path, monkeypatch):
    root, _, cfg, _ = corpus
    calls = {"n": 0}
    original = shards_mod.ShardWriter.flush

    def failing_flush(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the stage were killed after one shard
        original(self)

    monkeypatch.setattr(shards_mod.ShardWriter, "flush", failing_flush)
    with pytest.raises(KeyboardInterrupt):
        write_shards(root / "documents.parquet", root / "tok", cfg, tmp_path / "out", progress_bar=False)
    assert list(tmp_path.iterdir()) == []


def test_dtype_choice_and_bad_inputs(corpus, tmp_path):
    root = corpus[0]
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        write_shards(root / "documents.parquet", tmp_path / "none.json", ShardConfig(), tmp_path / "o",
                     progress_bar=False)
    with pytest.raises(FileNotFoundError, match="documents file not found"):
        write_shards(tmp_path / "none.parquet", root / "tok", ShardConfig(), tmp_path / "o",
                     progress_bar=False)
    with pytest.raises(ValueError, match="split must be one of"):
        ShardReader(root / "out", split="test")


def _copy_shards(root: Path, dest: Path) -> dict:
    dest.mkdir()
    for p in root.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return json.loads((dest / "manifest.json").read_text())


@pytest.mark.parametrize("case", ["edited shard", "traversal", "absolute", "no splits", "no sha256", "bad dtype",
                                  "out of vocabulary"])
def test_shards_are_verified_on_open(corpus, tmp_path, case):
    """An edited shard, a manifest naming files outside the folder or lacking fields, and token ids
    beyond the vocabulary are refused when the reader opens the folder, with one line naming the file."""
    root = corpus[0]
    out = tmp_path / "out"
    manifest = _copy_shards(root / "out", out)
    first = manifest["splits"]["train"]["shards"][0]
    expected = {"edited shard": "sha256 .* differs from the manifest", "traversal": "not a file inside",
                "absolute": "not a file inside", "no splits": "no field 'splits'",
                "no sha256": "lacks file, documents, tokens or sha256", "bad dtype": "field 'dtype'",
                "out of vocabulary": "outside the tokenizer's vocabulary"}[case]
    if case == "edited shard":
        data = bytearray((out / first["file"]).read_bytes())
        data[-100] ^= 1
        (out / first["file"]).write_bytes(bytes(data))
    elif case == "traversal":
        first["file"] = "../elsewhere.arrow"
    elif case == "absolute":
        first["file"] = str(out / first["file"])
    elif case == "no splits":
        del manifest["splits"]
    elif case == "no sha256":
        del first["sha256"]
    elif case == "bad dtype":
        manifest["dtype"] = "float32"
    elif case == "out of vocabulary":
        manifest["vocab_size"] = 100  # the shards hold ids up to ~300
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=expected):
        ShardReader(out)


def test_validation_positions_equal_sorting_every_key():
    """The split from candidates below a bound is the split from sorting all keys, also when the
    first bound finds too few (the bound is widened) and with ties."""
    from tokenization.shards import below, validation_count, validation_positions

    rng = np.random.default_rng(0)
    for n, fraction, skew in ((1000, 0.01, False), (5000, 0.2, False), (300, 0.1, True), (2, 0.5, False)):
        keys = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
        if skew:  # every key in the top 1/64 of the range: the first bounds find nothing
            keys = keys | np.uint64(0xFC00_0000_0000_0000)
            keys[5] = keys[9]  # a tie, broken by position
        calls = []

        def candidates(bound):
            calls.append(bound)
            hit = np.flatnonzero(below(keys, bound))
            return hit, keys[hit]

        got = validation_positions(n, fraction, candidates)
        expected = np.sort(np.lexsort((np.arange(n), keys))[:validation_count(n, fraction)])
        assert np.array_equal(got, expected)
        assert (len(calls) > 1) == skew


def test_background_map_keeps_order_and_raises_with_several_workers():
    from tokenization.runtime import background_map

    assert list(background_map(lambda x: x * x, range(11), workers=3)) == [(i, i * i) for i in range(11)]
    assert list(background_map(lambda x: x, [], workers=2)) == []

    def fail_at_4(x):
        if x == 4:
            raise ValueError("item 4")
        return x

    with pytest.raises(ValueError, match="item 4"):
        list(background_map(fail_at_4, range(9), workers=2))
