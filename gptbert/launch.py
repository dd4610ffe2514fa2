"""Distributed pretraining: the trainer's loop inside Ray Train workers, each a DeepSpeed rank.

``pretrain_distributed(cfg, shard_dir, out_dir, run_name, callback)`` starts (or attaches to) Ray,
runs a ``TorchTrainer`` with ``cfg.launch.num_workers`` workers, and in every worker:

- builds the model and our LAMB (gptbert.optim) and wraps them with ``deepspeed.initialize``
  (ZeRO stage from ``cfg.launch``, the JSON in ``infra/deepspeed/`` filled from the typed config);
  under ZeRO-3 the model's cross-module parameter uses are registered (``prepare_zero3_model``)
  and the EMA runs over local partitions (``Zero3EMA``);
- runs ``gptbert.trainer.Trainer`` unchanged through ``DeepSpeedBackend`` (the step-backend
  contract of trainer.py). Every rank plans the same global batch from document lengths and
  reads only its own examples from the memory-mapped shards, so 1 and N workers train the same
  objective;
- checkpoints: every rank writes its DeepSpeed shard + RNG into a node-local folder (the
  trainer's ``save_checkpoint``), then the folder is handed to ``ray.train.report``, which merges
  all ranks' files into ``<storage_path>/<run_name>/step-N``. A restarted worker group (Ray's
  ``FailureConfig``) or a rerun with the same run name resumes from the latest one;
- rank 0 writes the final model folder (EMA weights, gptbert.io.save_model_dir) into the last
  checkpoint, and the driver copies it to ``<out_dir>/model``.

This is the only module that imports ray and deepspeed; both are imported inside functions, so the
config helpers can be used (and tested) without starting either.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from common.config import ConfigError, PipelineConfig, from_dict, to_dict

DEEPSPEED_CONFIG_DIR = Path(__file__).resolve().parents[1] / "infra" / "deepspeed"
CHECKPOINT_PREFIX = "step-"
DS_TAG = "deepspeed"

# Dense bf16 tensor-core peaks (FLOP/s) by GPU name, most specific first. MFU is reported only for
# these; elsewhere (CPUs, unknown GPUs, fp32) the achieved FLOP/s is reported and MFU left out.
GPU_BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


# ----------------------------------------------------------------------------- config helpers

def device_peak_flops(device_name: str | None, bf16: bool) -> float | None:
    """Per-device peak FLOP/s for MFU, or None where no honest peak is known."""
    if not device_name or not bf16:
        return None
    for key, peak in GPU_BF16_PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def resolve_ray_address(cfg: PipelineConfig) -> str | None:
    """``launch.ray_address`` if set, else ``RAY_ADDRESS`` from the environment, else None (local)."""
    return cfg.launch.ray_address or os.environ.get("RAY_ADDRESS") or None


def check_storage_path(storage_path: str | None, out_dir: str | Path, cluster: bool) -> str:
    """Where Ray Train persists checkpoints: a URI (``s3://``, ``gs://``, ...) or an absolute path.

    On a cluster the workers of other nodes write there too, so it must be shared storage: it must
    be given explicitly, and a local path must already exist (an NFS mount, not a folder this
    driver would create on its own disk). Locally it defaults to ``<out_dir>/ray``.
    """
    field = "launch.storage_path"
    if storage_path is None:
        if cluster:
            raise ConfigError(field, "is required when attaching to a Ray cluster (launch.ray_address or "
                                     "RAY_ADDRESS): shared storage that every node can reach, e.g. "
                                     "an NFS path mounted on all nodes or an s3:// / gs:// URI")
        path = (Path(out_dir) / "ray").resolve()
        path.mkdir(parents=True, exist_ok=True)
        return str(path)
    if "://" in storage_path:
        scheme = storage_path.split("://", 1)[0]
        if not scheme or not scheme.replace("+", "").replace("-", "").isalnum():
            raise ConfigError(field, f"not a valid URI: {storage_path!r}")
        return storage_path
    path = Path(storage_path)
    if not path.is_absolute():
        raise ConfigError(field, f"must be an absolute path or a URI (workers run in other working "
                                 f"folders), got {storage_path!r}")
    if cluster and not path.is_dir():
        raise ConfigError(field, f"{storage_path} does not exist: on a cluster it must be an existing "
                                 "shared folder (mounted on every node) or a URI")
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def default_run_name(out_dir: str | Path) -> str:
    """A stable run name from the output folder, so rerunning the same command resumes."""
    p = Path(out_dir).resolve()
    return f"{p.parent.name}-{p.name}".strip("-") or "gptbert"


def deepspeed_config(cfg: PipelineConfig, world_size: int, bf16: bool,
                     base: dict[str, Any] | str | Path | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a run: ``infra/deepspeed/zero<stage>.json`` with its ``"auto"``
    values filled from the typed config; ``bf16`` is the resolved ``train.precision``.

    One meaning of bf16 on every backend (SPEC 5: bf16 autocast with fp32 master weights): the
    engine holds fp32 weights, gradients and optimizer state, and bf16 is ``torch.autocast`` as in
    the single-process loop. DeepSpeed runs its forward with autocast switched off unless its
    ``torch_autocast`` section is enabled, so that section mirrors ``bf16``, with no "lower
    precision safe" modules: gradients are reduced in fp32, as the plain loop sums them. DeepSpeed's
    own ``bf16`` mode (bf16 weights and gradients, an fp32 master copy) computes a different step,
    so a JSON that enables it (or fp16) is refused.

    The loop accumulates gradients itself (the number of micro-batches varies with the batch
    schedule), so DeepSpeed runs unmanaged accumulation: ``backward`` only accumulates and every
    ``step`` is a boundary; ``gradient_accumulation_steps`` is 1 and the micro batch is the
    nominal one at step 0. A value written explicitly in the JSON must agree with the typed config
    (one source of truth); a disagreement is an error naming both.
    """
    lc, tc = cfg.launch, cfg.train
    if base is None:
        base = lc.deepspeed_config or DEEPSPEED_CONFIG_DIR / f"zero{lc.zero_stage}.json"
    if not isinstance(base, dict):
        path = Path(base)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config not found: {path}")
        try:
            base = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        source = str(path)
    else:
        source = "DeepSpeed config"
    ds = json.loads(json.dumps(base))  # deep copy

    micro = max(1, tc.micro_batch_tokens // tc.seq_len_at(0))
    computed = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world_size,
        "gradient_clipping": float(tc.grad_clip),
        "managed_gradient_accumulation": False,
    }
    for key, value in computed.items():
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = value
        elif have != value:
            raise ConfigError(key, f"{source} sets {key}={have!r} but the typed config gives {value!r} "
                                   "(set it to \"auto\" or change the train config)")
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.get("stage", lc.zero_stage)
    if stage != lc.zero_stage:
        raise ConfigError("launch.zero_stage", f"{source} is ZeRO stage {stage}, config says {lc.zero_stage}")
    zero["stage"] = lc.zero_stage
    if lc.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    for key in ("bf16", "fp16"):
        section = ds.get(key, {})
        enabled = section.get("enabled", False) if isinstance(section, dict) else section
        if enabled not in (False, "auto"):
            raise ConfigError("train.precision", f"{source} enables DeepSpeed's {key} mode; gptbert's "
                                                 "precision is train.precision (bf16 autocast over fp32 "
                                                 f"weights on every backend): remove {key!r} from the JSON")
    ds["bf16"] = {"enabled": False}
    ds.pop("fp16", None)
    ds["torch_autocast"] = {"enabled": bool(bf16), "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return ds


# ----------------------------------------------------------------------------- LAMB under ZeRO

def _lamb_class():
    from .optim import LAMB

    return LAMB


class ShardedLAMB(_lamb_class()):
    """LAMB whose layer-wise trust ratio survives ZeRO's flattening.

    ZeRO 1/2 hand the client optimizer one flat fp32 tensor per param group and rank (this rank's
    slice of all parameters concatenated). The Adam part of LAMB is elementwise and does not care,
    but the trust ratio ||w|| / ||update|| must be per original parameter over the whole parameter.
    ``attach_partitions`` records, for each flat slice, which parameter every element belongs to;
    the squared norms are then summed per parameter with ``index_add`` and all-reduced over the
    data-parallel group, giving exactly the per-parameter ratio of the unsharded LAMB. Tensors that
    were not attached (ZeRO 0: the real parameters) take the plain LAMB step.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        # id(flat tensor) -> (segment id per element (num_params = padding), num_params, group)
        self._segments: dict[int, tuple[Any, int, Any]] = {}

    def attach_partitions(self, flat: Any, segment_ids: Any, num_params: int, process_group=None) -> None:
        self._segments[id(flat)] = (segment_ids.to(flat.device), num_params, process_group)

    def step(self, closure=None):
        import torch

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            plain = []
            for group in self.param_groups:
                beta1, beta2 = group["betas"]
                lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if id(p) not in self._segments:
                        plain.append((group, p))
                        continue
                    seg, n, pg = self._segments[id(p)]
                    update = self._adam_update(p, beta1, beta2, eps)
                    if wd > 0:
                        w = p.float()
                        update.add_(w, alpha=wd)
                        sq = torch.zeros(2, n + 1, dtype=torch.float64, device=p.device)
                        sq[0].index_add_(0, seg, (w * w).double())
                        sq[1].index_add_(0, seg, (update * update).double())
                        if torch.distributed.is_available() and torch.distributed.is_initialized():
                            torch.distributed.all_reduce(sq, group=pg)
                        w_norm, u_norm = sq.sqrt().float()
                        trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                                            torch.ones_like(w_norm))
                        update.mul_(trust[seg])
                    p.add_(update.to(p.dtype), alpha=-lr)
            if plain:
                # Unsharded tensors: exactly the LAMB of gptbert.optim, on just these parameters.
                saved = [g["params"] for g in self.param_groups]
                try:
                    for g in self.param_groups:
                        g["params"] = [p for gg, p in plain if gg is g]
                    super().step()
                finally:
                    for g, ps in zip(self.param_groups, saved):
                        g["params"] = ps
        return loss

    def _adam_update(self, p, beta1: float, beta2: float, eps: float):
        import torch

        grad = p.grad.float()
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
        return m_hat / (v_hat.sqrt() + eps)


def zero_partition_segments(zero_optimizer, group_index: int, rank: int):
    """Parameter index of every element of this rank's flat slice of group ``group_index``
    (DeepSpeed ZeRO 1/2 layout: parameters at ``round_robin_bit16_offsets``, equal slices of
    ``partition_size``); padding gets the index ``num_params``."""
    import torch

    offsets = zero_optimizer.round_robin_bit16_offsets[group_index]
    numels = [m.numel() for m in zero_optimizer.round_robin_bit16_meta[group_index]]
    size = int(zero_optimizer.partition_size[group_index])
    start = rank * size
    seg = torch.full((size,), len(numels), dtype=torch.long)
    for j, (off, n) in enumerate(zip(offsets, numels)):
        a, b = max(off, start), min(off + n, start + size)
        if a < b:
            seg[a - start:b - start] = j
    return seg, len(numels)


def attach_zero_partitions(optimizer: ShardedLAMB, zero_optimizer) -> int:
    """Tell ``optimizer`` the layout of ZeRO 1/2's flat slices; returns how many were attached."""
    import torch.distributed as dist

    flats = getattr(zero_optimizer, "single_partition_of_fp32_groups", None)
    if flats is None:
        return 0
    for i, flat in enumerate(flats):
        pg = zero_optimizer.real_dp_process_group[i]
        seg, n = zero_partition_segments(zero_optimizer, i, dist.get_rank(group=pg))
        if seg.numel() != flat.numel():
            raise RuntimeError(f"ZeRO partition {i}: {flat.numel()} elements, layout says {seg.numel()}")
        optimizer.attach_partitions(flat, seg, n, pg)
    return len(flats)


def zero3_partition_segments(numels: list[int], partition_numels: list[int], rank: int):
    """Parameter index of every element of this rank's ZeRO-3 flat fp32 partition of one sub group.

    ZeRO-3 splits every parameter on its own: rank r holds elements [r*P, (r+1)*P) of the flattened
    parameter (P = its partition size, the last rank's slice zero-padded past the end), and the
    optimizer's flat tensor is these slices concatenated in sub-group order. Padding gets the index
    ``len(numels)``."""
    import torch

    parts = []
    for j, (n, size) in enumerate(zip(numels, partition_numels)):
        valid = max(0, min(size, n - rank * size))
        parts.append(torch.full((valid,), j, dtype=torch.long))
        parts.append(torch.full((size - valid,), len(numels), dtype=torch.long))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long), len(numels)


def attach_zero3_partitions(optimizer: ShardedLAMB, zero_optimizer) -> int:
    """Tell ``optimizer`` the layout of ZeRO-3's flat fp32 sub-group partitions (the tensors DeepSpeed
    hands the client optimizer, one sub group per step call); returns how many were attached."""
    import torch.distributed as dist

    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    groups = getattr(zero_optimizer, "fp16_groups", None)
    if not flats or groups is None:
        return 0
    pg = zero_optimizer.dp_process_group
    rank = dist.get_rank(group=pg)
    for flat, params in zip(flats, groups):
        seg, n = zero3_partition_segments([int(p.ds_numel) for p in params],
                                          [int(p.partition_numel()) for p in params], rank)
        if seg.numel() != flat.numel():
            raise RuntimeError(f"ZeRO-3 partition: {flat.numel()} elements, layout says {seg.numel()}")
        optimizer.attach_partitions(flat, seg, n, pg)
    return len(flats)


def prepare_zero3_model(model) -> None:
    """Make GPTBERT's parameter uses that happen outside their owning module's forward visible to
    ZeRO-3, which gathers parameters per module in forward/backward hooks.

    - ``lm_logits`` (the tied LM head) runs after the model's forward and uses
      ``word_embedding.weight`` and ``head_bias``: it is routed through a parameterless child module
      (so DeepSpeed hooks its forward and backward) with both registered as its external
      parameters. ``state_dict`` names are unchanged (the child owns no parameters).
    - ``layer_weights`` (a ParameterList, never called itself) are read in the root forward:
      registered as external parameters of the root module.
    The relative-position table is owned by the root module and normalised in its forward, so the
    layers only see an activation. Call before ``deepspeed.initialize`` (which hooks submodules).
    """
    import torch
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    from .model import GPTBERT

    class Zero3LMHead(torch.nn.Module):
        def __init__(self, owner):
            super().__init__()
            self._owner = [owner]  # a list: not a child module (no cycle, no parameters)

        def forward(self, hidden):
            return GPTBERT.lm_logits(self._owner[0], hidden)

    head = Zero3LMHead(model)
    model.add_module("zero3_lm_head", head)
    model.__dict__["lm_logits"] = head  # instance attribute wins over the class method
    register_external_parameter(head, model.word_embedding.weight)
    register_external_parameter(head, model.head_bias)
    if model.layer_weights is not None:
        for alpha in model.layer_weights:
            register_external_parameter(model, alpha)


class Zero3EMA:
    """The trainer's EMA under ZeRO-3, over this rank's parameter partitions (``param.ds_tensor``).

    The average is elementwise, so averaging each rank's slice equals slicing the full average; no
    communication per step and 1/world of the memory. ``full_state()`` (every rank calls it: an
    all-gather per parameter) rebuilds the full fp32 tensors for checkpoints and the final model;
    ``state_dict()`` returns them once gathered for the current step (checkpoint.py calls it on rank
    0 only). ``load_state_dict`` takes full tensors (any world size) and keeps this rank's slice.
    """

    def __init__(self, model, decay: float, process_group=None):
        self.decay = decay
        self.group = process_group
        self.params = dict(model.named_parameters())
        self.shadow = {n: p.ds_tensor.detach().float().clone() for n, p in self.params.items()}
        self._version = 0
        self._full: tuple[int, dict] | None = None

    def update(self, model=None) -> None:
        import torch

        with torch.no_grad():
            for n, p in self.params.items():
                self.shadow[n].lerp_(p.ds_tensor.detach().float(), 1.0 - self.decay)
        self._version += 1

    def _gather(self, tensors: dict) -> dict:
        import torch
        import torch.distributed as dist

        world = dist.get_world_size(group=self.group)
        out = {}
        for n, p in self.params.items():
            part = tensors[n].contiguous()
            pieces = [torch.empty_like(part) for _ in range(world)]
            dist.all_gather(pieces, part, group=self.group)
            out[n] = torch.cat(pieces)[: p.ds_numel].view(p.ds_shape).cpu()
        return out

    def full_state(self) -> dict:
        """Full fp32 EMA tensors by parameter name (collective: every rank calls it)."""
        if self._full is None or self._full[0] != self._version:
            self._full = (self._version, self._gather(self.shadow))
        return self._full[1]

    def state_dict(self) -> dict:
        if self._full is None or self._full[0] != self._version:
            raise RuntimeError("Zero3EMA.state_dict: call full_state() on every rank first")
        return dict(self._full[1])

    def _slice(self, name: str, full):
        import torch
        import torch.distributed as dist

        p = self.params[name]
        size = int(p.partition_numel())
        start = dist.get_rank(group=self.group) * size
        flat = full.detach().reshape(-1).float()
        out = torch.zeros(size, dtype=torch.float32, device=p.ds_tensor.device)
        valid = max(0, min(size, flat.numel() - start))
        out[:valid] = flat[start:start + valid]
        return out

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks parameters: {sorted(missing)[:3]}")
        for n in self.shadow:
            if tuple(state[n].shape) != tuple(self.params[n].ds_shape):
                raise ValueError(f"EMA state: {n} has shape {tuple(state[n].shape)}, "
                                 f"model has {tuple(self.params[n].ds_shape)}")
            self.shadow[n].copy_(self._slice(n, state[n]))
        self._version += 1
        self._full = None

    def _write(self, partitions: dict, full: dict | None) -> None:
        import torch
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        with torch.no_grad():
            for n, p in self.params.items():
                p.ds_tensor.copy_(partitions[n].to(p.ds_tensor.dtype))
                # Persistent (small) parameters stay gathered between forwards: refresh their data.
                if p.ds_status == ZeroParamStatus.AVAILABLE and p.numel() == p.ds_numel:
                    p.data.copy_(full[n].to(p.device, p.dtype).view_as(p))

    def backup(self, model=None) -> tuple[dict, dict]:
        """This rank's current partitions and full copies of gathered parameters, for ``restore``."""
        parts = {n: p.ds_tensor.detach().clone() for n, p in self.params.items()}
        full = {n: p.detach().clone() for n, p in self.params.items() if p.numel() == p.ds_numel}
        return parts, full

    def restore(self, model, saved: tuple[dict, dict]) -> None:
        parts, full = saved
        self._write(parts, full)

    def copy_to(self, model=None) -> None:
        """Write the average into the engine's partitions (collective: every rank calls it)."""
        self._write(self.shadow, self.full_state())


# ----------------------------------------------------------------------------- the step backend

class DeepSpeedBackend:
    """The trainer's step-backend contract over a ``DeepSpeedEngine``.

    ``backward`` only accumulates (unmanaged gradient accumulation); ``step`` is the boundary:
    DeepSpeed reduces the gradients across ranks, clips at ``gradient_clipping`` and steps the
    client optimizer, whose learning rate the loop's schedule sets here first.
    """

    def __init__(self, engine, device, rank: int, world_size: int):
        self.engine = engine
        self.module = engine  # callable like the model; .module is the GPTBERT
        self.device = device
        self.rank = rank
        self.world_size = world_size

    def make_ema(self, model, decay: float):
        """The trainer's EMA: over local partitions under ZeRO-3, else gptbert.optim.EMA."""
        from .optim import EMA

        if self.engine.zero_optimization_stage() == 3:
            return Zero3EMA(model, decay, self.engine.optimizer.dp_process_group)
        return EMA(model, decay)

    def backward(self, loss, boundary: bool = True) -> None:
        # The loop already normalised the loss over the global batch: no 1/GAS scaling.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, lr: float) -> float:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, directory: str | Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=DS_TAG, save_latest=False)

    def load(self, directory: str | Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{DS_TAG}' in {directory}")


def _skip_shm_build() -> None:
    # DeepSpeed JIT-compiles a shared-memory all-reduce op (1-2 minutes) on first init; training
    # collectives go through gloo and never use it (STACK.md). Replace the builder in the module
    # object itself: `import deepspeed.comm.torch as m` would bind the torch package instead.
    import deepspeed  # noqa: F401  (loads deepspeed.comm.torch)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def build_deepspeed_backend(cfg: PipelineConfig, device, rank: int, world_size: int) -> DeepSpeedBackend:
    """Model + optimizer wrapped by ``deepspeed.initialize`` (torch.distributed already set up)."""
    import deepspeed
    import torch

    from .model import GPTBERT
    from .optim import param_groups, resolve_precision

    if device.type == "cpu":
        _skip_shm_build()
    tc = cfg.train
    bf16 = resolve_precision(tc.precision, device) is not None
    torch.manual_seed(tc.seed)  # identical initial weights on every rank (as the plain loop)
    model = GPTBERT(cfg.model).to(device)
    groups = param_groups(model, tc.weight_decay)
    betas = (tc.beta1, tc.beta2)
    if tc.optimizer == "lamb":
        optimizer = ShardedLAMB(groups, lr=tc.lr, betas=betas, eps=tc.eps, weight_decay=tc.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=betas, eps=tc.eps, weight_decay=tc.weight_decay)
    if cfg.launch.zero_stage == 3:
        prepare_zero3_model(model)
    ds_cfg = deepspeed_config(cfg, world_size, bf16)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    if isinstance(optimizer, ShardedLAMB) and cfg.launch.zero_stage in (1, 2):
        if attach_zero_partitions(optimizer, ds_optimizer) == 0:
            raise RuntimeError("ZeRO optimizer exposes no flat partitions; cannot keep LAMB per-layer")
    if isinstance(optimizer, ShardedLAMB) and cfg.launch.zero_stage == 3:
        if attach_zero3_partitions(optimizer, ds_optimizer) == 0:
            raise RuntimeError("ZeRO-3 optimizer exposes no fp32 partitions; cannot keep LAMB per-layer")
    if rank > 0:
        # Dropout streams must differ between ranks; rank 0 keeps the plain loop's stream.
        torch.manual_seed(tc.seed + 1_000_003 * rank)
    return DeepSpeedBackend(engine, device, rank, world_size)


# ----------------------------------------------------------------------------- metrics

class MetricsCallback:
    """Adds achieved FLOP/s and MFU to the loop's per-step metrics, then calls ``inner``.

    Runs inside the rank-0 worker, so it (and ``inner``) must be picklable.
    """

    def __init__(self, cfg: PipelineConfig, world_size: int, device_name: str | None, bf16: bool,
                 inner: Callable[[dict, int], None] | None = None):
        self.model_cfg = cfg.model
        self.causal_fraction = cfg.train.causal_fraction
        self.world_size = world_size
        self.device_name = device_name
        self.peak = device_peak_flops(device_name, bf16)
        self.inner = inner
        self._fpt: dict[tuple[int, float], float] = {}

    def flops_per_token(self, seq_len: int, mask_rate: float) -> float:
        from .flops import flops_per_token

        # Targets per input token: every causal position, about mask_rate of a masked example's.
        frac = round(self.causal_fraction + (1.0 - self.causal_fraction) * mask_rate, 3)
        key = (seq_len, frac)
        if key not in self._fpt:
            self._fpt[key] = float(flops_per_token(self.model_cfg, seq_len, frac, training=True))
        return self._fpt[key]

    def __call__(self, metrics: dict, step: int) -> None:
        tps = metrics.get("tokens_per_s")
        if tps is not None and "seq_len" in metrics:
            flops = tps * self.flops_per_token(int(metrics["seq_len"]), float(metrics.get("mask_rate", 0.15)))
            metrics["flops_per_s"] = flops
            metrics["mfu"] = flops / (self.peak * self.world_size) if self.peak else None
        metrics["workers"] = self.world_size
        if self.inner is not None:
            self.inner(metrics, step)


class JsonlCallback:
    """Appends ``{"step": ..., **metrics}`` per step to a JSON-lines file (picklable)."""

    def __init__(self, path: str | Path):
        self.path = str(Path(path).resolve())

    def __call__(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: v for k, v in metrics.items()
                                if isinstance(v, (int, float, str)) or v is None}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


# ----------------------------------------------------------------------------- inside a worker

def _trainer_class():
    from .trainer import Trainer

    return Trainer


class RayTrainer(_trainer_class()):
    """The trainer's loop unchanged; checkpoints also go to Ray storage, plus the test fault hook."""

    def __init__(self, *args, local_rank: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.local_rank = local_rank
        self.final_checkpoint: Path | None = None

    def _prepare(self, step: int, cursor):
        out = super()._prepare(step, cursor)
        if self.cfg.launch.zero_stage == 3:
            # ZeRO-3 gathers parameters with collectives inside every forward, so every rank must run
            # a real forward per micro-batch; the loop's zero loss for a rank without examples runs
            # none. Every rank checks every rank's share (rank-independent), so all stop together.
            plan = out[0]
            for r in range(self.world_size):
                if any(len(c) == 0 for c in self.stream.micro_batches(plan, r, self.world_size)):
                    raise ConfigError("train.micro_batch_tokens",
                                      f"step {step}: {plan.batch_size} examples over {self.world_size} ranks "
                                      "leave a rank without examples in a micro-batch, which ZeRO-3 cannot "
                                      "run (every rank must run each forward); use larger batches or ZeRO 0-2")
        return out

    def train_step(self):
        metrics = super().train_step()
        lc = self.cfg.launch
        if lc.fail_at_step is not None and self.step == lc.fail_at_step and self.rank == 0:
            marker = Path(lc.fail_marker)
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"failed once at step {self.step}\n")
                raise RuntimeError(f"injected fault at step {self.step} (launch.fail_at_step)")
        return metrics

    def save(self, checkpoint_root: str | Path) -> Path:
        if isinstance(self.ema, Zero3EMA):
            self.ema.full_state()  # collective; checkpoint.py then reads it on rank 0
        path = super().save(checkpoint_root)
        if self.step >= self.tc.steps:
            # The last checkpoint is reported once the model folder is inside it.
            self.final_checkpoint = self._local_folder(checkpoint_root)
            return path
        self.report(checkpoint_root)
        return path

    def _local_folder(self, checkpoint_root: str | Path) -> Path | None:
        # Rank 0 renamed .tmp-step-N to step-N on its node; other nodes keep their .tmp folder.
        root = Path(checkpoint_root)
        for name in (f"{CHECKPOINT_PREFIX}{self.step}", f".tmp-{CHECKPOINT_PREFIX}{self.step}"):
            if (root / name).is_dir():
                return root / name
        return None

    def report(self, checkpoint_root: str | Path | None = None, folder: Path | None = None,
               extra: dict | None = None) -> None:
        """Every rank calls this (it is a barrier); one rank per node uploads that node's files."""
        import ray.train

        if folder is None and checkpoint_root is not None:
            folder = self._local_folder(checkpoint_root)
        metrics = {k: v for k, v in self.last_metrics.items() if isinstance(v, (int, float))}
        metrics.update(step=self.step, **(extra or {}))
        checkpoint = None
        if folder is not None and self.local_rank == 0:
            checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{self.step}")
        if folder is not None and folder.name.startswith(".tmp-") and self.local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)


def _stored_checkpoints(storage_path: str, run_name: str) -> list[Path]:
    """Complete checkpoints ``step-N`` (with trainer.pt) of a run in local storage, oldest first."""
    if "://" in storage_path:
        return []
    root = Path(storage_path) / run_name
    found = []
    if root.is_dir():
        for p in root.iterdir():
            n = p.name[len(CHECKPOINT_PREFIX):]
            if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and n.isdigit() and (p / "trainer.pt").exists():
                found.append((int(n), p))
    return [p for _, p in sorted(found)]


def _check_zero3_validation(cfg: PipelineConfig, valid, world: int) -> None:
    """Under ZeRO-3 every rank must run the same number of validation forwards (each one gathers
    parameters collectively); refuse a validation set whose split leaves ranks uneven."""
    from .objective import rank_slice, segment_pieces

    tc = cfg.train
    if valid is None or tc.valid_examples == 0:
        return
    n = len(segment_pieces(valid.lengths, tc.max_seq_len, tc.valid_examples))
    micro = max(1, tc.micro_batch_tokens // tc.max_seq_len)
    counts = {-(-len(rank_slice(n, r, world)) // micro) for r in range(world)}
    if len(counts) > 1:
        raise ConfigError("train.valid_examples",
                          f"{n} validation examples in micro-batches of {micro} give the {world} ranks "
                          f"different numbers of forwards ({sorted(counts)}), which ZeRO-3 cannot run; "
                          f"use a multiple of {world * micro} examples or ZeRO 0-2")


def _train_worker(config: dict) -> None:
    """The per-worker function of the Ray ``TorchTrainer``."""
    import ray
    import ray.train
    import torch

    from .io import save_model_dir
    from .optim import resolve_precision
    from .trainer import _manifest_digest, open_data, training_summary

    cfg = from_dict(PipelineConfig, config["cfg"])
    lc = cfg.launch
    if lc.checkpoint_every is not None:
        # A loop-only field (not part of the run's identity), so resuming is unaffected.
        cfg.train.checkpoint_every = lc.checkpoint_every
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local_rank, local_world = ctx.get_local_rank(), ctx.get_local_world_size()

    threads = lc.threads_per_worker or max(1, (os.cpu_count() or 1) // max(local_world, 1))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    if lc.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        device_name = torch.cuda.get_device_name(device)
    else:
        device = torch.device("cpu")
        device_name = None

    source, tokenizer_path, valid = open_data(config["shard_dir"], config.get("tokenizer"))
    backend = build_deepspeed_backend(cfg, device, rank, world)
    bf16 = resolve_precision(cfg.train.precision, device) is not None
    callback = MetricsCallback(cfg, world, device_name, bf16, config.get("callback")) if rank == 0 else None
    trainer = RayTrainer(cfg, source, backend, valid, callback, local_rank=local_rank)
    if lc.zero_stage == 3:
        _check_zero3_validation(cfg, valid, world)

    # Which node every rank runs on (recorded in training.json: proves multi-node placement).
    node = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": os.uname().nodename, "threads": threads, "device": str(device)}
    nodes: list[Any] = [None] * world
    torch.distributed.all_gather_object(nodes, node)

    resumed_from = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.load(d)
        resumed_from = {"step": trainer.step, "via": "ray.train.get_checkpoint"}
    else:
        stored = _stored_checkpoints(config["storage_path"], config["run_name"])
        if stored:
            trainer.load(stored[-1])
            resumed_from = {"step": trainer.step, "via": str(stored[-1])}

    # Node-local scratch for the trainer's checkpoint writer; Ray storage keeps the real copies.
    scratch = Path(config["out_dir"]) / ".ray-checkpoints" / config["run_name"]
    started = time.time()
    start_step = trainer.step
    trainer.fit(scratch)

    folder = trainer.final_checkpoint
    if folder is None:
        # Resumed a finished run: nothing trained, the final checkpoint is the one restored.
        return
    summary = training_summary(trainer, cfg, started, data_name=config["shard_dir"],
                               manifest_digest=_manifest_digest(config["shard_dir"]),
                               tokenizer_path=tokenizer_path, start_step=start_step)
    summary["launch"] = {"backend": "ray+deepspeed", "workers": world, "zero_stage": lc.zero_stage,
                         "run_name": config["run_name"], "storage_path": config["storage_path"],
                         "resumed_from": resumed_from, "nodes": nodes}
    # ZeRO-3: every rank joins the gather of the partitioned EMA; rank 0 writes it.
    full_ema = trainer.ema.full_state() if isinstance(trainer.ema, Zero3EMA) else None
    if rank == 0:
        # The final model is the EMA in fp32, in a fresh CPU model: independent of the device.
        from .model import GPTBERT

        final_model = GPTBERT(cfg.model)
        if full_ema is not None:
            with torch.no_grad():
                for n, p in final_model.named_parameters():
                    p.copy_(full_ema[n])
        else:
            trainer.ema.copy_to(final_model)
        save_model_dir(folder / "model", final_model, cfg.model, tokenizer_path, summary)
    trainer.report(folder=folder, extra={"final": 1})
    if local_rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)


# ----------------------------------------------------------------------------- the driver

def pretrain_distributed(cfg: PipelineConfig, shard_dir: str | Path, out_dir: str | Path,
                         run_name: str | None = None, callback: Callable[[dict, int], None] | None = None,
                         tokenizer: str | Path | None = None) -> Path:
    """Pretrain with Ray Train + DeepSpeed; returns ``<out_dir>/model``.

    ``run_name`` (else ``cfg.launch.run_name``, else derived from ``out_dir``) names the run in
    ``storage_path``; rerunning with the same name resumes from its latest checkpoint.
    ``callback(metrics, step)`` runs in the rank-0 worker (it must be picklable). ``tokenizer``:
    the tokenizer.json shipped in the model folder (default: the shard folder's).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    lc = cfg.launch
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shard_dir = str(Path(shard_dir).resolve())
    if not Path(shard_dir).exists():
        raise FileNotFoundError(f"training data not found: {shard_dir}")
    if tokenizer is not None:
        tokenizer = str(Path(tokenizer).resolve())
        if not Path(tokenizer).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tokenizer}")
    address = resolve_ray_address(cfg)
    storage = check_storage_path(lc.storage_path, out, cluster=address is not None)
    name = run_name or lc.run_name or default_run_name(out)
    if "/" in name or name in (".", ".."):
        raise ConfigError("launch.run_name", f"must be a plain folder name, got {name!r}")

    started_ray = False
    if not ray.is_initialized():
        if address is not None:
            ray.init(address=address)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, lc.num_workers * lc.cpus_per_worker),
                     include_dashboard=False)
        started_ray = True
    try:
        resources = {"CPU": lc.cpus_per_worker}
        if lc.use_gpu:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"cfg": to_dict(cfg), "shard_dir": shard_dir, "out_dir": str(out),
                               "storage_path": storage, "run_name": name, "callback": callback,
                               "tokenizer": tokenizer},
            scaling_config=ScalingConfig(num_workers=lc.num_workers, use_gpu=lc.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=name, storage_path=storage,
                failure_config=FailureConfig(max_failures=lc.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=max(cfg.train.keep_checkpoints, 1) + 1),
                worker_runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ.get(
                    "DS_ACCELERATOR", "cuda" if lc.use_gpu else "cpu")}},
            ),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        checkpoint = result.checkpoint
        if checkpoint is None:
            raise RuntimeError(f"run {name!r} in {storage} finished without a checkpoint")
        with checkpoint.as_directory() as d:
            model_src = Path(d) / "model"
            if not (model_src / "training.json").is_file():
                raise RuntimeError(f"latest checkpoint {checkpoint.path} of run {name!r} holds no model folder")
            return _install_model_dir(model_src, out / "model")
    finally:
        if started_ray:
            ray.shutdown()


def _install_model_dir(src: Path, dest: Path) -> Path:
    """Copy the model folder next to ``dest`` under a temporary name, then swap it into place."""
    from .io import replace_dir

    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    shutil.copytree(src, tmp)
    return replace_dir(tmp, dest)


__all__ = ["DeepSpeedBackend", "JsonlCallback", "MetricsCallback", "RayTrainer", "ShardedLAMB",
           "Zero3EMA", "attach_zero3_partitions", "attach_zero_partitions", "build_deepspeed_backend",
           "check_storage_path", "deepspeed_config", "default_run_name", "device_peak_flops",
           "prepare_zero3_model", "pretrain_distributed", "read_jsonl", "resolve_ray_address",
           "zero3_partition_segments", "zero_partition_segments"]
