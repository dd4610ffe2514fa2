"""The final model folder: ``model.safetensors`` (EMA weights), ``config.json`` (ModelConfig),
``tokenizer.json`` and ``training.json`` (summary), written atomically."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.artifacts import replace_dir
from common.config import ModelConfig, from_dict, to_dict


def save_model_dir(out_dir: str | Path, model: torch.nn.Module, model_cfg: ModelConfig,
                   tokenizer_path: str | Path | None, summary: dict[str, Any]) -> Path:
    """Write the model folder to a temporary sibling, then rename it into place."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(to_dict(model_cfg), indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        (tmp / "training.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_model_dir(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizers.Tokenizer or None when the folder has no tokenizer.json)."""
    from .model import GPTBERT

    p = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (p / name).is_file():
            raise FileNotFoundError(f"model folder {p} lacks {name}")
    try:
        cfg = from_dict(ModelConfig, json.loads((p / "config.json").read_text()))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p / 'config.json'}: not valid JSON ({exc})") from None
    model = GPTBERT(cfg)
    model.load_state_dict(load_file(str(p / "model.safetensors")))
    model.to(device).eval()
    tokenizer = None
    if (p / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(p / "tokenizer.json"))
    return model, tokenizer


__all__ = ["load_model_dir", "save_model_dir"]
