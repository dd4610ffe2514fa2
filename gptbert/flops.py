"""Analytic parameter and FLOP counts of the GPT-BERT model (for model-info and MFU).

FLOPs are matmul FLOPs (2 per multiply-add), the quantity a GEMM peak is quoted in, and they follow
the fused attention path (the position terms as (T, 63) matmuls, not the reference path's (T, T)
gather). Not counted: layer norms, activations, softmax, dropout, gathers and the layer-weighting
sums (O(H) per token per block: ``layer_weighting_flops_per_token`` gives them separately).
A training step is forward + backward = 3x forward: every matmul input requires a gradient, the
first layer's included (the embedding is trained). Masks do not save FLOPs: causal and
block-diagonal attention is computed densely, so the two modes differ only in how many tokens
reach the LM head (``target_fraction``).
"""

from __future__ import annotations

from common.config.model import ModelConfig


def parameter_count(cfg: ModelConfig) -> int:
    """Trainable parameters of ``GPTBERT(cfg)``, tied word embedding counted once, no classifier."""
    H, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    R = 2 * cfg.position_buckets - 1
    embedding = V * H + R * H + 2 * H  # words, relative table, its affine LayerNorm
    attention = (H * 2 * H + 2 * H) + (H * (2 * H if cfg.gate else H) + (2 * H if cfg.gate else H)) + (H * H + H)
    ffn = H * 2 * I + I * H
    weights = sum(k + 2 for k in range(2 * L)) if cfg.layer_weighting else 0
    head = H * H + H + V  # dense layer, and the tied projection's own bias
    return embedding + L * (attention + ffn) + weights + head


def forward_flops_breakdown(cfg: ModelConfig, seq_len: int, target_fraction: float,
                            batch_size: int = 1) -> dict[str, float]:
    """Forward matmul FLOPs per input token, by part.

    ``target_fraction``: share of tokens that reach the LM head (the trainer gathers target
    positions first). ``batch_size``: sequences per micro-batch (an average may be fractional); the
    position table is projected once per layer per micro-batch, so its cost per token shrinks with it.
    """
    if seq_len < 1 or not batch_size >= 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    if not 0.0 <= target_fraction <= 1.0:
        raise ValueError(f"target_fraction must be in [0, 1], got {target_fraction}")
    H, I, V, L, T = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers, seq_len
    R = 2 * cfg.position_buckets - 1
    vg_out = 2 * H if cfg.gate else H
    projections = 2 * (H * 2 * H + H * vg_out + H * H)
    ffn = 2 * (H * 2 * I + I * H)
    # q.k and probs.v over T keys, plus q.K_pos and k.Q_pos over the R table rows.
    attention = 2 * (2 * T * H) + 2 * (2 * R * H)
    position_table = 2 * R * H * 2 * H / (batch_size * T)
    head = target_fraction * 2 * (H * H + H * V)
    return {
        "attention_projections": float(L * projections),
        "ffn": float(L * ffn),
        "attention_scores": float(L * attention),
        "position_table": float(L * position_table),
        "lm_head": float(head),
    }


def flops_per_token(cfg: ModelConfig, seq_len: int, target_fraction: float, training: bool = True,
                    batch_size: int = 1) -> float:
    """Matmul FLOPs per input token of one forward (``training=False``) or forward + backward."""
    total = sum(forward_flops_breakdown(cfg, seq_len, target_fraction, batch_size).values())
    return 3.0 * total if training else total


def layer_weighting_flops_per_token(cfg: ModelConfig, training: bool = True) -> float:
    """The weighted sums over the block history (not matmuls; memory-bound): 2*(k+2)*H per block k
    forward; backward adds a gradient for the weights and for every history entry (2x)."""
    if not cfg.layer_weighting:
        return 0.0
    fwd = sum(2 * (k + 2) * cfg.hidden_size for k in range(2 * cfg.num_layers))
    return float(3 * fwd if training else fwd)


def step_flops_per_token(cfg: ModelConfig, seq_len: int, causal_fraction: float, mask_rate: float,
                         batch_size: int = 1, micro_batches: int = 1, world_size: int = 1) -> float:
    """Training FLOPs per input token of one optimizer step: THE count behind the training log's
    FLOP/s and MFU (``metrics.MetricsCallback``), a run's total (``training_flops``) and the
    benchmarks' MFU (``benchmarks/gpu_rows.py``, ``gpu_bench.py``).

    The LM head runs on the step's targets (every causal position, ``mask_rate`` of a masked
    example's); the position table is projected once per micro-batch, of ``batch_size`` global
    sequences split over ``world_size`` ranks in ``micro_batches`` micro-batches each (the step's
    metrics ``batch_size`` and ``micro_batches``)."""
    targets = causal_fraction + (1.0 - causal_fraction) * mask_rate
    micro_sequences = max(1.0, batch_size / (max(1, world_size) * max(1, micro_batches)))
    return flops_per_token(cfg, seq_len, targets, True, micro_sequences)


def training_tokens(train_cfg) -> int:
    """Token slots (padding included) a run trains on: sum over steps of sequences x length."""
    return sum(train_cfg.batch_size_at(s) * train_cfg.seq_len_at(s) for s in range(train_cfg.steps))


def training_flops(cfg: ModelConfig, train_cfg, world_size: int = 1) -> float:
    """Matmul FLOPs of a whole pretraining run (forward + backward of every step): each step's tokens
    times ``step_flops_per_token`` at its sequence length, mask rate and micro-batching (with
    ``micro_batch_tokens: auto``, which only the device decides, micro-batches of one sequence: an
    upper bound)."""
    from .objective import num_micro_batches

    total = 0.0
    for s in range(train_cfg.steps):
        seq, batch = train_cfg.seq_len_at(s), train_cfg.batch_size_at(s)
        micro_tokens = train_cfg.micro_batch_tokens
        micro = batch if micro_tokens == "auto" else num_micro_batches(batch, world_size,
                                                                       max(1, int(micro_tokens) // seq))
        total += step_flops_per_token(cfg, seq, train_cfg.causal_fraction, train_cfg.mask_rate_at(s), batch,
                                      micro, world_size) * batch * seq
    return total
