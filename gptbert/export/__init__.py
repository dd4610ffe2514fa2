"""Hugging Face export: a gptbert model folder as one `transformers` folder (``trust_remote_code``).

The exported folder loads as ``AutoModel`` (the encoder), ``AutoModelForMaskedLM`` (masked next-token
prediction, logits unshifted: position i predicts token i + 1), ``AutoModelForCausalLM`` (the same
weights with a causal mask; ``generate()`` works) and ``AutoModelForSequenceClassification`` (a
first-token classifier). It holds ``config.json`` with ``auto_map``, the self-contained modeling
code of ``gptbert/export/hf/`` (torch and transformers only), ``model.safetensors`` and a fast
tokenizer (``tokenizer.json`` + ``tokenizer_config.json``: ``<s> A`` and ``<s> A </s> B``, no trailing
``</s>``). The tokenizer's pre-tokenizer is written with parts every ``tokenizers`` release reads (a
``FixedLength`` step becomes the equivalent ``Split`` on ``.{1,N}``), so the folder also loads under
the versions the BabyLM evaluation pipeline pins (transformers 4.51.3, tokenizers 0.21.1).

Word-milestone checkpoints (``train.word_milestones``) are exported as ``chck_{N}M`` folders beside
the final model, and, with ``git_repo=True``, as branches of a local git repository laid out like a
hub model repository (``main`` + ``chck_1M`` ...), so ``from_pretrained(repo, revision="chck_1M")``
works on it and publishing is one ``git push``.

``transformers`` is an optional dependency (``pip install -e ".[hf]"``); nothing else in gptbert
needs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from common import storage
from common.artifacts import (DataError, check_output_folder, check_outside_inputs, local_stage_copy, make_record,
                              read_record, staging_dir, write_record)

STAGE = "export"
HF_DIR = Path(__file__).resolve().parent / "hf"
CODE_FILES = ("configuration_gptbert.py", "modeling_gptbert.py")
AUTO_MAP = {
    "AutoConfig": "configuration_gptbert.GPTBertConfig",
    "AutoModel": "modeling_gptbert.GPTBertModel",
    "AutoModelForMaskedLM": "modeling_gptbert.GPTBertForMaskedLM",
    "AutoModelForCausalLM": "modeling_gptbert.GPTBertForCausalLM",
    "AutoModelForSequenceClassification": "modeling_gptbert.GPTBertForSequenceClassification",
}
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                  "mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"}


def require_transformers():
    """The installed ``transformers`` module, or a one-line error saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise DataError("the Hugging Face export needs transformers: pip install -e \".[hf]\"") from None
    return transformers


def hf_config(model_cfg) -> dict[str, Any]:
    """The ``config.json`` fields of a gptbert ModelConfig (names as transformers models use them)."""
    return {
        "model_type": "gpt_bert",
        "architectures": ["GPTBertForMaskedLM", "GPTBertForCausalLM"],
        "auto_map": AUTO_MAP,
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.hidden_size,
        "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_heads,
        "intermediate_size": model_cfg.intermediate_size,
        "max_position_embeddings": model_cfg.max_position_embeddings,
        "position_buckets": model_cfg.position_buckets,
        "hidden_dropout_prob": model_cfg.hidden_dropout,
        "attention_probs_dropout_prob": model_cfg.attention_dropout,
        "layer_norm_eps": model_cfg.layer_norm_eps,
        "gate": model_cfg.gate,
        "layer_weighting": model_cfg.layer_weighting,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "mask_token_id": 4,
        "use_cache": False,
        "tie_word_embeddings": True,
    }


def hf_state_dict(state: dict) -> dict:
    """Our parameter names -> the exported model's: the encoder under ``model.``, the LM head under
    ``head.`` (its output projection is the token embedding itself, so it is not stored twice)."""
    out = {}
    for name, tensor in state.items():
        if name == "head_dense.weight":
            out["head.dense.weight"] = tensor
        elif name == "head_dense.bias":
            out["head.dense.bias"] = tensor
        elif name == "head_bias":
            out["head.bias"] = tensor
        elif name.startswith("classifier."):
            continue  # a fine-tuned task head is not part of the pretrained model
        else:
            out[f"model.{name}"] = tensor
    return out


def portable_tokenizer_json(text: str) -> str:
    """The tokenizer JSON with every ``FixedLength`` pre-tokenizer written as the equivalent isolated
    ``Split`` on ``.{1,N}``, which releases before tokenizers 0.22 can read."""
    data = json.loads(text)

    def rewrite(node):
        if isinstance(node, dict):
            if node.get("type") == "FixedLength":
                return {"type": "Split", "pattern": {"Regex": f".{{1,{int(node['length'])}}}"},
                        "behavior": "Isolated", "invert": False}
            return {k: rewrite(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    return json.dumps(rewrite(data), ensure_ascii=False, indent=2)


def write_hf_folder(model_dir: str | Path, out: Path) -> None:
    """One exported folder (config, code, weights, tokenizer) from a gptbert model folder."""
    from safetensors.torch import save_file

    from ..io import load_model_dir

    # A conversion, not a computation: the weights are renamed and written from host memory, so
    # the export runs no forward pass and reads them on the CPU whatever eval.device says.
    model, tokenizer = load_model_dir(model_dir, device="cpu")
    if tokenizer is None:
        raise DataError(f"model folder {model_dir} has no tokenizer.json; an exported model needs one")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in hf_state_dict(model.state_dict()).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model.config), indent=2) + "\n")
    for name in CODE_FILES:
        shutil.copyfile(HF_DIR / name, out / name)
    (out / "tokenizer.json").write_text(portable_tokenizer_json((Path(model_dir) / "tokenizer.json").read_text()))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **SPECIAL_TOKENS,
                        "model_max_length": model.config.max_position_embeddings, "padding_side": "right",
                        "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")
    training = Path(model_dir) / "training.json"
    if training.is_file():
        shutil.copyfile(training, out / "training.json")


def milestone_folders(run_dir: str | Path) -> list[tuple[str, Path]]:
    """The word-milestone model folders of a pretraining run folder, ``(chck_{N}M, path)``, by words."""
    from ..pretraining import MILESTONES_DIR, milestones_reached

    return [(name, Path(run_dir) / MILESTONES_DIR / name) for name in milestones_reached(run_dir)]


def _source(model_dir: str | Path) -> tuple[Path, Path | None]:
    """(the final model folder, the run folder holding its milestones or None) of what was given:
    a pretraining run folder or a model folder (``RUN/model`` finds its run's milestones). A URI
    is read from its copy in the local cache (a run folder without its checkpoints)."""
    if storage.is_remote(model_dir):
        return _source(_remote_source(str(model_dir)))
    source = Path(model_dir)
    if (source / "model" / "model.safetensors").is_file():
        return source / "model", source
    if (source / "model.safetensors").is_file():
        return source, source.parent if source.name == "model" else None
    raise FileNotFoundError(f"not a model folder or pretraining run folder (no model.safetensors): {source}")


def _remote_source(location: str) -> Path:
    from ..pretraining import MILESTONES_DIR, MODEL_DIR, STAGE as PRETRAIN

    record = read_record(location, PRETRAIN)
    if record is None:  # a model folder (or a run folder without its record)
        return storage.local_input(location)
    return local_stage_copy(location, record, (MODEL_DIR, MILESTONES_DIR))  # not its checkpoints


def export_inputs(model_dir: str | Path) -> dict[str, str]:
    """The export's input digests: the final model folder and each milestone model folder."""
    from common.artifacts import tree_digest

    final, run_dir = _source(model_dir)
    milestones = milestone_folders(run_dir) if run_dir is not None else []
    return {"model": tree_digest(final), **{f"milestone.{name}": tree_digest(path) for name, path in milestones}}


def export_model(model_dir: str | Path, out_dir: str | Path, *, git_repo: bool = False) -> dict[str, Any]:
    """Export ``model_dir`` (a model folder, or a pretraining run folder: its ``model/`` and its
    milestones) into ``out_dir``; returns the stage record. With ``git_repo``, ``out_dir`` is also a
    git repository with the final model on ``main`` and each milestone on a ``chck_{N}M`` branch."""
    require_transformers()
    final, run_dir = _source(model_dir)
    check_outside_inputs(out_dir, [model_dir])
    check_output_folder(out_dir, STAGE)
    if git_repo and shutil.which("git") is None:
        raise DataError("export with git_repo needs the git command on PATH")
    milestones = milestone_folders(run_dir) if run_dir is not None else []
    inputs = export_inputs(model_dir)
    with staging_dir(out_dir, STAGE) as tmp:
        write_hf_folder(final, tmp)
        for name, path in milestones:
            write_hf_folder(path, tmp / name)
        if git_repo:
            hub_repository(tmp, [name for name, _ in milestones])
        stats = {"milestones": [name for name, _ in milestones], "git_repo": git_repo}
        record = make_record(STAGE, inputs, {"git_repo": git_repo}, tmp, ".", stats)
        write_record(tmp, record)
    return record


def _git(cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                            env={"GIT_AUTHOR_NAME": "gptbert", "GIT_AUTHOR_EMAIL": "gptbert@localhost",
                                 "GIT_COMMITTER_NAME": "gptbert", "GIT_COMMITTER_EMAIL": "gptbert@localhost",
                                 "PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(cwd)})
    if result.returncode != 0:
        raise DataError(f"git {' '.join(args)} in {cwd}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


HUB_ATTRIBUTES = "*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def hub_repository(folder: Path, milestones: list[str]) -> None:
    """Make ``folder`` a git repository laid out like a hub model repository: branch ``main`` holds the
    final model at the top level, branch ``chck_{N}M`` that milestone's model at the top level (each
    with the hub's ``.gitattributes``: weights go to git LFS where it is installed). The ``chck_*``
    folders stay in the working tree, ignored, for direct use."""
    (folder / ".gitattributes").write_text(HUB_ATTRIBUTES)
    (folder / ".gitignore").write_text("chck_*/\nstage.json\n")
    model_files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != "stage.json")
    _git(folder, "init", "-q", "-b", "main")
    _git(folder, "add", *model_files)
    _git(folder, "commit", "-q", "-m", "final model")
    attributes = _git(folder, "hash-object", "-w", ".gitattributes").strip()
    for name in milestones:
        # An orphan branch whose tree is the milestone folder's files plus .gitattributes.
        _git(folder, "checkout", "-q", "--orphan", name)
        _git(folder, "read-tree", "--empty")
        _git(folder, "update-index", "--add", "--cacheinfo", f"100644,{attributes},.gitattributes")
        files = sorted(p.name for p in (folder / name).iterdir() if p.is_file())
        _git(folder, "--work-tree", str(folder / name), "add", *files)
        _git(folder, "--work-tree", str(folder / name), "commit", "-q", "-m", f"checkpoint after {name[5:]} words")
    _git(folder, "checkout", "-q", "-f", "main")


__all__ = ["AUTO_MAP", "HUB_ATTRIBUTES", "STAGE", "export_inputs", "export_model", "hf_config", "hf_state_dict", "hub_repository",
           "milestone_folders", "portable_tokenizer_json", "require_transformers", "write_hf_folder"]
