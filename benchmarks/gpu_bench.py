"""The one-command GPU benchmark behind ``benchmarks/gpu.sh`` (three modes).

* default: training throughput of ``small`` and ``base`` at sequence 128 and 512, bf16 autocast
  with fp32 master weights, our LAMB optimiser, for a fixed number of steps per variant: the fused
  attention path (the paper's dropout), flex attention (block mask + score_mod, attention dropout
  0), and flex with the whole model under ``torch.compile`` (``base`` at 512 only, where it pays
  most). Prints tokens/s, MFU (``gptbert.flops`` model FLOPs over the device's bf16 peak), peak
  memory and compile/first-step time.
* ``--quality``: the data stages on ``--data`` (default ../shared/data/babylm-sample), then
  ``small`` pretrained for as many steps as fit ``--budget-minutes`` (up to 10 epochs, the BabyLM
  limit), then BLiMP (``--blimp``) in the three scoring modes; one table.
* ``--sweep``: the ratio sweep (``gptbert sweep``: the Prefect flow with its MLflow runs) of
  ``small``-class trials, each sized so the whole grid fits ``--budget-minutes`` of GPU time.

Without a CUDA device, each mode says so and runs the same code path with a tiny budget on the CPU
(the ``tiny`` preset, a few steps), so the script is tested where no GPU is; exit status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common.config import ModelConfig, load_config, preset  # noqa: E402
from gptbert.flops import flops_per_token  # noqa: E402
from gptbert.metrics import device_peak_flops  # noqa: E402
from gptbert.model import GPTBERT  # noqa: E402
from model_throughput import make_batch  # noqa: E402  (the same masked-mode batch as the CPU benchmark)
from gptbert.optim import build_optimizer  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
# The quality run's global batch: the recipe's 1M -> 4M tokens would leave ~50 steps for 10 epochs
# of an 8M-word corpus, so it is scaled down (same ramp shape); the report says so.
QUALITY_BATCH = (131_072, 262_144)
TARGET_FRACTION = 0.25


# ----------------------------------------------------------------------------- throughput


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variant(name: str, seq: int, impl: str, compiled: bool, steps: int, batch_tokens: int,
                 device: torch.device) -> dict:
    """Build one variant, time its first step (compile included) and ``steps`` more."""
    base = preset(name)
    changes = {"attention_impl": impl}
    if impl == "flex":
        changes["attention_dropout"] = 0.0  # flex kernels have no attention-probability dropout
    cfg = ModelConfig(**{**base.model.__dict__, **changes})
    torch.manual_seed(0)
    model = GPTBERT(cfg).to(device).train()
    opt = build_optimizer(model, base.train)
    forward = torch.compile(model) if compiled else model
    batch = make_batch(cfg, max(1, batch_tokens // seq), seq, TARGET_FRACTION)
    ids, blocked, targets = (t.to(device) for t in batch)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            hidden = forward(ids, blocked)
            logits = model.lm_logits(hidden[targets]).float()
            loss = F.cross_entropy(logits, ids[targets]) + 1e-4 * logits.logsumexp(-1).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    per_step = statistics.median(times) if times else first
    tokens = ids.numel()
    flops = flops_per_token(cfg, seq, TARGET_FRACTION, True, ids.size(0)) * tokens
    name_ = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = device_peak_flops(name_, True)
    return {"preset": name, "seq": seq, "variant": impl + (" + compile" if compiled else ""),
            "tokens_per_s": tokens / per_step, "mfu": flops / per_step / peak if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "first_step_s": first, "tokens_per_step": tokens}


def throughput(args, device: torch.device) -> list[dict]:
    if device.type == "cuda":
        plan = [(p, s, impl, False) for p in ("small", "base") for s in (128, 512) for impl in ("fused", "flex")]
        plan.append(("base", 512, "flex", True))
        steps, batch_tokens = args.steps, args.batch_tokens
    else:
        plan, steps, batch_tokens = [("tiny", 64, "fused", False)], 0, 256
    rows = []
    print(f"{'preset':<6} {'seq':>4} {'variant':<16} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'1st step s':>10}")
    for name, seq, impl, compiled in plan:
        r = time_variant(name, seq, impl, compiled, steps, batch_tokens, device)
        rows.append(r)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{name:<6} {seq:>4} {r['variant']:<16} {r['tokens_per_s']:>10,.0f} {mfu:>6} {mem:>9} "
              f"{r['first_step_s']:>10.1f}", flush=True)
    return rows


# ----------------------------------------------------------------------------- quality


def probe_tokens_per_s(name: str, device: torch.device, batch_tokens: int) -> float:
    """Steady training speed of ``name`` at its first sequence length (3 timed steps)."""
    seq = preset(name).train.seq_len_at(0)
    return time_variant(name, seq, "fused", False, 3, batch_tokens, device)["tokens_per_s"]


def data_stages(cfg):
    """clean -> tokenizer -> shards through the pipeline's cached stage functions (no Prefect)."""
    from flows.stages import clean, shard, train_tokenizer

    corpus = clean(cfg)
    tok = train_tokenizer(cfg, corpus)
    return shard(cfg, corpus, tok), tok


def quality(args, device: torch.device) -> dict:
    from flows.stages import evaluate, pretrain
    from gptbert.data import open_data

    gpu = device.type == "cuda"
    name = args.preset or ("small" if gpu else "tiny")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gptbert-quality-"))
    batch = QUALITY_BATCH if gpu else (512, 1024)
    common = [f"clean.inputs=[{json.dumps(str(Path(args.data).resolve()))}]", f"workdir={workdir}",
              "launch.backend=local", "train.word_milestones=none",
              f"train.batch_tokens_start={batch[0]}", f"train.batch_tokens_end={batch[1]}",
              "eval.tasks=[blimp]", f"eval.blimp_dir={Path(args.blimp).resolve()}"]
    cfg = load_config(name, overrides=common)
    t_start = time.time()
    shards, tokenizer = data_stages(cfg)
    corpus_tokens = open_data(shards.path).train.num_tokens
    rate = probe_tokens_per_s(name, device, batch[1])
    budget_tokens = min(10 * corpus_tokens, int(args.budget_minutes * 60 * rate * 0.9))
    steps = max(4, int(budget_tokens / (sum(batch) / 2)))
    cfg = load_config(name, overrides=common + [f"train.steps={steps}",
                                                f"train.checkpoint_every={max(steps, 1)}",
                                                f"train.validate_every={max(steps, 1)}"])
    mfu: list[float] = []

    def collect(metrics: dict, step: int) -> None:
        if metrics.get("mfu") is not None:
            mfu.append(metrics["mfu"])

    from gptbert.metrics import MetricsCallback

    callback = MetricsCallback(cfg.model, cfg.train.causal_fraction, 1,
                               torch.cuda.get_device_name(device) if gpu else None, gpu, inner=collect)
    t_train = time.time()
    model = pretrain(cfg, shards, tokenizer, callback=callback)
    train_s = time.time() - t_train
    evaluation = evaluate(cfg, model)
    summary = model.record["stats"]
    stats = evaluation.record.get("stats", {})
    row = {"preset": name, "steps": steps, "tokens": summary["tokens"], "words": summary.get("words"),
           "epochs": summary["tokens"] / corpus_tokens, "train_minutes": train_s / 60,
           "wall_minutes": (time.time() - t_start) / 60, "mfu": statistics.mean(mfu) if mfu else None,
           "precision": summary.get("precision"),
           **{k: v for k, v in stats.items() if k.startswith("blimp.")}}
    print(f"quality run: {name}, {steps} steps, global batch {batch[0]:,} -> {batch[1]:,} tokens, "
          f"run root {workdir}")
    print(f"{'tokens':>12} {'words':>12} {'epochs':>7} {'train min':>9} {'wall min':>8} {'MFU':>6} "
          f"{'causal':>7} {'mntp':>7} {'fused':>7}  (BLiMP, best T)")
    acc = [row.get(f"blimp.{m}.best_accuracy") for m in ("causal", "mntp", "fused")]
    print(f"{row['tokens']:>12,} {row['words'] or 0:>12,} {row['epochs']:>7.2f} {row['train_minutes']:>9.2f} "
          f"{row['wall_minutes']:>8.2f} {(format(row['mfu'], '.1%') if row['mfu'] else '-'):>6} "
          + " ".join(f"{a:>7.1%}" if a is not None else f"{'-':>7}" for a in acc), flush=True)
    return row


# ----------------------------------------------------------------------------- sweep


def sweep(args, device: torch.device) -> int:
    """``gptbert sweep`` with trials sized so the grid fits the budget (6 fractions by default)."""
    gpu = device.type == "cuda"
    name = args.preset or ("small" if gpu else "tiny")
    fractions = args.fractions or [0.0, 0.0625, 0.25, 0.5, 0.9375, 1.0]
    batch = QUALITY_BATCH if gpu else (512, 1024)
    rate = probe_tokens_per_s(name, device, batch[1])
    # Two thirds of each trial's share of the budget for training, the rest for its evaluation.
    per_trial_s = args.budget_minutes * 60 / len(fractions) * 2 / 3
    steps = max(4, int(per_trial_s * rate * 0.9 / (sum(batch) / 2)))
    workdir = args.workdir or tempfile.mkdtemp(prefix="gptbert-sweep-")
    cmd = [sys.executable, "-m", "cli.main", "sweep", "--preset", name, "--corpus", str(Path(args.data).resolve()),
           "--workdir", str(workdir), "--set", f"sweep.fractions={json.dumps(fractions)}",
           "--set", f"train.steps={steps}", "--set", f"train.batch_tokens_start={batch[0]}",
           "--set", f"train.batch_tokens_end={batch[1]}", "--set", "launch.backend=local",
           "--set", "eval.tasks=[blimp]", "--set", f"eval.blimp_dir={Path(args.blimp).resolve()}",
           "--set", "eval.milestones=none", "--set", f"train.checkpoint_every={steps}"]
    print(f"sweep: {name}, {len(fractions)} trials of {steps} steps ({rate:,.0f} tokens/s probed), "
          f"run root {workdir}", flush=True)
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode


# ----------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quality", action="store_true", help="pretrain small on --data, then BLiMP")
    mode.add_argument("--sweep", action="store_true", help="the ratio sweep within --budget-minutes")
    p.add_argument("--steps", type=int, default=10, help="timed steps per throughput variant")
    p.add_argument("--batch-tokens", type=int, default=65_536, help="tokens per throughput step")
    p.add_argument("--data", default=str(SHARED / "babylm-sample"), help="corpus (file or folder)")
    p.add_argument("--blimp", default=str(SHARED / "blimp-dev"), help="BLiMP-format folder")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="GPU time for --quality (default 8) or --sweep (default 10); 0.2 on CPU")
    p.add_argument("--preset", help="model preset (default small on a GPU, tiny on CPU)")
    p.add_argument("--fractions", type=float, nargs="+", help="--sweep: causal fractions (default the paper's 6)")
    p.add_argument("--workdir", help="run root for --quality/--sweep (default a new temporary folder)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}, bf16 autocast", flush=True)
        default_budget = 10.0 if args.sweep else 8.0
    else:
        print("# no CUDA device: running the same code path as a CPU smoke test with a tiny budget "
              "(no GPU numbers)", flush=True)
        default_budget = 0.2
    if args.budget_minutes is None:
        args.budget_minutes = default_budget
    if (args.quality or args.sweep) and not (Path(args.data).exists() and Path(args.blimp).is_dir()):
        print(f"gpu.sh: --data {args.data} and --blimp {args.blimp} must exist", file=sys.stderr)
        return 2
    started = time.time()
    if args.sweep:
        rc = sweep(args, device)
        rows = []
    elif args.quality:
        rows, rc = [quality(args, device)], 0
    else:
        rows, rc = throughput(args, device), 0
    print(f"# done in {(time.time() - started) / 60:.1f} min", flush=True)
    if args.json and rows:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=lambda x: None if x != x else x))
    return rc


if __name__ == "__main__":
    sys.exit(main())
