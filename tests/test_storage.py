"""Object storage (common/storage.py) against a real S3 API server on loopback (moto in server
mode, the ``s3`` fixture): publishing stage folders with the record last, refusing foreign
objects, the bounded local cache, remote shards read the same as local ones, the stage cache
reading only records, and (slow) the whole pipeline with its run root in a bucket."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from common import storage
from common.artifacts import DataError, DigestMismatchError, read_record, staging_dir, tree_digest
from common.config import load_config


def _stage_folder(folder: Path, files: dict[str, str], stage: str = "clean") -> Path:
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    (folder / "stage.json").write_text(json.dumps({"stage": stage, "identity": "x", "output": "."}))
    return folder


def test_locations_join_and_normalize(tmp_path):
    assert storage.join("s3://b/run/", "artifacts", "clean") == "s3://b/run/artifacts/clean"
    assert storage.join(tmp_path, "a") == str(tmp_path.resolve() / "a")
    assert storage.normalize(f"file://{tmp_path}") == str(tmp_path.resolve())
    assert storage.is_remote("gs://b/x") and not storage.is_remote(f"file://{tmp_path}") and not storage.is_remote("x")
    assert storage.local_home(tmp_path) == tmp_path.resolve()
    assert storage.local_home("s3://b/run").parts[-3:] == ("s3", "b", "run")
    with pytest.raises(storage.StorageError, match="unknown URI scheme ftp"):
        storage.normalize("ftp://host/x")


def test_publish_writes_the_record_last_and_an_interrupted_upload_is_redone(s3, tmp_path, monkeypatch):
    base = s3.bucket("publish")
    dest = f"{base}/artifacts/clean/one"
    first = _stage_folder(tmp_path / "first", {"a.txt": "alpha", "old.txt": "stale", "sub/b.txt": "beta"})
    storage.publish(first, dest, "clean", "stage.json")
    assert read_record(dest, "clean")["identity"] == "x"
    assert storage.list_files(dest) == {"a.txt": 5, "old.txt": 5, "sub/b.txt": 4, "stage.json": first.joinpath(
        "stage.json").stat().st_size}

    # A second publish that dies after one object: the old record is gone first, so readers see an
    # incomplete folder, and the pending marker says it is ours to redo.
    second = _stage_folder(tmp_path / "second", {"a.txt": "ALPHA", "sub/b.txt": "BETA"})
    real_upload, calls = storage.upload_file, []

    def dying_upload(local, location):
        calls.append(location)
        if len(calls) > 1:
            raise OSError("connection reset")
        real_upload(local, location)

    monkeypatch.setattr(storage, "upload_file", dying_upload)
    with pytest.raises(OSError, match="connection reset"):
        storage.publish(second, dest, "clean", "stage.json")
    monkeypatch.setattr(storage, "upload_file", real_upload)
    assert read_record(dest) is None
    assert storage.owned_by(dest, "clean", "stage.json") is True
    assert storage.owned_by(dest, "tokenizer", "stage.json") is False

    with staging_dir(dest, "clean") as tmp:  # accepted: an interrupted upload of this stage
        (tmp / "a.txt").write_text("ALPHA")
        (tmp / "stage.json").write_text(json.dumps({"stage": "clean", "identity": "y", "output": "."}))
    assert read_record(dest, "clean")["identity"] == "y"
    assert storage.read_bytes(f"{dest}/a.txt") == b"ALPHA"
    assert sorted(storage.list_files(dest)) == ["a.txt", "stage.json"]  # stale objects and the marker gone
    assert not list(storage.local_home(dest).parent.glob(f".{storage.name_of(dest)}.tmp-*"))  # no local leftovers


def test_a_failed_stage_leaves_the_prefix_as_it_was_and_a_missing_bucket_fails_before_work(s3):
    base = s3.bucket("failed")
    with pytest.raises(RuntimeError, match="stage broke"):
        with staging_dir(f"{base}/out", "clean") as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("stage broke")
    assert storage.list_files(f"{base}/out") == {}
    ran = []
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket/out"):
        with staging_dir("s3://no-such-bucket/out", "clean"):
            ran.append(True)
    assert ran == []


def test_foreign_objects_are_never_overwritten(s3):
    base = s3.bucket("foreign")
    storage.write_bytes(f"{base}/out/notes.txt", b"the user's notes")
    with pytest.raises(DataError, match="not empty and holds no clean stage.json"):
        with staging_dir(f"{base}/out", "clean") as tmp:
            (tmp / "stage.json").write_text("{}")
    assert storage.list_files(f"{base}/out") == {"notes.txt": 16}
    with pytest.raises(FileNotFoundError, match="not found"):
        storage.read_bytes(f"{base}/missing.json")


def test_cache_verifies_fills_and_evicts_the_least_recently_used(s3, tmp_path):
    import hashlib

    base = s3.bucket("cache")
    blobs = {name: bytes([i]) * 1000 for i, name in enumerate(("a", "b", "c"))}
    for name, data in blobs.items():
        storage.write_bytes(f"{base}/{name}", data)
    sha = {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}
    cache = storage.LocalCache(tmp_path / "cache", max_bytes=2500)
    a = cache.file(f"{base}/a", sha["a"])
    assert a.read_bytes() == blobs["a"] and cache.fills == 1
    assert cache.file(f"{base}/a", sha["a"]) == a and cache.hits == 1  # served from disk
    time.sleep(0.01)
    cache.file(f"{base}/b", sha["b"])
    time.sleep(0.01)
    cache.file(f"{base}/a", sha["a"])  # a is now more recent than b
    time.sleep(0.01)
    cache.file(f"{base}/c", sha["c"])  # 3000 bytes > 2500: the least recently used (b) goes
    assert sorted(p.name for p in (tmp_path / "cache" / "files").iterdir()) == sorted([sha["a"], sha["c"]])
    with pytest.raises(DigestMismatchError, match="changed after it was written"):
        cache.file(f"{base}/b", hashlib.sha256(b"other").hexdigest())  # wrong content: refused, not kept
    assert sorted(p.name for p in (tmp_path / "cache" / "files").iterdir()) == sorted([sha["a"], sha["c"]])


def _tiny_remote_stages(workdir: str, tmp_path: Path):
    """clean -> tokenizer -> shard of a small generated corpus with the run root ``workdir``."""
    from flows import stages
    from flows.demo import write_demo_data

    corpus, _ = write_demo_data(tmp_path / "data")
    cfg = load_config("tiny", overrides=[f"workdir={workdir}", f'clean.inputs=["{corpus}"]',
                                         "shard.shard_tokens=20000"])
    corpus_art = stages.clean(cfg)
    tok = stages.train_tokenizer(cfg, corpus_art)
    return cfg, corpus_art, tok, stages.shard(cfg, corpus_art, tok)


def test_remote_shards_read_like_local_ones_and_the_stage_cache_reads_only_records(s3, tmp_path, monkeypatch):
    from flows import stages
    from tokenization.shards import ShardReader

    base = s3.bucket("shards")
    cfg, corpus, tok, shards = _tiny_remote_stages(f"{base}/run", tmp_path)
    assert shards.path.startswith(f"{base}/run/artifacts/shard/") and not shards.cached
    names = storage.list_files(shards.path)
    assert "manifest.json" in names and "stage.json" in names and "tokenizer.json" in names
    assert sum(n.endswith(".arrow") for n in names) >= 2  # several shards, all in the bucket

    local = shards.local()  # a verified copy in the cache
    assert tree_digest(local / "manifest.json") == shards.digest
    ref = ShardReader(local, split="train")
    cache = storage.LocalCache(tmp_path / "reader-cache")
    cached = ShardReader(shards.path, split="train", cache=cache)
    memory = ShardReader(shards.path, split="train", remote="memory")
    for reader in (cached, memory):
        assert reader.manifest_digest == ref.manifest_digest and len(reader) == len(ref) > 0
        assert np.array_equal(reader.lengths, ref.lengths) and np.array_equal(reader.words, ref.words)
        for i in range(0, len(ref), max(1, len(ref) // 50)):
            assert np.array_equal(reader.document(i), ref.document(i))
    assert cache.fills == len(ref.manifest["splits"]["train"]["shards"]) and cache.hits == 0
    ShardReader(shards.path, split="train", cache=cache)
    assert cache.hits == len(ref.manifest["splits"]["train"]["shards"])  # the second open reads no shard
    assert cached.tokenizer_path is not None and cached.tokenizer_path.read_bytes() == (local / "tokenizer.json").read_bytes()

    # The stage cache: a rerun reads each stage's record and nothing else of the bucket.
    reads = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda loc: reads.append(str(loc)) or real(loc))
    again = stages.shard(cfg, corpus, tok)
    assert again.cached and again.digest == shards.digest
    assert reads == [f"{shards.path}/stage.json"]

    # A shard changed in the bucket after it was written is refused on read (memory: at once;
    # cache: when a cache without it is filled).
    first = sorted(n for n in names if n.endswith(".arrow"))[0]
    storage.write_bytes(f"{shards.path}/{first}", b"not the shard")
    with pytest.raises(DigestMismatchError, match="changed after it was written"):
        ShardReader(shards.path, split="train", remote="memory")
    with pytest.raises(DigestMismatchError, match="changed after it was written"):
        ShardReader(shards.path, split="train", cache=storage.LocalCache(tmp_path / "fresh"))


def test_open_data_and_local_inputs_read_uris(s3, tmp_path):
    from gptbert.data import open_data

    base = s3.bucket("inputs")
    storage.write_bytes(f"{base}/corpus/a.txt", b"one two\n")
    storage.write_bytes(f"{base}/corpus/sub/b.txt", b"three\n")
    folder = storage.local_input(f"{base}/corpus")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                  and not p.name.startswith(".")) == ["a.txt", "sub/b.txt"]
    assert storage.local_input(f"{base}/corpus") == folder  # unchanged listing: the same copy
    storage.write_bytes(f"{base}/corpus/a.txt", b"one two changed\n")
    assert storage.local_input(f"{base}/corpus") != folder  # changed input: fetched again
    single = storage.local_input(f"{base}/corpus/sub/b.txt")
    assert single.name == "b.txt" and single.read_text() == "three\n"
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        open_data(f"{base}/corpus")
    with pytest.raises(FileNotFoundError, match="not found"):
        storage.local_input(f"{base}/nothing-here")


@pytest.mark.slow
def test_every_stage_command_reads_and_writes_uris(s3, tmp_path, capfd):
    """The CLI stage by stage with every input and output in the bucket: clean (inputs in the
    bucket too) -> train-tokenizer -> shard -> pretrain (local launcher) -> evaluate, export."""
    from cli.main import main
    from flows.demo import write_demo_data

    base = s3.bucket("cli")
    corpus, pairs = write_demo_data(tmp_path / "data")
    storage.write_bytes(f"{base}/in/corpus.txt", Path(corpus).read_bytes())
    for p in sorted(Path(pairs).glob("*.jsonl")):
        storage.write_bytes(f"{base}/in/pairs/{p.name}", p.read_bytes())
    common = ["--preset", "tiny", "--set", "shard.shard_tokens=20000"]
    assert main(["clean", f"{base}/in/corpus.txt", "--out", f"{base}/clean", "--no-progress", *common]) == 0
    assert main(["train-tokenizer", f"{base}/clean", "--out", f"{base}/tok", "--no-progress", *common]) == 0
    assert main(["shard", f"{base}/clean", f"{base}/tok", "--out", f"{base}/shards", "--no-progress", *common]) == 0
    train = ["--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--set", "train.validate_every=0",
             "--set", "train.batch_tokens_start=512", "--set", "train.batch_tokens_end=512",
             "--set", "train.micro_batch_tokens=512", "--set", "launch.backend=local",
             "--set", "launch.remote_shards=memory"]  # the shards read into memory, no local copy
    assert main(["pretrain", "--data", f"{base}/shards", "--out", f"{base}/run", "--no-progress", *common, *train]) == 0
    assert f"pretrain: wrote {base}/run/model" in capfd.readouterr().out
    assert main(["evaluate", f"{base}/run/model", "--out", f"{base}/eval", "--blimp", f"{base}/in/pairs",
                 "--set", "eval.temperatures=[1.0]", "--set", "eval.max_pairs_per_paradigm=5", *common]) == 0
    assert main(["export", f"{base}/run", "--out", f"{base}/hf"]) == 0  # the run folder, from the bucket
    for folder, stage in (("clean", "clean"), ("tok", "tokenizer"), ("shards", "shard"), ("run", "pretrain"),
                          ("eval", "evaluate"), ("hf", "export")):
        assert read_record(f"{base}/{folder}", stage) is not None, folder
    run = storage.list_files(f"{base}/run")
    assert "model/model.safetensors" in run and "checkpoints/" in "".join(run)  # the local launcher's checkpoints
    results = json.loads(storage.read_bytes(f"{base}/eval/results.json"))
    assert results["tasks"]["blimp"]
    exported = storage.list_files(f"{base}/hf")
    assert "model.safetensors" in exported and "config.json" in exported
    # The tokenizer stage's input, the shard stage's inputs and the model came from the bucket.
    assert read_record(f"{base}/shards", "shard")["inputs"]["tokenizer"] == read_record(f"{base}/tok")["output_digest"]


@pytest.fixture
def team_server(s3, tmp_path):
    """The team tracking server of ``infra/mlflow/start-server.sh`` on loopback: PostgreSQL
    (Debian's server, in a temporary folder) as the backend store, the S3 server as the proxied
    artifact store. Yields its URI."""
    import os
    import subprocess
    import tempfile

    from servers import free_port, start_postgres, stop, stop_postgres, wait_healthy
    from venvs import env_with_this_interpreter_first  # the script runs `mlflow` from PATH

    folder = Path(tempfile.mkdtemp(prefix="gbpg-", dir="/tmp"))  # the postgres user must reach it
    data, db_uri = start_postgres(folder)
    artifacts = s3.bucket("team-mlflow")
    port = free_port()
    env = {**env_with_this_interpreter_first(), "MLFLOW_BACKEND_STORE_URI": db_uri, "MLFLOW_ARTIFACTS_DESTINATION": f"{artifacts}/artifacts",
           "MLFLOW_PORT": str(port), "MLFLOW_SERVER_ROOT": str(tmp_path / "server"),
           "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen([str(Path(__file__).resolve().parents[1] / "infra" / "mlflow" / "start-server.sh")],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, timeout=180)
        yield SimpleNamespace(uri=f"http://127.0.0.1:{port}", artifacts=artifacts, db=db_uri)
    finally:
        stop(proc)
        stop_postgres(data)
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_pipeline_in_a_bucket_tracked_by_the_team_server(prefect_harness, s3, team_server, tmp_path):
    """The whole pipeline on the tiny test config with ``workdir`` in the bucket and the team
    tracking server (PostgreSQL + proxied S3 artifacts): every stage folder is a prefix of the
    bucket with its record; runs, metrics, artifacts and the registry alias are on the server; a
    second client reads them back; a rerun with the embedded store is all cached."""
    from mlflow.tracking import MlflowClient

    from flows.demo import demo_config, with_demo_data
    from flows.pipeline import STAGES, pipeline
    from test_flows import _test_overrides

    base = s3.bucket("pipeline")
    workdir = f"{base}/team/run"
    cfg = with_demo_data(demo_config(workdir, _test_overrides(f"tracking.tracking_uri={team_server.uri}")))
    t0 = time.time()
    first = pipeline(config=cfg)
    print(f"bucket-backed pipeline with the team server: {time.time() - t0:.1f} s")
    assert first["ran"] == list(STAGES) and first["workdir"] == workdir
    for stage in STAGES:
        path = first["stages"][stage]["path"]
        assert path.startswith(f"{workdir}/artifacts/{stage}/")
        record = read_record(path, stage)
        assert record is not None and record["output_digest"] == first["stages"][stage]["digest"]
    files = storage.list_files(first["stages"]["pretrain"]["path"])
    assert "model/model.safetensors" in files and any(n.startswith("ray/") for n in files)
    assert not storage.exists(f"{workdir}/mlflow")  # no tracking store inside the run root

    # A second client (another process would do the same) reads everything back from the server.
    other = MlflowClient(tracking_uri=team_server.uri, registry_uri=team_server.uri)
    parent = other.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: clients need no bucket access
    children = {r.data.tags["gptbert.stage"]: r for r in other.search_runs(
        [first["experiment_id"]], f"tags.mlflow.parentRunId = '{first['mlflow_run_id']}'")}
    assert sorted(children) == sorted(STAGES)
    assert children["pretrain"].data.metrics["loss"] > 0
    history = other.get_metric_history(children["pretrain"].info.run_id, "loss")
    assert len(history) >= 2
    version = other.get_model_version_by_alias("flows-test", "champion")
    assert version.run_id and int(version.version) >= 1
    local = other.download_artifacts(children["evaluate"].info.run_id, "evaluate/results.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["tasks"]["blimp"]
    # The artifacts are in the bucket behind the server, not on this machine's disk.
    assert any(name.endswith("results.json") for name in storage.list_files(f"{team_server.artifacts}/artifacts"))

    # The embedded default: no server configured, the store stays local; every stage is cached.
    t0 = time.time()
    second = pipeline(config=with_demo_data(demo_config(workdir, _test_overrides())))
    print(f"bucket-backed rerun (all cached): {time.time() - t0:.1f} s")
    assert second["cached"] == list(STAGES) and second["ran"] == []
    assert second["tracking_uri"] == f"sqlite:///{storage.local_home(workdir)}/mlflow/mlflow.db"


def test_a_rerun_finds_the_newest_complete_checkpoints_in_remote_ray_storage(s3, tmp_path):
    """A driver started again under the same run name resumes from what is in the bucket: the
    newest two complete checkpoints (with trainer.pt) are copied to node-local scratch."""
    from gptbert.distributed.ray_launcher import stored_checkpoints

    base = s3.bucket("raystore")
    for step, files in ((3, ("trainer.pt", "model/w.bin")), (6, ("trainer.pt",)), (9, ("model/w.bin",)),
                        (12, ())):
        for name in files:
            storage.write_bytes(f"{base}/ray/run/step-{step}/{name}", f"{step}:{name}".encode())
    storage.write_bytes(f"{base}/ray/run/other/trainer.pt", b"not a checkpoint")
    found = stored_checkpoints(f"{base}/ray", "run", tmp_path / "scratch")
    assert [p.name for p in found] == ["step-3", "step-6"]  # step-9 is incomplete (no trainer.pt)
    assert (found[0] / "model" / "w.bin").read_bytes() == b"3:model/w.bin"
    assert (found[1] / "trainer.pt").read_bytes() == b"6:trainer.pt"
    assert stored_checkpoints(f"{base}/ray", "absent", tmp_path / "scratch") == []
