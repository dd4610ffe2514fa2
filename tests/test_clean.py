"""The clean stage: formats, normalisation, rules, splitting, dedup, streaming, errors, atomicity."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli.main import main as cli_main
from common.config.base import ConfigError
from common.config.data import CHILDES_SPEAKER_PATTERN, CleanConfig, CleanRule
from tokenization import clean as clean_mod
from tokenization import cleaner as cleaner_mod
from tokenization.formats import base as formats_base
from tokenization.clean import clean_corpus, count_words
from common.artifacts import DataError, read_record, stage_identity


def _docs(out):
    return pq.read_table(out / "documents.parquet").to_pylist()


def _write_inputs(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text("First  document.\tTabbed\n\nSecond \u00a0doc \ufb01ne \uff21\n"
                                "First  document.\tTabbed\n", encoding="utf-8")
    # mtime=0: gzip stamps the write time into its header, and two copies written across a second
    # boundary would otherwise differ in bytes (and so in the inputs' digest).
    (root / "childes.train.gz").write_bytes(gzip.compress(
        "*CHI: where's dolly? *MOT: here she is.\n*CHI: bye\u0007 bye.\n".encode("utf-8"), mtime=0))
    with open(root / "c.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "line one  \n\n\n\nline two\u200b!", "id": 1}) + "\n\n")
        f.write(json.dumps({"text": "   ", "id": 2}) + "\n")
    pq.write_table(pa.table({"text": ["parquet text", None, "parquet text"], "n": [1, 2, 3]}),
                   root / "d.parquet")
    (root / "notes.md").write_text("not an input: folders take known suffixes only")


def test_formats_normalisation_rules_and_stats(tmp_path):
    _write_inputs(tmp_path / "in")
    rule = CleanRule(pattern=CHILDES_SPEAKER_PATTERN, sources=["childes"])
    cfg = CleanConfig(inputs=[str(tmp_path / "in")], rules=[rule])
    record = clean_corpus(cfg, tmp_path / "out", progress_bar=False)
    stats = record["stats"]
    docs = _docs(tmp_path / "out")
    assert docs == [
        {"text": "First document. Tabbed", "source": "a"},
        {"text": "Second doc fine A", "source": "a"},  # NFKC: nbsp, ligature, fullwidth
        {"text": "line one\n\nline two!", "source": "c"},  # at most one blank line, ZWSP gone
        {"text": "where's dolly? here she is.", "source": "childes"},
        {"text": "bye bye.", "source": "childes"},  # control character removed
        {"text": "parquet text", "source": "d"},
    ]
    s = stats["sources"]
    assert s["a"]["documents_in"] == 3 and s["a"]["documents_out"] == 2
    assert s["a"]["dropped_duplicates"] == 1
    assert s["childes"]["words_in"] == 10 and s["childes"]["words_out"] == 7  # 3 speaker marks
    assert s["c"]["dropped_empty"] == 1 and s["d"]["dropped_empty"] == 1
    assert s["d"]["dropped_duplicates"] == 1
    assert stats["totals"]["documents_out"] == 6
    assert sorted(e["name"] for e in stats["input_files"]) == ["a.txt", "c.jsonl", "childes.train.gz", "d.parquet"]
    on_disk = read_record(tmp_path / "out", "clean")
    assert on_disk["output"] == "documents.parquet" and on_disk["stats"] == stats
    assert on_disk["output_digest"] == hashlib.sha256((tmp_path / "out" / "documents.parquet").read_bytes()).hexdigest()
    assert on_disk["identity"] == stage_identity("clean", clean_mod.clean_inputs(cfg), cfg.identity_dict())


def test_count_words_matches_split_on_normalised_text():
    for text in ["a b c", "x\n\ny z", "", " ", "one", " a\nb\n\nc d\n"]:
        assert count_words(text) == len(text.split())


def test_same_inputs_byte_identical_and_location_independent(tmp_path):
    _write_inputs(tmp_path / "in")
    _write_inputs(tmp_path / "elsewhere" / "in2")
    a = clean_corpus(CleanConfig(inputs=[str(tmp_path / "in")]), tmp_path / "o1", progress_bar=False)
    b = clean_corpus(CleanConfig(inputs=[str(tmp_path / "elsewhere" / "in2")]), tmp_path / "o2",
                     progress_bar=False)
    for name in ("documents.parquet", "stage.json"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()
    assert a["identity"] == b["identity"]
    c = clean_corpus(CleanConfig(inputs=[str(tmp_path / "in")], deduplicate=False),
                     tmp_path / "o3", progress_bar=False)
    assert c["identity"] != a["identity"] and c["inputs"] == a["inputs"]


def _long_text(n_sentences=400):
    words = ["alpha", "beta", "Gamma", "d\u00e9j\u00e0", "\u65e5\u672c", "x2", "\U0001F600", "e\u0301t\u00e9"]
    out = []
    for i in range(n_sentences):
        sent = " ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 11))
        sep = ["  ", " ", "\t", " \n", "\n\n\n  "][i % 5]
        out.append(sent + ("." if i % 3 else "!\"") + sep)
    return "".join(out)


def test_long_documents_split_at_sentence_boundaries(tmp_path):
    text = _long_text()
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": text}) + "\n")
    cfg = CleanConfig(inputs=[str(tmp_path / "in.jsonl")], max_document_chars=300)
    stats = clean_corpus(cfg, tmp_path / "out", progress_bar=False)
    docs = [d["text"] for d in _docs(tmp_path / "out")]
    assert len(docs) > 10 and all(len(d) <= 300 for d in docs)
    assert all(d[-1] in ".\"" for d in docs[:-1])  # every cut after a sentence end
    assert sum(count_words(d) for d in docs) == len(text.split()) == stats["stats"]["totals"]["words_out"]
    assert stats["stats"]["totals"]["documents_split"] == 1


def test_streaming_segments_give_the_same_output(tmp_path, monkeypatch):
    # A long line in a plain text file and newline-rich jsonl text, cleaned with tiny read blocks
    # and segments, must equal cleaning them whole.
    text = _long_text(600)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(text.replace("\n", " ") + "\nshort line\n")
    (tmp_path / "in" / "b.jsonl").write_text(json.dumps({"text": text}) + "\n")
    cfg = CleanConfig(inputs=[str(tmp_path / "in")], max_document_chars=1000,
                      rules=[CleanRule(pattern=r"Gamma", replacement="")])
    whole = clean_corpus(cfg, tmp_path / "whole", progress_bar=False)
    monkeypatch.setattr(formats_base, "BLOCK", 97)
    monkeypatch.setattr(cleaner_mod, "SEGMENT", 61)
    streamed = clean_corpus(cfg, tmp_path / "streamed", progress_bar=False)
    assert _docs(tmp_path / "whole") == _docs(tmp_path / "streamed")
    assert whole["stats"]["totals"] == streamed["stats"]["totals"]


def test_invalid_utf8_replaced_and_counted_or_rejected(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\nbad \xff\xfe byte\n")
    stats = clean_corpus(CleanConfig(inputs=[str(path)]), tmp_path / "out", progress_bar=False)
    assert stats["stats"]["sources"]["bad"]["bytes_replaced"] == 2
    assert _docs(tmp_path / "out")[1]["text"] == "bad \ufffd\ufffd byte"
    with pytest.raises(DataError, match=r"bad\.txt: line 2: invalid UTF-8 at byte 4"):
        clean_corpus(CleanConfig(inputs=[str(path)], invalid_utf8="strict"), tmp_path / "o2",
                     progress_bar=False)


@pytest.mark.parametrize("name,content,error,pattern", [
    ("empty.txt", b"", DataError, r"empty\.txt: empty input"),
    ("blank.txt", b"\n  \n", DataError, r"blank\.txt: empty input"),
    ("bin.txt", b"ok\nELF\x00\x01\x02", DataError, r"bin\.txt: line 2: NUL byte"),
    ("x.jsonl", b'{"text": "a"}\n{"text": "b"\n', DataError, r"x\.jsonl: line 2: malformed JSON"),
    ("y.jsonl", b'{"body": "a"}\n', DataError, r"y\.jsonl: line 1: record has no field 'text'"),
    ("z.jsonl", b'{"text": 3}\n', DataError, r"z\.jsonl: line 1: field 'text' must be a string"),
    ("w.gz", b"\x1f\x8bnot gzip", DataError, r"w\.gz: not a readable gzip file"),
])
def test_bad_input_names_the_file(tmp_path, name, content, error, pattern):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(error, match=pattern):
        clean_corpus(CleanConfig(inputs=[str(tmp_path / name)]), tmp_path / "out", progress_bar=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary folder left behind


def test_parquet_without_text_column_and_missing_paths(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet: Parquet file has no column 'text' \(columns: body\)"):
        clean_corpus(CleanConfig(inputs=[str(tmp_path / "p.parquet")]), tmp_path / "o", progress_bar=False)
    with pytest.raises(FileNotFoundError, match="input not found: .*nope"):
        clean_corpus(CleanConfig(inputs=[str(tmp_path / "nope")]), tmp_path / "o", progress_bar=False)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="emptydir: folder holds no input files"):
        clean_corpus(CleanConfig(inputs=[str(tmp_path / "emptydir")]), tmp_path / "o", progress_bar=False)
    with pytest.raises(DataError, match="no inputs given"):
        clean_corpus(CleanConfig(), tmp_path / "o", progress_bar=False)
    with pytest.raises(ConfigError, match="pattern"):
        CleanConfig(rules=[CleanRule(pattern="(")])


def test_failed_run_keeps_previous_output_and_leaves_nothing_partial(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("fine\n")
    clean_corpus(CleanConfig(inputs=[str(tmp_path / "in")]), tmp_path / "out", progress_bar=False)
    before = (tmp_path / "out" / "documents.parquet").read_bytes()
    (tmp_path / "in" / "b.jsonl").write_text("{broken\n")
    with pytest.raises(DataError, match="b.jsonl: line 1"):
        clean_corpus(CleanConfig(inputs=[str(tmp_path / "in")]), tmp_path / "out", progress_bar=False)
    assert (tmp_path / "out" / "documents.parquet").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="refusing to overwrite"):
        clean_corpus(CleanConfig(inputs=[str(tmp_path / "in" / "a.txt")]), tmp_path / "other",
                     progress_bar=False)


def test_cli_clean_reports_errors_and_writes_output(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("one doc\n")
    assert cli_main(["clean", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--no-progress",
                     "--set", "clean.max_document_chars=500"]) == 0
    assert _docs(tmp_path / "out") == [{"text": "one doc", "source": "a"}]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\nnot json\n')
    assert cli_main(["clean", str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "o2"), "--no-progress"]) == 1
    assert "b.jsonl: line 2: malformed JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_50mb_single_line_streams_with_bounded_memory(tmp_path):
    # ~5 s. Peak RSS growth while cleaning one 50 MB line must stay well under the ~3 copies
    # (bytes, str, normalised str) that reading the line whole would cost.
    path = tmp_path / "big.txt"
    sentence = ("The quick brown fox jumps over the lazy dog near the riverbank today. " * 100).encode()
    with open(path, "wb") as f:
        for _ in range(50_000_000 // len(sentence) + 1):
            f.write(sentence)
    size = path.stat().st_size
    script = textwrap.dedent(f"""
        import resource, json
        import pyarrow, pyarrow.parquet, tqdm
        from common.config.data import CleanConfig
        from tokenization.clean import clean_corpus
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        s = clean_corpus(CleanConfig(inputs=[{str(path)!r}], deduplicate=False), {str(tmp_path / 'out')!r},
                         progress_bar=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"growth": (peak - base) * 1024, "totals": s["stats"]["totals"]}}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["totals"]["documents_in"] == 1
    assert result["totals"]["words_out"] == result["totals"]["words_in"] == 13 * 100 * (50_000_000 // len(sentence) + 1)
    assert result["totals"]["documents_out"] >= size // 100_000
    assert result["growth"] < 2.5 * size, f"peak RSS grew by {result['growth'] / 1e6:.0f} MB"


def test_newline_and_normalisation_options(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "ﬁrst line \n\n second\tline"}) + "\n")
    clean_corpus(CleanConfig(inputs=[str(tmp_path / "a.jsonl")], keep_newlines=False,
                             unicode_normalization="none", min_document_chars=5), tmp_path / "o",
                 progress_bar=False)
    assert _docs(tmp_path / "o") == [{"text": "ﬁrst line second line", "source": "a"}]
    (tmp_path / "b.txt").write_text("tiny\nlong enough\n")
    s = clean_corpus(CleanConfig(inputs=[str(tmp_path / "b.txt")], min_document_chars=5), tmp_path / "o2",
                     progress_bar=False)
    assert _docs(tmp_path / "o2") == [{"text": "long enough", "source": "b"}]
    assert s["stats"]["totals"]["dropped_empty"] == 1


def test_input_formats_are_a_registry(tmp_path, monkeypatch):
    """A file is read by the format with the longest matching suffix; registering a format (one
    module's FORMAT) makes clean read it, from folders too."""
    from tokenization import formats
    from tokenization.formats.base import InputFormat

    assert formats.format_for(Path("a.jsonl.gz")).name == "jsonl"
    assert formats.format_for(Path("childes.train.gz")).name == "text"
    assert formats.format_for(Path("x.parquet")).name == "parquet"
    assert formats.format_for(Path("notes.md")).name == "text"  # named explicitly: read as text

    def read_tsv(location, cfg, sink, part):
        for line in Path(location).read_text().splitlines():
            sink.add_bytes(len(line) + 1)
            sink.start()
            sink.feed(line.split("\t")[1])
            sink.end()

    monkeypatch.setitem(formats.FORMATS, "tsv", InputFormat("tsv", (".tsv",), read_tsv))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.tsv").write_text("1\tfirst text\n2\tsecond  text\n")
    record = clean_corpus(CleanConfig(inputs=[str(tmp_path / "in")]), tmp_path / "out", progress_bar=False)
    assert _docs(tmp_path / "out") == [{"text": "first text", "source": "a"}, {"text": "second text", "source": "a"}]
    assert record["stats"]["totals"]["bytes_in"] == len("1\tfirst text\n2\tsecond  text\n")


def _clean_in_parts(cfg, block_bytes):
    """Every input file cleaned part by part (as the Ray engine's tasks do): documents per file,
    counters summed per file."""
    from tokenization.clean import PartCleaner, list_input_files, plan_parts

    files = list_input_files(cfg.inputs)
    parts = plan_parts(files, block_bytes)
    cleaner, docs, stats = PartCleaner(cfg), {}, {}
    for index, (i, part) in enumerate(parts):
        for chunk in cleaner.run(files[i], part, index):
            docs.setdefault(files[i].name, []).extend(chunk.column("text").to_pylist())
        for key, value in vars(cleaner.stats).items():
            stats.setdefault(files[i].name, {}).setdefault(key, 0)
            stats[files[i].name][key] += value
    return docs, stats, len(parts)


def test_files_read_in_parts_give_the_documents_and_counters_of_whole_files(tmp_path):
    """Byte ranges cut anywhere (in the middle of lines, of a UTF-8 character, of a long single
    line, on blank lines and CRLF) and row-group ranges give exactly what one pass over each file
    gives."""
    (tmp_path / "in").mkdir()
    lines = [f"line {i} {'é' * (i % 5)} {'word ' * (i % 17)}" for i in range(400)]
    body = "\r\n".join(lines[:100]) + "\n\n  \n" + "\n".join(lines[100:]) + "\n"
    (tmp_path / "in" / "a.txt").write_text(body, encoding="utf-8")
    (tmp_path / "in" / "long.txt").write_text(_long_text(300).replace("\n", " ") + "\nlast\n")
    with gzip.open(tmp_path / "in" / "g.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[:50]))
    (tmp_path / "in" / "j.jsonl").write_text("".join(json.dumps({"text": t}) + ("\n\n" if i % 9 == 0 else "\n")
                                                     for i, t in enumerate(lines)))
    pq.write_table(pa.table({"text": lines[:250]}), tmp_path / "in" / "p.parquet", row_group_size=40)
    cfg = CleanConfig(inputs=[str(tmp_path / "in")], max_document_chars=500)
    whole, whole_stats, n = _clean_in_parts(cfg, 0)
    assert n == 5
    for block in (1024, 4093):
        docs, stats, n = _clean_in_parts(cfg, block)
        assert n > 20
        assert docs == whole and stats == whole_stats
    assert whole_stats["a.txt"]["bytes_in"] == len(body.encode()) and whole_stats["a.txt"]["documents_in"] == 400


def test_an_error_in_a_later_part_names_its_line_in_the_file(tmp_path):
    from tokenization.clean import PartCleaner, list_input_files, plan_parts

    rows = [json.dumps({"text": f"record {i}"}) for i in range(300)]
    rows[250] = '{"text": broken'
    (tmp_path / "x.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "y.txt").write_bytes(b"ok line\n" * 300 + b"bin\x00ary\n")
    for name, pattern in (("x.jsonl", r"x\.jsonl: line 251: malformed JSON"), ("y.txt", r"y\.txt: line 301: NUL byte")):
        files = list_input_files([str(tmp_path / name)])
        parts = plan_parts(files, 1024)
        assert len(parts) > 2
        with pytest.raises(DataError, match=pattern):
            for index, (i, part) in enumerate(parts):
                for _ in PartCleaner(CleanConfig()).run(files[i], part, index):
                    pass
