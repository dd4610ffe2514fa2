"""The pretraining loop: global batches -> micro-batches -> backend step -> EMA -> hooks.

The loop knows nothing about distribution beyond a **step backend** (``StepBackend`` below):
``LocalBackend`` runs one process of plain torch; ``gptbert.distributed`` provides a DeepSpeed
backend that the Ray launcher uses. Metrics leave through ``callback(metrics: dict, step: int)``
on rank 0; the library logs nowhere. The run around the loop (data, resume, milestones, the final
model and record) is ``gptbert.pretraining``, shared by every launcher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from safetensors.torch import save_file

from common.artifacts import DataError
from common.config import ModelConfig, TrainConfig, digest

from .checkpoint import CheckpointError, load_checkpoint, safetensors_load, save_checkpoint, torch_load
from .data import WordCounter, document_words
from .objective import (SUM_KEYS, Cursor, LossNorm, TrainingStream, hybrid_loss, objective_value, rank_slice,
                        segment_pieces, validation_batches)
from .device import with_micro_batch_tokens
from .optim import EMA, resolve_precision, schedule_lr

log = logging.getLogger("gptbert")

Callback = Callable[[dict, int], None]


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(values: list[float], device) -> list[float]:
    """Sum floats over ranks (identity without a process group)."""
    if not _dist():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _to_collective(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` where the process group reduces tensors of ``device`` (NCCL: the GPU, gloo: the CPU),
    copied without waiting (from pinned memory) when it goes to a GPU."""
    from .optim import collective_device

    where = collective_device(torch.distributed.get_backend(), device)
    if where.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(where, non_blocking=True)
    return t.to(where)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a wrapper (a DeepSpeed engine keeps it in ``.module``)."""
    return getattr(module, "module", module)


class NonFiniteLossError(ValueError):
    """Training produced a non-finite loss or gradient norm (the message names the step)."""


class AveragedWeights(Protocol):
    """The EMA the loop keeps: ``optim.EMA``, or a backend's own (ZeRO-3: over its partitions)."""

    def update(self, model: torch.nn.Module) -> None:
        """Fold ``model``'s current weights into the average (after every optimiser step)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average as full fp32 tensors by parameter name (what a checkpoint stores)."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the average with ``state`` (full tensors, as ``state_dict`` returns them)."""

    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the averaged weights into ``model``."""

    def backup(self, model: torch.nn.Module) -> Any:
        """What ``restore`` needs to put ``model``'s current weights back after ``copy_to``."""

    def restore(self, model: torch.nn.Module, saved: Any) -> None:
        """Put back the weights ``backup`` saved."""


class StepBackend(Protocol):
    """What the loop needs from whoever owns the model and the optimizer.

    - ``module``: the callable model (``module(input_ids, blocked) -> hidden``; ``unwrap(module)``
      is the ``GPTBERT`` with ``lm_logits``); ``device``, ``rank``, ``world_size``;
    - ``backward(loss, boundary)``: accumulate one micro-batch's gradients (``boundary``: the
      step's last micro-batch; the loop accumulates, as the count varies with the batch schedule);
    - ``step(lr) -> grad_norm``: set ``lr``, clip at ``train.grad_clip``, step the optimizer, zero the
      gradients; returns the global gradient norm before clipping, as a float or as a 0-d tensor on
      the device (the loop reads it with the step's other numbers, in its one host read);
    - ``save(dir)`` / ``load(dir)``: model and optimizer state (every rank calls them);
    - ``make_ema(model, decay)``: the EMA the loop updates after every step.
    """

    module: Any
    device: torch.device
    rank: int
    world_size: int

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        """Accumulate one micro-batch's gradients (``boundary``: the step's last micro-batch)."""

    def step(self, lr: float) -> float | torch.Tensor | None:
        """Set ``lr``, clip, step the optimizer and zero the gradients; returns the global gradient norm
        before clipping (a float or a 0-d tensor; None when not computed)."""

    def save(self, directory: str | Path) -> None:
        """Write model and optimizer state into ``directory`` (every rank calls it)."""

    def load(self, directory: str | Path) -> None:
        """Read model and optimizer state from ``directory`` (every rank calls it)."""

    def make_ema(self, model: torch.nn.Module, decay: float) -> AveragedWeights:
        """The EMA of ``model`` with ``decay`` that the loop updates after every step."""


class LocalBackend:
    """The step backend of one process, plain torch: loss.backward(), clip, optimiser step."""

    rank = 0
    world_size = 1

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 2.0):
        self.module = model
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.device = next(model.parameters()).device

    def make_ema(self, model: torch.nn.Module, decay: float) -> EMA:
        """A plain ``optim.EMA`` of ``model``."""
        return EMA(model, decay)

    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None:
        """``loss.backward()``: gradients accumulate in ``.grad`` (``boundary`` is unused)."""
        loss.backward()

    def step(self, lr: float) -> torch.Tensor:
        """Set ``lr``, clip at ``grad_clip`` (no clipping when <= 0), step, zero the gradients; returns
        the gradient norm before clipping as a 0-d tensor on the device, unread: clipping and the
        step queue behind the backward without the host waiting. A non-finite norm makes the loop
        stop at the step's host read (the weights of that step are never saved)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def save(self, directory: str | Path) -> None:
        """Write ``model.safetensors`` and ``optimizer.pt`` into ``directory``."""
        d = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        save_file(state, str(d / "model.safetensors"))
        torch.save(self.optimizer.state_dict(), d / "optimizer.pt")

    def load(self, directory: str | Path) -> None:
        """Read ``model.safetensors`` and ``optimizer.pt`` from ``directory`` (weights onto the backend's
        device)."""
        d = Path(directory)
        self.module.load_state_dict(safetensors_load(d / "model.safetensors", device=str(self.device)))
        self.optimizer.load_state_dict(torch_load(d / "optimizer.pt"))


def _zero_loss(module: torch.nn.Module) -> torch.Tensor:
    # A rank with no examples in a micro-batch still joins the backward collectives: zero gradients.
    return sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0


class Trainer:
    """Owns the data stream, EMA, schedules and step counter of one rank (recipe §2, §3, §5)."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, source, backend: StepBackend,
                 valid_source=None, callback: Callback | None = None, progress: bool = False):
        self.model_cfg = model_cfg
        # "auto" measured on the backend's device (launchers have done it before building the backend).
        self.tc = train_cfg = with_micro_batch_tokens(train_cfg, model_cfg, backend.device, backend.world_size)
        self.backend = backend
        self.rank, self.world_size = backend.rank, backend.world_size
        self.device = backend.device
        self.stream = TrainingStream(source, self.tc, model_cfg.vocab_size)
        self.valid_source = valid_source
        self.callback = callback
        self.progress = progress
        self.ema = backend.make_ema(unwrap(backend.module), self.tc.ema_decay)
        self.autocast_dtype = resolve_precision(self.tc.precision, self.device)
        words, tokens = source.num_words, source.num_tokens
        self.words_per_token = (words / tokens) if words and tokens else None
        per_doc = document_words(source)
        self.word_counter = WordCounter(source.lengths, per_doc) if per_doc is not None else None
        self.milestones = train_cfg.milestone_words()
        if self.milestones and self.word_counter is None:
            raise DataError("train.word_milestones needs word counts, and this training data has none "
                            "(shards record them; a token file needs 'num_words')")
        self.step = 0
        self.last_checkpoint_step = 0
        self.tokens_seen = 0
        self.words_seen = 0  # exact, from the documents the global batches consumed (identical on every rank)
        # Digest of step 0's global batch (documents and token spans): equal digests on the same shards
        # mean the same data order (a ratio sweep checks its trials with it).
        self.first_batch_sha256: str | None = None
        self.cursor = Cursor()  # data position after the last completed step
        self.last_metrics: dict[str, Any] = {}
        self._valid_cache: dict[bool, list] = {}
        self._executor = None
        self._pending = None  # (step, cursor it was planned from, future) of a prefetched step

    # -- identity of the run, for refusing to resume a different one -------------------------
    def run_digest(self) -> str:
        """This run's identity digest (``run_digest``), checked when resuming from a checkpoint."""
        return run_digest(self.model_cfg, self.tc)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    # -- one optimiser step ------------------------------------------------------------------
    def _prepare(self, step: int, cursor):
        """This rank's micro-batches of global step ``step`` (a pure function of step and cursor)."""
        plan, nxt = self.stream.plan_from(step, cursor)
        chunks = self.stream.micro_batches(plan, self.rank, self.world_size)
        batches = [self.stream.batch(plan, c) if c else None for c in chunks]
        if self.device.type == "cuda":  # pinned here (the prefetch thread), copied asynchronously in the step
            batches = [b.pin_memory() if b is not None else None for b in batches]
        return plan, batches, nxt

    def _drop_prefetch(self) -> None:
        if self._pending is not None:
            try:
                self._pending[2].result()
            except Exception:
                pass  # it is recomputed (and raises again) in the main thread if still needed
            self._pending = None

    def train_step(self) -> dict[str, Any]:
        """Run global step ``self.step`` (one optimiser step) and return its metrics.

        Takes this rank's micro-batches of the step (prefetched in a background thread when
        ``train.prefetch``, which then starts on the next step's), all-reduces their target counts so
        that every micro-batch loss is normalised over the whole global batch (recipe §2), accumulates
        gradients over the micro-batches (a rank without examples in one backpropagates a zero loss to
        keep the collectives in step), steps the backend at the scheduled learning rate with clipping
        (recipe §5), updates the EMA and advances the step, data cursor and token count. The metrics:
        loss, loss_masked, loss_causal, z_loss, lr, mask_rate, grad_norm (before clipping), seq_len, batch_size,
        micro_batches, tokens, tokens_per_s, data_time_s, step_time_s and, where the data has a word
        count, words_per_s.
        """
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

        # Everything the step needs from the host comes with the batches (their TargetPlan): the
        # micro-batch loop, clipping, the optimizer and the EMA queue on the device without a read;
        # the one host read is the step's numbers at its end.
        local = np.zeros(3)
        for b in batches:
            if b is not None:
                m, c = b.target_counts()
                local += (m, c, b.num_tokens)
        counts = None
        if _dist():
            # All-reduced where the process group reduces, and kept there: the loss divides by
            # them on the device, the host reads them at the end with the rest.
            counts = _to_collective(torch.tensor(local, dtype=torch.float64), self.device)
            torch.distributed.all_reduce(counts)
            norm = LossNorm(0, 0, self.world_size, divisors=counts[:2].to(self.device, torch.float32,
                                                                          non_blocking=True))
        else:
            norm = LossNorm(int(local[0]), int(local[1]), self.world_size)

        module.train()
        sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64, device=self.device)  # on device: no sync per micro-batch
        for i, b in enumerate(batches):
            if b is None:
                loss = _zero_loss(module)
            else:
                with self._autocast():
                    loss, s = hybrid_loss(module, b.to(self.device, non_blocking=True), norm, tc.causal_fraction,
                                          tc.z_loss)
                sums += torch.stack([s[k] for k in SUM_KEYS]).double()
            self.backend.backward(loss, boundary=i == len(batches) - 1)
        lr = schedule_lr(self.step, tc)
        grad_norm = self.backend.step(lr)
        self.ema.update(unwrap(module))

        if _dist():
            sums = _to_collective(sums, self.device)
            torch.distributed.all_reduce(sums)
        # The step's one host read: the loss sums, the gradient norm and (under a process group) the
        # global counts, in one copy.
        parts = [sums.to(self.device)]
        if isinstance(grad_norm, torch.Tensor):
            parts.append(grad_norm.to(self.device, torch.float64).reshape(1))
        if counts is not None:
            parts.append(counts.to(self.device))
        read = torch.cat(parts).tolist()
        g = read[:len(SUM_KEYS)]
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = read[len(SUM_KEYS)]
        if counts is not None:
            n_masked, n_causal, n_tokens = read[-3:]
            norm = LossNorm(int(n_masked), int(n_causal), self.world_size)
        else:
            n_tokens = local[2]
        values = objective_value(dict(zip(SUM_KEYS, g)), norm, tc.causal_fraction, tc.z_loss)
        if not math.isfinite(values["loss"]) or (grad_norm is not None and not math.isfinite(grad_norm)):
            kept = f" (the latest is step-{self.last_checkpoint_step})" if self.last_checkpoint_step else ""
            raise NonFiniteLossError(f"step {self.step + 1}: the loss ({values['loss']:.4g}) or the gradient norm "
                                     f"({grad_norm}) is not finite; training stopped, the checkpoints written so far "
                                     f"are kept{kept}; lower train.lr or check the data")
        if self.step == 0:
            spans = [[[int(x) for x in piece] for piece in example] for example in plan.examples]
            self.first_batch_sha256 = hashlib.sha256(json.dumps(spans).encode()).hexdigest()
        self.step += 1
        self.cursor = self.stream.cursor = nxt
        self.tokens_seen += int(n_tokens)
        if self.word_counter is not None:
            # The plan is the global batch (every rank plans it), so this is the sum over workers.
            self.words_seen += self.word_counter.count(p for example in plan.examples for p in example)
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
        if self.word_counter is not None:
            metrics["words"] = self.words_seen
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
                    self.valid_source, self.tc, self.model_cfg.vocab_size, seq_len, micro, causal, mine)
            ce, count = torch.zeros((), dtype=torch.float64, device=self.device), 0.0
            for b in self._valid_cache[causal]:
                m, c = b.target_counts()
                norm = LossNorm(m, c, 1)
                with self._autocast():
                    _, s = hybrid_loss(module, b.to(self.device), norm, 1.0 if causal else 0.0, 0.0)
                ce += s["ce_causal" if causal else "ce_masked"].double()  # read once, after the loop
                count += c if causal else m
            ce, count = _all_reduce([float(ce), count], self.device)
            out["valid_loss_causal" if causal else "valid_loss_masked"] = ce / count if count else float("nan")
        module.train(was_training)
        return out

    @torch.no_grad()
    def validate_ema(self) -> dict[str, float]:
        """Validation with the EMA weights swapped in (the weights of the final model)."""
        model = unwrap(self.backend.module)
        saved = self.ema.backup(model)
        self.ema.copy_to(model)
        try:
            return {k + "_ema": v for k, v in self.validate().items()}
        finally:
            self.ema.restore(model, saved)

    # -- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The loop state saved as trainer.pt: step, data cursor, tokens seen and the run digest."""
        return {"step": self.step, "cursor": self.cursor.to_dict(), "tokens_seen": self.tokens_seen,
                "words_seen": self.words_seen, "run_digest": self.run_digest(),
                "first_batch_sha256": self.first_batch_sha256}

    def save(self, checkpoint_root: str | Path) -> Path:
        """Write the checkpoint of the current step under ``checkpoint_root``, keeping the newest
        ``train.keep_checkpoints``; every rank calls it. Returns the checkpoint folder."""
        return save_checkpoint(checkpoint_root, self.step, self.backend, self.ema, self.state(),
                               keep=self.tc.keep_checkpoints, rank=self.rank)

    def load(self, checkpoint: str | Path) -> None:
        """Restore a checkpoint of this run (a checkpoint of another run is refused before any weights
        are read)."""
        self._drop_prefetch()
        state = load_checkpoint(checkpoint, self.backend, self.ema, rank=self.rank, run_digest=self.run_digest())
        self.step = self.last_checkpoint_step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.first_batch_sha256 = state.get("first_batch_sha256")
        if "words_seen" in state:
            self.words_seen = int(state["words_seen"])
        else:  # a checkpoint from before exact counting: the estimate from the corpus ratio
            self.words_seen = round(self.tokens_seen * (self.words_per_token or 0.0))
        self.cursor = self.stream.cursor = Cursor.from_dict(state["cursor"])

    def resume(self, checkpoints: list[Path]) -> Path | None:
        """Load the newest of ``checkpoints`` (oldest first) that reads completely on every rank; a
        damaged one (missing, truncated or corrupt file) is skipped with a warning naming it. Returns
        the checkpoint loaded, or None when there is none; raises when none of them reads."""
        failures = []
        for path in reversed(checkpoints):
            error = None
            try:
                self.load(path)
            except CheckpointError as exc:
                error = exc
            # Every rank must resume from the same step: a file damaged on one rank skips it for all.
            if _all_reduce([1.0 if error else 0.0], self.device)[0] == 0:
                return path
            failures.append(f"{path.name}: {error}" if error else f"{path.name}: damaged on another rank")
            log.warning("checkpoint %s cannot be resumed from (%s); trying the previous one", path,
                        error or "a file of another rank is damaged")
        if failures:
            raise CheckpointError("no checkpoint can be resumed from: " + "; ".join(failures))
        return None

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, checkpoint_root: str | Path | None = None, stop_after: int | None = None,
            on_checkpoint: Callable[[Path], None] | None = None,
            on_milestone: Callable[[list[int]], None] | None = None) -> dict:
        """Train until ``tc.steps`` (or ``stop_after`` total steps); checkpoint periodically and at
        the end, calling ``on_checkpoint(folder)`` after each checkpoint (every rank). After a step
        whose words pass word milestones, ``on_milestone(milestones)`` runs on every rank (saving
        the model may be a collective)."""
        tc = self.tc
        end = tc.steps if stop_after is None else min(stop_after, tc.steps)
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True)
        start_step = self.step
        try:
            while self.step < end:
                before = self.words_seen
                metrics = self.train_step()
                passed = [m for m in self.milestones if before < m <= self.words_seen]
                if passed and on_milestone is not None:
                    on_milestone(passed)
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
                    self._checkpoint(checkpoint_root, on_checkpoint)
        finally:
            self._drop_prefetch()
            if self._executor is not None:  # its thread would outlive the trainer (one per run in a sweep)
                self._executor.shutdown()
                self._executor = None
            if bar is not None:
                bar.close()
        if checkpoint_root is not None and self.step > start_step:
            self._checkpoint(checkpoint_root, on_checkpoint)
        return self.last_metrics

    def _checkpoint(self, root, on_checkpoint) -> None:
        folder = self.save(root)
        self.last_checkpoint_step = self.step
        if on_checkpoint is not None:
            on_checkpoint(folder)


# ----------------------------------------------------------------------------- a run's identity

def run_digest(model_cfg: ModelConfig, train_cfg: TrainConfig) -> str:
    """What a run is: its model and the result-deciding training fields (loop cadence, device and
    precision may change between a run and its resumption)."""
    return digest(pretrain_config(model_cfg, train_cfg))


# How the packing planner orders the data; part of a run's identity, so checkpoints and cached
# runs made with an earlier order (whole documents in turn) are not resumed or reused as this one.
DATA_ORDER = "shuffled-segments"


def pretrain_config(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    """The config part of a pretraining run's identity (stage record and checkpoint run digest)."""
    return {"model": model_cfg.identity_dict(), "train": train_cfg.identity_dict(), "data_order": DATA_ORDER}


__all__ = ["DATA_ORDER", "AveragedWeights", "LocalBackend", "NonFiniteLossError", "StepBackend", "Trainer",
           "pretrain_config", "run_digest", "unwrap"]
