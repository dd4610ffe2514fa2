"""The training loop end to end: learning in both modes, metrics, the model folder, token files, CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import load_config
from common.artifacts import read_record, tree_digest
from gptbert.data import ListDocumentSource, load_token_file, save_token_file


# Tiny tensors: extra threads only contend with other processes (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def repetitive_corpus(n_docs=120, seed=0):
    """Documents that cycle through one of 4 fixed 8-token patterns: easy to learn both ways."""
    rng = np.random.default_rng(seed)
    patterns = [rng.integers(16, 512, size=8) for _ in range(4)]
    docs = []
    for i in range(n_docs):
        p = patterns[i % 4]
        n = int(rng.integers(12, 60))
        docs.append(np.resize(p, n))
    return docs


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_loss_falls_in_both_pure_modes(tmp_path, fraction):
    from gptbert.pretraining import pretrain

    history = []
    cfg = load_config(preset="tiny", overrides=[
        "train.steps=40", "train.lr=2e-2", f"train.causal_fraction={fraction}", "train.checkpoint_every=0",
        "train.validate_every=0", "train.seq_len_schedule=false", "train.seq_len=32",
        "train.batch_tokens_start=1024", "train.batch_tokens_end=1024", "train.micro_batch_tokens=1024"])
    docs = repetitive_corpus()
    pretrain(cfg, ListDocumentSource(docs), tmp_path / "run", callback=lambda m, s: history.append(m),
             valid_data=ListDocumentSource(repetitive_corpus(136)[120:]))  # same patterns, unseen docs
    key = "loss_causal" if fraction == 1.0 else "loss_masked"
    other = "loss_masked" if fraction == 1.0 else "loss_causal"
    first, last = history[0][key], np.mean([m[key] for m in history[-5:]])
    assert first > 5.5  # about ln(512) at initialisation
    assert last < 0.5 * first, (first, last)
    assert all(np.isnan(m[other]) for m in history)  # the other kind is absent
    summary = json.loads((tmp_path / "run" / "model" / "training.json").read_text())
    valid_key = "valid_" + key
    assert summary["final"][valid_key] < 0.5 * first
    assert summary["final"][other] is None  # strict JSON: no NaN


def test_pretrain_metrics_and_model_folder(tmp_path):
    from gptbert.io import load_model_dir
    from gptbert.model import GPTBERT
    from gptbert.pretraining import pretrain

    docs = repetitive_corpus(40)
    data = tmp_path / "tokens.txt"
    data.write_text("\n".join(" ".join(map(str, d)) for d in docs) + "\n")
    valid = tmp_path / "valid.npz"
    save_token_file(valid, repetitive_corpus(8, seed=3))
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(_minimal_tokenizer_json())
    calls = []
    cfg = load_config(preset="tiny", overrides=["train.steps=4", "train.validate_every=2",
                                                "train.checkpoint_every=0", "train.valid_examples=5"])
    model_dir = pretrain(cfg, data, tmp_path / "run", callback=lambda m, s: calls.append((s, m)),
                         tokenizer=tokenizer, valid_data=valid)
    assert [s for s, _ in calls] == [1, 2, 3, 4]
    m = calls[0][1]
    for key in ("loss", "loss_masked", "loss_causal", "lr", "mask_rate", "grad_norm", "tokens_per_s",
                "data_time_s", "step_time_s", "seq_len", "batch_size"):
        assert np.isfinite(m[key]), key
    assert "words_per_s" not in m  # a .txt token file has no word count
    assert m["mask_rate"] == pytest.approx(0.30) and calls[-1][1]["mask_rate"] == pytest.approx(0.15)
    assert m["batch_size"] == 1024 // 16 and m["seq_len"] == 16
    assert "valid_loss_masked" in calls[1][1] and "valid_loss_causal" in calls[1][1]
    assert "valid_loss_masked" not in calls[0][1]
    model, tok = load_model_dir(model_dir)
    assert isinstance(model, GPTBERT) and not model.training
    assert tok is not None and tok.get_vocab_size() >= 1
    summary = json.loads((model_dir / "training.json").read_text())
    assert summary["steps"] == 4 and summary["tokens"] > 0
    assert np.isfinite(summary["final"]["valid_loss_masked_ema"])
    assert json.loads((model_dir / "config.json").read_text())["hidden_size"] == 64


def _minimal_tokenizer_json() -> str:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from tokenization.tokenizer import SPECIAL_TOKENS

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)} | {"a": len(SPECIAL_TOKENS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    return tok.to_str()


def test_words_per_second_uses_the_source_word_count():
    from gptbert.trainer import LocalBackend, Trainer
    from gptbert.model import GPTBERT
    from gptbert.optim import build_optimizer

    cfg = load_config(preset="tiny", overrides=["train.steps=2"])
    docs = repetitive_corpus(20)
    tokens = sum(len(d) for d in docs)
    source = ListDocumentSource(docs, words=tokens // 2)
    model = GPTBERT(cfg.model)
    trainer = Trainer(cfg.model, cfg.train, source, LocalBackend(model, build_optimizer(model, cfg.train)))
    m = trainer.train_step()
    assert m["words_per_s"] == pytest.approx(m["tokens_per_s"] * (tokens // 2) / tokens)
    assert trainer.step == 1 and m["tokens"] == trainer.tokens_seen > 0


def test_token_files_roundtrip_and_errors(tmp_path):
    docs = [[16, 17, 18], [], [20]]
    save_token_file(tmp_path / "t.npz", docs, num_words=7)
    src = load_token_file(tmp_path / "t.npz")
    assert len(src) == 3 and src.lengths.tolist() == [3, 0, 1] and src.num_words == 7
    assert src.document(0).tolist() == [16, 17, 18] and src.num_tokens == 4
    (tmp_path / "bad.txt").write_text("1 2 3\n4 x 5\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        load_token_file(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="expected .txt or .npz"):
        (tmp_path / "t.csv").write_text("1")
        load_token_file(tmp_path / "t.csv")
    with pytest.raises(FileNotFoundError):
        load_token_file(tmp_path / "missing.txt")


def test_shard_folder_is_the_source_of_its_tokenizer(tmp_path):
    """open_data takes the shard folder's own tokenizer.json, only when it is the one the manifest
    pins (a replaced one is refused, naming it); an explicit tokenizer is checked against the manifest."""
    from common.artifacts import DigestMismatchError
    from common.config import CleanConfig, ShardConfig, TokenizerConfig
    from gptbert.data import open_data
    from tokenization.clean import clean_corpus
    from tokenization.shards import write_shards
    from tokenization.tokenizer import train_tokenizer

    (tmp_path / "corpus.txt").write_text("\n".join(f"line {i} of the small corpus" for i in range(200)) + "\n")
    clean_corpus(CleanConfig(inputs=[str(tmp_path / "corpus.txt")]), tmp_path / "clean", progress_bar=False)
    train_tokenizer(tmp_path / "clean", TokenizerConfig(vocab_size=300), tmp_path / "tok", progress_bar=False)
    train_tokenizer(tmp_path / "clean", TokenizerConfig(vocab_size=290), tmp_path / "tok2", progress_bar=False)
    write_shards(tmp_path / "clean", tmp_path / "tok", ShardConfig(validation_fraction=0.1), tmp_path / "shards",
                 progress_bar=False)
    data = open_data(tmp_path / "shards")
    assert data.tokenizer == tmp_path / "shards" / "tokenizer.json" and data.vocab_size == 300
    assert data.valid is not None and len(data.valid) == 20
    assert data.digest == hashlib.sha256((tmp_path / "shards" / "manifest.json").read_bytes()).hexdigest()
    with pytest.raises(DigestMismatchError, match="re-run gptbert shard"):
        open_data(tmp_path / "shards", tokenizer=tmp_path / "tok2" / "tokenizer.json")
    (tmp_path / "shards" / "tokenizer.json").write_bytes((tmp_path / "tok2" / "tokenizer.json").read_bytes())
    with pytest.raises(DigestMismatchError, match="shards/tokenizer.json: sha256 .* differs from the manifest's"):
        open_data(tmp_path / "shards")  # a swapped file is neither taken nor silently dropped


def test_out_of_vocabulary_ids_fail_clearly(tmp_path):
    from gptbert.pretraining import pretrain

    cfg = load_config(preset="tiny", overrides=["train.steps=1"])
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        pretrain(cfg, ListDocumentSource([np.arange(500, 600)]), tmp_path / "run")


def test_cli_pretrain(tmp_path, capfd):
    from cli.train import register

    data = tmp_path / "tokens.txt"
    data.write_text("\n".join(" ".join(map(str, d)) for d in repetitive_corpus(30)) + "\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pretrain", "--preset", "tiny", "--set", "train.steps=2",
                              "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress"])
    assert args.func(args) == 0
    out = capfd.readouterr().out
    assert "pretrain: wrote" in out and "loss=" in out
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_train_config_validation():
    from common.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="seq_len_boundaries"):
        TrainConfig(seq_len_stages=[128, 512], seq_len_boundaries=[0.7, 0.9])
    with pytest.raises(ConfigError, match="causal_fraction"):
        TrainConfig(causal_fraction=1.5)
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        TrainConfig(micro_batch_tokens=100)
    small = load_config(preset="small").train
    assert (small.steps, small.lr, small.causal_fraction, small.ema_decay) == (7812, 1.41e-2, 0.0625, 0.999)
    assert (small.beta1, small.beta2, small.eps, small.weight_decay, small.grad_clip) == (0.9, 0.98, 1e-8, 0.1, 2.0)
    base = load_config(preset="base").train
    assert (base.steps, base.lr) == (15625, 1e-2)


@pytest.mark.slow
def test_pretrain_from_real_shards(tmp_path):
    """The shard reader of tokenization/ feeds the loop: words/s, validation split, tokenizer."""
    from common.config import CleanConfig, ShardConfig, TokenizerConfig
    from gptbert.pretraining import pretrain
    from tokenization.clean import clean_corpus
    from tokenization.shards import write_shards
    from tokenization.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    words = "the cat dog sat ran on a mat log big small red".split()
    lines = [" ".join(rng.choice(words, size=rng.integers(5, 30))) for _ in range(300)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    clean_corpus(CleanConfig(inputs=[str(tmp_path / "corpus.txt")]), tmp_path / "clean", progress_bar=False)
    docs = tmp_path / "clean" / "documents.parquet"
    train_tokenizer(docs, TokenizerConfig(vocab_size=512), tmp_path / "tok", progress_bar=False)
    tok = tmp_path / "tok" / "tokenizer.json"
    write_shards(docs, tok, ShardConfig(validation_fraction=0.1), tmp_path / "shards", progress_bar=False)
    history = []
    cfg = load_config(preset="tiny", overrides=["train.steps=2", "train.validate_every=1"])
    model_dir = pretrain(cfg, tmp_path / "shards", tmp_path / "run", tokenizer=tok,
                         callback=lambda m, s: history.append(m))
    assert "words_per_s" in history[0] and history[0]["words_per_s"] > 0
    assert np.isfinite(history[0]["valid_loss_masked"])  # the shards' valid split
    assert (model_dir / "tokenizer.json").read_bytes() == tok.read_bytes()
    summary = json.loads((model_dir / "training.json").read_text())
    assert summary["data_digest"] and summary["words"] > 0
    record = read_record(tmp_path / "run", "pretrain")  # the stage record: lineage and output digest
    assert record["inputs"] == {"data": summary["data_digest"], "tokenizer": hashlib.sha256(tok.read_bytes()).hexdigest()}
    assert record["output_digest"] == tree_digest(model_dir) and record["stats"]["steps"] == 2


@pytest.mark.slow
def test_forced_bf16_autocast_step_runs():
    """precision=bf16 (forced: slow on AVX2 CPUs) trains with fp32 master weights and a finite loss."""
    from gptbert.pretraining import build_local_backend
    from gptbert.trainer import Trainer

    cfg = load_config(preset="tiny", overrides=[
        "train.steps=2", "train.precision=bf16", "train.batch_tokens_start=128",
        "train.batch_tokens_end=128", "train.micro_batch_tokens=128", "train.prefetch=false"])
    backend = build_local_backend(cfg.model, cfg.train)
    trainer = Trainer(cfg.model, cfg.train, ListDocumentSource(repetitive_corpus(20)), backend)
    assert trainer.autocast_dtype is torch.bfloat16
    before = {n: p.detach().clone() for n, p in backend.module.named_parameters()}
    m = trainer.train_step()
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])
    assert all(p.dtype == torch.float32 for p in backend.module.parameters())
    assert any(not torch.equal(before[n], p) for n, p in backend.module.named_parameters())


def test_word_counter_is_exact_however_documents_are_cut_and_split():
    """BabyLM milestones count words seen: the pieces of a document (cut anywhere, the packer's
    one-token tail dropped or not) always sum to its words, and pieces spread over 2 workers sum to
    the same count as on 1."""
    from gptbert.data import WordCounter

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=200)
    words = (lengths * rng.uniform(0.5, 0.9, size=200)).astype(np.int64)
    counter = WordCounter(lengths, words)
    pieces = []
    for doc, length in enumerate(lengths):
        end = length - 1 if (length > 1 and doc % 3 == 0) else length  # one-token tail dropped
        cuts = np.unique(np.concatenate([[0, end], rng.integers(0, end + 1, size=4)]))
        pieces += [(doc, int(a), int(b - a)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    assert counter.count(pieces) == int(words.sum())
    order = rng.permutation(len(pieces))
    worker0 = [pieces[i] for i in order[: len(order) // 3]]
    worker1 = [pieces[i] for i in order[len(order) // 3:]]
    assert counter.count(worker0) + counter.count(worker1) == int(words.sum())
    # A document read half-way counts a proportional, integer share of its words, never more.
    half = [(doc, 0, int(length) // 2) for doc, length in enumerate(lengths) if length >= 4]
    assert 0 < counter.count(half) < int(words.sum())
