"""Stage 2, ``gptbert train-tokenizer``: byte-level BPE exactly as recipe §4 describes.

``build_tokenizer(cfg)`` assembles the untrained pipeline (the benchmark reuses it to time the raw
library), ``train_tokenizer`` trains it on a cleaned ``documents.parquet`` and writes
``tokenizer.json`` + the stage record ``stage.json`` atomically; ``load_tokenizer`` reads one back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from common import storage
from common.config.data import TokenizerConfig

from common.artifacts import (DataError, check_output_folder, check_outside_inputs, file_digest, make_record, resolve_file,
                              staging_dir, write_record)

from .runtime import interruptible, rayon_threads

STAGE = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"] + [f"<special_{i}>" for i in range(11)]
UNK_ID, BOS_ID, EOS_ID, PAD_ID, MASK_ID = range(5)
NUM_SPECIALS = len(SPECIAL_TOKENS)

# The GPT-4 split without contraction rules, with CamelCase splitting and single digits (recipe §4):
# letters (optionally preceded by one non-letter, non-digit, non-newline character) as
# Upper*lower+ or Upper+lower*; one digit with an optional space; punctuation runs with an
# optional space plus trailing newlines or slashes; whitespace ending in newlines; whitespace not
# followed by a non-space; other whitespace.
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
SPLIT_PATTERN = "|".join([
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*",
    r" ?\p{N}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])


def chunk_pre_tokenizer(max_chars: int) -> pre_tokenizers.Split:
    """Chunks of at most ``max_chars`` characters (recipe §4), written as an isolated ``Split`` on
    ``.{1,N}``: every ``tokenizers`` release reads it, unlike ``FixedLength``, which releases before
    0.22 (the one the BabyLM evaluation pipeline pins) cannot load. Both give the same pieces: after
    the byte-level step no character is a newline, so ``.`` matches every one."""
    return pre_tokenizers.Split(Regex(f".{{1,{max_chars}}}"), behavior="isolated", invert=False)


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The untrained recipe §4 tokenizer: model, normaliser, pre-tokenizer, decoder, post-processor."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False, fuse_unk=False,
                               ignore_merges=True))
    tok.normalizer = normalizers.Sequence([
        normalizers.Prepend(" "),
        normalizers.NFKC(),
        normalizers.Replace("\n", "\n "),
        normalizers.Replace(Regex(" +\n"), "\n"),
    ])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        chunk_pre_tokenizer(cfg.max_token_chars),
    ])
    tok.decoder = decoders.Sequence([
        decoders.ByteLevel(),
        decoders.Strip(" ", 1, 0),
        decoders.Replace("\n ", "\n"),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A </s> $B:1",
        special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)],
    )
    return tok


def build_trainer(cfg: TokenizerConfig, show_progress: bool = False) -> trainers.BpeTrainer:
    """The BPE trainer of recipe §4: vocabulary size, minimum merge count, the specials, the 256
    byte characters as initial alphabet and tokens of at most ``max_token_chars``."""
    return trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=cfg.max_token_chars,
        show_progress=show_progress,
    )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A trained tokenizer from ``tokenizer.json`` (or a folder holding one), with its specials
    checked, so a wrong file fails here rather than as odd token ids later."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.exists():
        raise FileNotFoundError(f"tokenizer not found: {p}")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as exc:  # tokenizers raises a plain Exception for malformed JSON
        raise DataError(f"{p}: not a valid tokenizer.json ({exc})") from None
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise DataError(f"{p}: special token {name} must have id {i}, has "
                            f"{tok.token_to_id(name)}")
    return tok


def tokenizer_inputs(corpus_sha256: str) -> dict[str, str]:
    """The inputs part of the tokenizer stage's identity: the cleaned corpus's sha256 (the stage and
    the flows' cache check both spell it here)."""
    return {"corpus": corpus_sha256}


def _documents(path: str | Path) -> Path:
    from .clean import DOCUMENTS_FILE

    return resolve_file(path, DOCUMENTS_FILE, "documents file")


def train_tokenizer(documents_parquet: str | Path, cfg: TokenizerConfig, out_dir: str | Path,
                    progress_bar: bool = True) -> dict[str, Any]:
    """Train the recipe §4 byte-level BPE on the cleaned documents; write tokenizer.json and the stage
    record (returned, plus the wall time in ``seconds``)."""
    from .clean import iter_documents, open_documents

    t0 = time.perf_counter()
    check_outside_inputs(out_dir, [documents_parquet])
    check_output_folder(out_dir, STAGE)  # before training, not after
    docs_path = _documents(storage.local_input(documents_parquet))  # a URI: its copy in the local cache
    pf = open_documents(docs_path)
    num_docs = pf.metadata.num_rows
    if cfg.max_documents:
        num_docs = min(num_docs, cfg.max_documents)
    inputs = tokenizer_inputs(file_digest(docs_path))

    counts = {"documents": 0, "characters": 0}

    def batches():
        for texts in iter_documents(docs_path, limit=cfg.max_documents):
            counts["documents"] += len(texts)
            counts["characters"] += sum(map(len, texts))
            yield texts

    tok = build_tokenizer(cfg)
    with rayon_threads(cfg.num_threads):
        interruptible(tok.train_from_iterator, batches(), trainer=build_trainer(cfg, progress_bar), length=num_docs)

    with staging_dir(out_dir, STAGE) as tmp:
        tok.save(str(tmp / TOKENIZER_FILE), pretty=True)
        stats = {
            "vocab_size": tok.get_vocab_size(),
            "vocab_size_requested": cfg.vocab_size,
            "special_tokens": SPECIAL_TOKENS,
            "documents": counts["documents"],
            "characters": counts["characters"],
        }
        record = make_record(STAGE, inputs, cfg.identity_dict(), tmp, TOKENIZER_FILE, stats)
        write_record(tmp, record)
    return dict(record, seconds=time.perf_counter() - t0)
