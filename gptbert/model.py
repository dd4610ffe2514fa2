"""The GPT-BERT model: an LTG-BERT encoder with a GELU attention gate and layer weighting (recipe §1).

One network serves both objectives: the attention mask alone decides whether an example is causal
(lower triangle) or masked (bidirectional). Tensors are batch-first, (B, T, H). The file reads in
the paper's order: relative positions and masks, the attention block, the feed-forward block, the
layer weighting, the model with its LM head.

Attention is DeBERTa-style disentangled: besides content->content, every query/key pair gets a
content->position and a position->content term, where the position vectors come from one shared
table of 2 * 32 - 1 relative-distance buckets, projected through each layer's own [Q|K] Linear.
Two ways to compute it, chosen by ``attention_impl``:

* ``reference``: mirrors the paper's code, gathers a (T, T, 2H) tensor of position vectors and
  computes the scores, masked softmax and context explicitly;
* ``fused`` (and ``flex``): projects the 63-entry table once per layer, takes q . K_pos and
  k . Q_pos as (B, h, T, 63) matmuls, gathers them into a (B, h, T, T) additive bias (the mask
  folded in as -inf) and calls scaled dot-product attention.

This module is plain PyTorch. Faster implementations of the same maths (``gptbert.kernels``: CPU
dropout masks, the position-bias gather, buffered layer weighting, a compiled GEGLU, flex
attention for ``attention_impl: flex``) are installed on a built model from outside, through the
hooks ``Attention.position_bias``, ``Attention.attend``, ``FeedForward.geglu_norm``,
``GPTBERT.layer_mix``, ``GPTBERT.lm_loss_terms`` and the ``nn.Dropout`` modules; ``model.kernels:
false`` leaves them out.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config.model import ModelConfig

# ---------------------------------------------------------------------------------------------
# Relative positions and masks


def relative_position_buckets(relative: torch.Tensor, buckets: int = 32, max_position: int = 512) -> torch.Tensor:
    """Log-bucketed signed distance (recipe §1): |r| <= buckets//2 is kept, larger distances map to
    sign(r) * (ceil(log(|r|/mid) / log((max-1)/mid) * (mid-1)) + mid); result in [-(buckets-1), buckets-1].

    Computed in float32 exactly as the paper's code does, so the table matches it bit for bit.
    """
    mid = buckets // 2
    sign = torch.sign(relative)
    # Distances inside the linear zone get a dummy value so the log below stays finite.
    abs_pos = torch.where((relative < mid) & (relative > -mid), mid - 1,
                          relative.abs().clamp(max=max_position - 1))
    log_pos = torch.ceil(torch.log(abs_pos / mid) / math.log((max_position - 1) / mid) * (mid - 1)).int() + mid
    return torch.where(abs_pos <= mid, relative, log_pos * sign).long()


def position_index_table(length: int, buckets: int = 32, max_position: int = 512,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """(length, length) table index of the relative distance query - key, in [0, 2*buckets-2]."""
    pos = torch.arange(length, dtype=torch.long, device=device)
    return relative_position_buckets(pos[:, None] - pos[None, :], buckets, max_position) + buckets - 1


def build_blocked_mask(segment_ids: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids + (B,) causal flags -> (B, T, T) bool, True = query may NOT attend key.

    Segment id 0 is padding (blocked as query and as key); equal non-zero ids attend to each other
    (block-diagonal packing); causal rows also block keys after the query.
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be (B, T), got shape {tuple(segment_ids.shape)}")
    causal = torch.as_tensor(causal, dtype=torch.bool, device=segment_ids.device).reshape(-1)
    if causal.numel() != segment_ids.size(0):
        raise ValueError(f"causal must have one flag per example ({segment_ids.size(0)}), got {causal.numel()}")
    T = segment_ids.size(1)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = segment_ids != 0
    allowed = same & real[:, :, None] & real[:, None, :]
    future = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).triu(1)
    allowed = allowed & ~(future[None] & causal[:, None, None])
    return ~allowed


# ---------------------------------------------------------------------------------------------
# Precision


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls on ``x`` run in: the autocast dtype where autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def lower_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype when autocast is on for its device (else unchanged). Casting once
    by hand lets several Linears share the cast that autocast would repeat for each of them."""
    return x.to(compute_dtype(x))


# ---------------------------------------------------------------------------------------------
# Attention


class Attention(nn.Module):
    """The attention block (recipe §1): LayerNorm, disentangled relative-position attention, the
    optional GELU gate, LayerNorm, output Linear and dropout; the caller adds the residual."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.eps = config.layer_norm_eps
        self.gate = config.gate
        self.impl = config.attention_impl
        self.in_proj_qk = nn.Linear(H, 2 * H)
        self.in_proj_vg = nn.Linear(H, 2 * H if config.gate else H)
        self.out_proj = nn.Linear(H, H)
        self.attention_dropout = nn.Dropout(config.attention_dropout)
        self.dropout = nn.Dropout(config.hidden_dropout)
        # DeBERTa scaling: three score terms are summed.
        self.scale = 1.0 / math.sqrt(3 * self.head_dim)

    def forward(self, x: torch.Tensor, rel_table: torch.Tensor, pos_index: torch.Tensor,
                masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, H) states -> the block's (B, T, H) output, residual not added. ``rel_table``: the
        normalised relative-position table; ``pos_index``: (T, T) bucket indices; ``masks``: the
        blocked mask in the forms ``GPTBERT.attention_masks`` builds."""
        B, T, H = x.shape
        h, d = self.num_heads, self.head_dim
        x = lower_precision(F.layer_norm(x, (H,), eps=self.eps))
        # One copy into head-major layout; q and k are then contiguous (B, h, T, d) views.
        q, k = self.in_proj_qk(x).view(B, T, 2, h, d).permute(2, 0, 3, 1, 4).contiguous()
        vg = self.in_proj_vg(x)
        v = vg[..., :H].reshape(B, T, h, d).transpose(1, 2)
        # The shared table (dropped out per layer) through this layer's own [Q|K] projection.
        pos = self.in_proj_qk(self.attention_dropout(rel_table))  # (R, 2H)
        p_drop = self.attention_dropout.p if self.training else 0.0
        if self.impl == "reference":
            ctx = self.reference_attend(q, k, v, pos, pos_index, masks["blocked"])
        else:
            ctx = self.attend(q, k, v, pos, pos_index, masks, p_drop)
        ctx = ctx.transpose(1, 2).reshape(B, T, H)
        if self.gate:
            ctx = ctx * F.gelu(vg[..., H:])
        ctx = F.layer_norm(ctx, (H,), eps=self.eps)
        return self.dropout(self.out_proj(ctx))

    def reference_attend(self, q, k, v, pos, pos_index, blocked):
        """The paper's computation: (T, T) position vectors per pair, explicit masked softmax."""
        T, h, d = q.size(2), self.num_heads, self.head_dim
        pos = F.embedding(pos_index, pos).view(T, T, 2, h, d)
        q_pos, k_pos = pos[:, :, 0], pos[:, :, 1]
        scores = q @ k.transpose(-1, -2) * self.scale
        scores = scores + torch.einsum("bhqd,qkhd->bhqk", q, k_pos * self.scale)
        scores = scores + torch.einsum("bhkd,qkhd->bhqk", k * self.scale, q_pos)
        mask = blocked[:, None]
        probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1).masked_fill(mask, 0.0)
        return self.attention_dropout(probs) @ v

    def attend(self, q, k, v, pos, pos_index, masks, p_drop):
        """The fused computation: the position terms as a (B, h, T, T) bias on the scores."""
        B, h, T, d = q.shape
        R = pos.size(0)
        # The scale goes on the small (h, d, R) tables and into the score GEMM, never on a big tensor.
        q_pos, k_pos = (pos * self.scale).view(R, 2, h, d).permute(1, 2, 3, 0)  # each (h, d, R)
        idx = pos_index.expand(B, h, T, T)
        # content->position: q_i . K_pos[idx(i, j)]; position->content: k_j . Q_pos[idx(i, j)].
        bias = self.position_bias(q @ k_pos, k @ q_pos, idx, masks["additive"] if masks["any_blocked"] else None)
        if torch.is_grad_enabled() and bias.requires_grad and not self.sdpa_in_training(q.device):
            # CPU training: SDPA would take its unfused math path here (the bias needs a gradient);
            # doing it by hand saves its extra passes over the (T, T) scores.
            scores = torch.baddbmm(bias.view(B * h, T, T), q.view(B * h, T, d),
                                   k.view(B * h, T, d).transpose(1, 2), alpha=self.scale)
            probs = self.attention_dropout(torch.softmax(scores, dim=-1))
            out = (probs @ v.reshape(B * h, T, d)).view(B, h, T, d)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p_drop, scale=self.scale)
        # Fully blocked rows (pads) got a finite dummy row in "additive"; their output is zero.
        return out * masks["row_keep"] if masks["any_empty_row"] else out

    # Where training goes through SDPA too (None: everywhere but the CPU). On CUDA its
    # memory-efficient kernel takes the bias as a float mask with a gradient and drops out inside,
    # without keeping fp32 probabilities and a dropout mask per layer.
    sdpa_training: bool | None = None

    def sdpa_in_training(self, device: torch.device) -> bool:
        """Whether a training forward on ``device`` calls SDPA (else the hand-written CPU path)."""
        return device.type != "cpu" if self.sdpa_training is None else self.sdpa_training

    @staticmethod
    def position_bias(c2p, p2c, idx, additive):
        """``bias[b, h, i, j] = c2p[b, h, i, idx(i, j)] + p2c[b, h, j, idx(i, j)]`` (+ the additive
        mask), from the (B, h, T, R) tables of every query (key) against every bucket."""
        bias = torch.gather(c2p, 3, idx) + torch.gather(p2c.transpose(-1, -2), 2, idx)
        return bias if additive is None else bias + additive


# ---------------------------------------------------------------------------------------------
# Feed-forward


class FeedForward(nn.Module):
    """The feed-forward block (recipe §1): LayerNorm, Linear H->2I, GEGLU, LayerNorm, Linear I->H and
    dropout; the caller adds the residual."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.eps = config.layer_norm_eps
        self.intermediate_size = config.intermediate_size
        self.up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) states -> the block's (..., H) output, residual not added."""
        x = self.up(F.layer_norm(x, (x.size(-1),), eps=self.eps))
        return self.dropout(self.down(self.geglu_norm(x, self.eps)))

    @staticmethod
    def geglu_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
        """LayerNorm(value * GELU-tanh(gate)) for x = [value | gate], in the matmul dtype."""
        value, gate = x.chunk(2, dim=-1)
        y = value * F.gelu(gate, approximate="tanh")
        return lower_precision(F.layer_norm(y, (y.size(-1),), eps=eps))


class Layer(nn.Module):
    """One transformer layer: an attention and a feed-forward block, which ``GPTBERT.forward`` runs
    with a layer-weighting step after each."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = Attention(config)
        self.mlp = FeedForward(config)


# ---------------------------------------------------------------------------------------------
# Layer weighting (DenseFormer / ELC-BERT style)


class LayerWeighting:
    """After block k, the stream becomes sum_j alpha^k_j * h_j over the history h = [embedding,
    block 0 output, ..., block k output] (each output the residual sum x + delta). ``begin`` starts
    a forward's history; calling it runs one block's step. Elementwise products and sums: no
    autocast applies to them, so they run in fp32 on every device."""

    def begin(self, first: torch.Tensor, weights) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The history of one forward, starting with the embedding output ``first``."""
        return [first], list(weights)

    def __call__(self, state, x: torch.Tensor, delta: torch.Tensor, k: int) -> torch.Tensor:
        history, weights = state
        history.append(x + delta)
        alpha = weights[k]
        out = alpha[0] * history[0]
        for j in range(1, len(history)):
            out = out + alpha[j] * history[j]
        return out


# ---------------------------------------------------------------------------------------------
# Heads


class ClassifierHead(nn.Module):
    """Fine-tuning head on the first token: LN -> Linear -> GELU -> LN -> dropout -> Linear."""

    def __init__(self, config: ModelConfig, num_labels: int):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be positive, got {num_labels}")
        self.eps = config.layer_norm_eps
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, num_labels)
        self.dropout = nn.Dropout(config.hidden_dropout)
        std = init_std(config)
        for lin in (self.dense, self.out):
            nn.init.trunc_normal_(lin.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(lin.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) hidden states -> (B, num_labels) logits, from the first token's state."""
        x = hidden[:, 0]
        H = x.size(-1)
        x = F.gelu(self.dense(F.layer_norm(x, (H,), eps=self.eps)))
        return self.out(self.dropout(F.layer_norm(x, (H,), eps=self.eps)))


def init_std(config: ModelConfig) -> float:
    """Standard deviation of the truncated-normal initialisation: sqrt(2 / (5H)) (recipe §1)."""
    return math.sqrt(2.0 / (5.0 * config.hidden_size))


# ---------------------------------------------------------------------------------------------
# The model


class GPTBERT(nn.Module):
    """The GPT-BERT encoder of one ModelConfig (architecture: docs/recipe.md §1).

    ``forward(input_ids, blocked)`` takes ``input_ids`` (B, T) long and ``blocked`` (B, T, T) bool,
    where True means the query may not attend the key (``build_blocked_mask`` builds it from segment
    ids and causal flags; the mask alone makes an example causal or masked). It returns the hidden
    states (B, T, H) after the last layer-weighting step (the last block's output when layer weighting
    is off); there is no final encoder LayerNorm. ``lm_logits`` is the LM head, whose output projection
    is tied to the word embedding, applied to states gathered at the positions that have a target;
    ``add_classifier`` and ``classifier_logits`` give the fine-tuning head.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        H, V = config.hidden_size, config.vocab_size
        self.num_blocks = 2 * config.num_layers
        self.word_embedding = nn.Embedding(V, H)
        self.relative_embedding = nn.Parameter(torch.empty(2 * config.position_buckets - 1, H))
        self.relative_norm = nn.LayerNorm(H, eps=config.layer_norm_eps)  # the only affine LN
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        # Block k (attention of layer i is 2i, its FFN 2i+1) mixes k+2 stream states.
        self.layer_weights = nn.ParameterList(
            nn.Parameter(torch.empty(k + 2)) for k in range(self.num_blocks)
        ) if config.layer_weighting else None
        self.layer_mix = LayerWeighting()
        # LM head; its output projection is the word embedding (tied), with its own bias.
        self.head_dense = nn.Linear(H, H)
        self.head_dropout = nn.Dropout(config.hidden_dropout)
        self.head_bias = nn.Parameter(torch.empty(V))
        self.classifier: ClassifierHead | None = None
        self._pos_index_cache: dict[str, torch.Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as recipe §1: truncated-normal weights and embeddings (std ``init_std``, cut at
        ±2 std), zero biases, layer i's feed-forward weights scaled by sqrt(1/(2(i+1))), layer weights
        [0, ..., 0, 1], the relative-position LayerNorm at identity."""
        std = init_std(self.config)

        def trunc(t: torch.Tensor) -> None:
            nn.init.trunc_normal_(t, mean=0.0, std=std, a=-2 * std, b=2 * std)

        trunc(self.word_embedding.weight)
        trunc(self.relative_embedding)
        nn.init.ones_(self.relative_norm.weight)
        nn.init.zeros_(self.relative_norm.bias)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Deeper FFNs start smaller (the paper's rule).
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                factor = math.sqrt(1.0 / (2.0 * (i + 1)))
                layer.mlp.up.weight.mul_(factor)
                layer.mlp.down.weight.mul_(factor)
            if self.layer_weights is not None:
                for alpha in self.layer_weights:
                    alpha.zero_()
                    alpha[-1] = 1.0
        nn.init.zeros_(self.head_bias)

    # -- helpers ------------------------------------------------------------------------------

    def position_index(self, length: int, device: torch.device) -> torch.Tensor:
        """(length, length) bucket-index table. The index depends only on query - key, so one table
        per device (at least max_position_embeddings long) serves every length as its corner."""
        key = str(device)
        table = self._pos_index_cache.get(key)
        if table is None or table.size(0) < length:
            size = max(length, self.config.max_position_embeddings)
            table = position_index_table(size, self.config.position_buckets,
                                         self.config.max_position_embeddings, device)
            self._pos_index_cache[key] = table
        return table[:length, :length]

    def attention_masks(self, blocked: torch.Tensor, dtype: torch.dtype,
                        mask_flags: tuple[bool, bool] | None = None) -> dict[str, torch.Tensor]:
        """The mask in the forms each attention path needs, computed once per forward.
        ``mask_flags``: (anything blocked, some row fully blocked) where the caller knows them (the
        trainer, from the batch on the host); else read from ``blocked`` (a host read on a GPU)."""
        full_rows = blocked.all(dim=-1, keepdim=True)  # (B, T, 1): pads
        # -inf where blocked, except in fully blocked rows, which get a finite dummy row (0) so the
        # fused softmax stays NaN-free; their output is zeroed with row_keep.
        additive = torch.zeros(blocked.shape, dtype=dtype, device=blocked.device)
        additive.masked_fill_(blocked & ~full_rows, float("-inf"))
        return {
            "blocked": blocked,
            "additive": additive[:, None],
            "row_keep": (~full_rows).to(dtype)[:, None],
            # Python bools let the common cases skip whole passes.
            "any_blocked": bool(blocked.any()) if mask_flags is None else bool(mask_flags[0]),
            "any_empty_row": bool(full_rows.any()) if mask_flags is None else bool(mask_flags[1]),
        }

    # -- forward ------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, blocked: torch.Tensor,
                mask_flags: tuple[bool, bool] | None = None) -> torch.Tensor:
        """(B, T) token ids + (B, T, T) bool mask (True = may NOT attend) -> (B, T, H) states.
        ``mask_flags``: optional hints about ``blocked`` (``attention_masks``)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if blocked.shape != (B, T, T) or blocked.dtype != torch.bool:
            raise ValueError(f"blocked must be a bool tensor of shape {(B, T, T)}, "
                             f"got {blocked.dtype} {tuple(blocked.shape)}")
        cfg = self.config
        x = self.word_embedding(input_ids)
        x = self.embedding_dropout(F.layer_norm(x, (cfg.hidden_size,), eps=cfg.layer_norm_eps))
        rel_table = self.relative_norm(self.relative_embedding)
        pos_index = self.position_index(T, input_ids.device)
        # In the matmuls' dtype: an fp32 bias or row mask would promote the bf16 scores and context.
        masks = self.attention_masks(blocked, compute_dtype(x), mask_flags)
        mix = self.layer_mix.begin(x, self.layer_weights) if self.layer_weights is not None else None
        for i, layer in enumerate(self.layers):
            x = self._residual(mix, x, layer.attention(x, rel_table, pos_index, masks), 2 * i)
            x = self._residual(mix, x, layer.mlp(x), 2 * i + 1)
        return x

    def _residual(self, mix, x, delta, k):
        # x + delta, then layer weighting step k where it is on (the mix does the add itself).
        return x + delta if mix is None else self.layer_mix(mix, x, delta, k)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied LM head on (..., H) states -> (..., V) logits. Gather target positions first."""
        H = hidden.size(-1)
        eps = self.config.layer_norm_eps
        x = F.gelu(self.head_dense(F.layer_norm(hidden, (H,), eps=eps)))
        x = self.head_dropout(F.layer_norm(x, (H,), eps=eps))
        return F.linear(x, self.word_embedding.weight, self.head_bias)

    @staticmethod
    def lm_loss_terms(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, V) logits and (N,) target ids -> (lse, target logit), each (N,) in fp32: the terms of
        the objectives, cross-entropy = lse - target logit and z-loss = lse^2 (recipe §2, §5)."""
        logits = logits.float()
        return torch.logsumexp(logits, dim=-1), logits.gather(1, targets[:, None]).squeeze(1)

    def add_classifier(self, num_labels: int) -> ClassifierHead:
        """Attach a freshly initialised first-token classifier head (fine-tuning)."""
        self.classifier = ClassifierHead(self.config, num_labels).to(self.word_embedding.weight.device)
        return self.classifier

    def classifier_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) states -> (B, num_labels) from the first token; needs ``add_classifier``."""
        if self.classifier is None:
            raise RuntimeError("this model has no classifier head; call add_classifier(num_labels) first")
        return self.classifier(hidden)


def num_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Parameter count; the tied word embedding is counted once (it is one tensor here)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
