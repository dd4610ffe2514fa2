"""Per-step metrics leaving the training loop: achieved FLOP/s and MFU, and a JSON-lines log.

Both are trainer callbacks (``callback(metrics, step)``, rank 0) and picklable, so a launcher can
ship them into a Ray worker. MFU is reported only against an honest peak: the dense bf16 tensor-core
peak of a known GPU; elsewhere (CPUs, unknown GPUs, fp32) only the achieved FLOP/s.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from common.config import ModelConfig

from .flops import step_flops_per_token

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

    def flops_per_token(self, metrics: dict) -> float:
        """Training FLOPs per input token of the step whose ``metrics`` the loop reported
        (``flops.step_flops_per_token`` of its sequence length, mask rate and micro-batching)."""
        return step_flops_per_token(self.model_cfg, int(metrics["seq_len"]), self.causal_fraction,
                                    float(metrics.get("mask_rate", 0.15)), int(metrics.get("batch_size", 1)),
                                    int(metrics.get("micro_batches", 1)), self.world_size)

    def __call__(self, metrics: dict, step: int) -> None:
        tps = metrics.get("tokens_per_s")
        if tps is not None and "seq_len" in metrics:
            flops = tps * self.flops_per_token(metrics)
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


class Chain:
    """Calls each callback in turn with the same ``(metrics, step)`` (picklable when they are)."""

    def __init__(self, *callbacks: Callable[[dict, int], None] | None):
        self.callbacks = [c for c in callbacks if c is not None]

    def __call__(self, metrics: dict, step: int) -> None:
        for callback in self.callbacks:
            callback(metrics, step)


# The fields a progress display needs; the rest of a step's metrics stay in the step log.
PROGRESS_FIELDS = ("loss", "loss_masked", "loss_causal", "tokens_per_s", "words_per_s", "words", "tokens",
                   "lr", "seq_len")


class ProgressFile:
    """Keeps ``path`` holding the latest step as one small JSON document (replaced atomically),
    so that another process (the CLI console) can show progress wherever rank 0 runs on a shared
    disk. Fields: step, total_steps, time, and ``PROGRESS_FIELDS`` that the step reported. It is
    called on the training step's path, so it writes at most every ``min_interval_s`` (and always
    at the last step): a fast GPU step must not pay a file write each time."""

    def __init__(self, path: str | Path, total_steps: int, min_interval_s: float = 0.25):
        self.path = str(Path(path).resolve())
        self.total_steps = int(total_steps)
        self.min_interval_s = float(min_interval_s)
        self._last_write = 0.0

    def __call__(self, metrics: dict, step: int) -> None:
        now = time.time()
        if step < self.total_steps and now - self._last_write < self.min_interval_s:
            return
        self._last_write = now
        doc = {"step": int(step), "total_steps": self.total_steps, "time": now}
        doc.update({k: metrics[k] for k in PROGRESS_FIELDS if isinstance(metrics.get(k), (int, float))})
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, self.path)
        except OSError:  # progress is a convenience: a full or vanished disk must not stop training
            pass


def read_progress(path: str | Path) -> dict | None:
    """The latest document a ``ProgressFile`` wrote, or None when there is none (yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped); [] when the file does not exist."""
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


__all__ = ["GPU_BF16_PEAK_FLOPS", "PROGRESS_FIELDS", "Chain", "JsonlCallback", "MetricsCallback", "ProgressFile",
           "device_peak_flops", "read_jsonl", "read_progress"]
