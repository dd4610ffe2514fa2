"""Optimisation (recipe §5): LAMB, parameter groups, the learning-rate schedule, EMA, precision.

LAMB as the reference used it: Adam moments with bias correction, eps added after the square root,
weight decay added to the update, then (only for groups with weight decay) a layer-wise trust ratio
||w|| / ||update||. No-decay parameters are chosen by name as the paper's code does (biases and
LayerNorm parameters) and take plain Adam steps; everything else, the layer-weighting scalars
included, is decayed with the trust ratio. It is a ``torch.optim.Optimizer``, so DeepSpeed accepts
it as a client optimizer (DeepSpeed's own LAMB does not run on CPU). Training parity with the
paper's code, step by step: tests/test_training_parity.py.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn


def trust_ratio(w_norm: torch.Tensor, u_norm: torch.Tensor) -> torch.Tensor:
    """LAMB's layer-wise ratio ||w|| / ||update||; 1 where either norm is zero (a fresh zero weight,
    a zero update)."""
    return torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))


class LAMB(torch.optim.Optimizer):
    """LAMB (recipe §5): Adam moments with bias correction, eps after the square root, weight decay
    added to the update, then the trust ratio ||w|| / ||update|| per parameter of decay groups.

    Steps run as multi-tensor (``torch._foreach_*``) ops over the parameters that share a step
    count, dtype and device: the maths of a per-parameter loop without a dozen kernel launches per
    parameter. On a GPU that is one pass over all of them (a launch per op, not per chunk); on a
    CPU, chunks of ``chunk_elements`` (sized for its cache, see ``step``). Moments are kept in at
    least fp32.
    """

    chunk_elements = 250_000  # on a CPU

    def chunk_size(self, device: torch.device) -> float:
        """Elements per multi-tensor chunk on ``device``: ``chunk_elements`` on a CPU, no limit on a
        GPU (where each chunk costs a launch per op and cache reuse does not pay)."""
        return self.chunk_elements if device.type == "cpu" else math.inf

    def __init__(self, params, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.98),
                 eps: float = 1e-8, weight_decay: float = 0.1):
        if lr < 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"invalid LAMB hyper-parameters: lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        """One LAMB step over every parameter with a gradient; returns ``closure()``'s loss, or None without a
        closure."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                dtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
                state["step"] += 1
                buckets.setdefault((state["step"], dtype, p.device), []).append(p)
            for (t, dtype, device), params in buckets.items():
                # Chunks of ~250K elements (measured: 250K 1.1-1.2x the per-parameter loop, 2M 1.0x, one
                # chunk for the whole model 0.6x): a chunk stays in cache across its ops and its
                # temporaries small enough for the allocator to reuse (whole-model temporaries are
                # fresh pages every step). Small tensors are grouped, which saves the Python loop.
                limit = self.chunk_size(device)
                chunk: list[torch.Tensor] = []
                size = 0
                for p in params:
                    chunk.append(p)
                    size += p.numel()
                    if size >= limit:
                        self._step_tensors(group, chunk, t, dtype)
                        chunk, size = [], 0
                if chunk:
                    self._step_tensors(group, chunk, t, dtype)
        return loss

    def _step_tensors(self, group: dict, params: list[torch.Tensor], t: int, dtype: torch.dtype) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        grads = [p.grad.to(dtype) for p in params]
        ms = [self.state[p]["exp_avg"] for p in params]
        vs = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, grads, alpha=1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        del grads
        # update = (m / bc1) / (sqrt(v / bc2) + eps), in two temporaries per parameter.
        update = torch._foreach_div(ms, 1 - beta1 ** t)
        denom = torch._foreach_div(vs, 1 - beta2 ** t)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(update, denom)
        del denom
        if wd > 0:
            ws = [p.to(dtype) for p in params]
            torch._foreach_add_(update, ws, alpha=wd)
            self._scale_by_trust_ratios(params, ws, update)
        if any(p.dtype != dtype for p in params):
            update = [u.to(p.dtype) for u, p in zip(update, params)]
        torch._foreach_add_(params, update, alpha=-lr)

    def _scale_by_trust_ratios(self, params: list[torch.Tensor], weights: list[torch.Tensor],
                               updates: list[torch.Tensor]) -> None:
        """Multiply each update by its parameter's ratio (one 0-d tensor each, multi-tensor)."""
        w_norm = torch.stack(torch._foreach_norm(weights))
        u_norm = torch.stack(torch._foreach_norm(updates))
        torch._foreach_mul_(updates, list(trust_ratio(w_norm, u_norm).unbind()))


def collective_device(backend: str, device: torch.device) -> torch.device:
    """Where a tensor on ``device`` must be for a collective of the process-group ``backend``
    (``torch.distributed.get_backend()``): NCCL reduces CUDA tensors only (the current device), gloo
    CPU tensors; a multi-device backend such as ``cpu:gloo,cuda:nccl`` keeps the tensor where it is
    when it serves that device type."""
    served = {}
    for part in str(backend).lower().split(","):
        kind, _, name = part.strip().rpartition(":")
        if kind:
            served[kind] = name
        else:
            served.update({"nccl": {"cuda": "nccl"}, "gloo": {"cpu": "gloo"}}.get(name, {device.type: name}))
    if device.type in served:
        return device
    return torch.device("cuda") if "cuda" in served else torch.device("cpu")


class ShardedLAMB(LAMB):
    """LAMB whose layer-wise trust ratio survives ZeRO's flattening.

    ZeRO hands the client optimizer flat fp32 tensors: a rank's slice of many parameters
    concatenated (stages 1/2: one per param group; stage 3: one per sub group, each parameter split
    on its own). The Adam part is elementwise and does not care, but the trust ratio must be per
    original parameter over the whole parameter. ``attach_partitions`` records, for each flat
    tensor, its runs of consecutive elements of one parameter (lengths, and the parameter of each
    run, padding as the index ``num_params``); a step takes the norms of the runs' views in one
    multi-tensor pass, sums their squares per parameter (a vector of num_params + 1) and all-reduces
    them over the data-parallel group, which gives exactly the unsharded ratio, and scales each
    run's view of the update by its parameter's ratio. No per-element index or copy is kept.
    Tensors without a layout (ZeRO 0: the real parameters) get plain LAMB ratios. Everything else
    is ``LAMB``'s arithmetic.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        # id(flat tensor) -> (run lengths, parameter index of each run, number of parameters, process group)
        self._segments: dict[int, tuple[list[int], torch.Tensor, int, Any]] = {}

    def attach_partitions(self, flat: torch.Tensor, segment_ids: torch.Tensor, num_params: int,
                          process_group=None) -> None:
        """Record which parameter every element of ZeRO's flat tensor ``flat`` belongs to
        (``segment_ids``, ``num_params`` for padding; kept as runs, not per element); trust-ratio
        norms are all-reduced over ``process_group``."""
        seg = segment_ids.reshape(-1).cpu()
        if seg.numel() != flat.numel():
            raise ValueError(f"layout of {seg.numel()} elements for a flat tensor of {flat.numel()}")
        starts = torch.cat([torch.zeros(1, dtype=torch.long),
                            torch.nonzero(seg[1:] != seg[:-1]).reshape(-1) + 1]) if seg.numel() else seg[:0]
        ends = torch.cat([starts[1:], torch.tensor([seg.numel()])]) if seg.numel() else seg[:0]
        self._segments[id(flat)] = ((ends - starts).tolist(), seg[starts].to(flat.device), num_params, process_group)

    def _scale_by_trust_ratios(self, params, weights, updates):
        plain = [i for i, p in enumerate(params) if id(p) not in self._segments]
        if plain:
            super()._scale_by_trust_ratios([params[i] for i in plain], [weights[i] for i in plain],
                                           [updates[i] for i in plain])
        for p, w, u in zip(params, weights, updates):
            layout = self._segments.get(id(p))
            if layout is None:
                continue
            lengths, run_param, n, group = layout
            w_runs, u_runs = w.reshape(-1).split(lengths), u.reshape(-1).split(lengths)
            run_sq = torch.stack([torch.stack(torch._foreach_norm(w_runs)), torch.stack(torch._foreach_norm(u_runs))])
            run_sq = run_sq.double() ** 2  # (2, runs): small, so fp64 is free here
            sq = torch.zeros(2, n + 1, dtype=torch.float64, device=p.device).index_add_(1, run_param, run_sq)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # With ZeRO offload the partitions live on the CPU, but NCCL reduces CUDA tensors only.
                where = collective_device(torch.distributed.get_backend(group), sq.device)
                reduced = sq.to(where)
                torch.distributed.all_reduce(reduced, group=group)
                sq = reduced.to(p.device)
            w_norm, u_norm = sq.sqrt().float()
            ratio = trust_ratio(w_norm, u_norm)[run_param]
            torch._foreach_mul_(list(u_runs), list(ratio.unbind()))


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters trained without weight decay: the paper's rule (``train_10m.py``: no
    decay where the name holds ``bias`` or ``layer_norm``), i.e. every bias (``head_bias`` too) and the
    parameters of LayerNorm modules (ours are not named ``layer_norm``: the module type decides). The
    layer-weighting scalars are decayed, as the paper's ``dwa_modules.alphas`` are."""
    names = {n for n, _ in model.named_parameters() if "bias" in n}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            names.update(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False))
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decay group (matrices, embeddings, layer-weighting scalars), no-decay group (``no_decay_names``:
    biases, LayerNorm parameters)]."""
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, train_cfg) -> torch.optim.Optimizer:
    """The optimiser of ``train_cfg`` (LAMB by default; AdamW as an option) over ``model``."""
    groups = param_groups(model, train_cfg.weight_decay)
    betas = (train_cfg.beta1, train_cfg.beta2)
    if train_cfg.optimizer == "lamb":
        return LAMB(groups, lr=train_cfg.lr, betas=betas, eps=train_cfg.eps,
                    weight_decay=train_cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=betas, eps=train_cfg.eps,
                             weight_decay=train_cfg.weight_decay)


def lr_at(step: int, total_steps: int, peak: float, warmup_fraction: float = 0.016,
          cooldown_fraction: float = 0.016, min_ratio: float = 0.1) -> float:
    """Learning rate of step ``step`` (0-based) as a pure function: the paper's schedule
    (``utils.cosine_schedule_with_warmup_cooldown``, a ``LambdaLR`` stepped after every optimizer step).

    With warmup = int(warmup_fraction * total) and cooldown = int(cooldown_fraction * total) steps
    (truncated, as the paper's ``int()``): a linear warmup ``peak * step / warmup``, so the first step
    runs at 0 (it still moves LAMB's moments); then ``min_ratio`` + cosine with progress
    (step - warmup) / (total - warmup), which ends above the floor where the cooldown starts; then a
    linear cooldown from ``min_ratio * peak`` to 0 over the last ``cooldown`` steps.
    """
    warmup = int(warmup_fraction * total_steps)
    cooldown = int(cooldown_fraction * total_steps)
    # The factor LambdaLR multiplies the peak by, computed in the paper's order (equal to the last bit).
    if step < warmup:
        factor = float(step) / float(max(1, warmup))
    elif step >= total_steps - cooldown:
        factor = min_ratio * float(total_steps - step) / float(max(1, cooldown))
    else:
        progress = float(step - warmup) / float(max(1, total_steps - warmup))
        factor = max(min_ratio, min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return peak * factor


def schedule_lr(step: int, train_cfg) -> float:
    """Learning rate of ``step`` under ``train_cfg``'s schedule (``lr_at``, recipe §5)."""
    c = train_cfg
    return lr_at(step, c.steps, c.lr, c.warmup_fraction, c.cooldown_fraction, c.min_lr_ratio)


class EMA:
    """Exponential moving average of the parameters (fp32), updated after every optimiser step
    (recipe §5: decay 0.999; evaluation and the final model use the average)."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average a fraction ``1 - decay`` of the way toward ``model``'s current weights, in
        one multi-tensor ``lerp`` over all parameters (per parameter device and dtype)."""
        shadows, weights = [], []
        for n, p in model.named_parameters():
            shadows.append(self.shadow[n])
            weights.append(p.detach() if p.dtype == torch.float32 else p.detach().float())
        torch._foreach_lerp_(shadows, weights, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 average by parameter name (a new dict holding the same tensors)."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state``'s tensors into the average; a parameter missing from ``state`` is a ValueError."""
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks parameters: {sorted(missing)[:3]}")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (used for evaluation and the final model)."""
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n].to(p.dtype))

    def backup(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's current weights, for ``restore`` after evaluating with the average."""
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def restore(self, model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
        """Write the weights saved by ``backup`` back into ``model``."""
        for n, p in model.named_parameters():
            p.copy_(saved[n])


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX-512-BF16 or AMX); AVX2 emulates it ~7x slower."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(f()) for f in checks if f is not None)


# What ``precision: auto`` resolves to, overriding the hardware check (values fp32 / bf16): lets one
# machine reproduce the other CPU kind's choice (e.g. the test suite run both ways on one machine).
AUTO_PRECISION_ENV = "GPTBERT_AUTO_PRECISION"


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32).

    One meaning on every backend (plain loop and DeepSpeed, CPU and CUDA): ``bf16`` is
    ``torch.autocast(dtype=bfloat16)`` around the forward and the loss, over fp32 weights, with fp32
    gradients, optimizer state and EMA (recipe §5: bf16 autocast with fp32 master weights). ``auto``
    is bf16 where the hardware runs it natively (CUDA with bf16; a CPU with AVX-512-BF16 or AMX,
    where bf16 matmuls are ~6x faster than fp32) and fp32 elsewhere (on AVX2-only CPUs bf16 is
    emulated and ~7x slower); ``GPTBERT_AUTO_PRECISION`` overrides that choice.
    """
    if precision == "auto":
        forced = os.environ.get(AUTO_PRECISION_ENV, "").strip().lower()
        if forced:
            if forced not in ("fp32", "bf16"):
                raise ValueError(f"environment variable {AUTO_PRECISION_ENV}: expected fp32 or bf16, "
                                 f"got {forced!r}")
            precision = forced
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16  # explicitly asked for, even where it is slow
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()
    return torch.bfloat16 if supported else None


def precision_name(dtype: torch.dtype | None) -> str:
    """How a run's precision is recorded (training.json, MLflow): ``bf16-autocast`` or ``fp32``."""
    return "bf16-autocast" if dtype is torch.bfloat16 else "fp32"


__all__ = ["AUTO_PRECISION_ENV", "EMA", "LAMB", "ShardedLAMB", "build_optimizer", "cpu_supports_bf16", "lr_at",
           "no_decay_names", "param_groups", "precision_name", "resolve_precision", "schedule_lr", "trust_ratio"]
