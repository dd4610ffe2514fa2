"""The DeepSpeed step backend: the trainer's loop over a ``DeepSpeedEngine`` (ZeRO 0-3, our LAMB as
the client optimizer), and the DeepSpeed config built from the typed config.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from common.config import ConfigError, LaunchConfig, ModelConfig, TrainConfig

from ..kernels import build_model
from ..optim import EMA, ShardedLAMB, param_groups, resolve_precision

log = logging.getLogger("gptbert")
from .zero import Zero3EMA, attach_zero3_partitions, attach_zero_partitions, prepare_zero3_model

# The base configs, one per ZeRO stage; their "auto" values are filled from the typed config.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DS_TAG = "deepspeed"


def deepspeed_config(train_cfg: TrainConfig, launch_cfg: LaunchConfig, world_size: int, bf16: bool,
                     base: dict[str, Any] | str | Path | None = None, cuda: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of a run: ``configs/zero<stage>.json`` with its ``"auto"`` values filled
    from the typed config; ``bf16`` is the resolved ``train.precision``, ``cuda`` whether the ranks
    train on CUDA devices.

    One meaning of bf16 on every backend (recipe §5: bf16 autocast with fp32 master weights): the
    engine holds fp32 weights, gradients and optimizer state, and bf16 is ``torch.autocast`` as in
    the single-process loop. DeepSpeed runs its forward with autocast switched off unless its
    ``torch_autocast`` section is enabled, so that section mirrors ``bf16``, with no "lower
    precision safe" modules: gradients are reduced in fp32, as the plain loop sums them. DeepSpeed's
    own ``bf16`` mode (bf16 weights and gradients, an fp32 master copy) computes a different step,
    so a JSON that enables it (or fp16) is refused.

    The loop accumulates gradients itself (the number of micro-batches varies with the batch
    schedule), so DeepSpeed runs unmanaged accumulation: ``backward`` only accumulates and every
    ``step`` is the boundary; ``gradient_accumulation_steps`` is 1 and the micro batch is the
    nominal one at step 0. So ZeRO-0/1 reduce the gradients once per optimizer step, inside
    ``step``, whatever the number of micro-batches; ZeRO-2/3 reduce-scatter each micro-batch's
    gradients during its backward (that is how they keep only a partition of the gradients).
    A value written explicitly in the JSON must agree with the typed config (one source of
    truth); a disagreement is an error naming both.

    Device-dependent settings (an explicit JSON value is kept): ``overlap_comm`` ``"auto"`` is on
    for ZeRO-2/3 on CUDA (the per-micro-batch reduce-scatter runs on a side stream during the
    backward) and off elsewhere (ZeRO-0/1 reduce once, in ``step``, with nothing to overlap, and
    DeepSpeed's unmanaged accumulation refuses it there); optimizer offload pins its host buffers
    on CUDA (asynchronous copies) and not on CPU ranks, where pinning only costs memory.
    """
    lc, tc = launch_cfg, train_cfg
    if base is None:
        base = lc.deepspeed_config or CONFIG_DIR / f"zero{lc.zero_stage}.json"
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
    overlap = zero.get("overlap_comm", "auto")
    if overlap == "auto":
        zero["overlap_comm"] = cuda and lc.zero_stage >= 2
    elif overlap and lc.zero_stage < 2:
        raise ConfigError("launch.zero_stage", f"{source} sets zero_optimization.overlap_comm=true, which needs "
                                               f"ZeRO stage 2 or 3 (stage {lc.zero_stage} reduces once per step, "
                                               "in step()): remove it or set it to \"auto\"")
    if lc.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(cuda)}
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
        if self.engine.zero_optimization_stage() == 3:
            return Zero3EMA(model, decay, self.engine.optimizer.dp_process_group)
        return EMA(model, decay)

    def backward(self, loss, boundary: bool = True) -> None:
        """Accumulate ``loss``'s gradients in the engine. ``boundary`` is not needed: under unmanaged
        accumulation the engine's boundary is ``step`` itself, so ZeRO-0/1 reduce once per step there
        (``tests/test_launch.py`` counts the collectives)."""
        # The loop already normalised the loss over the global batch: no 1/GAS scaling.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, lr: float) -> float | None:
        """Set ``lr`` and step the engine (reduce, clip, optimizer step); returns the global gradient norm, or
        None when DeepSpeed did not compute it."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None  # None: DeepSpeed did not compute it

    def save(self, directory: str | Path) -> None:
        """Save the engine's checkpoint (tag ``deepspeed``) into ``directory``; every rank calls it."""
        self.engine.save_checkpoint(str(directory), tag=DS_TAG, save_latest=False)

    def load(self, directory: str | Path) -> None:
        """Load the engine's ``deepspeed`` checkpoint with optimizer states from ``directory``;
        FileNotFoundError when there is none."""
        path, _ = self.engine.load_checkpoint(str(directory), tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{DS_TAG}' in {directory}")


def _skip_shm_build() -> None:
    # DeepSpeed JIT-compiles a shared-memory all-reduce op (1-2 minutes) on first init; training
    # collectives go through gloo and never use it (losses are identical either way). Replace the builder in the module
    # object itself: `import deepspeed.comm.torch as m` would bind the torch package instead.
    import deepspeed  # noqa: F401  (loads deepspeed.comm.torch)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def select_accelerator(device: torch.device) -> str:
    """Tell DeepSpeed which accelerator the rank trains on (``DS_ACCELERATOR``, unless the user set
    it) before it is imported: otherwise it probes for CUDA and warns on CPU machines."""
    return os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")


def build_deepspeed_backend(model_cfg: ModelConfig, train_cfg: TrainConfig, launch_cfg: LaunchConfig, device,
                            rank: int, world_size: int) -> DeepSpeedBackend:
    """Model + optimizer wrapped by ``deepspeed.initialize`` (torch.distributed already set up)."""
    select_accelerator(device)
    import deepspeed

    if device.type == "cpu":
        _skip_shm_build()
    tc = train_cfg
    bf16 = resolve_precision(tc.precision, device) is not None
    torch.manual_seed(tc.seed)  # identical initial weights on every rank (as the plain loop)
    if tc.compile and launch_cfg.zero_stage == 3:
        log.warning("train.compile is not applied under ZeRO-3 (its parameter hooks run inside the forward)")
    model = build_model(model_cfg, device, compile=tc.compile and launch_cfg.zero_stage < 3)
    groups = param_groups(model, tc.weight_decay)
    betas = (tc.beta1, tc.beta2)
    if tc.optimizer == "lamb":
        optimizer = ShardedLAMB(groups, lr=tc.lr, betas=betas, eps=tc.eps, weight_decay=tc.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=betas, eps=tc.eps, weight_decay=tc.weight_decay)
    if launch_cfg.zero_stage == 3:
        prepare_zero3_model(model)
    ds_cfg = deepspeed_config(tc, launch_cfg, world_size, bf16, cuda=device.type == "cuda")
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    from .safe_checkpoint import WeightsOnlyCheckpointEngine

    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)  # loads never unpickle code
    if isinstance(optimizer, ShardedLAMB) and launch_cfg.zero_stage in (1, 2):
        if attach_zero_partitions(optimizer, ds_optimizer) == 0:
            raise RuntimeError("ZeRO optimizer exposes no flat partitions; cannot keep LAMB per-layer")
    if isinstance(optimizer, ShardedLAMB) and launch_cfg.zero_stage == 3:
        if attach_zero3_partitions(optimizer, ds_optimizer) == 0:
            raise RuntimeError("ZeRO-3 optimizer exposes no fp32 partitions; cannot keep LAMB per-layer")
    if rank > 0:
        # Dropout streams must differ between ranks; rank 0 keeps the plain loop's stream.
        torch.manual_seed(tc.seed + 1_000_003 * rank)
    return DeepSpeedBackend(engine, device, rank, world_size)


__all__ = ["CONFIG_DIR", "DeepSpeedBackend", "build_deepspeed_backend", "deepspeed_config"]
