"""TrainConfig: objective, masking, optimisation and loop settings (recipe §2, §3, §5).

Defaults are the faithful values of the `small` run where docs/recipe.md fixes them; the presets override
steps, lr and the batch numbers. Batch sizes are given in *tokens* per global batch so that the
sequence-length schedule (128 -> 256 -> 512) keeps tokens per step constant by halving/quartering
the number of sequences, and so that the number of processes never changes the objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from .base import ConfigBase, check, check_device


@dataclass
class TrainConfig(ConfigBase):
    """Configures the pretrain stage (recipe §2, §3, §5): the objective mix, sequence and batch schedules,
    masking, optimiser and loop."""

    steps: int = 7812
    lr: float = 1.41e-2
    seed: int = 0

    # --- hybrid objective (recipe §2) ---
    # Fraction of examples in every global batch that are causal; 1/16 is the paper's 1:15 mix.
    # 0.0 = masked-only baseline, 1.0 = causal-only baseline.
    causal_fraction: float = 0.0625
    z_loss: float = 1e-4

    # --- sequences and masking (recipe §3) ---
    # Maximum sequence length (the last stage of the schedule, or the only one without it).
    seq_len: int = 512
    # seq_len_stages[i] is used from step fraction seq_len_boundaries[i-1] on (first from step 0).
    seq_len_schedule: bool = True
    seq_len_stages: list[int] = field(default_factory=lambda: [128, 256, 512])
    seq_len_boundaries: list[float] = field(default_factory=lambda: [0.7, 0.9])
    # Global batch in tokens (padding slots included) at step 0 and at the last step; linear ramp.
    # Equal values give a constant batch. Recipe §3: about 1M -> about 4.2M tokens.
    batch_tokens_start: int = 1_048_576
    batch_tokens_end: int = 4_194_304
    # At most this many tokens go through one forward/backward (gradient accumulation beyond it).
    # "auto": on CUDA the largest micro-batch that fits the device, measured once at start-up by a
    # short probe (gptbert.device.resolve_micro_batch_tokens); 8192 on a CPU. Not part of a run's
    # identity: the loss is normalised over the whole global batch, so the split changes no maths.
    micro_batch_tokens: Union[int, Literal["auto"]] = "auto"
    mask_rate_start: float = 0.30
    mask_rate_end: float = 0.15
    # Per masked span: replaced by <mask> / by a random non-special token / left unchanged.
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    max_span_length: int = 3

    # --- optimisation (recipe §5) ---
    optimizer: Literal["lamb", "adamw"] = "lamb"
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_fraction: float = 0.016
    cooldown_fraction: float = 0.016
    min_lr_ratio: float = 0.1
    grad_clip: float = 2.0
    ema_decay: float = 0.999
    # "auto": bf16 autocast on CUDA with bf16, or a CPU with AVX-512-BF16/AMX; fp32 elsewhere.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Where pretraining computes, on every launcher: auto (CUDA when present) | cpu | cuda | cuda:N.
    device: str = "auto"
    # torch.compile the model's forward (worth it on GPUs; eager with a warning where it fails).
    compile: bool = False

    # --- loop ---
    # Build the next step's examples in a background thread while this step trains.
    prefetch: bool = True
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 500
    # Validation examples (one segment each, no packing, fixed 15% mask rate).
    valid_examples: int = 256
    valid_mask_rate: float = 0.15
    # Save the (EMA) model each time the words seen pass a milestone, as milestones/chck_{N}M/:
    # "babylm" = 1M..10M by 1M, then by 10M to 100M, then by 100M to 1B (the BabyLM checkpoints);
    # or a list of milestones in millions of words; "none" = no milestone models.
    word_milestones: Union[Literal["none", "babylm"], list[float]] = "none"

    # Loop settings that may change between a run and its resumption (not part of its identity).
    RUNTIME_FIELDS = ("checkpoint_every", "keep_checkpoints", "validate_every", "device", "precision",
                      "prefetch", "compile", "micro_batch_tokens")

    def seq_len_at(self, step: int) -> int:
        """Sequence length used at ``step`` (pure function of the step)."""
        if not self.seq_len_schedule:
            return self.seq_len
        frac = step / max(self.steps, 1)
        length = self.seq_len_stages[0]
        for boundary, stage in zip(self.seq_len_boundaries, self.seq_len_stages[1:]):
            if frac >= boundary:
                length = stage
        return length

    def batch_tokens_at(self, step: int) -> int:
        """Global batch tokens at ``step``: batch_tokens_start to batch_tokens_end, linearly (recipe §3)."""
        frac = step / max(self.steps - 1, 1)
        return int(round(self.batch_tokens_start + (self.batch_tokens_end - self.batch_tokens_start) * frac))

    def batch_size_at(self, step: int) -> int:
        """Global batch in sequences at ``step``: tokens / seq_len, at least 1."""
        return max(1, int(round(self.batch_tokens_at(step) / self.seq_len_at(step))))

    def mask_rate_at(self, step: int) -> float:
        """Mask rate at ``step``: linear from mask_rate_start to mask_rate_end (recipe §3)."""
        frac = min(step / max(self.steps - 1, 1), 1.0)
        return self.mask_rate_start + (self.mask_rate_end - self.mask_rate_start) * frac

    def milestone_words(self) -> list[int]:
        """The word milestones (in words, increasing) that ``word_milestones`` asks for."""
        if self.word_milestones == "none":
            return []
        if self.word_milestones == "babylm":
            millions = list(range(1, 11)) + list(range(20, 101, 10)) + list(range(200, 1001, 100))
        else:
            millions = list(self.word_milestones)
        return sorted({int(round(m * 1e6)) for m in millions})

    @property
    def max_seq_len(self) -> int:
        """The longest sequence length of the run (the last stage of the schedule, or seq_len)."""
        return max(self.seq_len_stages) if self.seq_len_schedule else self.seq_len

    def validate(self) -> None:
        """Reject invalid values with a ConfigError naming the field."""
        check(self.steps > 0, "steps", "must be positive")
        check_device(self.device, "device")
        check(self.lr > 0, "lr", "must be positive")
        check(0.0 <= self.causal_fraction <= 1.0, "causal_fraction", "must be in [0, 1]")
        check(self.z_loss >= 0, "z_loss", "must be >= 0")
        check(self.seq_len >= 4, "seq_len", "must be at least 4")
        if self.seq_len_schedule:
            check(len(self.seq_len_stages) >= 1, "seq_len_stages", "needs at least one length")
            check(all(s >= 4 for s in self.seq_len_stages), "seq_len_stages", "lengths must be >= 4")
            check(len(self.seq_len_boundaries) == len(self.seq_len_stages) - 1, "seq_len_boundaries",
                  f"needs {len(self.seq_len_stages) - 1} fractions (one fewer than seq_len_stages)")
            check(all(0.0 < b < 1.0 for b in self.seq_len_boundaries)
                  and list(self.seq_len_boundaries) == sorted(self.seq_len_boundaries),
                  "seq_len_boundaries", "must be increasing fractions in (0, 1)")
            check(max(self.seq_len_stages) == self.seq_len, "seq_len",
                  f"must equal the largest of seq_len_stages ({max(self.seq_len_stages)})")
        check(self.batch_tokens_start > 0 and self.batch_tokens_end > 0, "batch_tokens_start",
              "batch sizes must be positive")
        check(self.micro_batch_tokens == "auto" or self.micro_batch_tokens >= self.seq_len, "micro_batch_tokens",
              f"must be auto or hold at least one sequence of seq_len ({self.seq_len})")
        for name in ("mask_rate_start", "mask_rate_end", "valid_mask_rate"):
            check(0.0 < getattr(self, name) < 1.0, name, "must be in (0, 1)")
        check(0.0 <= self.mask_token_prob and 0.0 <= self.random_token_prob
              and self.mask_token_prob + self.random_token_prob <= 1.0, "mask_token_prob",
              "mask_token_prob + random_token_prob must be a probability split (<= 1)")
        check(self.max_span_length >= 1, "max_span_length", "must be >= 1")
        check(0.0 <= self.beta1 < 1.0, "beta1", "must be in [0, 1)")
        check(0.0 <= self.beta2 < 1.0, "beta2", "must be in [0, 1)")
        check(self.eps > 0, "eps", "must be positive")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0.0 <= self.warmup_fraction < 1.0, "warmup_fraction", "must be in [0, 1)")
        check(0.0 <= self.cooldown_fraction < 1.0, "cooldown_fraction", "must be in [0, 1)")
        check(self.warmup_fraction + self.cooldown_fraction < 1.0, "cooldown_fraction",
              "warmup_fraction + cooldown_fraction must be < 1")
        check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        check(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0 = only at the end)")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        check(self.validate_every >= 0, "validate_every", "must be >= 0 (0 = only at the end)")
        check(self.valid_examples >= 0, "valid_examples", "must be >= 0")
        if isinstance(self.word_milestones, list):
            check(all(m > 0 for m in self.word_milestones), "word_milestones",
                  "milestones are positive numbers of millions of words")
            check(all(round(m * 1e6) % 1000 == 0 for m in self.word_milestones), "word_milestones",
                  "milestones are millions of words with at most three decimals (0.001 = 1000 words)")
