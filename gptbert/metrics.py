"""Per-step metrics leaving the training loop: achieved FLOP/s and MFU, and a JSON-lines log.

Both are trainer callbacks (``callback(metrics, step)``, rank 0) and picklable, so a launcher can
ship them into a Ray worker. MFU is reported only against an honest peak: the dense bf16 tensor-core
peak of a known GPU; elsewhere (CPUs, unknown GPUs, fp32) only the achieved FLOP/s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from common.config import ModelConfig

from .flops import flops_per_token

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


def device_peak_flops(device_name: str | None, bf16: bool) -> float | None:
    """Per-device peak FLOP/s for MFU, or None where no honest peak is known."""
    if not device_name or not bf16:
        return None
    for key, peak in GPU_BF16_PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


class MetricsCallback:
    """Adds achieved FLOP/s and MFU to the loop's per-step metrics, then calls ``inner``.

    Runs inside the rank-0 worker, so it (and ``inner``) must be picklable.
    """

    def __init__(self, model_cfg: ModelConfig, causal_fraction: float, world_size: int, device_name: str | None,
                 bf16: bool, inner: Callable[[dict, int], None] | None = None):
        self.model_cfg = model_cfg
        self.causal_fraction = causal_fraction
        self.world_size = world_size
        self.device_name = device_name
        self.peak = device_peak_flops(device_name, bf16)
        self.inner = inner
        self._fpt: dict[tuple[int, float], float] = {}

    def flops_per_token(self, seq_len: int, mask_rate: float) -> float:
        """Training FLOPs per input token at ``seq_len`` and ``mask_rate`` (cached per pair)."""
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
    """The rows of a JSON-lines file (blank lines skipped); [] when the file does not exist."""
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


__all__ = ["GPU_BF16_PEAK_FLOPS", "JsonlCallback", "MetricsCallback", "device_peak_flops", "read_jsonl"]
