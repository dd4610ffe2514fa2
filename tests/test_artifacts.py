"""The artifact toolkit (common/artifacts.py): digests, atomic writes and folder swaps, stage
records, and the flows' identity-keyed cache built on them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.artifacts import (RECORD_FILE, DataError, atomic_write_json, make_record, read_record, replace_dir,
                              stage_identity, staging_dir, tree_digest, update_record, write_record)


def test_tree_digest_sees_names_and_contents(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("1")
    d1 = tree_digest(tmp_path / "a")
    (tmp_path / "a" / RECORD_FILE).write_text("ignored")  # the record is not part of the output
    (tmp_path / "a" / ".hidden").write_text("ignored")
    assert tree_digest(tmp_path / "a") == d1
    (tmp_path / "a" / "x").write_text("2")
    assert tree_digest(tmp_path / "a") != d1
    (tmp_path / "a" / "x").write_text("1")
    (tmp_path / "a" / "x").rename(tmp_path / "a" / "y")
    assert tree_digest(tmp_path / "a") != d1
    with pytest.raises(FileNotFoundError, match="missing artifact"):
        tree_digest(tmp_path / "nope")


def test_staging_dir_swaps_in_whole_folders_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with staging_dir(out, "clean") as tmp:
        (tmp / "data.txt").write_text("one")
        write_record(tmp, make_record("clean", {"inputs": "x"}, {}, tmp, "data.txt"))
        assert not out.exists()  # nothing visible until the block succeeds
    assert (out / "data.txt").read_text() == "one"
    with pytest.raises(RuntimeError, match="boom"):
        with staging_dir(out, "clean") as tmp:
            (tmp / "data.txt").write_text("half")
            raise RuntimeError("boom")
    assert (out / "data.txt").read_text() == "one"  # the earlier output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind
    with staging_dir(out, "clean") as tmp:  # a rerun of the same stage replaces it
        (tmp / "data.txt").write_text("two")
    assert (out / "data.txt").read_text() == "two" and not (out / RECORD_FILE).exists()


def test_a_stage_recognises_only_its_own_output(tmp_path):
    other = tmp_path / "tok"
    other.mkdir()
    (other / "tokenizer.json").write_text("{}")
    write_record(other, make_record("tokenizer", {"corpus": "c"}, {}, other, "tokenizer.json"))
    with pytest.raises(DataError, match="holds the output of stage 'tokenizer'"):
        with staging_dir(other, "clean"):
            pass
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(DataError, match="not empty and holds no clean stage.json"):
        with staging_dir(tmp_path / "mine", "clean"):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        with staging_dir(tmp_path / "file", "clean"):
            pass
    assert (other / "tokenizer.json").exists() and (tmp_path / "mine" / "notes.txt").exists()


def test_records_identity_and_updates(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w").write_text("weights")
    rec = make_record("pretrain", {"data": "d", "tokenizer": None}, {"lr": 1}, tmp_path, "m", {"steps": 3})
    assert rec["identity"] == stage_identity("pretrain", {"tokenizer": None, "data": "d"}, {"lr": 1})
    assert rec["identity"] != stage_identity("pretrain", {"data": "d2", "tokenizer": None}, {"lr": 1})
    assert rec["identity"] != stage_identity("evaluate", {"data": "d", "tokenizer": None}, {"lr": 1})
    assert rec["output_digest"] == tree_digest(tmp_path / "m")
    with pytest.raises(ValueError, match="unknown stage"):
        make_record("nope", {}, {}, tmp_path, "m")
    write_record(tmp_path, rec)
    assert read_record(tmp_path) == rec and read_record(tmp_path, "pretrain", rec["identity"]) == rec
    assert read_record(tmp_path, "shard") is None and read_record(tmp_path, "pretrain", "0" * 64) is None
    assert update_record(tmp_path, mlflow_run_id="r1")["mlflow_run_id"] == "r1"
    assert read_record(tmp_path)["mlflow_run_id"] == "r1"
    (tmp_path / RECORD_FILE).write_text("{broken")
    assert read_record(tmp_path) is None
    with pytest.raises(DataError, match="no readable stage.json"):
        update_record(tmp_path, x=1)


def test_atomic_writes_and_folder_swap(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1, 2], "b": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "f").write_text("new")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "f").write_text("old")
    replace_dir(tmp_path / "new", tmp_path / "dest")
    assert (tmp_path / "dest" / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "dest"]


def test_flows_stage_cache_is_the_stage_identity(tmp_path):
    """flows/stages.py reuses a folder only when its record names the stage and the identity the
    library function would write; anything else reruns the stage."""
    from common.config import load_config
    from flows.stages import clean, stage_dir

    (tmp_path / "in.txt").write_text("first document\nsecond document\n")
    over = [f"workdir={tmp_path / 'work'}", f'clean.inputs=["{tmp_path / "in.txt"}"]']
    a = clean(load_config("tiny", overrides=over))
    assert not a.cached and a.path == stage_dir(tmp_path / "work", "clean", a.identity)
    assert a.digest == tree_digest(Path(a.path) / "documents.parquet") == a.record["output_digest"]
    b = clean(load_config("tiny", overrides=over))
    assert b.cached and b.path == a.path and b.digest == a.digest
    c = clean(load_config("tiny", overrides=over + ["clean.deduplicate=false"]))
    assert not c.cached and c.path != a.path and c.digest == a.digest  # same output, other identity
    record = json.loads((Path(a.path) / RECORD_FILE).read_text())
    record["identity"] = "0" * 64  # a record of another identity is not trusted
    (Path(a.path) / RECORD_FILE).write_text(json.dumps(record))
    d = clean(load_config("tiny", overrides=over))
    assert not d.cached and d.path == a.path and read_record(d.path, "clean", a.identity) is not None


def test_flows_rerun_a_stage_whose_output_changed_after_its_record(tmp_path):
    """A swapped output is not reused under the digest its record holds: the stage runs again."""
    from common.config import load_config
    from flows.stages import clean

    (tmp_path / "in.txt").write_text("first document\nsecond document\n")
    cfg = load_config("tiny", overrides=[f"workdir={tmp_path / 'work'}", f'clean.inputs=["{tmp_path / "in.txt"}"]'])
    a = clean(cfg)
    original = (Path(a.path) / "documents.parquet").read_bytes()
    (Path(a.path) / "documents.parquet").write_bytes(b"swapped")
    b = clean(cfg)
    assert not b.cached and b.path == a.path and b.digest == a.digest
    assert (Path(a.path) / "documents.parquet").read_bytes() == original


def test_outputs_inside_or_around_inputs_and_stale_temporaries(tmp_path):
    from common.artifacts import check_outside_inputs, remove_stale_siblings, temporary_sibling

    (tmp_path / "data" / "sub").mkdir(parents=True)
    for out, word in ((tmp_path / "data", "is"), (tmp_path / "data" / "sub" / "out", "lies inside"),
                      (tmp_path, "contains")):
        with pytest.raises(DataError, match=word):
            check_outside_inputs(out, [tmp_path / "other", tmp_path / "data"])
    check_outside_inputs(tmp_path / "out", [tmp_path / "data", None])
    out = tmp_path / "out"
    mine = temporary_sibling(out)
    mine.mkdir()
    dead = out.with_name(mine.name.replace(f"-{os.getpid()}-", "-999999999-"))  # a killed process of this host
    dead.mkdir()
    other_host = out.with_name(".out.tmp-elsewhere-1-abc")
    other_host.mkdir()
    assert remove_stale_siblings(out) == [dead]
    assert mine.exists() and other_host.exists() and not dead.exists()
