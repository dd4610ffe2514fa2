"""Throughput of distributed pretraining: plain single-process loop vs Ray Train + DeepSpeed with
1 and 2 workers, same config (tiny preset by default), same machine, one process tree.

    python benchmarks/distributed.py [--preset tiny] [--steps 30] [--zero-stage 1]

Tokens/s is the median of the loop's per-step ``tokens_per_s`` after ``--warmup`` steps (start-up,
first-touch allocation and Ray/DeepSpeed initialisation are excluded; they are reported
separately as wall time). The plain loop uses all cores in one process; N workers use cores/N
threads each (``--threads`` fixes it for all). Ratios are against the plain loop measured in the
same run. tokens/s is global (all workers) per optimizer step. On a machine shared with other
work the numbers swing widely; compare only rows of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import load_config  # noqa: E402
from gptbert.data import save_token_file  # noqa: E402


def corpus(path: Path, vocab: int, docs: int = 2000) -> Path:
    rng = np.random.default_rng(0)
    save_token_file(path, [rng.integers(16, vocab, size=int(rng.integers(20, 400))) for _ in range(docs)],
                    num_words=docs * 150)
    return path


def steady(rows: list[dict], warmup: int) -> float:
    vals = [r["tokens_per_s"] for r in rows if r["step"] > warmup]
    return statistics.median(vals) if vals else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--zero-stage", type=int, default=1)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads per process for every run (0 = cores for the plain loop, cores/N per "
                         "worker); 1 keeps a loaded machine from oversubscribing")
    args = ap.parse_args()

    import ray
    import torch

    from gptbert.distributed import run_pretraining
    from gptbert.metrics import JsonlCallback, read_jsonl

    cores = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="gptbert-bench-dist-"))
    base = [f"train.steps={args.steps}", "train.validate_every=0", "train.valid_examples=0",
            f"train.checkpoint_every={10 * args.steps}", "train.precision=fp32"]
    cfg0 = load_config(args.preset, overrides=base)
    data = corpus(root / "corpus.npz", cfg0.model.vocab_size)
    rows = []

    torch.set_num_threads(args.threads or cores)

    def run_plain(tag: str) -> float:
        # Run before and after the Ray runs: on a shared machine the background load drifts.
        t0 = time.time()
        run_pretraining(cfg0, data, root / f"plain-{tag}", callback=JsonlCallback(root / f"plain-{tag}.jsonl"))
        tps = steady(read_jsonl(root / f"plain-{tag}.jsonl"), args.warmup)
        rows.append((f"plain loop (1 process), {tag}", args.threads or cores, tps, time.time() - t0))
        return tps

    plain = run_plain("first")

    ray.init(num_cpus=cores, include_dashboard=False)
    try:
        for n in [int(x) for x in args.workers.split(",")]:
            cfg = load_config(args.preset, overrides=base + [
                "launch.backend=ray", f"launch.num_workers={n}", f"launch.zero_stage={args.zero_stage}",
                f"launch.threads_per_worker={args.threads or max(1, cores // n)}", f"launch.run_name=bench-{n}"])
            t0 = time.time()
            run_pretraining(cfg, data, root / f"ds{n}", callback=JsonlCallback(root / f"ds{n}.jsonl"))
            wall = time.time() - t0
            rows.append((f"Ray+DeepSpeed ZeRO-{args.zero_stage}, {n} worker(s)", args.threads or max(1, cores // n),
                         steady(read_jsonl(root / f"ds{n}.jsonl"), args.warmup), wall))
    finally:
        ray.shutdown()
    run_plain("last")

    print(f"\npreset={args.preset} steps={args.steps} (median tokens/s over steps > {args.warmup}), "
          f"{cores} cores, torch {torch.__version__}")
    print(f"{'run':<36} {'threads/worker':>14} {'tokens/s':>10} {'vs plain':>9} {'wall s':>8}")
    for name, threads, tps, wall in rows:
        print(f"{name:<36} {threads:>14} {tps:>10.0f} {tps / plain:>9.2f} {wall:>8.1f}")


if __name__ == "__main__":
    main()
