"""The engines of the data stages (``clean.engine``, ``shard.engine``): the local one and Ray Data
pipelines give the same documents, order, split and token ids; the stage cache does not depend on
the engine; a killed worker's block is retried; bad input is one line and leaves nothing.

The slow tests share one local Ray (two CPUs, on loopback), started by the module and shut down
after it. Where moto is installed, its S3 server is up first, so the Ray workers read and write
the bucket with the standard AWS_* environment, as cluster nodes would.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli.main import main as cli_main
from common.artifacts import DataError, read_record, stage_identity
from common.config import ConfigError, load_config
from common.config.data import CleanConfig, ShardConfig
from tokenization.clean import clean_inputs
from tokenization.shards import ShardReader

RAY_FIELDS = ("engine", "ray_workers", "ray_block_bytes")


def test_engine_fields_stay_out_of_stage_identities_and_are_checked():
    for section in (CleanConfig, ShardConfig):
        base = section().identity_dict()
        assert section(engine="ray", ray_workers=2, ray_block_bytes=4096).identity_dict() == base
        assert not set(RAY_FIELDS) & set(base)
    with pytest.raises(ConfigError, match="'clean.engine': expected one of 'local', 'ray'"):
        load_config("tiny", overrides=["clean.engine=spark"])
    with pytest.raises(ConfigError, match="'engine': must be one of local, ray"):
        ShardConfig(engine="dask")
    with pytest.raises(ConfigError, match="'shard.ray_workers': must be >= 0"):
        load_config("tiny", overrides=["shard.ray_workers=-1"])


def _upload(folder: Path, uri: str) -> str:
    from common import storage

    for p in sorted(folder.rglob("*")):
        if p.is_file():
            storage.upload_file(p, storage.join(uri, p.relative_to(folder).as_posix()))
    return uri


def test_remote_inputs_are_listed_and_hashed_where_they_lie(s3, tmp_path):
    """Without copies (the Ray engine) a bucket's inputs give the listing, order and digest of their
    local copies, and nothing is copied to this machine."""
    from common import storage
    from tokenization.clean import inputs_digest, list_input_files

    corpus = _corpus(tmp_path / "in")
    (corpus / "a-b").mkdir()
    (corpus / "a-b" / "x.txt").write_text("under a-b\n")
    (corpus / "a").mkdir()
    (corpus / "a" / "y.txt").write_text("under a\n")  # a/y sorts before a-b/x by parts, after it as a string
    (corpus / ".hidden.txt").write_text("not an input\n")
    uri = _upload(corpus, s3.bucket("listing") + "/corpus")
    before = set(storage.cache_root().rglob("*")) if storage.cache_root().exists() else set()
    remote = list_input_files([uri], copies=False)
    assert [f.location for f in remote][:2] == [f"{uri}/a/y.txt", f"{uri}/a-b/x.txt"]
    assert inputs_digest(remote) == inputs_digest(list_input_files([str(corpus)]))
    assert (set(storage.cache_root().rglob("*")) if storage.cache_root().exists() else set()) == before
    assert inputs_digest(list_input_files([uri])) == inputs_digest(remote)  # the local engine's copies


def _corpus(root: Path) -> Path:
    """Several files of every format, documents repeated within and across files, blank lines, and
    a long single line (split into many documents, and cut into many parts)."""
    root.mkdir(parents=True)
    lines = [f"Sentence {i}: the {'big ' * (i % 7)}dog saw {i % 13} cats." for i in range(1200)]
    (root / "a.txt").write_text("\n".join(lines[:700] + lines[:40]) + "\n\n\n", encoding="utf-8")
    with gzip.open(root / "b.train.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[600:900]) + "\n")
    (root / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[850:1100] + lines[5:9]))
    pq.write_table(pa.table({"text": lines[1000:1200] + lines[300:310]}), root / "d.parquet", row_group_size=32)
    (root / "long.txt").write_text("".join(f"A long line, part {i}. " for i in range(5000)) + lines[3] + "\n",
                                   encoding="utf-8")
    return root


OVERRIDES = ["clean.max_document_chars=1000", "clean.row_group_documents=150", "clean.ray_block_bytes=16384",
             "shard.validation_fraction=0.05", "shard.shard_tokens=30000", "shard.batch_documents=200",
             "shard.ray_block_bytes=8192", "tokenizer.vocab_size=512", "model.vocab_size=512"]
RAY = ["clean.engine=ray", "shard.engine=ray", "clean.ray_workers=2", "shard.ray_workers=2"]


@pytest.fixture(scope="module")
def local_ray(request):
    """A local Ray of two CPUs on loopback for the module (its workers at this process's niceness)."""
    ray = pytest.importorskip("ray")
    try:
        request.getfixturevalue("s3")  # first: the workers inherit its AWS_* environment
    except pytest.skip.Exception:
        pass
    # Ray's unix socket paths must stay under 107 bytes: a short temp dir, not pytest's.
    ray_tmp = tempfile.mkdtemp(prefix="gbray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=ray_tmp,
             log_to_driver=False, _system_config={"worker_niceness": 0})
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _streams(folder: Path) -> dict[str, tuple[list[list[int]], list[int]]]:
    out = {}
    for split in ("train", "valid"):
        with ShardReader(folder, split=split) as reader:
            out[split] = ([doc.tolist() for doc in reader], reader.words.tolist())
    return out


@pytest.mark.slow
def test_both_engines_give_the_same_documents_split_and_token_ids(local_ray, tmp_path, request):
    from gptbert.distributed.data_stages import run_clean, run_shard
    from tokenization.tokenizer import train_tokenizer

    corpus = _corpus(tmp_path / "in")
    local = load_config("tiny", overrides=OVERRIDES + [f"clean.inputs=['{corpus}']"])
    on_ray = load_config("tiny", overrides=OVERRIDES + RAY + [f"clean.inputs=['{corpus}']"])
    a = run_clean(local, tmp_path / "clean-local")
    b = run_clean(on_ray, tmp_path / "clean-ray")
    # Byte for byte: the documents in the same order and row groups, and the same record (counters).
    for name in ("documents.parquet", "stage.json"):
        assert (tmp_path / "clean-local" / name).read_bytes() == (tmp_path / "clean-ray" / name).read_bytes()
    assert a["identity"] == b["identity"] == stage_identity("clean", clean_inputs(local.clean), local.clean.identity_dict())
    texts = pq.read_table(tmp_path / "clean-ray" / "documents.parquet").column("text").to_pylist()
    totals = b["stats"]["totals"]
    assert len(texts) == len(set(texts)) == totals["documents_out"]
    assert totals["dropped_duplicates"] >= 40 + 50 + 200 + 4 + 10  # within and across files
    assert texts.index("Sentence 0: the dog saw 0 cats.") == 0  # the first occurrence kept: a.txt's
    assert sum(t.startswith("A long line") for t in texts) > 100  # the long line, split
    try:  # the same inputs in a bucket: the workers read them there
        uri = _upload(corpus, request.getfixturevalue("s3").bucket("engine-inputs") + "/in")
    except pytest.skip.Exception:
        uri = None
    if uri is not None:
        run_clean(load_config("tiny", overrides=OVERRIDES + RAY + [f"clean.inputs=['{uri}']"]), tmp_path / "clean-s3")
        for name in ("documents.parquet", "stage.json"):
            assert (tmp_path / "clean-s3" / name).read_bytes() == (tmp_path / "clean-local" / name).read_bytes()

    train_tokenizer(tmp_path / "clean-local", local.tokenizer, tmp_path / "tok", progress_bar=False)
    c = run_shard(local, tmp_path / "clean-local", tmp_path / "tok", tmp_path / "shard-local")
    d = run_shard(on_ray, tmp_path / "clean-ray", tmp_path / "tok", tmp_path / "shard-ray")
    assert c["identity"] == d["identity"]
    streams = _streams(tmp_path / "shard-ray")
    assert streams == _streams(tmp_path / "shard-local")
    assert len(streams["valid"][0]) == round(0.05 * len(texts))
    assert len(d["manifest"]["splits"]["train"]["shards"]) > len(c["manifest"]["splits"]["train"]["shards"])
    listed = {e["file"] for s in d["manifest"]["splits"].values() for e in s["shards"]}
    assert {p.name for p in (tmp_path / "shard-ray").iterdir()} == listed | {"manifest.json", "tokenizer.json",
                                                                             "stage.json"}


@pytest.mark.slow
def test_the_stage_cache_is_engine_independent(local_ray, tmp_path, request):
    """A pipeline that cleaned locally reuses that clean with clean.engine=ray and shards on Ray
    (in a bucket where moto is installed: workers read the documents from it and write shards
    straight to it); the Ray shards are then the cached shards of the local engine."""
    from flows import stages

    corpus = _corpus(tmp_path / "in")
    try:
        workdir = request.getfixturevalue("s3").bucket("engines") + "/run"
    except pytest.skip.Exception:
        workdir = str(tmp_path / "run")
    base = OVERRIDES + [f"clean.inputs=['{corpus}']", f"workdir={workdir}"]
    local, on_ray = load_config("tiny", overrides=base), load_config("tiny", overrides=base + RAY)
    cleaned = stages.clean(local)
    assert not cleaned.cached
    again = stages.clean(on_ray)
    assert again.cached and again.path == cleaned.path
    tok = stages.train_tokenizer(on_ray, again)
    shards = stages.shard(on_ray, again, tok)
    assert not shards.cached and stages.shard(local, cleaned, tok).cached
    with ShardReader(shards.path, split="train") as train, ShardReader(shards.path, split="valid") as valid:
        train.verify()
        valid.verify()
        assert len(train) + len(valid) == cleaned.record["stats"]["totals"]["documents_out"]
        # Ray's shards, cut per block: <split>-<block>-<n>.arrow
        assert all(re.fullmatch(r"train-\d{5}-\d{5}\.arrow", e["file"]) for e in train.manifest["splits"]["train"]["shards"])


@pytest.mark.slow
def test_a_worker_killed_while_encoding_is_retried_and_the_shards_are_the_same(local_ray, tmp_path):
    from gptbert.distributed.data_stages import run_clean, run_shard
    from tokenization.tokenizer import train_tokenizer

    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(3)
    words = np.array(["the", "a", "dog", "cat", "saw", "ran", "big", "small", "red", "tree", "house", "quickly"])
    (tmp_path / "in" / "t.txt").write_text("\n".join(" ".join(rng.choice(words, 60)) for _ in range(6000)) + "\n")
    base = OVERRIDES + [f"clean.inputs=['{tmp_path / 'in'}']", "shard.ray_block_bytes=400000",
                        "shard.batch_documents=100"]
    local = load_config("tiny", overrides=base)
    on_ray = load_config("tiny", overrides=base + RAY)
    run_clean(local, tmp_path / "clean")
    train_tokenizer(tmp_path / "clean", local.tokenizer, tmp_path / "tok", progress_bar=False)
    run_shard(local, tmp_path / "clean", tmp_path / "tok", tmp_path / "shard-local")

    killed: list[int] = []
    stop = threading.Event()

    def kill_an_encoding_worker() -> None:
        while not stop.is_set() and not killed:
            for entry in Path("/proc").iterdir():
                try:
                    title = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if entry.name.isdigit() and b"MapBatches(encode_block)" in title:
                    time.sleep(0.05)
                    try:  # still encoding its block: kill it mid-block
                        if b"MapBatches(encode_block)" in (entry / "cmdline").read_bytes():
                            os.kill(int(entry.name), signal.SIGKILL)
                            killed.append(int(entry.name))
                            return
                    except OSError:
                        continue
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_an_encoding_worker, daemon=True)
    watcher.start()
    try:
        run_shard(on_ray, tmp_path / "clean", tmp_path / "tok", tmp_path / "shard-ray")
    finally:
        stop.set()
        watcher.join()
    assert killed, "no encoding worker was seen to kill"
    assert _streams(tmp_path / "shard-ray") == _streams(tmp_path / "shard-local")
    manifest = json.loads((tmp_path / "shard-ray" / "manifest.json").read_text())
    listed = {e["file"] for s in manifest["splits"].values() for e in s["shards"]}
    assert {p.name for p in (tmp_path / "shard-ray").iterdir()} == listed | {"manifest.json", "tokenizer.json",
                                                                             "stage.json"}


@pytest.mark.slow
def test_bad_input_on_ray_is_one_line_naming_the_file_and_leaves_nothing(local_ray, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    rows = [json.dumps({"text": f"record {i}"}) for i in range(400)]
    rows[321] = '{"text": "unterminated'
    (tmp_path / "in" / "a.txt").write_text("fine\n" * 100)
    (tmp_path / "in" / "b.jsonl").write_text("\n".join(rows) + "\n")
    args = ["clean", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--no-progress",
            "--set", "clean.engine=ray", "--set", "clean.ray_block_bytes=2048", "--set", f"workdir={tmp_path / 'run'}"]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("gptbert clean:")]
    assert len(ours) == 1 and "b.jsonl: line 322: malformed JSON" in ours[0], err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "run"]  # no output, no temporary folder
    assert [p.parent.name for p in (tmp_path / "run").rglob("*.log")] == ["logs"]  # Ray's output
    on_ray = load_config("tiny", overrides=RAY + [f"clean.inputs=['{tmp_path / 'in'}']"])
    from gptbert.distributed.data_stages import run_clean

    with pytest.raises(DataError, match=r"b\.jsonl: line 322: malformed JSON") as caught:
        run_clean(on_ray, tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert read_record(tmp_path / "out") is None
