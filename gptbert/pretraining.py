"""A pretraining run around the loop, the same for every launcher: open the data, build the trainer,
resume, fit, write milestones, and when the run is finished its summary and EMA model.

``train_rank`` is that lifecycle for one rank. Launchers differ only in how the process group, the
device and the step backend are set up and where checkpoints are reported (``RankRun``): the local
launcher (``pretrain``, below) runs one rank in this process with checkpoints in the run folder; the
Ray launcher (``gptbert.distributed.ray_launcher``) runs one rank per worker, each a DeepSpeed
rank, and hands checkpoints to Ray Train. The throughput metrics (tokens/s, words/s, FLOP/s, MFU)
are added on rank 0 by ``metrics.MetricsCallback`` on both.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from common.artifacts import (DataError, check_outside_inputs, check_writable, file_digest, make_record,
                              read_record, write_record)
from common.config import ModelConfig, PipelineConfig, TrainConfig, digest
from common.config.base import replace

from .checkpoint import latest_checkpoint, list_checkpoints
from .data import TrainingData, open_data
from .device import resolve_device, with_micro_batch_tokens
from .kernels import build_model
from .metrics import MetricsCallback
from .optim import build_optimizer, precision_name, resolve_precision
from .trainer import LocalBackend, StepBackend, Trainer, pretrain_config

log = logging.getLogger("gptbert")

Callback = Callable[[dict, int], None]

STAGE = "pretrain"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
MILESTONES_DIR = "milestones"  # milestones/chck_{N}M/: a model folder per word milestone reached
PROGRESS_FILE = "progress.json"  # the latest step, for a progress bar in another process (metrics.ProgressFile)
LOGS_DIR = "logs"  # the CLI's log files of the commands that wrote into this folder



def milestone_name(words: int) -> str:
    """The BabyLM checkpoint name of a word milestone: 1_000_000 -> ``chck_1M``, 2_000 -> ``chck_0.002M``."""
    return f"chck_{words / 1e6:g}M"




def pretrain_inputs(data_sha256: str, tokenizer_sha256: str | None) -> dict[str, str | None]:
    """The inputs part of a pretraining run's identity: the data's and the tokenizer's digests (the
    stage and the flows' cache check both spell it here)."""
    return {"data": data_sha256, "tokenizer": tokenizer_sha256}


def check_run_folder(out: Path) -> None:
    """A run folder is empty, or holds this stage's checkpoints, model or record, nothing else; and it
    can be written (checked before any work)."""
    check_writable(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out}: output path exists and is not a folder")
    other = read_record(out)
    if other is not None and other.get("stage") != STAGE:
        raise DataError(f"{out}: holds the output of stage '{other.get('stage')}'; refusing to train into it")
    if other is None:
        foreign = [p.name for p in out.iterdir() if not p.name.startswith(".")
                   and p.name not in (CHECKPOINT_DIR, MODEL_DIR, MILESTONES_DIR, PROGRESS_FILE, LOGS_DIR, "ray")]
        if foreign:
            raise DataError(f"{out}: output folder holds {', '.join(sorted(foreign)[:3])}, which no "
                            "pretraining run wrote; choose an empty folder or an earlier run's folder")


def check_data_fits(cfg: PipelineConfig, data: TrainingData) -> None:
    """Refuse a config whose model cannot read this data (sequence length, vocabulary)."""
    max_len = cfg.train.max_seq_len
    if max_len > cfg.model.max_position_embeddings:
        raise DataError(f"config field 'train.seq_len': {max_len} exceeds model.max_position_embeddings "
                        f"({cfg.model.max_position_embeddings})")
    if data.vocab_size is not None and data.vocab_size > cfg.model.vocab_size:
        raise DataError(f"config field 'model.vocab_size': {cfg.model.vocab_size} is smaller than the "
                        f"data's tokenizer vocabulary ({data.vocab_size})")


def ema_model(trainer: "Trainer", model_cfg: ModelConfig) -> torch.nn.Module | None:
    """The EMA weights in a fresh fp32 CPU model on rank 0 (independent of device, precision and
    sharding); None on other ranks. Every rank must call it: under ZeRO-3 the EMA is gathered."""
    from .model import GPTBERT

    state = trainer.ema.state_dict()
    if trainer.rank != 0:
        return None
    model = GPTBERT(model_cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state[name])
    return model.eval()


def save_milestone_models(trainer: "Trainer", model_cfg: ModelConfig, milestones: list[int], root: str | Path,
                          tokenizer: str | Path | None) -> list[Path]:
    """Write the current EMA model as ``root/chck_{N}M`` for each milestone passed (rank 0 writes;
    every rank calls). A step passing several milestones writes each (same weights)."""
    from .io import save_model_dir

    model = ema_model(trainer, model_cfg)
    if model is None:
        return []
    written = []
    for words in milestones:
        summary = {"milestone": milestone_name(words), "milestone_words": words, "words": trainer.words_seen,
                   "steps": trainer.step, "tokens": trainer.tokens_seen, "run_digest": trainer.run_digest(),
                   "precision": precision_name(trainer.autocast_dtype)}
        written.append(save_model_dir(Path(root) / milestone_name(words), model, model_cfg, tokenizer, summary))
        log.info("word milestone %s reached at step %d (%d words): saved %s", milestone_name(words),
                 trainer.step, trainer.words_seen, written[-1])
    return written


def milestones_reached(run_dir: str | Path) -> list[str]:
    """Names of the milestone model folders of a run folder, by words (``chck_1M``, ``chck_2M``, ...)."""
    root = Path(run_dir) / MILESTONES_DIR
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("chck_")
             and (p / "training.json").is_file()]
    return sorted(names, key=lambda n: float(n[len("chck_"):-1]))


def write_pretrain_record(out: Path, cfg: PipelineConfig, data: TrainingData, summary: dict) -> dict:
    """The pretraining stage's record (written once the model folder is complete)."""
    stats = {k: summary[k] for k in ("steps", "steps_this_session", "tokens", "words", "final", "precision",
                                     "milestones", "first_batch_sha256") if k in summary}
    inputs = pretrain_inputs(data.digest, file_digest(data.tokenizer) if data.tokenizer else None)
    record = make_record(STAGE, inputs, pretrain_config(cfg.model, cfg.train), out, MODEL_DIR,
                         stats)
    write_record(out, record)
    return record


def training_summary(trainer: "Trainer", cfg: PipelineConfig, started: float, data: TrainingData,
                     start_step: int | None = None) -> dict:
    """The ``training.json`` summary: final train/valid losses (training and EMA weights), counts,
    and the digests of what the model was made from. Runs validation (a collective when distributed)."""
    final = dict(trainer.last_metrics)
    final.update(trainer.validate())
    final.update(trainer.validate_ema())
    summary = {
        "steps": trainer.step,
        "tokens": trainer.tokens_seen,
        "words": trainer.words_seen if trainer.word_counter is not None else None,
        "milestones": [milestone_name(m) for m in trainer.milestones if m <= trainer.words_seen],
        "train_seconds_this_session": round(time.time() - started, 3),
        # NaN (no example of that kind, e.g. loss_masked of a causal-only run) becomes null: strict JSON.
        "final": {k: (v if math.isfinite(v) else None) for k, v in final.items() if isinstance(v, (int, float))},
        "model_config_digest": digest(cfg.model),
        "train_config_digest": digest(cfg.train),
        "run_digest": trainer.run_digest(),
        "first_batch_sha256": trainer.first_batch_sha256,
        "data": data.name,
        "data_digest": data.digest,
        "tokenizer": str(data.tokenizer) if data.tokenizer else None,
        "ema_decay": cfg.train.ema_decay,
        "precision": precision_name(trainer.autocast_dtype),
    }
    if start_step is not None:
        summary["steps_this_session"] = trainer.step - start_step
    return summary


def build_local_backend(model_cfg: ModelConfig, train_cfg: TrainConfig,
                        device: torch.device | None = None) -> LocalBackend:
    """A fresh model (seeded by ``train.seed``, kernels applied) and its optimizer on ``device``
    (default: ``train.device``)."""
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg, device if device is not None else resolve_device(train_cfg.device, "train.device"),
                        compile=train_cfg.compile)
    return LocalBackend(model, build_optimizer(model, train_cfg), train_cfg.grad_clip)


# ----------------------------------------------------------------------------- the lifecycle


@dataclass
class RankRun:
    """Where one rank's run lives: the part of the lifecycle each launcher decides.

    ``checkpoint_root``: where the trainer writes checkpoints; ``resume_from``: the checkpoints to
    resume from, oldest first; ``on_checkpoint(folder, trainer)``: after each checkpoint (every rank; Ray
    reports it); ``milestone_root``: where rank 0 writes milestone model folders, and
    ``publish_milestone(folder)`` what happens to each after (Ray uploads it); ``launch``: what
    ``training.json`` records under ``launch``.
    """

    checkpoint_root: Path
    milestone_root: Path
    resume_from: list[Path] = field(default_factory=list)
    on_checkpoint: Callable[[Path, Trainer], None] | None = None
    publish_milestone: Callable[[Path], None] | None = None
    launch: dict[str, Any] | None = None


@dataclass
class RankResult:
    """What ``train_rank`` leaves: the trainer; when the run reached ``train.steps``, its summary
    and, on rank 0, the final model (EMA weights, fp32, CPU); ``resumed_from`` the checkpoint
    loaded at the start (None for a fresh run)."""

    trainer: Trainer
    finished: bool
    resumed_from: Path | None = None
    summary: dict | None = None
    model: torch.nn.Module | None = None


def train_rank(cfg: PipelineConfig, data: TrainingData, backend: StepBackend, run: RankRun, *,
               callback: Callback | None = None, progress: bool = False,
               stop_after: int | None = None) -> RankResult:
    """One rank's pretraining run (every rank calls it; see the module docstring)."""
    tc = cfg.train
    device = backend.device
    callback_chain = None
    if backend.rank == 0:
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        bf16 = resolve_precision(tc.precision, device) is not None
        callback_chain = MetricsCallback(cfg.model, tc.causal_fraction, backend.world_size, device_name, bf16,
                                         callback)
    trainer = Trainer(cfg.model, tc, data.train, backend, data.valid, callback_chain, progress)
    resumed_from = trainer.resume(run.resume_from)
    started, start_step = time.time(), trainer.step

    def on_milestone(passed: list[int]) -> None:
        for folder in save_milestone_models(trainer, cfg.model, passed, run.milestone_root, data.tokenizer):
            if run.publish_milestone is not None:
                run.publish_milestone(folder)

    on_checkpoint = None if run.on_checkpoint is None else (lambda folder: run.on_checkpoint(folder, trainer))
    trainer.fit(run.checkpoint_root, stop_after, on_checkpoint=on_checkpoint, on_milestone=on_milestone)
    if trainer.step < tc.steps:
        return RankResult(trainer, False, resumed_from)
    summary = training_summary(trainer, cfg, started, data, start_step=start_step)
    if run.launch is not None:
        via = {"step": start_step, "via": str(resumed_from)} if resumed_from is not None else None
        summary["launch"] = {**run.launch, "resumed_from": via}
    # Every rank joins (under ZeRO-3 the EMA is gathered); rank 0 gets the model.
    return RankResult(trainer, True, resumed_from, summary, ema_model(trainer, cfg.model))


def pretrain(cfg: PipelineConfig, data, out_dir: str | Path, callback: Callback | None = None,
             backend: StepBackend | None = None, tokenizer: str | Path | None = None, valid_data=None,
             progress: bool = False, stop_after: int | None = None) -> Path:
    """The local launcher: train in this process (resuming from the latest checkpoint in
    ``out_dir/checkpoints``), write ``out_dir/model`` with the EMA weights and the stage record.
    ``data``: a DocumentSource, a shard folder or a token file (``gptbert.data.open_data``). Returns
    the model folder; with ``stop_after`` < steps, stops early and returns the checkpoint written
    there instead."""
    from .io import save_model_dir

    out = Path(out_dir)
    device = resolve_device(cfg.train.device, "train.device")  # a missing GPU fails before any work
    check_run_folder(out)
    check_outside_inputs(out, [data if isinstance(data, (str, Path)) else None, tokenizer])
    opened = open_data(data, tokenizer, valid_data, remote=cfg.launch.remote_shards)
    check_data_fits(cfg, opened)
    cfg = replace(cfg, train=with_micro_batch_tokens(cfg.train, cfg.model, device if backend is None else backend.device))
    if backend is None:
        backend = build_local_backend(cfg.model, cfg.train, device)
    ckpt_root = out / CHECKPOINT_DIR
    run = RankRun(checkpoint_root=ckpt_root, milestone_root=out / MILESTONES_DIR,
                  resume_from=list_checkpoints(ckpt_root))
    result = train_rank(cfg, opened, backend, run, callback=callback, progress=progress, stop_after=stop_after)
    if not result.finished:
        return latest_checkpoint(ckpt_root)
    model_dir = out / MODEL_DIR
    if result.model is not None:
        save_model_dir(model_dir, result.model, cfg.model, opened.tokenizer, result.summary)
        write_pretrain_record(out, cfg, opened, result.summary)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return model_dir


__all__ = ["CHECKPOINT_DIR", "LOGS_DIR", "MILESTONES_DIR", "MODEL_DIR", "PROGRESS_FILE", "STAGE", "RankResult",
           "RankRun", "build_local_backend", "check_data_fits", "check_run_folder", "ema_model", "milestone_name",
           "milestones_reached", "pretrain", "pretrain_inputs", "save_milestone_models", "train_rank",
           "training_summary", "write_pretrain_record"]
