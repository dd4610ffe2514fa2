"""The final model folder: ``model.safetensors`` (EMA weights), ``config.json`` (ModelConfig),
``tokenizer.json`` and ``training.json`` (summary), written atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from common.artifacts import (DataError, DigestMismatchError, file_digest, read_json, remove_stale_siblings,
                              replace_dir, temporary_sibling)
from common.config import ConfigError, ModelConfig, from_dict, to_dict

from .checkpoint import safetensors_load

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
SUMMARY_FILE = "training.json"


def save_model_dir(out_dir: str | Path, model: torch.nn.Module, model_cfg: ModelConfig,
                   tokenizer_path: str | Path | None, summary: dict[str, Any]) -> Path:
    """Write the model folder to a temporary sibling, then swap it into place. ``training.json``
    records the tokenizer's sha256, which ``load_model_dir`` checks."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    tmp = temporary_sibling(out)
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(to_dict(model_cfg), indent=2) + "\n")
        summary = dict(summary)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
            summary["tokenizer_sha256"] = file_digest(tmp / TOKENIZER_FILE)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_model_dir(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, tokenizers.Tokenizer or None when the folder has no
    tokenizer.json).

    ``device``: a ``torch.device`` (evaluation passes ``eval.device`` resolved) or a device setting,
    ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``, resolved by ``gptbert.device`` before anything is
    read (CUDA asked for where there is none is a DeviceError). The folder is checked as it is
    read: ``config.json`` must be a valid ModelConfig, the weights must have exactly its shapes,
    and the tokenizer must be the one training recorded (sha256), hold the 16 special tokens at
    their ids and fit the model's vocabulary. Every error names the file."""
    from tokenization.tokenizer import load_tokenizer

    from .device import resolve_device
    from .kernels import apply_kernels
    from .model import GPTBERT

    if not isinstance(device, torch.device):
        device = resolve_device(str(device), "device")
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model folder not found: {p}")
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (p / name).is_file():
            raise FileNotFoundError(f"model folder {p} lacks {name}")
    raw = read_json(p / CONFIG_FILE)
    try:
        cfg = from_dict(ModelConfig, raw if isinstance(raw, dict) else {"": raw})
    except ConfigError as exc:
        raise DataError(f"{p / CONFIG_FILE}: {exc}") from None
    model = GPTBERT(cfg)
    state = safetensors_load(p / MODEL_FILE)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:3] if line.strip())
        raise DataError(f"{p / MODEL_FILE}: the weights do not fit {CONFIG_FILE} ({detail})") from None
    apply_kernels(model.to(device)).eval()
    tokenizer = None
    if (p / TOKENIZER_FILE).is_file():
        expected = read_json(p / SUMMARY_FILE).get("tokenizer_sha256") if (p / SUMMARY_FILE).is_file() else None
        if expected is not None and file_digest(p / TOKENIZER_FILE) != expected:
            raise DigestMismatchError(f"{p / TOKENIZER_FILE}: sha256 differs from the one the model was trained "
                                      f"with ({SUMMARY_FILE} records {expected[:16]}...)")
        tokenizer = load_tokenizer(p / TOKENIZER_FILE)
        if tokenizer.get_vocab_size() > cfg.vocab_size:
            raise DataError(f"{p / TOKENIZER_FILE}: {tokenizer.get_vocab_size()} tokens, more than the model's "
                            f"vocabulary ({CONFIG_FILE}: vocab_size {cfg.vocab_size})")
    return model, tokenizer


__all__ = ["CONFIG_FILE", "MODEL_FILE", "SUMMARY_FILE", "TOKENIZER_FILE", "load_model_dir", "save_model_dir"]
