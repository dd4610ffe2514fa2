"""Text generation in causal mode: greedy or sampled decoding with a repetition penalty.

recipe §6: greedy decoding loops without a repetition penalty; a CTRL-style penalty of 1.5 fixes it.
The penalty divides the positive logits and multiplies the negative logits of tokens already
generated (each such token once, however often it occurred), then temperature, top-k and top-p
shape the distribution. Special tokens other than `</s>` are never produced.

The model has no key/value cache, so every step re-encodes the whole (windowed) sequence: fine for
the short texts this is meant for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from gptbert.scoring import BOS_ID, EOS_ID, NUM_SPECIAL, special_ids


@dataclass
class GenerationSettings:
    """How ``generate`` decodes: length, greedy or sampling (temperature, top-k, top-p), the
    repetition penalty (recipe §6), stopping at ``</s>`` and the sampling seed."""

    max_new_tokens: int = 64
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    top_p: float = 1.0  # 1.0 = no nucleus filtering
    repetition_penalty: float = 1.0  # 1.0 = off; the paper fixes greedy loops with 1.5
    stop_at_eos: bool = True
    seed: int | None = None

    def validate(self) -> None:
        """Reject settings that cannot decode with a ValueError naming the field."""
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature must be positive for sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, previous: Sequence[int], penalty: float) -> torch.Tensor:
    """CTRL penalty on a (V,) logit vector: positive logits / penalty, negative ones * penalty."""
    if penalty == 1.0 or len(previous) == 0:
        return logits
    logits = logits.clone()
    idx = torch.tensor(sorted(set(int(t) for t in previous)), device=logits.device)
    seen = logits[idx]
    logits[idx] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties at the k-th value kept), set the rest to -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    # A token is dropped when the tokens before it already reach p; the first is always kept.
    drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, generated: Sequence[int], settings: GenerationSettings,
               banned: torch.Tensor, generator: torch.Generator | None) -> int:
    """Choose the next token from the (V,) logits at the last position."""
    logits = logits.float().masked_fill(banned, float("-inf"))
    logits = apply_repetition_penalty(logits, generated, settings.repetition_penalty)
    if settings.greedy:
        return int(torch.argmax(logits))
    logits = filter_top_k(logits / settings.temperature, settings.top_k)
    logits = filter_top_p(logits, settings.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.inference_mode()
def generate_ids(model: torch.nn.Module, prompt_ids: Sequence[int], settings: GenerationSettings,
                 eos_id: int = EOS_ID, max_context: int | None = None) -> list[int]:
    """Continue `prompt_ids` (which should start with `<s>`); returns only the new token ids."""
    from gptbert.model import build_blocked_mask

    settings.validate()
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    banned = torch.zeros(vocab, dtype=torch.bool, device=device)
    banned[: min(NUM_SPECIAL, vocab)] = True
    banned[eos_id] = not settings.stop_at_eos  # `</s>` is allowed only when it ends the text
    generator = None
    if settings.seed is not None:
        generator = torch.Generator().manual_seed(settings.seed)
    if max_context is None:
        max_context = int(model.config.max_position_embeddings)

    sequence = [int(t) for t in prompt_ids] or [BOS_ID]
    generated: list[int] = []
    was_training = model.training
    model.eval()
    try:
        for _ in range(settings.max_new_tokens):
            window = sequence[-max_context:]
            ids = torch.tensor([window], device=device)
            blocked = build_blocked_mask(torch.ones_like(ids), torch.ones(1, dtype=torch.bool, device=device))
            hidden = model(ids, blocked)
            logits = model.lm_logits(hidden[0, -1])
            token = next_token(logits, generated, settings, banned, generator)
            if settings.stop_at_eos and token == eos_id:
                break
            generated.append(token)
            sequence.append(token)
    finally:
        model.train(was_training)
    return generated


def generate(model: torch.nn.Module, tokenizer, prompt: str, settings: GenerationSettings | None = None,
             **overrides) -> str:
    """Generate a continuation of `prompt` and return it as text (without the prompt)."""
    settings = settings or GenerationSettings()
    if overrides:
        settings = GenerationSettings(**{**settings.__dict__, **overrides})
    ids = special_ids(tokenizer)
    prompt_ids = [ids["bos"]] + tokenizer.encode(prompt, add_special_tokens=False).ids
    new = generate_ids(model, prompt_ids, settings, eos_id=ids["eos"])
    return tokenizer.decode(new, skip_special_tokens=True)
