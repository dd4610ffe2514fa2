"""Training throughput of the GPT-BERT model: our paths against the paper's own model code.

One training step = forward + LM head on the target positions + cross-entropy + backward + AdamW
step, at batch 8 x seq 128 in masked mode (25% of positions have a target), 2 threads.

Variants, all built from the same ModelConfig and fed the same batch:

* ``fused``: our model (``attention_impl: fused``), the training path;
* ``reference-attn``: our model with the explicit attention that mirrors the paper's;
* ``plain``: our model without ``gptbert.kernels`` (``model.kernels: false``), what the kernels buy;
* ``paper``: the paper's ``pretraining/model_extra.py`` imported from a local snapshot of
  github.com/ltgoslo/gpt-bert (``--against-reference PATH``, the repository folder or the file), so
  the ratio to the paper's code is measured in this run, not quoted.

Each precision runs every variant: ``fp32``, and ``bf16`` (CPU autocast: fp32 weights, bf16
matmuls; the paper's own mixed-precision mode) where the processor runs bf16 natively. The matmul
peak of the same precision is measured in the same run (a 2048^3 GEMM, sampled between the timing
rounds: on a shared host the GEMM rate drifts), so MFU is "model FLOPs (gptbert.flops, ~176
MFLOP/token for small at 128) per second / the median of those peak samples".

Timing interleaves the variants' steps, so load from other processes hits all alike; compare the
ratio columns, not absolute numbers across runs. Peak memory is measured per variant in a fresh
subprocess (VmHWM minus the RSS after the model and optimiser were built).

    python benchmarks/model_throughput.py --presets small --against-reference ../gpt-bert
    python benchmarks/model_throughput.py --presets small --seqs 128 256 512 --no-memory
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import ModelConfig, preset  # noqa: E402
from gptbert.flops import flops_per_token  # noqa: E402
from gptbert.kernels import build_model  # noqa: E402
from gptbert.model import build_blocked_mask  # noqa: E402
from gptbert.optim import cpu_supports_bf16  # noqa: E402

# variant -> (attention_impl, kernels): "plain" is the model without gptbert.kernels.
OURS = {"fused": ("fused", True), "reference-attn": ("reference", True), "plain": ("fused", False)}


def make_batch(cfg: ModelConfig, batch: int, seq: int, target_fraction: float, seed: int = 0):
    """Token ids, the (B, T, T) blocked mask and the target positions of one masked-mode batch."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(16, cfg.vocab_size, (batch, seq), generator=g)
    # Two packed documents per row, the second ending in a little padding: the realistic mask.
    seg = torch.ones(batch, seq, dtype=torch.long)
    seg[:, seq // 2:] = 2
    seg[:, seq - seq // 16:] = 0
    blocked = build_blocked_mask(seg, torch.zeros(batch, dtype=torch.bool))
    targets = (torch.rand(batch, seq, generator=g) < target_fraction) & (seg != 0)
    return ids, blocked, targets


def load_paper_module(path: str):
    """Import ``model_extra.py`` from a snapshot of the paper's repository (or the file itself)."""
    p = Path(path)
    file = p if p.is_file() else p / "pretraining" / "model_extra.py"
    if not file.is_file():
        raise SystemExit(f"--against-reference: {path}: expected the gpt-bert repository folder "
                         "(with pretraining/model_extra.py) or that file")
    spec = importlib.util.spec_from_file_location("paper_model_extra", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paper_config(cfg: ModelConfig) -> types.SimpleNamespace:
    """Our ModelConfig in the field names of the paper's configs/*.json."""
    return types.SimpleNamespace(
        attention_probs_dropout_prob=cfg.attention_dropout, hidden_dropout_prob=cfg.hidden_dropout,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, position_bucket_size=cfg.position_buckets,
        num_attention_heads=cfg.num_heads, num_hidden_layers=cfg.num_layers, vocab_size=cfg.vocab_size,
        layer_norm_eps=cfg.layer_norm_eps)


class Runner:
    """One variant's model, AdamW optimiser and batch; ``step`` times one training step."""

    def __init__(self, variant: str, cfg: ModelConfig, batch, precision: str, paper=None,
                 adamw: str = "foreach"):
        torch.manual_seed(0)
        self.variant, self.precision = variant, precision
        self.ids, self.blocked, self.targets = batch
        if variant == "paper":
            self.model = paper.Bert(paper_config(cfg)).train()
            # The paper's layout: (T, B) ids and labels, -100 where there is no target.
            self.ids_t = self.ids.t().contiguous()
            self.labels_t = torch.where(self.targets, self.ids, -100).t().contiguous()
        else:
            impl, kernels = OURS[variant]
            self.model = build_model(ModelConfig(**{**cfg.__dict__, "attention_impl": impl, "kernels": kernels})).train()
        # The same optimiser for every variant: "foreach" (the multi-tensor kernels) or "fused"
        # (one kernel per parameter group, on devices torch has it for).
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, **{adamw: True})

    def _loss(self) -> torch.Tensor:
        if self.variant == "paper":
            loss, _, _, _ = self.model(self.ids_t, self.blocked, self.labels_t)
            return loss
        hidden = self.model(self.ids, self.blocked)
        return F.cross_entropy(self.model.lm_logits(hidden[self.targets]), self.ids[self.targets])

    def step(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16" else contextlib.nullcontext()
        with ctx:
            loss = self._loss()
        loss.backward()
        t1 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return t1 - t0, time.perf_counter() - t0


class PeakSampler:
    """The matmul peak (an n x n x n GEMM on operands already in this precision; autocast's
    per-call casts are model overhead, not peak), sampled between timing rounds so MFU divides by
    the peak of the same minutes as the steps: on a shared host the GEMM rate drifts by 2x or
    more between minutes, and a peak measured once at start-up would skew MFU by as much."""

    def __init__(self, precision: str, n: int = 2048, seconds: float = 0.1):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.a, self.b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        self.flops, self.seconds, self.samples = 2 * n ** 3, seconds, []
        self.a @ self.b

    def sample(self) -> None:
        done, t0 = 0, time.perf_counter()
        while done == 0 or time.perf_counter() - t0 < self.seconds:
            self.a @ self.b
            done += 1
        self.samples.append(done * self.flops / (time.perf_counter() - t0))

    def median(self) -> float:
        return statistics.median(self.samples)


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


def build(args, name: str, variant: str, seq: int, precision: str, paper) -> Runner:
    cfg = preset(name).model
    return Runner(variant, cfg, make_batch(cfg, args.batch, seq, args.target_fraction), precision, paper,
                  args.adamw)


def memory_probe(args) -> None:
    """Subprocess mode: build one variant, run two steps, print the peak RSS increase as JSON."""
    torch.set_num_threads(args.threads)
    paper = load_paper_module(args.against_reference) if args.variant == "paper" else None
    runner = build(args, args.presets[0], args.variant, args.seqs[0], args.precisions[0], paper)
    before = rss_mb()
    for _ in range(2):
        runner.step()
    peak = peak_rss_mb()
    print(json.dumps({"peak_rss_mb": peak, "increase_mb": peak - before}))


def measure_memory(args, name: str, variant: str, seq: int, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--memory-probe", "--variant", variant, "--presets", name,
           "--threads", str(args.threads), "--batch", str(args.batch), "--seqs", str(seq),
           "--precisions", precision, "--target-fraction", str(args.target_fraction), "--adamw", args.adamw]
    if args.against_reference:
        cmd += ["--against-reference", args.against_reference]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def default_precisions() -> list[str]:
    return ["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["small"])
    p.add_argument("--against-reference", metavar="PATH",
                   help="snapshot of github.com/ltgoslo/gpt-bert (or its pretraining/model_extra.py)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=None,
                   help="default: fp32, plus bf16 where the CPU runs it natively")
    p.add_argument("--seqs", nargs="+", type=int, default=[128], help="sequence lengths (one table row each)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--target-fraction", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 1 warm-up step)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--adamw", choices=["foreach", "fused"], default="foreach",
                   help="torch AdamW implementation, the same for every variant (default: foreach)")
    p.add_argument("--variants", nargs="+", choices=list(OURS), default=["fused", "reference-attn"],
                   help="our variants to time (the paper's code is added with --against-reference)")
    p.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fused", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.precisions = args.precisions or default_precisions()
    if args.memory_probe:
        memory_probe(args)
        return

    torch.set_num_threads(args.threads)
    paper = load_paper_module(args.against_reference) if args.against_reference else None
    variants = (["paper"] if paper else []) + args.variants
    baseline = "paper" if paper else args.variants[-1]
    print(f"# batch {args.batch}, {args.target_fraction:.0%} targets, {args.threads} threads, torch "
          f"{torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.steps} timed steps (median), AdamW {args.adamw}; MFU divides by the column 'peak' "
          f"(a 2048^3 GEMM's GFLOP/s, sampled between the timed rounds)")
    header = (f"{'preset':<7} {'seq':>4} {'prec':<5} {'variant':<15} {'step s':>7} {'tokens/s':>9} "
              f"{'vs ' + baseline:>18} {'GFLOP/s':>8} {'MFU':>6} {'peak':>8} {'peak RSS MB':>12} "
              f"{'+MB in step':>11}")
    print(header)
    print("-" * len(header))
    for name in args.presets:
        cfg = preset(name).model
        for seq in args.seqs:
            for prec in args.precisions:
                runners = {v: build(args, name, v, seq, prec, paper) for v in variants}
                for r in runners.values():  # warm-up
                    r.step()
                times = {v: [] for v in variants}
                sampler = PeakSampler(prec)
                for _ in range(args.steps):
                    for v, r in runners.items():
                        times[v].append(r.step()[1])
                    sampler.sample()
                runners.clear()
                peak = sampler.median()
                tokens = args.batch * seq
                flops = flops_per_token(cfg, seq, args.target_fraction, True, args.batch) * tokens
                base = statistics.median(times[baseline])
                for v in variants:
                    step = statistics.median(times[v])
                    mem = {"peak_rss_mb": float("nan"), "increase_mb": float("nan")}
                    if not args.no_memory:
                        mem = measure_memory(args, name, v, seq, prec)
                    print(f"{name:<7} {seq:>4} {prec:<5} {v:<15} {step:>7.3f} {tokens / step:>9,.0f} "
                          f"{base / step:>17.2f}x {flops / step / 1e9:>8.1f} {flops / step / peak:>6.1%} "
                          f"{peak / 1e9:>8,.0f} {mem['peak_rss_mb']:>12.0f} {mem['increase_mb']:>11.0f}",
                          flush=True)


if __name__ == "__main__":
    main()
