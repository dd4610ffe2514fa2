"""Where a stage computes: one meaning of a device setting for every stage that runs a model.

``train.device`` (pretraining, on every launcher) and ``eval.device`` (evaluation, fine-tuning,
scoring, generation, export checks) take the same values:

- ``auto``: the first CUDA device when one is present, else the CPU;
- ``cpu``;
- ``cuda``: the current CUDA device; ``cuda:N``: device N.

Asking for CUDA where there is none (or for a device index that does not exist) is a
``DeviceError`` naming the config field, raised before any work: never a silent CPU run.

``train.micro_batch_tokens: auto`` is resolved here too (``resolve_micro_batch_tokens``): on CUDA,
the largest micro-batch that fits the device, found once by a short probe (forward + backward of
the real model at candidate sizes, doubling then bisecting, with headroom); on a CPU, 8192 tokens.
Splitting a global batch into micro-batches does not change the maths (the loss is normalised over
the whole global batch), so the value is a runtime setting, not part of a run's identity.
"""

from __future__ import annotations

import gc
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from common.config.base import ConfigError, check_device, replace

log = logging.getLogger("gptbert")

_CUDA_INDEX = re.compile(r"cuda:(\d+)")


class DeviceError(ConfigError):
    """A device setting that this machine cannot honour (the message names the config field)."""


def resolve_device(spec: str, field: str = "train.device") -> torch.device:
    """The ``torch.device`` that ``spec`` names on this machine (see the module docstring).

    ``field`` is the config field the value came from, for the error message.
    """
    check_device(spec, field)
    if spec == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if available else torch.device("cpu")
    if not available:
        raise DeviceError(field, f"{spec!r} requested but this machine has no CUDA device (torch "
                                 f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use cpu or auto")
    match = _CUDA_INDEX.fullmatch(spec)
    index = int(match.group(1)) if match else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(field, f"{spec!r} requested but this machine has {count} CUDA "
                                 f"device{'s' if count != 1 else ''}")
    return torch.device("cuda", index)


def wants_cuda(spec: str) -> bool:
    """True when ``spec`` can only be satisfied by CUDA (``cuda`` or ``cuda:N``)."""
    return spec == "cuda" or bool(_CUDA_INDEX.fullmatch(str(spec)))


# ----------------------------------------------------------------------------- micro-batch fitting

# Share of the device's memory the probe leaves unused: allocator fragmentation, cuBLAS/NCCL
# workspaces, a ragged last micro-batch with one more causal example than the probe had.
DEFAULT_HEADROOM = 0.12
# Bytes per parameter the real run holds beyond what a forward + backward allocates: two fp32
# optimizer moments (LAMB and AdamW) and the fp32 EMA.
STATE_BYTES_PER_PARAM = 12


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure: CUDA's ``OutOfMemoryError`` or the CPU allocator's error."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass
class MicroBatchFit:
    """The outcome of a micro-batch search: ``sequences`` per micro-batch (0 when not even one fits)
    and every probe made, as (sequences, peak bytes or None for an allocation failure)."""

    sequences: int
    seq_len: int
    budget_bytes: int
    probes: list[tuple[int, int | None]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """The micro-batch in tokens (a multiple of ``seq_len``)."""
        return self.sequences * self.seq_len

    @property
    def peak_bytes(self) -> int | None:
        """The measured peak of the chosen size (None when nothing fits)."""
        return next((peak for n, peak in self.probes if n == self.sequences), None)


def fit_micro_batch(max_sequences: int, budget_bytes: int, measure: Callable[[int], int],
                    seq_len: int = 1) -> MicroBatchFit:
    """The largest ``n`` in [1, max_sequences] whose ``measure(n)`` (peak bytes of one forward +
    backward of ``n`` sequences) is at most ``budget_bytes``.

    Memory grows with ``n``, so the search doubles from 1 until a size does not fit (or the cap is
    reached), then bisects between the last size that fitted and the first that did not: at most
    about 2 * log2(max_sequences) + 1 measurements. ``measure`` raising an allocation failure
    (``is_out_of_memory``) counts as not fitting; any other error propagates.
    """
    if max_sequences < 1:
        raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
    fit = MicroBatchFit(0, seq_len, int(budget_bytes))
    known: dict[int, bool] = {}

    def fits(n: int) -> bool:
        if n not in known:
            try:
                peak = int(measure(n))
            except Exception as exc:  # noqa: BLE001  (only allocation failures are answers)
                if not is_out_of_memory(exc):
                    raise
                peak = None
            fit.probes.append((n, peak))
            known[n] = peak is not None and peak <= budget_bytes
        return known[n]

    if not fits(1):
        return fit
    lo, hi = 1, None
    while hi is None and lo < max_sequences:
        n = min(2 * lo, max_sequences)
        if fits(n):
            lo = n
        else:
            hi = n
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    fit.sequences = lo
    return fit


def max_micro_sequences(train_cfg, world_size: int = 1) -> int:
    """The most sequences of the run's longest length one rank ever puts in a micro-batch: its share
    of the largest global batch (a larger micro-batch would never be filled)."""
    seq = train_cfg.max_seq_len
    largest = max(train_cfg.batch_tokens_start, train_cfg.batch_tokens_end)
    return max(1, math.ceil(math.ceil(largest / seq) / max(1, world_size)))


def probe_batch(model_cfg, train_cfg, sequences: int, seed: int = 0):
    """A training micro-batch of ``sequences`` full rows of the run's longest length, made by the
    run's own ``TrainingStream`` (its causal mix, masking at the run's highest mask rate) over random
    tokens: what a micro-batch of that size costs in memory."""
    import numpy as np

    from common.config.base import replace

    from .data import ListDocumentSource
    from .objective import NUM_SPECIAL, TrainingStream

    seq = train_cfg.max_seq_len
    rate = max(train_cfg.mask_rate_start, train_cfg.mask_rate_end)
    cfg = replace(train_cfg, seq_len=seq, seq_len_schedule=False, batch_tokens_start=sequences * seq,
                  batch_tokens_end=sequences * seq, mask_rate_start=rate, mask_rate_end=rate,
                  micro_batch_tokens=sequences * seq)
    rng = np.random.default_rng(seed)
    docs = [rng.integers(NUM_SPECIAL, model_cfg.vocab_size, size=seq - 2) for _ in range(sequences + 1)]
    stream = TrainingStream(ListDocumentSource(docs), cfg, model_cfg.vocab_size)
    plan = stream.plan(0)
    return stream.batch(plan, range(plan.batch_size))


def probe_step(model: torch.nn.Module, batch, train_cfg, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """One forward + backward of ``batch`` through ``model`` with the run's loss and autocast (the
    gradients stay in ``.grad``); returns the loss."""
    from .objective import LossNorm, hybrid_loss

    device = next(model.parameters()).device
    batch = batch.to(device)
    masked, causal = batch.target_counts()
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss, _ = hybrid_loss(model, batch, LossNorm(masked, causal, 1), train_cfg.causal_fraction,
                              train_cfg.z_loss)
    loss.backward()
    return loss.detach()


def free_cuda(device: torch.device | None = None) -> None:
    """Hand cached CUDA memory back (after ``del`` of the tensors): gc, ``empty_cache``, peak reset."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def cuda_probe(model_cfg, train_cfg, device: torch.device):
    """(measure, close): ``measure(n)`` is the peak CUDA memory of one training forward + backward of
    ``n`` sequences of the real model on ``device`` (``torch.cuda.max_memory_allocated``), plus the
    optimizer state and EMA the probe does not allocate; ``close()`` frees the probe's memory."""
    from .kernels import build_model
    from .optim import resolve_precision

    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg, device).train()  # the model as training builds it (kernels)
    state = STATE_BYTES_PER_PARAM * sum(p.numel() for p in model.parameters())
    dtype = resolve_precision(train_cfg.precision, device)

    def measure(n: int) -> int:
        batch = probe_batch(model_cfg, train_cfg, n)
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            probe_step(model, batch, train_cfg, dtype)
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) + state
        finally:
            model.zero_grad(set_to_none=True)
            del batch

    def close() -> None:
        nonlocal model
        model = None
        free_cuda(device)

    return measure, close


def fit_micro_batch_tokens(train_cfg, model_cfg, device, world_size: int = 1,
                           measure: Callable[[int], int] | None = None, capacity_bytes: int | None = None,
                           headroom: float = DEFAULT_HEADROOM) -> MicroBatchFit:
    """The micro-batch search for ``train_cfg`` on ``device`` (see ``resolve_micro_batch_tokens``).

    ``measure`` and ``capacity_bytes`` default to the real CUDA probe and the device's free memory
    (plus what this process has cached); a test gives its own. Raises ``DeviceError`` when not even
    one sequence fits."""
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    device = torch.device(device)
    close = None
    if capacity_bytes is None:
        free, _total = torch.cuda.mem_get_info(device)
        capacity_bytes = free + torch.cuda.memory_reserved(device)
    if measure is None:
        measure, close = cuda_probe(model_cfg, train_cfg, device)
    try:
        fit = fit_micro_batch(max_micro_sequences(train_cfg, world_size), int(capacity_bytes * (1.0 - headroom)),
                              measure, train_cfg.max_seq_len)
    finally:
        if close is not None:
            close()
    if fit.sequences == 0:
        raise DeviceError("train.micro_batch_tokens",
                          f"auto: not even one sequence of {train_cfg.max_seq_len} tokens fits in "
                          f"{capacity_bytes / 2**30:.1f} GiB of {device} ({headroom:.0%} kept free); "
                          "use a shorter train.seq_len or a smaller model")
    peak = fit.peak_bytes
    log.info("train.micro_batch_tokens auto: %d tokens (%d sequences of %d) on %s; peak %.1f GiB of a %.1f GiB "
             "budget, %d probes", fit.tokens, fit.sequences, fit.seq_len, device, (peak or 0) / 2**30,
             fit.budget_bytes / 2**30, len(fit.probes))
    return fit


EVAL_MAX_TOKENS_CAP = 1 << 19  # eval.max_tokens auto: batches beyond this gain nothing on any GPU


def fit_eval_max_tokens(model: torch.nn.Module, width: int, measure: Callable[[int], int],
                        capacity_bytes: int | None = None, headroom: float = DEFAULT_HEADROOM) -> int:
    """``eval.max_tokens: auto`` on CUDA: the largest scoring batch (rows of ``width`` tokens, at most
    ``EVAL_MAX_TOKENS_CAP`` tokens) whose forward fits the device with ``headroom`` left free,
    searched as the training micro-batch (``fit_micro_batch``). Rows of a batch are at most ``width``
    long, and a forward's memory per token does not grow for shorter rows, so the budget is safe for
    them. ``measure(n)``: peak bytes of a forward of ``n`` rows (``gptbert.scoring`` gives the real
    probe); ``capacity_bytes`` defaults to the device's free memory."""
    device = next(model.parameters()).device
    if capacity_bytes is None:
        free, _total = torch.cuda.mem_get_info(device)
        capacity_bytes = free + torch.cuda.memory_reserved(device)
    fit = fit_micro_batch(max(1, EVAL_MAX_TOKENS_CAP // width), int(capacity_bytes * (1.0 - headroom)), measure,
                          width)
    if fit.sequences == 0:
        raise DeviceError("eval.max_tokens", f"auto: not even one row of {width} tokens fits in "
                                             f"{capacity_bytes / 2**30:.1f} GiB of {device}; use eval.device cpu")
    log.info("eval.max_tokens auto: %d tokens (rows of %d) on %s, %d probes", fit.tokens, width, device,
             len(fit.probes))
    return fit.tokens


def with_micro_batch_tokens(train_cfg, model_cfg, device, world_size: int = 1):
    """``train_cfg`` with ``micro_batch_tokens`` a number (``resolve_micro_batch_tokens`` on
    ``device``); under a process group every rank takes the smallest rank's value, so all ranks
    split alike. Launchers call it before building their backend (the probe then has the device to
    itself); the Trainer calls it for a config that still says ``auto``."""
    if train_cfg.micro_batch_tokens != "auto":
        return train_cfg
    tokens = resolve_micro_batch_tokens(train_cfg, model_cfg, device, world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([tokens], dtype=torch.int64, device=device if torch.device(device).type == "cuda" else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        tokens = int(t.item())
    return replace(train_cfg, micro_batch_tokens=tokens)


def resolve_micro_batch_tokens(train_cfg, model_cfg, device, world_size: int = 1, **search) -> int:
    """``train.micro_batch_tokens`` as a number of tokens for a run on ``device``.

    An integer setting is returned as it is. ``auto`` is, on a CUDA device, the largest multiple of
    the run's longest sequence length, at most this rank's share of the largest global batch, whose
    training forward + backward (the real model, the run's precision and objective mix) plus the
    optimizer state and EMA fits the device's memory with ``DEFAULT_HEADROOM`` left free; it is
    measured once here, and the probe's memory is freed before returning. On any other device it is
    ``cpu_micro_batch_tokens`` (8192 tokens). ``search`` goes to ``fit_micro_batch_tokens``
    (``measure``, ``capacity_bytes``, ``headroom``)."""
    value = train_cfg.micro_batch_tokens
    if value != "auto":
        return int(value)
    device = torch.device(device)
    if device.type != "cuda" and "measure" not in search:
        from .objective import cpu_micro_batch_tokens

        return cpu_micro_batch_tokens(train_cfg.max_seq_len)
    return fit_micro_batch_tokens(train_cfg, model_cfg, device, world_size, **search).tokens


__all__ = ["DEFAULT_HEADROOM", "DeviceError", "MicroBatchFit", "cuda_probe", "fit_micro_batch", "fit_micro_batch_tokens", "free_cuda", "is_out_of_memory",
           "max_micro_sequences", "probe_batch", "probe_step", "resolve_device", "resolve_micro_batch_tokens", "with_micro_batch_tokens",
           "wants_cuda"]
