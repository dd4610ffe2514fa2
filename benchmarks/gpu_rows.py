"""The rows of ``benchmarks/gpu_bench.py``: one measured training configuration each.

A row trains a few global batches with the trainer's own micro-batching (``Trainer.train_step``:
the batch split into micro-batches, gradients accumulated, one optimizer step), either in this
process (the plain loop) or through ``run_pretraining`` with Ray Train + DeepSpeed. Each row is
measured on its own: an out-of-memory row is a row that says OOM and the run goes on, the GPU is
freed after every row, and the results file is rewritten after every row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config import LaunchConfig, PipelineConfig, load_config  # noqa: E402
from common.config.base import replace  # noqa: E402
from gptbert.device import fit_micro_batch_tokens, free_cuda, is_out_of_memory  # noqa: E402
from gptbert.flops import step_flops_per_token  # noqa: E402
from gptbert.metrics import GPU_BF16_PEAK_FLOPS  # noqa: E402
from gptbert.objective import cpu_micro_batch_tokens  # noqa: E402

GIB = 2**30


@dataclass(frozen=True)
class RowSpec:
    """What one row trains: ``kind`` is ``plain`` or ``ray-zero1`` / ``ray-zero2``; ``variant`` the
    attention path (``fused``, ``flex``, ``flex + compile``)."""

    kind: str
    preset: str
    seq: int
    variant: str = "fused"

    @property
    def name(self) -> str:
        """A short label: ``plain small 512 fused``."""
        return f"{self.kind} {self.preset} {self.seq} {self.variant}"


def device_peak(device_name: str | None) -> tuple[str, float] | None:
    """(table entry, FLOP/s): the dense bf16 peak of a known GPU (``gptbert.metrics``), else None."""
    if not device_name:
        return None
    for key, peak in GPU_BF16_PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return key, peak
    return None


def describe_peak(device_name: str | None) -> str:
    """The line naming the peak MFU is measured against."""
    found = device_peak(device_name)
    if found is None:
        return f"no known bf16 dense peak for {device_name or 'this device'}: MFU not reported"
    key, peak = found
    label = "H100 SXM" if key == "H100" else key  # the table's plain "H100" is the SXM part
    return f"MFU against the bf16 dense peak of {label}: {peak / 1e12:.0f} TFLOP/s"


def row_mfu(model_cfg, causal_fraction: float, step: dict, tokens_per_s: float | None, peak: float | None,
            world_size: int = 1) -> float | None:
    """Model FLOPs over the peak: ``gptbert.flops.step_flops_per_token`` of a step's metrics (its
    sequence length, mask rate and micro-batching), the count the training log's MFU uses."""
    if not peak or not tokens_per_s:
        return None
    per_token = step_flops_per_token(model_cfg, int(step["seq_len"]), causal_fraction, float(step["mask_rate"]),
                                     int(step["batch_size"]), int(step["micro_batches"]), world_size)
    return tokens_per_s * per_token / (peak * world_size)


class Results:
    """The results file, rewritten (atomically) after every row; ``complete`` only at the end."""

    def __init__(self, path: str | Path, header: dict[str, Any]):
        self.path = Path(path)
        self.header = dict(header)
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        """Append ``row`` and rewrite the file."""
        self.rows.append(row)
        self.write(complete=False)

    def write(self, complete: bool) -> None:
        """Write header, rows and ``complete`` (tmp file, then rename: a reader never sees half)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        doc = {**self.header, "complete": complete, "rows": self.rows}
        tmp.write_text(json.dumps(doc, indent=1, default=lambda x: None))
        os.replace(tmp, self.path)


def run_rows(specs: list[RowSpec], measure: Callable[[RowSpec], dict], results: Results,
             deadline: float | None = None, show: Callable[[dict], None] | None = None) -> list[dict]:
    """Measure every row on its own: an allocation failure is a row with status ``OOM``, another
    error a row with status ``error`` (its message), a row not started before ``deadline``
    (``time.time()``) one with status ``skipped``; the GPU is freed after each row, and the results
    are written after each."""
    for spec in specs:
        base = {"kind": spec.kind, "preset": spec.preset, "seq": spec.seq, "variant": spec.variant}
        if deadline is not None and time.time() > deadline:
            row = {**base, "status": "skipped", "error": "time budget (--max-minutes) spent"}
        else:
            started = time.time()
            try:
                row = {**base, "status": "ok", **measure(spec)}
            except Exception as exc:  # noqa: BLE001  (a row's failure is its result)
                status = "OOM" if is_out_of_memory(exc) else "error"
                message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                row = {**base, "status": status, "error": f"{type(exc).__name__}: {message}"}
                if status == "error" and os.environ.get("GPTBERT_DEBUG"):
                    traceback.print_exc()
                del exc
            row["seconds"] = round(time.time() - started, 2)
        free_cuda()
        results.add(row)
        if show is not None:
            show(row)
    return results.rows


# ----------------------------------------------------------------------------- configs and data


def row_config(spec: RowSpec, batch_tokens: int, steps: int, device: str, micro: int | str = "auto",
               extra: tuple[str, ...] = ()) -> PipelineConfig:
    """The preset with a fixed sequence length and global batch (``steps`` steps, no validation),
    plus the ``extra`` overrides."""
    global_tokens = max(spec.seq, batch_tokens // spec.seq * spec.seq)
    overrides = [f"train.steps={steps}", "train.seq_len_schedule=false", f"train.seq_len={spec.seq}",
                 f"train.batch_tokens_start={global_tokens}", f"train.batch_tokens_end={global_tokens}",
                 "train.valid_examples=0", "train.validate_every=0", "train.checkpoint_every=0",
                 f"train.device={device}", f"train.micro_batch_tokens={micro}", "train.word_milestones=none"]
    if spec.variant.startswith("flex"):
        overrides += ["model.attention_impl=flex", "model.attention_dropout=0.0"]  # flex has no attention dropout
    return load_config(spec.preset, overrides=overrides + list(extra))


_DOCS: dict[int, list[np.ndarray]] = {}


def random_documents(vocab_size: int, tokens: int = 3_000_000) -> list[np.ndarray]:
    """Documents of random non-special tokens (20-2,000 long): throughput does not depend on text."""
    if vocab_size not in _DOCS:
        rng = np.random.default_rng(0)
        docs, total = [], 0
        while total < tokens:
            docs.append(rng.integers(16, vocab_size, size=int(rng.integers(20, 2000))))
            total += len(docs[-1])
        _DOCS[vocab_size] = docs
    return _DOCS[vocab_size]


def micro_batch(cfg: PipelineConfig, device: torch.device, given: int | None) -> tuple[int, dict]:
    """The row's micro-batch in tokens and how it was chosen: ``given``, the CUDA probe of
    ``gptbert.device`` (``auto``), or the CPU default."""
    if given:
        return given, {"micro_batch_source": "given"}
    if device.type != "cuda":
        return cpu_micro_batch_tokens(cfg.train.max_seq_len), {"micro_batch_source": "cpu default"}
    fit = fit_micro_batch_tokens(cfg.train, cfg.model, device)
    return fit.tokens, {"micro_batch_source": "auto", "probe_peak_gib": (fit.peak_bytes or 0) / GIB,
                        "probes": len(fit.probes)}


# ----------------------------------------------------------------------------- the plain loop


def plain_row(spec: RowSpec, device: torch.device, batch_tokens: int, steps: int, warmup: int = 1,
              given_micro: int | None = None, peak: float | None = None, micro_cache: dict | None = None) -> dict:
    """Train ``warmup + steps`` global batches with ``Trainer.train_step`` on ``device`` (bf16 autocast
    where the hardware has it); tokens/s is the median over the ``steps`` after the warm-up."""
    from gptbert.data import ListDocumentSource
    from gptbert.kernels import build_model
    from gptbert.optim import build_optimizer
    from gptbert.trainer import LocalBackend, Trainer

    cfg = row_config(spec, batch_tokens, warmup + steps, str(device))
    key = (spec.preset, spec.seq, spec.variant.split(" ")[0])
    if micro_cache is not None and key in micro_cache and not given_micro:
        micro, how = micro_cache[key]
    else:
        micro, how = micro_batch(cfg, device, given_micro)
        if micro_cache is not None:
            micro_cache[key] = (micro, how)
    tc = replace(cfg.train, micro_batch_tokens=micro)
    torch.manual_seed(tc.seed)
    # As training builds it: the kernels, and for "compile" train.compile's compiled forward.
    model = module = build_model(cfg.model, device, compile="compile" in spec.variant)
    optimizer = build_optimizer(model, tc)
    trainer = Trainer(cfg.model, tc, ListDocumentSource(random_documents(cfg.model.vocab_size)),
                      LocalBackend(module, optimizer, tc.grad_clip))
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        history = [trainer.train_step() for _ in range(warmup + steps)]
        timed = history[warmup:] or history
        tps = statistics.median(m["tokens_per_s"] for m in timed)
        last = timed[-1]
        return {**how, "global_batch_tokens": tc.batch_tokens_start, "micro_batch_tokens": micro,
                "micro_batches": last["micro_batches"], "tokens_per_s": tps,
                "mfu": row_mfu(cfg.model, tc.causal_fraction, last, tps, peak),
                "peak_mem_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
                "first_step_s": history[0]["step_time_s"], "timed_steps": len(timed),
                "precision": str(trainer.autocast_dtype).replace("torch.", "") if trainer.autocast_dtype else "fp32",
                "loss": last["loss"]}
    finally:
        trainer._drop_prefetch()
        del trainer, module, optimizer, model
        if "compile" in spec.variant:
            torch._dynamo.reset()  # compiled graphs keep their own references


# ----------------------------------------------------------------------------- Ray + DeepSpeed


class StepLog:
    """The rank-0 worker's per-step metrics, with the worker's CUDA peak, as JSON lines (picklable:
    Ray ships it by value with this script)."""

    def __init__(self, path: str | Path):
        self.path = str(Path(path).resolve())

    def __call__(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            row["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def ray_row(spec: RowSpec, device: torch.device, batch_tokens: int, steps: int, root: Path, micro: int,
            warmup: int = 1, peak: float | None = None, how: dict | None = None) -> dict:
    """The same training through ``run_pretraining`` with ``launch.backend=ray``: one Ray Train
    worker on the device, DeepSpeed at the row's ZeRO stage. tokens/s is the worker's median over
    the steps after the warm-up; the wall time includes Ray's and DeepSpeed's start-up and the final
    checkpoint."""
    from gptbert.data import save_token_file
    from gptbert.distributed import run_pretraining

    stage = int(spec.kind.rsplit("zero", 1)[1])
    launch = ["launch.backend=ray", "launch.num_workers=1", f"launch.zero_stage={stage}",
              f"launch.run_name=bench-{spec.preset}-{spec.seq}-zero{stage}"]
    if "use_gpu" in {f.name for f in dataclasses.fields(LaunchConfig)}:  # before train.device decided it
        launch.append(f"launch.use_gpu={'true' if device.type == 'cuda' else 'false'}")
    cfg = row_config(spec, batch_tokens, warmup + steps, str(device), micro, tuple(launch))
    data = root / f"tokens-{cfg.model.vocab_size}.npz"
    if not data.exists():
        save_token_file(data, random_documents(cfg.model.vocab_size))
    # The worker unpickles StepLog from this module: put benchmarks/ on the path of the processes Ray
    # starts (they inherit this environment).
    here = str(Path(__file__).resolve().parent)
    if here not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    log = root / f"{spec.kind}-{spec.preset}-{spec.seq}.jsonl"
    log.unlink(missing_ok=True)
    t0 = time.time()
    run_pretraining(cfg, data, root / f"run-{spec.kind}-{spec.preset}-{spec.seq}", callback=StepLog(log))
    wall = time.time() - t0
    history = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    timed = [m for m in history if m["step"] > warmup] or history
    tps = statistics.median(m["tokens_per_s"] for m in timed)
    peaks = [m["peak_mem_bytes"] for m in history if m.get("peak_mem_bytes") is not None]
    return {**(how or {"micro_batch_source": "given"}), "global_batch_tokens": cfg.train.batch_tokens_start, "micro_batch_tokens": micro,
            "micro_batches": timed[-1]["micro_batches"], "tokens_per_s": tps,
            "mfu": row_mfu(cfg.model, cfg.train.causal_fraction, timed[-1], tps, peak),
            "peak_mem_gib": max(peaks) / GIB if peaks else None, "first_step_s": history[0]["step_time_s"],
            "timed_steps": len(timed), "wall_s_with_startup": wall, "loss": timed[-1]["loss"]}


def format_row(row: dict) -> str:
    """One line of the printed table."""
    def num(key, fmt, scale=1.0):
        v = row.get(key)
        return format(v * scale, fmt) if isinstance(v, (int, float)) else "-"

    status = row["status"] if row["status"] != "ok" else ""
    if row.get("error") and row["status"] != "ok":
        status += f" ({row['error'][:90]})"
    micro = f"{row['micro_batch_tokens']:,}x{row['micro_batches']}" if row.get("micro_batch_tokens") else "-"
    return (f"{row['kind']:<10} {row['preset']:<6} {row['seq']:>4} {row['variant']:<14} {micro:>14} "
            f"{num('tokens_per_s', ',.0f'):>11} {num('mfu', '.1%'):>6} {num('peak_mem_gib', '.1f'):>8} "
            f"{num('first_step_s', '.1f'):>8} {status}")


TABLE_HEADER = (f"{'kind':<10} {'preset':<6} {'seq':>4} {'variant':<14} {'micro x count':>14} {'tokens/s':>11} "
                f"{'MFU':>6} {'peak GiB':>8} {'1st s':>8} status")
