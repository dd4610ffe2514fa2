"""ModelConfig: the GPT-BERT architecture hyper-parameters (recipe §1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import ConfigBase, check


@dataclass
class ModelConfig(ConfigBase):
    """Configures the model (recipe §1): sizes, relative positions, dropout, the gate and layer-weighting
    ablations, and the attention implementation."""

    vocab_size: int = 8192
    hidden_size: int = 384
    num_layers: int = 12
    num_heads: int = 6
    intermediate_size: int = 1280
    max_position_embeddings: int = 512
    position_buckets: int = 32
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    # Recipe §1 ablations: the GELU attention gate and DenseFormer-style layer weighting.
    gate: bool = True
    layer_weighting: bool = True
    # "fused": scaled_dot_product_attention with the position terms as an additive bias;
    # "reference": the explicit softmax path that mirrors the paper's code;
    # "flex": torch's flex_attention with a block mask (blocked tiles are skipped) and the position
    # terms as a score_mod, no dense bias (the GPU path). Its kernels have no dropout on the
    # attention probabilities, so it needs attention_dropout 0; where flex has no backward (CPU)
    # training runs the fused path, which computes the same maths.
    attention_impl: Literal["fused", "reference", "flex"] = "fused"
    # gptbert.kernels: faster code for the same maths (CPU dropout masks, fused gathers, buffered
    # layer weighting, a compiled GEGLU, flex attention). false = the plain model, as the paper's.
    kernels: bool = True

    # How the maths is computed, not what: not part of a model's or run's identity.
    RUNTIME_FIELDS = ("kernels",)

    @property
    def head_dim(self) -> int:
        """Size of one attention head: hidden_size // num_heads."""
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Reject invalid values with a ConfigError naming the field."""
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "position_buckets"):
            check(getattr(self, name) > 0, name, "must be positive")
        check(self.hidden_size % self.num_heads == 0, "hidden_size",
              f"must be divisible by num_heads ({self.num_heads})")
        check(self.vocab_size >= 16, "vocab_size", "must hold at least the 16 special tokens")
        check(self.position_buckets * 2 <= self.max_position_embeddings, "position_buckets",
              "2 * position_buckets must not exceed max_position_embeddings")
        for name in ("hidden_dropout", "attention_dropout"):
            check(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")
        check(self.layer_norm_eps > 0, "layer_norm_eps", "must be positive")
        check(self.attention_impl != "flex" or self.attention_dropout == 0.0, "attention_dropout",
              "must be 0 with attention_impl flex (flex attention cannot drop attention probabilities); "
              "use attention_impl fused to keep it")
