"""The pretraining loop: global batches -> micro-batches -> backend step -> EMA -> hooks.

The loop knows nothing about distribution beyond a **step backend** (``PlainBackend`` below for one
process; a DeepSpeed backend lives in ``gptbert/launch.py``). A backend provides:

- ``module``: the callable model (``module(input_ids, blocked) -> hidden``; ``.module`` unwraps a
  wrapper to the ``GPTBERT`` with ``lm_logits``), ``device``, ``rank``, ``world_size``;
- ``backward(loss, boundary)``: accumulate gradients of one micro-batch; ``boundary`` is True on the
  step's last micro-batch (DeepSpeed: ``set_gradient_accumulation_boundary``; run it with
  ``gradient_accumulation_steps: 1`` because the loop does the accumulation, whose count varies
  with the batch schedule);
- ``step(lr) -> grad_norm``: set ``lr`` in every param group, clip at ``grad_clip``, optimiser step,
  zero the gradients; returns the global gradient norm before clipping;
- ``save(dir)`` / ``load(dir)``: model + optimizer state into / from a checkpoint folder (every
  rank calls them).
- optionally ``make_ema(model, decay)``: the EMA the loop updates after each step (a backend that
  partitions parameters keeps it over its partitions); default ``optim.EMA``.

Metrics leave through ``callback(metrics: dict, step: int)`` on rank 0; the library logs nowhere.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from common.config import PipelineConfig, digest, to_dict
from .objective import (Cursor, LossNorm, TrainingStream, hybrid_loss, objective_value, rank_slice,
                        segment_pieces, validation_batches)
from .optim import EMA, build_optimizer, precision_name, resolve_device, resolve_precision, schedule_lr

Callback = Callable[[dict, int], None]

# Fields of TrainConfig that may change between a run and its resumption.
_LOOP_FIELDS = ("checkpoint_every", "keep_checkpoints", "validate_every", "device", "precision",
                "prefetch")


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(values: list[float], device) -> list[float]:
    """Sum floats over ranks (identity without a process group)."""
    if not _dist():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


class PlainBackend:
    """One process, plain torch: loss.backward(), clip, optimiser step."""

    rank = 0
    world_size = 1

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 2.0):
        self.module = model
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.device = next(model.parameters()).device

    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None:
        loss.backward()

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        save_file(state, str(d / "model.safetensors"))
        torch.save(self.optimizer.state_dict(), d / "optimizer.pt")

    def load(self, directory: str | Path) -> None:
        d = Path(directory)
        self.module.load_state_dict(load_file(str(d / "model.safetensors"), device=str(self.device)))
        self.optimizer.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True,
                                                  map_location=self.device))


def _zero_loss(module: torch.nn.Module) -> torch.Tensor:
    # A rank with no examples in a micro-batch still joins the backward collectives: zero gradients.
    return sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0


class Trainer:
    """Owns the data stream, EMA, schedules and step counter of one rank."""

    def __init__(self, cfg, source, backend, valid_source=None, callback: Callback | None = None,
                 progress: bool = False):
        self.cfg = cfg
        self.tc = cfg.train
        self.backend = backend
        self.rank, self.world_size = backend.rank, backend.world_size
        self.device = backend.device
        self.stream = TrainingStream(source, self.tc, cfg.model.vocab_size)
        self.valid_source = valid_source
        self.callback = callback
        self.progress = progress
        # A backend may keep the EMA itself (ZeRO-3: over its local parameter partitions).
        make_ema = getattr(backend, "make_ema", None)
        self.ema = (make_ema or EMA)(unwrap(backend.module), self.tc.ema_decay)
        self.autocast_dtype = resolve_precision(self.tc.precision, self.device)
        words, tokens = source.num_words, source.num_tokens
        self.words_per_token = (words / tokens) if words and tokens else None
        self.step = 0
        self.tokens_seen = 0
        self.cursor = Cursor()  # data position after the last completed step
        self.last_metrics: dict[str, Any] = {}
        self._valid_cache: dict[bool, list] = {}
        self._executor = None
        self._pending = None  # (step, cursor it was planned from, future) of a prefetched step

    # -- identity of the run, for refusing to resume a different one -------------------------
    def run_digest(self) -> str:
        train = {k: v for k, v in to_dict(self.tc).items() if k not in _LOOP_FIELDS}
        return digest({"model": to_dict(self.cfg.model), "train": train})

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    # -- one optimiser step ------------------------------------------------------------------
    def _prepare(self, step: int, cursor):
        """This rank's micro-batches of global step ``step`` (a pure function of step and cursor)."""
        plan, nxt = self.stream.plan_from(step, cursor)
        chunks = self.stream.micro_batches(plan, self.rank, self.world_size)
        return plan, [self.stream.batch(plan, c) if c else None for c in chunks], nxt

    def _drop_prefetch(self) -> None:
        if self._pending is not None:
            try:
                self._pending[2].result()
            except Exception:
                pass  # it is recomputed (and raises again) in the main thread if still needed
            self._pending = None

    def train_step(self) -> dict[str, Any]:
        tc, module = self.tc, self.backend.module
        t0 = time.perf_counter()
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == self.step and pending[1] == self.cursor:
            plan, batches, nxt = pending[2].result()
        else:
            plan, batches, nxt = self._prepare(self.step, self.cursor)
        data_time = time.perf_counter() - t0
        if tc.prefetch and self.step + 1 < tc.steps:
            if self._executor is None:
                from concurrent.futures import ThreadPoolExecutor

                self._executor = ThreadPoolExecutor(1, thread_name_prefix="gptbert-data")
            self._pending = (self.step + 1, nxt, self._executor.submit(self._prepare, self.step + 1, nxt))

        local = np.zeros(3)
        for b in batches:
            if b is not None:
                m, c = b.target_counts()
                local += (m, c, b.num_tokens)
        n_masked, n_causal, n_tokens = _all_reduce(local.tolist(), self.device)
        norm = LossNorm(int(n_masked), int(n_causal), self.world_size)

        module.train()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # summed on device: no sync per micro-batch
        for i, b in enumerate(batches):
            if b is None:
                loss = _zero_loss(module)
            else:
                with self._autocast():
                    loss, s = hybrid_loss(module, b.to(self.device), norm, tc.causal_fraction, tc.z_loss)
                sums += torch.stack([s["ce_masked"], s["ce_causal"], s["z"]]).double()
            self.backend.backward(loss, boundary=i == len(batches) - 1)
        lr = schedule_lr(self.step, tc)
        grad_norm = self.backend.step(lr)
        self.ema.update(unwrap(module))

        g = _all_reduce(sums.tolist(), self.device)
        values = objective_value({"ce_masked": g[0], "ce_causal": g[1], "z": g[2]}, norm,
                                 tc.causal_fraction, tc.z_loss)
        self.step += 1
        self.cursor = self.stream.cursor = nxt
        self.tokens_seen += int(n_tokens)
        step_time = time.perf_counter() - t0
        metrics = {
            **values,
            "lr": lr,
            "mask_rate": plan.mask_rate,
            "grad_norm": grad_norm,
            "seq_len": plan.seq_len,
            "batch_size": plan.batch_size,
            "micro_batches": len(batches),
            "tokens": self.tokens_seen,
            "tokens_per_s": n_tokens / step_time,
            "data_time_s": data_time,
            "step_time_s": step_time,
        }
        if self.words_per_token is not None:
            metrics["words_per_s"] = metrics["tokens_per_s"] * self.words_per_token
        self.last_metrics = metrics
        return metrics

    # -- validation --------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Masked (fixed 15%, no packing) and causal loss of the fixed validation examples."""
        if self.valid_source is None or self.tc.valid_examples == 0:
            return {}
        module, seq_len = self.backend.module, self.tc.max_seq_len
        micro = max(1, self.tc.micro_batch_tokens // seq_len)
        out = {}
        was_training = module.training
        module.eval()
        for causal in (False, True):
            if causal not in self._valid_cache:
                n = len(segment_pieces(self.valid_source.lengths, seq_len, self.tc.valid_examples))
                mine = rank_slice(n, self.rank, self.world_size)
                self._valid_cache[causal] = validation_batches(
                    self.valid_source, self.tc, self.cfg.model.vocab_size, seq_len, micro, causal, mine)
            ce = count = 0.0
            for b in self._valid_cache[causal]:
                m, c = b.target_counts()
                norm = LossNorm(m, c, 1)
                with self._autocast():
                    _, s = hybrid_loss(module, b.to(self.device), norm, 1.0 if causal else 0.0, 0.0)
                ce += float(s["ce_causal" if causal else "ce_masked"])
                count += c if causal else m
            ce, count = _all_reduce([ce, count], self.device)
            out["valid_loss_causal" if causal else "valid_loss_masked"] = ce / count if count else float("nan")
        module.train(was_training)
        return out

    @torch.no_grad()
    def validate_ema(self) -> dict[str, float]:
        """Validation with the EMA weights swapped in (the weights of the final model)."""
        model = unwrap(self.backend.module)
        backup = getattr(self.ema, "backup", None)  # an EMA over partitions saves/restores its own
        saved = backup(model) if backup else {n: p.detach().clone() for n, p in model.named_parameters()}
        self.ema.copy_to(model)
        try:
            return {k + "_ema": v for k, v in self.validate().items()}
        finally:
            if backup:
                self.ema.restore(model, saved)
            else:
                for n, p in model.named_parameters():
                    p.copy_(saved[n])

    # -- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"step": self.step, "cursor": self.cursor.to_dict(), "tokens_seen": self.tokens_seen,
                "run_digest": self.run_digest()}

    def save(self, checkpoint_root: str | Path) -> Path:
        return save_checkpoint(checkpoint_root, self.step, self.backend, self.ema, self.state(),
                               keep=self.tc.keep_checkpoints, rank=self.rank)

    def load(self, checkpoint: str | Path) -> None:
        self._drop_prefetch()
        state = load_checkpoint(checkpoint, self.backend, self.ema, rank=self.rank)
        if state.get("run_digest") != self.run_digest():
            raise ValueError(f"checkpoint {checkpoint} was written by a run with a different model or "
                             "train config; use a new output folder or the original config")
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.cursor = self.stream.cursor = Cursor.from_dict(state["cursor"])

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, checkpoint_root: str | Path | None = None, stop_after: int | None = None) -> dict:
        """Train until ``tc.steps`` (or ``stop_after`` total steps); checkpoint periodically and at the end."""
        tc = self.tc
        end = tc.steps if stop_after is None else min(stop_after, tc.steps)
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True)
        start_step = self.step
        try:
            while self.step < end:
                metrics = self.train_step()
                if tc.validate_every and self.step % tc.validate_every == 0 and self.step < tc.steps:
                    metrics.update(self.validate())
                if self.rank == 0 and self.callback is not None:
                    self.callback(metrics, self.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                                    tok_s=f"{metrics['tokens_per_s']:.0f}")
                if checkpoint_root is not None and tc.checkpoint_every \
                        and self.step % tc.checkpoint_every == 0 and self.step < end:
                    self.save(checkpoint_root)
        finally:
            self._drop_prefetch()
            if bar is not None:
                bar.close()
        if checkpoint_root is not None and self.step > start_step:
            self.save(checkpoint_root)
        return self.last_metrics


# ----------------------------------------------------------------------------- data opening

def find_tokenizer(shard_dir: str | Path) -> Path | None:
    """tokenizer.json of a shard folder: named in its manifest, or lying beside/above it. When the
    manifest records ``tokenizer_sha256``, only a file with that digest is accepted."""
    import hashlib
    import json

    d = Path(shard_dir)
    manifest = d / "manifest.json"
    meta = json.loads(manifest.read_text()) if manifest.is_file() else {}
    candidates = []
    for key in ("tokenizer_path", "tokenizer_json", "tokenizer"):
        value = meta.get(key)
        if isinstance(value, dict):
            value = value.get("path")
        if isinstance(value, str) and value:
            p = Path(value)
            candidates.append(p if p.is_absolute() else d / p)
    candidates += [d / "tokenizer.json", d.parent / "tokenizer.json"]
    expected = meta.get("tokenizer_sha256")
    for p in candidates:
        if p.is_file() and (expected is None or hashlib.sha256(p.read_bytes()).hexdigest() == expected):
            return p
    return None


def open_data(data, tokenizer: str | Path | None = None, valid_data=None):
    """(train source, tokenizer path or None, validation source or None) from a DocumentSource,
    a shard folder or a token file (.txt/.npz, see gptbert.data)."""
    from .data import load_token_file

    def is_source(x):
        return hasattr(x, "lengths") and hasattr(x, "document")

    valid = valid_data if (valid_data is None or is_source(valid_data)) else None
    if is_source(data):
        source = data
    else:
        path = Path(data)
        if path.is_dir():
            if not (path / "manifest.json").is_file():
                raise FileNotFoundError(f"shard folder {path} has no manifest.json")
            from tokenization.shards import ShardReader

            tokenizer = tokenizer or find_tokenizer(path)
            source = ShardReader(path, tokenizer_json=tokenizer, split="train")
            if valid_data is None:
                try:
                    candidate = ShardReader(path, tokenizer_json=tokenizer, split="valid")
                    valid = candidate if len(candidate) else None
                except (FileNotFoundError, ValueError, KeyError):
                    valid = None
        elif path.is_file():
            source = load_token_file(path)
        else:
            raise FileNotFoundError(f"training data not found: {path} (expected a shard folder or a "
                                    "token file)")
    if valid is None and valid_data is not None:
        valid = load_token_file(valid_data)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {tokenizer}")
    return source, (Path(tokenizer) if tokenizer else None), valid


def build_plain_backend(cfg) -> PlainBackend:
    from .model import GPTBERT

    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    model = GPTBERT(cfg.model).to(device)
    return PlainBackend(model, build_optimizer(model, cfg.train), cfg.train.grad_clip)


def pretrain(cfg, data, out_dir: str | Path, callback: Callback | None = None, backend=None,
             tokenizer: str | Path | None = None, valid_data=None, progress: bool = False,
             stop_after: int | None = None) -> Path:
    """Train (resuming from the latest checkpoint in ``out_dir/checkpoints``) and write
    ``out_dir/model`` with the EMA weights. ``data``: a DocumentSource, a shard folder or a token
    file. Returns the model folder; with ``stop_after`` < steps, stops early and returns the
    checkpoint written there instead (no model folder)."""
    from .io import save_model_dir

    out = Path(out_dir)
    source, tokenizer_path, valid = open_data(data, tokenizer, valid_data)
    max_len = cfg.train.max_seq_len
    if max_len > cfg.model.max_position_embeddings:
        raise ValueError(f"config field 'train.seq_len': {max_len} exceeds model.max_position_embeddings "
                         f"({cfg.model.max_position_embeddings})")
    vocab = getattr(source, "manifest", {}).get("vocab_size")
    if isinstance(vocab, int) and vocab > cfg.model.vocab_size:
        raise ValueError(f"config field 'model.vocab_size': {cfg.model.vocab_size} is smaller than the "
                         f"shards' tokenizer vocabulary ({vocab})")
    if backend is None:
        backend = build_plain_backend(cfg)
    trainer = Trainer(cfg, source, backend, valid, callback, progress)
    ckpt_root = out / "checkpoints"
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        trainer.load(latest)
    started = time.time()
    trainer.fit(ckpt_root, stop_after)
    if trainer.step < cfg.train.steps:
        return latest_checkpoint(ckpt_root)

    model = unwrap(backend.module)
    summary = training_summary(trainer, cfg, started, data_name=str(data) if not hasattr(data, "lengths")
                               else type(data).__name__, manifest_digest=_manifest_digest(data),
                               tokenizer_path=tokenizer_path)
    trainer.ema.copy_to(model)  # the final model is the EMA of the weights
    model_dir = out / "model"
    if trainer.rank == 0:
        save_model_dir(model_dir, model, cfg.model, tokenizer_path, summary)
    if _dist():
        torch.distributed.barrier()
    return model_dir


def training_summary(trainer: "Trainer", cfg: PipelineConfig, started: float, *, data_name: str,
                     manifest_digest: str | None, tokenizer_path, start_step: int | None = None) -> dict:
    """The ``training.json`` summary: final train/valid losses (training and EMA weights), counts,
    and the digests of what the model was made from. Runs validation (a collective when distributed)."""
    final = dict(trainer.last_metrics)
    final.update(trainer.validate())
    final.update(trainer.validate_ema())
    words = trainer.words_per_token
    summary = {
        "steps": trainer.step,
        "tokens": trainer.tokens_seen,
        "words": round(trainer.tokens_seen * words) if words else None,
        "train_seconds_this_session": round(time.time() - started, 3),
        # NaN (no example of that kind, e.g. loss_masked of a causal-only run) becomes null: strict JSON.
        "final": {k: (v if math.isfinite(v) else None) for k, v in final.items() if isinstance(v, (int, float))},
        "model_config_digest": digest(cfg.model),
        "train_config_digest": digest(cfg.train),
        "run_digest": trainer.run_digest(),
        "data": data_name,
        "data_manifest_digest": manifest_digest,
        "tokenizer": str(tokenizer_path) if tokenizer_path else None,
        "ema_decay": cfg.train.ema_decay,
        "precision": precision_name(trainer.autocast_dtype),
    }
    if start_step is not None:
        summary["steps_this_session"] = trainer.step - start_step
    return summary


def _manifest_digest(data) -> str | None:
    import hashlib

    if hasattr(data, "lengths"):
        return None
    p = Path(data)
    target = p / "manifest.json" if p.is_dir() else p
    if not target.is_file():
        return None
    return hashlib.sha256(target.read_bytes()).hexdigest()


__all__ = ["PlainBackend", "Trainer", "build_plain_backend", "find_tokenizer", "open_data", "pretrain",
           "training_summary", "unwrap"]
