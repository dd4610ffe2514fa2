"""Reliability: every bad input through the CLI is one line naming the file or field, exits 1 and
leaves nothing partial; nothing the user had is lost; checkpoints never run code; damaged or
diverging runs stop or recover cleanly."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.main import main
from common.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--preset", "tiny", "--no-progress"]
CORPUS = "\n".join(f"The {a} {v} the {b} near the {c}." for a, v, b, c in
                   zip(["cat", "dog", "child", "bird"] * 40, ["sees", "likes", "finds", "hears"] * 40,
                       ["ball", "tree", "house", "river"] * 40, ["door", "road", "hill", "park"] * 40)) + "\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A corpus cleaned, a tokenizer, shards, a 2-step tiny model and a BLiMP folder, via the CLI."""
    root = tmp_path_factory.mktemp("reliability")
    (root / "in").mkdir()
    (root / "in" / "corpus.txt").write_text(CORPUS)
    assert main(["clean", str(root / "in"), "--out", str(root / "clean"), *TINY]) == 0
    assert main(["train-tokenizer", str(root / "clean"), "--out", str(root / "tok"), *TINY]) == 0
    assert main(["shard", str(root / "clean"), str(root / "tok"), "--out", str(root / "shards"),
                 "--set", "shard.validation_fraction=0.1", *TINY]) == 0
    assert main(["pretrain", "--data", str(root / "shards"), "--out", str(root / "run"), "--set", "train.steps=2",
                 "--set", "train.checkpoint_every=1", *TINY]) == 0
    (root / "blimp").mkdir()
    pair = {"sentence_good": "The cat sees the ball.", "sentence_bad": "The cat see the ball.", "UID": "agr",
            "linguistics_term": "agreement", "field": "morphology"}
    (root / "blimp" / "agr.jsonl").write_text(json.dumps(pair) + "\n")
    return root


def _run(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _assert_one_line(rc: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------------------------- no data loss

def test_a_stage_never_replaces_another_stages_output(built, capsys, tmp_path):
    clean = _copy(built / "clean", tmp_path / "clean")
    tok = _copy(built / "tok", tmp_path / "tok")
    before = {p: p.read_bytes() for p in (clean / "documents.parquet", tok / "tokenizer.json")}
    rc, err = _run(capsys, "train-tokenizer", str(clean), "--out", str(clean), *TINY)
    _assert_one_line(rc, err, str(clean), "is the input")
    rc, err = _run(capsys, "clean", str(built / "in"), "--out", str(tok), *TINY)
    _assert_one_line(rc, err, str(tok), "output of stage 'tokenizer'")
    rc, err = _run(capsys, "shard", str(clean), str(tok), "--out", str(clean), *TINY)
    _assert_one_line(rc, err, str(clean))
    assert {p: p.read_bytes() for p in before} == before
    assert _listing(tmp_path) == ["clean", "tok"]  # nothing partial beside them


def test_output_inside_or_around_the_input_is_refused_before_work(built, capsys, tmp_path):
    inputs = _copy(built / "in", tmp_path / "in")
    rc, err = _run(capsys, "clean", str(inputs), "--out", str(inputs / "out"), *TINY)
    _assert_one_line(rc, err, "lies inside the input", str(inputs))
    rc, err = _run(capsys, "clean", str(inputs), "--out", str(tmp_path), *TINY)
    _assert_one_line(rc, err, "contains the input")
    assert _listing(inputs) == ["corpus.txt"] and _listing(tmp_path) == ["in"]


@pytest.mark.parametrize("command", ["pretrain", "evaluate", "clean"])
def test_an_output_that_is_a_file_or_unwritable_is_refused_before_work(built, capsys, tmp_path, command):
    target = tmp_path / "taken"
    target.write_text("a user's file")
    args = {"pretrain": ["pretrain", "--data", str(built / "shards")],
            "evaluate": ["evaluate", str(built / "run" / "model"), "--blimp", str(built / "blimp")],
            "clean": ["clean", str(built / "in")]}[command]
    rc, err = _run(capsys, *args, "--out", str(target), *(["--preset", "tiny"] if command != "clean" else TINY))
    _assert_one_line(rc, err, str(target), "not a folder")
    assert target.read_text() == "a user's file"
    rc, err = _run(capsys, *args, "--out", "/proc/gptbert-cannot-write-here",
                   *(["--preset", "tiny"] if command != "clean" else TINY))
    _assert_one_line(rc, err, "/proc/gptbert-cannot-write-here")
    assert _listing(tmp_path) == ["taken"]


# ---------------------------------------------------------------------------------------- bad input

def _edit_manifest(shards: Path, change) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    change(manifest)
    (shards / "manifest.json").write_text(json.dumps(manifest))


BAD_INPUTS = {
    "manifest without splits": (lambda r: _edit_manifest(r, lambda m: m.pop("splits")), "manifest.json", "splits"),
    "manifest not JSON": (lambda r: (r / "manifest.json").write_text("{oops"), "manifest.json", "not valid JSON"),
    "edited shard": (lambda r: (r / "train-00000.arrow").write_bytes(b"x" + (r / "train-00000.arrow").read_bytes()[1:]),
                     "train-00000.arrow", "differs from the manifest"),
    "shard file outside the folder": (lambda r: _edit_manifest(r, lambda m: m["splits"]["train"]["shards"][0].update(
        file="../../etc/passwd")), "manifest.json", "not a file inside the shard folder"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_shard_folders(built, capsys, tmp_path, case):
    shards = _copy(built / "shards", tmp_path / "shards")
    damage, where, what = BAD_INPUTS[case]
    damage(shards)
    rc, err = _run(capsys, "pretrain", "--data", str(shards), "--out", str(tmp_path / "run"), *TINY)
    _assert_one_line(rc, err, where, what)
    assert not (tmp_path / "run" / "model").exists()


def test_bad_config_values_and_files(built, capsys, tmp_path):
    for value, field in (("train.lr=.inf", "train.lr"), ("train.lr=.nan", "train.lr"),
                         ("model.hidden_size=66", "model.hidden_size"),
                         ("tracking.registered_model=x' OR '1'='1", "tracking.registered_model")):
        rc, err = _run(capsys, "pretrain", "--data", str(built / "shards"), "--out", str(tmp_path / "r"),
                       "--set", value, *TINY)
        _assert_one_line(rc, err, f"config field '{field}'")
    rc, err = _run(capsys, "pretrain", "--data", str(built / "shards"), "--out", str(tmp_path / "r"),
                   "--config", str(tmp_path), *TINY)
    _assert_one_line(rc, err, str(tmp_path), "not a file")
    (tmp_path / "bad.yaml").write_bytes(b"train: {lr: \xff}\n")
    rc, err = _run(capsys, "pretrain", "--data", str(built / "shards"), "--out", str(tmp_path / "r"),
                   "--config", str(tmp_path / "bad.yaml"), *TINY)
    _assert_one_line(rc, err, "bad.yaml", "UTF-8")
    rc, err = _run(capsys, "train-tokenizer", str(built / "clean"), "--out", str(tmp_path / "t"),
                   "--set", "tokenizer.vocab_size=300", "--no-progress")
    _assert_one_line(rc, err, "config field 'tokenizer.vocab_size'")  # its own field, not the model's
    assert not (tmp_path / "r").exists() and not (tmp_path / "t").exists()


def test_bad_evaluation_data_and_model_folders(built, capsys, tmp_path):
    blimp = _copy(built / "blimp", tmp_path / "blimp")
    (blimp / "bad.jsonl").write_bytes(b'{"sentence_good": "caf\xe9"}\n')
    rc, err = _run(capsys, "evaluate", str(built / "run" / "model"), "--blimp", str(blimp), "--out",
                   str(tmp_path / "e"), "--preset", "tiny")
    _assert_one_line(rc, err, "bad.jsonl:1", "UTF-8")

    def broken(name: str, damage) -> Path:
        folder = _copy(built / "run" / "model", tmp_path / name)
        damage(folder)
        return folder

    cases = [
        (broken("truncated", lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:1000])), "model.safetensors", "unreadable"),
        (broken("reshaped", lambda f: (f / "config.json").write_text(json.dumps(
            {**json.loads((f / "config.json").read_text()), "intermediate_size": 64}))), "model.safetensors",
         "do not fit config.json"),
        (broken("config", lambda f: (f / "config.json").write_text("[1]")), "config.json", ""),
        (broken("swapped-tokenizer", lambda f: (f / "tokenizer.json").write_text(
            (f / "tokenizer.json").read_text().replace('"<mask>"', '"<masque>"'))), "tokenizer.json", "sha256"),
    ]
    for folder, where, what in cases:
        rc, err = _run(capsys, "evaluate", str(folder), "--blimp", str(built / "blimp"), "--out",
                       str(tmp_path / "e"), "--preset", "tiny")
        _assert_one_line(rc, err, f"{folder.name}/{where}", what)
        rc, err = _run(capsys, "score", str(folder), "The cat sees the ball.")
        _assert_one_line(rc, err, f"{folder.name}/{where}", what)
    assert not (tmp_path / "e").exists()


def test_a_model_whose_tokenizer_has_a_larger_vocabulary(built, capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(built / "run" / "model", tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    tokens = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    old, config["vocab_size"] = config["vocab_size"], tokens - 10
    (folder / "config.json").write_text(json.dumps(config))
    # The vocabulary-sized weights shrink with the config, so the shapes fit and the tokenizer check speaks.
    state = {k: v[: tokens - 10] if v.ndim and v.shape[0] == old else v
             for k, v in load_file(str(folder / "model.safetensors")).items()}
    save_file(state, str(folder / "model.safetensors"))
    rc, err = _run(capsys, "score", str(folder), "The cat sees the ball.")
    _assert_one_line(rc, err, "model/tokenizer.json", "more than the model's vocabulary")


# ---------------------------------------------------------------------------------------- tokenizers

def _truncated(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(src.read_bytes()[: len(src.read_bytes()) // 2])
    return dest


def _another_tokenizer(src: Path, dest: Path) -> Path:
    """A valid tokenizer.json that is not ``src``: the ids of its last two tokens swapped."""
    data = json.loads(src.read_text())
    vocab = data["model"]["vocab"]
    a, b = (next(t for t, i in vocab.items() if i == len(vocab) - k) for k in (1, 2))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(data))
    return dest


def _shards_whose_tokenizer(damage):
    def make(built: Path, tmp: Path) -> tuple[list[str], str]:
        shards = _copy(built / "shards", tmp / "shards")
        damage(shards / "tokenizer.json", tmp)
        return ["--data", str(shards)], "shards/tokenizer.json"
    return make


def _given_tokenizer(make_file, data: str = "shards"):
    def make(built: Path, tmp: Path) -> tuple[list[str], str]:
        tok = make_file(built / "tok" / "tokenizer.json", tmp / "given" / "tokenizer.json")
        if data == "tokens":  # a token file has no manifest to compare with: the tokenizer is read
            from gptbert.data import save_token_file

            save_token_file(tmp / "ids.npz", [list(range(16, 40))] * 20)
            return ["--data", str(tmp / "ids.npz"), "--tokenizer", str(tok)], "given/tokenizer.json"
        return ["--data", str(built / "shards"), "--tokenizer", str(tok)], "given/tokenizer.json"
    return make


BAD_TOKENIZERS = {
    "shard folder: truncated": (_shards_whose_tokenizer(lambda f, tmp: _truncated(f, f)),
                                "differs from the manifest's"),
    "shard folder: missing": (_shards_whose_tokenizer(lambda f, tmp: f.unlink()), "not found"),
    "shard folder: another tokenizer": (_shards_whose_tokenizer(lambda f, tmp: _another_tokenizer(f, f)),
                                        "differs from the manifest's"),
    "--tokenizer: truncated": (_given_tokenizer(_truncated), "not a valid tokenizer.json"),
    "--tokenizer: another tokenizer": (_given_tokenizer(_another_tokenizer), "re-run gptbert shard"),
    "--tokenizer: truncated, token file": (_given_tokenizer(_truncated, "tokens"), "not a valid tokenizer.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENIZERS))
def test_a_bad_tokenizer_for_pretraining_is_one_line_before_any_training(built, capsys, tmp_path, case):
    """Issue 30: a corrupt tokenizer in the shard folder was dropped, and the run wrote a model
    folder without one. Now every tokenizer pretraining reads is refused by name before a step."""
    make, what = BAD_TOKENIZERS[case]
    args, where = make(built, tmp_path)
    rc, err = _run(capsys, "pretrain", *args, "--out", str(tmp_path / "run"), *TINY)
    _assert_one_line(rc, err, where, what)
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_a_bad_tokenizer_for_sharding_or_in_a_model_folder_is_one_line(built, capsys, tmp_path):
    tok = _truncated(built / "tok" / "tokenizer.json", tmp_path / "tok" / "tokenizer.json")
    rc, err = _run(capsys, "shard", str(built / "clean"), str(tok.parent), "--out", str(tmp_path / "shards"), *TINY)
    _assert_one_line(rc, err, "tok/tokenizer.json", "not a valid tokenizer.json")
    assert not (tmp_path / "shards").exists()

    truncated = _copy(built / "run" / "model", tmp_path / "truncated")
    _truncated(truncated / "tokenizer.json", truncated / "tokenizer.json")
    unrecorded = _copy(truncated, tmp_path / "unrecorded")  # no digest to compare with: the file is read
    summary = json.loads((unrecorded / "training.json").read_text())
    summary.pop("tokenizer_sha256")
    (unrecorded / "training.json").write_text(json.dumps(summary))
    missing = _copy(built / "run" / "model", tmp_path / "missing")
    (missing / "tokenizer.json").unlink()
    for folder, what in ((truncated, "sha256 differs"), (unrecorded, "not a valid tokenizer.json"),
                         (missing, "lacks tokenizer.json")):
        rc, err = _run(capsys, "evaluate", str(folder), "--blimp", str(built / "blimp"), "--out",
                       str(tmp_path / "e"), "--preset", "tiny")
        _assert_one_line(rc, err, folder.name, what)
        if folder is not missing:
            rc, err = _run(capsys, "score", str(folder), "The cat sees the ball.")
            _assert_one_line(rc, err, f"{folder.name}/tokenizer.json", what)
    for folder, what in ((truncated, "sha256 differs"), (missing, "has no tokenizer.json")):
        rc, err = _run(capsys, "export", str(folder), "--out", str(tmp_path / "hf"))
        _assert_one_line(rc, err, folder.name, what)
    assert not (tmp_path / "e").exists() and not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------------------- checkpoints

class _Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_and_never_runs(built, capsys, tmp_path):
    run = _copy(built / "run", tmp_path / "run")
    step = sorted((run / "checkpoints").iterdir())[-1]
    marker = tmp_path / "payload-ran"
    state = torch.load(step / "optimizer.pt", weights_only=True)
    state["evil"] = _Payload(str(marker))
    torch.save(state, step / "optimizer.pt")
    shutil.rmtree(run / "model")
    (run / "stage.json").unlink()
    rc, err = _run(capsys, "pretrain", "--data", str(built / "shards"), "--out", str(run), "--set", "train.steps=2",
                   "--set", "train.checkpoint_every=1", *TINY)
    _assert_one_line(rc, err, f"{step.name}/optimizer.pt", "refused", "could run code")
    assert not marker.exists() and not (run / "model").exists()


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(built, caplog, tmp_path):
    from gptbert.pretraining import pretrain

    run = _copy(built / "run", tmp_path / "run")
    shutil.rmtree(run / "model")
    (run / "stage.json").unlink()
    latest = run / "checkpoints" / "step-2"
    (latest / "model.safetensors").write_bytes((latest / "model.safetensors").read_bytes()[:500])
    cfg = load_config("tiny", overrides=["train.steps=2", "train.checkpoint_every=1"])
    with caplog.at_level("WARNING", logger="gptbert"):
        model_dir = pretrain(cfg, built / "shards", run)
    assert any("step-2" in r.getMessage() and "model.safetensors" in r.getMessage() for r in caplog.records)
    summary = json.loads((model_dir / "training.json").read_text())
    assert summary["steps"] == 2  # resumed at step 1, trained step 2 again
    assert len(summary["final"]) > 0


def test_resume_checks_the_run_before_reading_weights(built, capsys, tmp_path):
    run = _copy(built / "run", tmp_path / "run")
    shutil.rmtree(run / "model")
    (run / "stage.json").unlink()
    for step in (run / "checkpoints").iterdir():  # the weights could not even be read: the digest comes first
        (step / "model.safetensors").write_bytes(b"")
    rc, err = _run(capsys, "pretrain", "--data", str(built / "shards"), "--out", str(run), "--set", "train.steps=2",
                   "--set", "model.hidden_size=32", "--set", "model.num_heads=2", *TINY)
    _assert_one_line(rc, err, "different model or train config")


def test_a_non_finite_loss_stops_training_naming_the_step(built, capsys, tmp_path):
    rc, err = _run(capsys, "pretrain", "--data", str(built / "shards"), "--out", str(tmp_path / "run"),
                   "--set", "train.steps=6", "--set", "train.checkpoint_every=1", "--set", "train.lr=1e30",
                   "--set", "train.warmup_fraction=0", *TINY)
    _assert_one_line(rc, err, "step ", "not finite")
    step = int(err.split("step ")[1].split(":")[0])
    kept = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert step >= 1 and [p.name for p in kept][-1] == f"step-{step - 1}" if step > 1 else not kept
    assert not (tmp_path / "run" / "model").exists()
    for ckpt in kept:  # what was kept is finite
        from safetensors.torch import load_file

        assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / "model.safetensors")).values())


def test_pickle_payload_class_really_runs_when_unpickled(tmp_path):
    """The payload used above is live: plain unpickling creates its marker (so the refusal test can fail)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(str(marker))))
    assert marker.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA")
@pytest.mark.parametrize("launcher", ["local", "ray"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_pretraining_on_a_missing_gpu_is_one_line_before_any_work(built, capsys, tmp_path, launcher, device):
    # Never a silent CPU run: train.device=cuda without CUDA fails on both launchers, Ray not started.
    rc, err = _run(capsys, "pretrain", "--data", str(built / "shards"), "--out", str(tmp_path / "run"),
                   "--set", f"train.device={device}", "--set", f"launch.backend={launcher}", *TINY)
    _assert_one_line(rc, err, "config field 'train.device'", "cuda" if launcher == "local" or device == "cuda"
                     else "Ray assigns each worker its own GPU")
    assert not (tmp_path / "run").exists()
