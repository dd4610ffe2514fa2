"""Training throughput of the GPT-BERT model on CPU: reference vs fused attention path.

One training step = forward + LM head on the target positions + cross-entropy + backward + AdamW
step, at batch 8 x seq 128 in masked mode (25% of positions have a target).

Timing runs all variants of a preset in one process and interleaves their steps, so load from other
processes on a shared machine hits every variant alike; compare the ratio column, not absolute
numbers across runs. Peak memory is measured per variant in a fresh subprocess (peak RSS from
/proc/self/status VmHWM, minus the RSS after the model and optimiser were built).

    python benchmarks/model_throughput.py                      # tiny and small, 2 threads
    python benchmarks/model_throughput.py --presets small --steps 6 --no-memory

torch.compile is not offered: on this CPU an inductor-compiled FFN sublayer ran about 2x slower than
eager (forward + backward) after a 60 s compile.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import ModelConfig, preset  # noqa: E402
from gptbert.flops import flops_per_token  # noqa: E402
from gptbert.model import GPTBERT, build_blocked_mask  # noqa: E402

VARIANTS = {
    "reference": dict(attention_impl="reference"),
    "fused": dict(attention_impl="fused"),
}


def make_batch(cfg: ModelConfig, batch: int, seq: int, target_fraction: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(16, cfg.vocab_size, (batch, seq), generator=g)
    # Two packed documents per row, the second ending in a little padding: the realistic mask.
    seg = torch.ones(batch, seq, dtype=torch.long)
    seg[:, seq // 2:] = 2
    seg[:, seq - seq // 16:] = 0
    blocked = build_blocked_mask(seg, torch.zeros(batch, dtype=torch.bool))
    targets = (torch.rand(batch, seq, generator=g) < target_fraction) & (seg != 0)
    return ids, blocked, targets


class Runner:
    def __init__(self, cfg: ModelConfig, batch):
        torch.manual_seed(0)
        self.model = GPTBERT(cfg).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, foreach=True)
        self.ids, self.blocked, self.targets = batch

    def step(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        hidden = self.model(self.ids, self.blocked)
        logits = self.model.lm_logits(hidden[self.targets])
        loss = torch.nn.functional.cross_entropy(logits, self.ids[self.targets])
        loss.backward()
        t1 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return t1 - t0, time.perf_counter() - t0


def config_for(preset_name: str, variant: str) -> ModelConfig:
    base = preset(preset_name).model
    return ModelConfig(**{**base.__dict__, **VARIANTS[variant]})


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    # VmHWM belongs to this process image; getrusage's ru_maxrss would carry over the parent's
    # peak across fork + exec.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_probe(args) -> None:
    """Subprocess mode: build one variant, run two steps, print the peak RSS increase as JSON."""
    torch.set_num_threads(args.threads)
    cfg = config_for(args.presets[0], args.variant)
    runner = Runner(cfg, make_batch(cfg, args.batch, args.seq, args.target_fraction))
    before = rss_mb()
    for _ in range(2):
        runner.step()
    peak = peak_rss_mb()
    print(json.dumps({"peak_rss_mb": peak, "increase_mb": peak - before}))


def measure_memory(args, preset_name: str, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--memory-probe", "--variant", variant, "--presets", preset_name,
           "--threads", str(args.threads), "--batch", str(args.batch), "--seq", str(args.seq),
           "--target-fraction", str(args.target_fraction)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--target-fraction", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 1 warm-up step)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fused", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_probe:
        memory_probe(args)
        return

    torch.set_num_threads(args.threads)
    variants = list(VARIANTS)
    tokens = args.batch * args.seq
    print(f"# {args.batch} x {args.seq} tokens per step, {args.target_fraction:.0%} targets, "
          f"{args.threads} threads, torch {torch.__version__}, {args.steps} timed steps (median)")
    header = (f"{'preset':<7} {'variant':<15} {'step s':>8} {'fwd+bwd s':>10} {'tokens/s':>9} "
              f"{'vs reference':>12} {'GFLOP/s':>8} {'peak RSS MB':>12} {'+MB in step':>11}")
    print(header)
    print("-" * len(header))
    for name in args.presets:
        runners = {}
        for v in variants:
            cfg = config_for(name, v)
            runners[v] = Runner(cfg, make_batch(cfg, args.batch, args.seq, args.target_fraction))
        for _ in range(1):  # warm-up
            for r in runners.values():
                r.step()
        times = {v: [] for v in variants}
        for _ in range(args.steps):
            for v, r in runners.items():
                times[v].append(r.step())
        flops = flops_per_token(config_for(name, "fused"), args.seq, args.target_fraction, True, args.batch)
        base = statistics.median(t for _, t in times["reference"])
        for v in variants:
            step = statistics.median(t for _, t in times[v])
            fb = statistics.median(t for t, _ in times[v])
            mem = {"peak_rss_mb": float("nan"), "increase_mb": float("nan")}
            if not args.no_memory:
                del runners[v]
                mem = measure_memory(args, name, v)
            print(f"{name:<7} {v:<15} {step:>8.3f} {fb:>10.3f} {tokens / step:>9.0f} {base / step:>11.2f}x "
                  f"{flops * tokens / step / 1e9:>8.1f} {mem['peak_rss_mb']:>12.0f} {mem['increase_mb']:>11.0f}")
        runners.clear()


if __name__ == "__main__":
    main()
