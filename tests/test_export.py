"""The Hugging Face export (gptbert/export/): what the official BabyLM pipeline and `transformers`
users do with the folder, checked against gptbert's own model, scoring and generation.

The pipeline's zero-shot arithmetic (evaluation_pipeline/sentence_zero_shot: dataset.py builds the
inputs from the tokenizer's offsets, compute_results.py reads the logits) is re-implemented here
on top of `transformers` alone, so a change on either side shows up as a score mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from common.artifacts import DataError  # noqa: E402
from gptbert.export import export_model, portable_tokenizer_json  # noqa: E402
from gptbert.generate import GenerationSettings, generate_ids  # noqa: E402
from gptbert.model import build_blocked_mask  # noqa: E402
from gptbert.scoring import score_sentences  # noqa: E402
from test_scoring import SENTENCES, make_model, make_tokenizer, one_thread  # noqa: E402,F401 (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
PAIRS = [("The cat sat on the mat.", "The cat sit on the mat."),
         ("Who should Derek hug?", "Who should Derek hug Mary?"),
         ("Every teacher praised the careful students.", "Every teacher praised careful the students.")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny gptbert model folder (float32, perturbed biases) with the project's tokenizer, and its export."""
    from common.config import preset
    from gptbert.io import load_model_dir, save_model_dir

    root = tmp_path_factory.mktemp("export")
    tokenizer = make_tokenizer()
    tokenizer.save(str(root / "tokenizer.json"))
    model = make_model(dtype=torch.float32)
    save_model_dir(root / "model", model, preset("tiny").model, root / "tokenizer.json", {"steps": 0})
    export_model(root / "model", root / "hf")
    model, tokenizer = load_model_dir(root / "model")
    return {"root": root, "hf": root / "hf", "model": model, "tokenizer": tokenizer}


def _auto(cls_name: str, path: Path, **kwargs):
    cls = getattr(transformers, cls_name)
    return cls.from_pretrained(str(path), trust_remote_code=True, **kwargs).eval()


def _hf_tokenizer(path: Path):
    # What the pipeline does: AutoProcessor with right padding (a fast tokenizer comes back).
    return transformers.AutoProcessor.from_pretrained(str(path), padding_side="right", trust_remote_code=True)


def _our_logits(model, ids: list[int], causal: bool) -> torch.Tensor:
    x = torch.tensor([ids])
    blocked = build_blocked_mask(torch.ones_like(x), torch.tensor([causal]))
    with torch.no_grad():
        return model.lm_logits(model(x, blocked))[0]


def test_folder_layout_and_config(exported):
    hf = exported["hf"]
    names = {p.name for p in hf.iterdir()}
    assert {"config.json", "configuration_gptbert.py", "modeling_gptbert.py", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "stage.json"} <= names
    config = json.loads((hf / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForMaskedLM", "AutoModelForCausalLM",
                                       "AutoModelForSequenceClassification"}
    assert config["hidden_size"] == exported["model"].config.hidden_size
    # Self-contained: the code imports torch and transformers only (checked by AST in test_layering).
    assert "gptbert." not in (hf / "modeling_gptbert.py").read_text().replace("modeling_gptbert", "")
    assert "FixedLength" not in (hf / "tokenizer.json").read_text()


def test_tokenizer_contract(exported):
    tok = _hf_tokenizer(exported["hf"])
    assert tok.is_fast
    assert (tok.bos_token, tok.cls_token, tok.eos_token, tok.sep_token, tok.pad_token, tok.unk_token,
            tok.mask_token) == ("<s>", "<s>", "</s>", "</s>", "<pad>", "<unk>", "<mask>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.mask_token_id) == (1, 2, 3, 4)
    ours = exported["tokenizer"]
    for sentence in SENTENCES:
        enc = tok(sentence, return_offsets_mapping=True)
        body = ours.encode(sentence, add_special_tokens=False).ids
        assert enc["input_ids"] == [1] + body  # `<s> A`, no trailing `</s>`
        # The offsets cover each word: the tokens overlapping a word cover all of its characters
        # and nothing else but the space before it (the prepended space of the first word maps
        # onto its first character).
        offsets = enc["offset_mapping"]
        assert tuple(offsets[0]) == (0, 0)
        start = 0
        for word in sentence.split():
            begin = sentence.index(word, start)
            end = begin + len(word)
            spans = [(a, b) for a, b in offsets[1:] if a < end and b > begin]
            chars = set().union(*(range(a, b) for a, b in spans))
            assert set(range(begin, end)) <= chars, (sentence, word, spans)
            assert all(sentence[c].isspace() for c in chars - set(range(begin, end))), (sentence, word, spans)
            start = end
    pair = tok("A dog.", "It ran.")
    a, b = ours.encode("A dog.", add_special_tokens=False).ids, ours.encode("It ran.", add_special_tokens=False).ids
    assert pair["input_ids"] == [1] + a + [2] + b  # `<s> A </s> B`, no trailing `</s>`


def test_masked_and_causal_logits_equal_ours_batched_with_right_padding(exported):
    model, tok = exported["model"], _hf_tokenizer(exported["hf"])
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][:, 0] == 1).all() and batch["attention_mask"].sum() < batch["attention_mask"].numel()
    for cls_name, causal in (("AutoModelForMaskedLM", False), ("AutoModelForCausalLM", True)):
        hf = _auto(cls_name, exported["hf"])
        with torch.no_grad():
            out = hf(**batch)
        logits = out["logits"]
        assert logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
        assert torch.equal(out[0], logits)
        for row in range(len(SENTENCES)):
            n = int(batch["attention_mask"][row].sum())
            ids = batch["input_ids"][row, :n].tolist()
            diff = float((logits[row, :n] - _our_logits(model, ids, causal)).abs().max())
            assert diff < 1e-5, (cls_name, row, diff)


def test_encoder_and_sequence_classifier_accept_2d_and_3d_masks(exported):
    model, tok = exported["model"], _hf_tokenizer(exported["hf"])
    batch = tok(SENTENCES[:2], ["It ran.", "Yes."], padding=True, truncation=True, max_length=512,
                return_tensors="pt")
    encoder = _auto("AutoModel", exported["hf"])
    config = transformers.AutoConfig.from_pretrained(str(exported["hf"]), trust_remote_code=True)
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state  # token_type_ids pass through
    assert hidden.shape[-1] == config.hidden_size
    n = int(batch["attention_mask"][0].sum())
    x = batch["input_ids"][:1, :n]
    with torch.no_grad():
        ours = model(x, build_blocked_mask(torch.ones_like(x), torch.tensor([False])))
    assert float((hidden[0, :n] - ours[0]).abs().max()) < 1e-5
    # The fine-tuning entry's --causal passes a (B, S, S) mask: the same mask written out gives the same states.
    keep = batch["attention_mask"].bool()
    square = (keep[:, :, None] & keep[:, None, :]).long()
    with torch.no_grad():
        hidden3 = encoder(input_ids=batch["input_ids"], attention_mask=square).last_hidden_state
    real = keep[:, :, None].expand_as(hidden)
    assert torch.allclose(hidden3[real], hidden[real], atol=1e-6)
    classifier = _auto("AutoModelForSequenceClassification", exported["hf"], num_labels=3)
    with torch.no_grad():
        out = classifier(**batch, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)


def _pipeline_mntp(model, tok, sentence: str) -> float:
    """evaluation_pipeline's mntp backend: mask each token of the sentence (offsets end > 0; `<s>` is
    kept), read the logits one position to the left, sum the target log-probs."""
    enc = tok(sentence, return_offsets_mapping=True)
    tokens, offsets = enc["input_ids"], enc["offset_mapping"]
    phrase = [i for i, (a, b) in enumerate(offsets) if b > 0 and i != 0]
    rows = torch.tensor([tokens] * len(phrase))
    for r, i in enumerate(phrase):
        rows[r, i] = tok.mask_token_id
    with torch.no_grad():
        logits = model(input_ids=rows, attention_mask=torch.ones_like(rows))["logits"]
    picked = logits[torch.arange(len(phrase)), torch.tensor(phrase) - 1]
    logp = torch.log_softmax(picked, -1).gather(-1, torch.tensor([tokens[i] for i in phrase])[:, None])
    return float(logp.sum())


def _pipeline_causal(model, tok, sentences: list[str]) -> list[float]:
    """evaluation_pipeline's causal backend: right-padded batch, inputs tokens[:-1], targets
    tokens[1:], summed over the tokens whose offsets end inside the sentence."""
    encs = [tok(s, return_offsets_mapping=True) for s in sentences]
    width = max(len(e["input_ids"]) for e in encs)
    ids = torch.full((len(encs), width), tok.pad_token_id)
    attn = torch.zeros_like(ids)
    phrase = torch.zeros_like(ids)
    for r, e in enumerate(encs):
        n = len(e["input_ids"])
        ids[r, :n], attn[r, :n] = torch.tensor(e["input_ids"]), 1
        phrase[r, :n] = torch.tensor([int(b > e["offset_mapping"][0][0]) for a, b in e["offset_mapping"]])
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1])["logits"]
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logp * phrase[:, 1:]).sum(1).tolist()


def test_pipeline_zero_shot_arithmetic_equals_gptbert_score(exported):
    tok = _hf_tokenizer(exported["hf"])
    sentences = [s for pair in PAIRS for s in pair] + SENTENCES
    ours = score_sentences(exported["model"], exported["tokenizer"], sentences, ["causal", "mntp"])
    mlm = _auto("AutoModelForMaskedLM", exported["hf"])
    mntp = np.array([_pipeline_mntp(mlm, tok, s) for s in sentences])
    causal = np.array(_pipeline_causal(_auto("AutoModelForCausalLM", exported["hf"]), tok, sentences))
    np.testing.assert_allclose(mntp, ours["mntp"][:, 0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(causal, ours["causal"][:, 0], atol=1e-4, rtol=0)
    # Hence the same minimal-pair decisions.
    for k in range(len(PAIRS)):
        assert (mntp[2 * k] > mntp[2 * k + 1]) == (ours["mntp"][2 * k, 0] > ours["mntp"][2 * k + 1, 0])


def test_generate_equals_our_greedy_decoding_and_samples(exported):
    tok, model = _hf_tokenizer(exported["hf"]), exported["model"]
    clm = _auto("AutoModelForCausalLM", exported["hf"])
    prompt = tok("The cat", return_tensors="pt")
    # Our decoder never emits the other special tokens; tell generate() the same.
    suppress = [i for i in range(16) if i != tok.eos_token_id]
    for penalty in (1.0, 1.5):
        out = clm.generate(**prompt, max_new_tokens=12, do_sample=False, repetition_penalty=penalty,
                           suppress_tokens=suppress, pad_token_id=tok.pad_token_id)
        new = out[0, prompt["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        ours = generate_ids(model, prompt["input_ids"][0].tolist(),
                            GenerationSettings(max_new_tokens=12, greedy=True, repetition_penalty=penalty))
        assert new == ours[: len(new)] and len(new) >= 1
    torch.manual_seed(0)
    a = clm.generate(**prompt, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    b = clm.generate(**prompt, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=tok.pad_token_id)
    assert torch.equal(a, b) and a.shape[1] > prompt["input_ids"].shape[1]


def test_export_load_save_load_keeps_the_weights(exported, tmp_path):
    first = _auto("AutoModelForMaskedLM", exported["hf"])
    first.save_pretrained(str(tmp_path / "again"))
    _hf_tokenizer(exported["hf"]).save_pretrained(str(tmp_path / "again"))
    second = _auto("AutoModelForMaskedLM", tmp_path / "again")
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = _hf_tokenizer(tmp_path / "again")(SENTENCES[0], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(first(**ids).logits, second(**ids).logits)


def test_portable_tokenizer_rewrites_fixed_length_with_identical_encodings(exported, tmp_path):
    """A tokenizer saved by an earlier gptbert (FixedLength pre-tokenizer) exports as a Split that
    every tokenizers release reads, and encodes identically (ids and offsets)."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    from common.config.data import TokenizerConfig
    from tokenization.tokenizer import SPLIT_PATTERN

    old = Tokenizer.from_str(exported["tokenizer"].to_str())
    old.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        pre_tokenizers.FixedLength(length=TokenizerConfig().max_token_chars),
    ])
    assert "FixedLength" in old.to_str()
    new = Tokenizer.from_str(portable_tokenizer_json(old.to_str()))
    texts = SENTENCES + ["supercalifragilisticexpialidocious antidisestablishmentarianism " * 3,
                         "Ünïcödé wörds — and emoji 🙂🙂🙂 plus tabs\tand  double  spaces", "x" * 100]
    for text in texts:
        a, b = old.encode(text), new.encode(text)
        assert a.ids == b.ids and a.offsets == b.offsets, text


def test_export_refuses_bad_input_in_one_line(exported, tmp_path, monkeypatch, capsys):
    from cli.main import main

    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 1
    assert "not a model folder" in capsys.readouterr().err
    assert main(["export", str(exported["root"] / "model"), "--out", str(exported["root"] / "model" / "hf")]) == 1
    assert "inside" in capsys.readouterr().err.lower()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["export", str(exported["root"] / "model"), "--out", str(tmp_path / "taken")]) == 1
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    with pytest.raises(DataError, match=r'pip install -e "\.\[hf\]"'):
        export_model(exported["root"] / "model", tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_word_milestones_export_as_folders_and_hub_branches(tmp_path):
    """A pretraining run with word milestones exports chck_{N}M folders, and with --git a repository
    whose main and chck_{N}M branches hold the final and the milestone models at the top level."""
    from cli.main import main
    from common.config import load_config
    from gptbert.data import ListDocumentSource
    from gptbert.pretraining import pretrain

    tokenizer = make_tokenizer()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    docs = [tokenizer.encode(s, add_special_tokens=False).ids for s in SENTENCES * 30]
    words = sum(len(s.split()) for s in SENTENCES * 30)
    cfg = load_config("tiny", overrides=["train.steps=6", "train.checkpoint_every=0", "model.vocab_size=400",
                                         "tokenizer.vocab_size=400", "train.word_milestones=[0.001,0.002]",
                                         "train.batch_tokens_start=1024", "train.batch_tokens_end=1024"])
    pretrain(cfg, ListDocumentSource(docs, words=words), tmp_path / "run", tokenizer=tmp_path / "tokenizer.json")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--git"]) == 0
    hf = tmp_path / "hf"
    assert sorted(p.name for p in hf.iterdir() if p.name.startswith("chck_")) == ["chck_0.001M", "chck_0.002M"]
    git = lambda *a: subprocess.run(["git", "-C", str(hf), *a], capture_output=True, text=True, check=True).stdout
    assert set(git("branch", "--format=%(refname:short)").split()) == {"main", "chck_0.001M", "chck_0.002M"}
    assert "model.safetensors" in git("ls-tree", "--name-only", "chck_0.001M").split()
    assert git("status", "--porcelain") == ""  # the milestone folders and the record are ignored
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--branch", "chck_0.001M", str(hf), str(clone)], check=True)
    milestone = _auto("AutoModelForMaskedLM", clone)
    direct = _auto("AutoModelForMaskedLM", hf / "chck_0.001M")
    final = _auto("AutoModelForMaskedLM", hf)
    a, b, c = milestone.state_dict(), direct.state_dict(), final.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # an earlier model than the final one
    summary = json.loads((clone / "training.json").read_text())
    assert summary["milestone"] == "chck_0.001M" and summary["words"] >= 1000


OLD_RELEASE = {"transformers": "4.51.3", "tokenizers": "0.21.1", "huggingface-hub": "0.31.0"}


def _old_release_python() -> Path:
    """A venv (under ~/.cache/gptbert) with the releases the BabyLM 2025 pipeline pins, on top of
    this environment's torch (system Python or a venv); created on first use (a pip install, about
    a minute)."""
    from venvs import venv_seeing_this_interpreter

    # One per interpreter running the suite (system Python, each venv): it sees that one's packages.
    tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]
    venv = Path.home() / ".cache" / "gptbert" / f"hf-{OLD_RELEASE['transformers']}-{tag}"
    probe = "import transformers, tokenizers; print(transformers.__version__, tokenizers.__version__)"
    want = f"{OLD_RELEASE['transformers']} {OLD_RELEASE['tokenizers']}"
    python = venv_seeing_this_interpreter(venv)  # its own releases first, this interpreter's torch after
    got = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if got.stdout.strip() == want:
        return python
    python = venv_seeing_this_interpreter(venv, clear=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *[f"{k}=={v}" for k, v in OLD_RELEASE.items()]],
                   check=True, timeout=900)
    assert subprocess.run([str(python), "-c", probe], capture_output=True, text=True).stdout.strip() == want
    return python


PROBE = r'''
import json, sys, torch, transformers, tokenizers
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoProcessor
path, texts = sys.argv[1], json.loads(open(sys.argv[2]).read())
tok = AutoProcessor.from_pretrained(path, padding_side="right", trust_remote_code=True)
out = {"versions": [transformers.__version__, tokenizers.__version__], "ids": [], "offsets": []}
for t in texts:
    e = tok(t, return_offsets_mapping=True)
    out["ids"].append(e["input_ids"]); out["offsets"].append([list(o) for o in e["offset_mapping"]])
batch = tok(texts[:4], padding=True, return_tensors="pt")
for name, cls in (("mlm", AutoModelForMaskedLM), ("clm", AutoModelForCausalLM), ("encoder", AutoModel)):
    m = cls.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        out[name] = m(**batch)[0].tolist()
clm = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
out["generate"] = clm.generate(**tok(["The cat"], return_tensors="pt"), max_new_tokens=6, do_sample=False,
                               pad_token_id=tok.pad_token_id)[0].tolist()
print("RESULT " + json.dumps(out))
'''


def _probe(python: Path, hf: Path, texts_file: Path) -> dict:
    env = dict(os.environ, PYTHONPATH="")  # the exported folder alone, not this checkout
    run = subprocess.run([str(python), "-c", PROBE, str(hf), str(texts_file)], capture_output=True, text=True,
                         env=env, cwd=str(texts_file.parent), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_the_pipelines_pinned_transformers_release_reads_the_export_identically(exported, tmp_path):
    """transformers 4.51.3 + tokenizers 0.21.1 (the BabyLM pipeline's pins), in a venv of their own,
    load the export and give the same ids, offsets, logits and greedy continuation as the current
    release; the texts are babylm-sample documents when the shared data is present."""
    from conftest import shared_path

    texts = list(SENTENCES)
    sample = shared_path("babylm-sample")
    if sample.is_dir():
        import gzip

        for path in sorted(sample.glob("*.gz")):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                lines = [line.strip() for _, line in zip(range(400), f) if line.strip()]
            texts += [line[:2000] for line in lines[:60]]  # long lines as real dumps have them
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps(texts))
    old = _probe(_old_release_python(), exported["hf"], texts_file)
    new = _probe(Path(sys.executable), exported["hf"], texts_file)
    assert old["versions"] == [OLD_RELEASE["transformers"], OLD_RELEASE["tokenizers"]]
    assert new["versions"] == [transformers.__version__, __import__("tokenizers").__version__]
    print(f"compared {len(texts)} texts, {sum(len(i) for i in new['ids'])} tokens")
    assert old["ids"] == new["ids"] and old["offsets"] == new["offsets"]
    for key in ("mlm", "clm", "encoder"):
        assert np.abs(np.array(old[key]) - np.array(new[key])).max() < 1e-5, key
    assert old["generate"] == new["generate"]
