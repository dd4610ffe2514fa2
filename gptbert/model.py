"""The GPT-BERT model: an LTG-BERT encoder with a GELU attention gate and layer weighting (recipe §1).

One network serves both objectives: the attention mask alone decides whether an example is causal
(lower triangle) or masked (bidirectional). Tensors are batch-first, (B, T, H).

Attention is DeBERTa-style disentangled: besides content->content, every query/key pair gets a
content->position and a position->content term, where the position vectors come from one shared
table of 2 * 32 - 1 relative-distance buckets, projected through each layer's own [Q|K] Linear.
Two implementations of the same maths are kept:

* ``attention_impl="reference"``: mirrors the paper's code, gathers a (T, T, 2H) tensor of position
  vectors and computes the scores, masked softmax and context explicitly;
* ``attention_impl="fused"``: projects the 63-entry table once per layer, takes q . K_pos and
  k . Q_pos as (B, h, T, 63) matmuls, gathers them into a (B, h, T, T) additive bias (the mask
  folded in as -inf) and calls ``scaled_dot_product_attention``;
* ``attention_impl="flex"``: the same two (B, h, T, 63) tables read inside ``flex_attention``'s
  score_mod, and the mask as a block mask, so no (B, h, T, T) tensor is built and tiles that packing
  or causality block entirely are skipped. Flex attention has no backward on CPU; there a forward
  that needs gradients runs the fused path.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import flex_attention as _flex_module

from common.config.model import ModelConfig

_compiled_flex = None
# Device types whose flex_attention has a backward; elsewhere (CPU) a forward that needs gradients
# takes the fused path.
FLEX_BACKWARD_DEVICES = {"cuda", "xpu", "hpu"}


def _flex_attention(*args, **kwargs):
    """flex_attention compiled once per process (its kernels exist only compiled). Dynamic shapes
    are left to torch.compile's default (static first, dynamic after a recompile), so the
    sequence-length stages and ragged last micro-batches do not exhaust the recompile limit."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(_flex_module.flex_attention)
    return _compiled_flex(*args, **kwargs)


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


def position_score_mod(c2p: torch.Tensor, p2c: torch.Tensor, pos_index: torch.Tensor):
    """flex_attention score_mod adding the disentangled position terms to q_i . k_j: the
    content->position term ``c2p[b, h, i, idx(i, j)]`` and the position->content term
    ``p2c[b, h, j, idx(i, j)]``, where the (B, h, T, R) tables hold each query (key) against every
    relative-distance bucket and ``pos_index`` is the (T, T) bucket index."""

    def score_mod(score, b, h, q_idx, kv_idx):
        r = pos_index[q_idx, kv_idx]
        return score + c2p[b, h, q_idx, r] + p2c[b, h, kv_idx, r]

    return score_mod


def flex_block_mask(blocked: torch.Tensor):
    """The (B, T, T) blocked mask (True = may not attend) as a flex_attention BlockMask, shared by
    every head and layer; tiles blocked throughout (other segments, the causal upper triangle,
    padding) are skipped by the kernel."""
    B, T, _ = blocked.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return ~blocked[b, q_idx, kv_idx]

    return _flex_module.create_block_mask(mask_mod, B, None, T, T, device=blocked.device)


# ---------------------------------------------------------------------------------------------
# Element-wise helpers for the CPU training step


# Integer types of a float's size (numpy unsigned, numpy signed, torch): ops that only move or
# compare bits run on these views.
_SAME_SIZE_INT = {2: (np.uint16, np.int16, torch.int16), 4: (np.uint32, np.int32, torch.int32),
                  8: (np.uint64, np.int64, torch.int64)}


@functools.lru_cache(maxsize=None)
def _scale_bits(cut: int, dtype: torch.dtype) -> int:
    """The bit pattern, as an unsigned integer, of 65536 / (65536 - cut) in ``dtype``."""
    unsigned, _, torch_int = _SAME_SIZE_INT[dtype.itemsize]
    return torch.tensor(65536 / (65536 - cut), dtype=dtype).view(torch_int).item() & np.iinfo(unsigned).max


def _keep_mask(n: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    """``n`` values of ``dtype``: 0 with probability ``p`` rounded to a multiple of 2**-16, else
    the inverse keep rate. Each 64-bit random value gives four 16-bit uniforms.

    One 64-bit draw from torch's default generator seeds a numpy SFC64 stream, so
    ``torch.manual_seed`` and a saved torch RNG state still fix every mask. The mask is built in
    numpy as ``keep * bit pattern of the scale``: torch's CPU Mersenne Twister (about 10 ns per 64
    bits) and its comparisons and ``where`` with bool masks (scalar loops) cost three to five
    times as much.
    """
    cut = round(p * 65536)
    unsigned, signed, _ = _SAME_SIZE_INT[dtype.itemsize]
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    uniforms = np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.uint16)[:n]
    keep = np.greater_equal(uniforms, cut).view(np.uint8)
    pattern = np.multiply(keep, unsigned(_scale_bits(cut, dtype)), dtype=unsigned)
    return torch.from_numpy(pattern.view(signed)).view(dtype)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout`` with a cheaper mask on CPU (``_keep_mask``): the drop probability is ``p``
    rounded to a multiple of 2**-16 (0.1 -> 0.100006) and the kept values are scaled by the exact
    inverse keep rate (unbiased). CPU ``bernoulli_`` draws one value per element and was about a
    fifth of a CPU training step; other devices keep ``F.dropout``."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    # The mask holds 0 or the scale in x's dtype, so autograd's backward is one multiply.
    return x * _keep_mask(x.numel(), p, x.dtype).view(x.shape)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls on ``x`` run in: the autocast dtype where autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _lower_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype when autocast is on for its device (else unchanged). Casting once
    by hand lets several Linears share the cast that autocast would repeat for each of them."""
    return x.to(_compute_dtype(x))


class _PositionBias(torch.autograd.Function):
    """The disentangled position terms as one (B, h, T, T) bias:
    ``bias[b, h, i, j] = c2p[b, h, i, idx(i, j)] + p2c[b, h, j, idx(i, j)]`` (+ the additive mask),
    from the (B, h, T, R) tables of every query (key) against every relative-distance bucket.

    The gathers run on an integer view of the tables' bits: CPU ``gather`` on bf16 writes into a
    temporary and copies it (a second full pass over the bias), and on fp32 its integer path is
    also faster. The backward is autograd's own (a scatter-add into each table).
    """

    @staticmethod
    def forward(ctx, c2p, p2c, idx, additive):
        bits = _SAME_SIZE_INT[c2p.element_size()][2]
        bias = torch.gather(c2p.view(bits), 3, idx).view(c2p.dtype)
        bias.add_(torch.gather(p2c.transpose(-1, -2).view(bits), 2, idx).view(p2c.dtype))
        if additive is not None:
            bias.add_(additive)
        ctx.save_for_backward(idx)
        ctx.table_shape = c2p.shape
        return bias

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        B, h, T, R = ctx.table_shape
        grad_c2p = grad.new_zeros((B, h, T, R)).scatter_add_(3, idx, grad)
        grad_p2c = grad.new_zeros((B, h, R, T)).scatter_add_(2, idx, grad).transpose(-1, -2)
        return grad_c2p, grad_p2c, None, None


# ---------------------------------------------------------------------------------------------
# Layer weighting (DenseFormer / ELC-BERT style)


class _History:
    """Per-forward storage of the block outputs [embedding, block 0, ..., block k] as one buffer,
    so each weighted sum is a single matrix-vector product instead of a stack of copies.
    ``params`` are the mixes' weight Parameters, one per block.

    ``pool`` (a list the model keeps) recycles the two buffers between steps: freshly allocated,
    their first writes are page faults, which cost more than the writes themselves on CPU. A
    history gives its buffers back when it is freed, i.e. once its backward graph is gone.
    """

    POOL_SIZE = 4  # buffers kept: two histories alive at once (e.g. two forwards, one backward)

    def __init__(self, first: torch.Tensor, params, pool: list | None = None):
        self.params = list(params)
        self.pool = pool
        self.buf = self._take((len(self.params) + 1, first.numel()), first)
        self.buf[0].copy_(first.detach().reshape(-1))
        self.alphas = [a.detach() for a in self.params]  # each mix's weights, as values
        self.upstream: torch.Tensor | None = None  # backward: row k = gradient of mix k's output
        self.hi = -1  # backward: the highest mix whose gradient this pass has written
        self.last_k = -1  # backward: the mix that ran last (mixes run in decreasing k in a pass)

    def _take(self, shape, like: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            for i, t in enumerate(self.pool):
                if t.shape == shape and t.dtype == like.dtype and t.device == like.device:
                    return self.pool.pop(i)
        return like.new_empty(shape)

    def take_upstream(self) -> torch.Tensor:
        if self.upstream is None:
            self.upstream = self._take((len(self.alphas), self.buf.size(1)), self.buf)
        return self.upstream

    def __del__(self):
        # getattr: under torch.compile, dynamo may build an instance without running __init__.
        if getattr(self, "pool", None) is not None:
            for t in (self.buf, self.upstream):
                if t is not None:
                    self.pool.insert(0, t)
            del self.pool[self.POOL_SIZE:]


class _LayerMix(torch.autograd.Function):
    """After block k: write its output, the residual sum ``x + delta``, straight into the history
    (no separate add and copy), return sum_j alpha^k_j * history_j.

    Backward stores its incoming gradient g_k as row k of an upstream buffer; the gradient of block
    k's output (history entry k+1) is then sum_{k' >= k} alpha^{k'}_{k+1} g_{k'}, one matrix-vector
    product over rows already written (every later mix, its only other reader, ran before it). This
    reads each row once instead of accumulating into a zeroed per-entry buffer (read + write). That
    gradient goes to both ``x`` and ``delta`` (autograd casts it to delta's dtype).

    The weights' gradients, grad alpha^k_j = history_j . g_k, come from the first mix (k = 0), which
    takes every mix's Parameter as an input and runs last in a backward pass: one (blocks+1, N) x
    (N, blocks) product reads the history and the upstream rows once, where a product per mix would
    read history rows 0..k+1 again for every k (quadratic in depth).
    """

    @staticmethod
    def forward(ctx, x, delta, first, history: _History, k: int, *params):
        torch.add(x, delta, out=history.buf[k + 1].view(x.shape))
        ctx.history, ctx.k, ctx.shape = history, k, x.shape
        # mv, not mm: a weighted sum, and FLOP counters leave it out of the matmul FLOPs.
        return torch.mv(history.buf[: k + 2].t(), history.alphas[k]).view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        history, k = ctx.history, ctx.k
        upstream = history.take_upstream()
        if k >= history.last_k:  # a (new) backward pass begins here
            history.hi = k
        history.last_k = k
        hi = history.hi
        g = grad_out.reshape(-1)
        upstream[k].copy_(g)
        rows = upstream[k: hi + 1]
        coeff = torch.stack([history.alphas[j][k + 1] for j in range(k, hi + 1)])
        grad_x = torch.mv(rows.t(), coeff).view(ctx.shape)
        if k > 0:
            return grad_x, grad_x, None, None, None
        coeff0 = torch.stack([history.alphas[j][0] for j in range(hi + 1)])
        grad_first = torch.mv(upstream[: hi + 1].t(), coeff0).view(ctx.shape)
        with torch.autocast(history.buf.device.type, enabled=False):  # fp32 sums, whatever the caller's context
            dots = history.buf[: hi + 2] @ upstream[: hi + 1].t()  # [j, k'] = history_j . g_k'
        grads = [dots[: j + 2, j] if j <= hi else torch.zeros_like(history.alphas[j])
                 for j in range(len(history.alphas))]
        return (grad_x, grad_x, grad_first, None, None, *grads)


# ---------------------------------------------------------------------------------------------
# Blocks


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
        self.attention_dropout = config.attention_dropout
        self.hidden_dropout = config.hidden_dropout
        # DeBERTa scaling: three score terms are summed.
        self.scale = 1.0 / math.sqrt(3 * self.head_dim)

    def forward(self, x: torch.Tensor, rel_table: torch.Tensor, pos_index: torch.Tensor,
                masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, H) states -> the block's (B, T, H) output, residual not added. ``rel_table``: the normalised
        relative-position table; ``pos_index``: (T, T) bucket indices; ``masks``: the blocked mask in the
        forms ``GPTBERT._attention_masks`` builds."""
        B, T, H = x.shape
        h, d = self.num_heads, self.head_dim
        x = _lower_precision(F.layer_norm(x, (H,), eps=self.eps))
        # One copy into head-major layout; q and k are then contiguous (B, h, T, d) views.
        q, k = self.in_proj_qk(x).view(B, T, 2, h, d).permute(2, 0, 3, 1, 4).contiguous()
        vg = self.in_proj_vg(x)
        v = vg[..., :H].reshape(B, T, h, d).transpose(1, 2)
        # The shared table (dropped out per layer) through this layer's own [Q|K] projection.
        p_drop = self.attention_dropout if self.training else 0.0
        pos = self.in_proj_qk(dropout(rel_table, p_drop, self.training))  # (R, 2H)
        if self.impl == "reference":
            ctx = self._reference(q, k, v, pos, pos_index, masks["blocked"], p_drop)
        elif "block_mask" in masks and (not x.requires_grad or x.device.type in FLEX_BACKWARD_DEVICES):
            ctx = self._flex(q, k, v, pos, pos_index, masks)
        else:
            ctx = self._fused(q, k, v, pos, pos_index, masks, p_drop)
        ctx = ctx.transpose(1, 2).reshape(B, T, H)
        if self.gate:
            ctx = ctx * F.gelu(vg[..., H:])
        ctx = F.layer_norm(ctx, (H,), eps=self.eps)
        return dropout(self.out_proj(ctx), self.hidden_dropout, self.training)

    def _reference(self, q, k, v, pos, pos_index, blocked, p_drop):
        T, h, d = q.size(2), self.num_heads, self.head_dim
        # (T, T, 2, h, d) position vectors for every query/key pair, as in the paper's code.
        pos = F.embedding(pos_index, pos).view(T, T, 2, h, d)
        q_pos, k_pos = pos[:, :, 0], pos[:, :, 1]
        scores = q @ k.transpose(-1, -2) * self.scale
        scores = scores + torch.einsum("bhqd,qkhd->bhqk", q, k_pos * self.scale)
        scores = scores + torch.einsum("bhkd,qkhd->bhqk", k * self.scale, q_pos)
        mask = blocked[:, None]
        probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1).masked_fill(mask, 0.0)
        probs = dropout(probs, p_drop, self.training)
        return probs @ v

    def _fused(self, q, k, v, pos, pos_index, masks, p_drop):
        B, h, T, d = q.shape
        R = pos.size(0)
        # The scale goes on the small (h, d, R) tables and into the score GEMM, never on a big tensor.
        q_pos, k_pos = (pos * self.scale).view(R, 2, h, d).permute(1, 2, 3, 0)  # each (h, d, R)
        idx = pos_index.expand(B, h, T, T)
        # content->position: q_i . K_pos[idx(i, j)]; position->content: k_j . Q_pos[idx(i, j)].
        bias = _PositionBias.apply(q @ k_pos, k @ q_pos, idx,
                                   masks["additive"] if masks["any_blocked"] else None)
        if torch.is_grad_enabled() and bias.requires_grad:
            # Training: SDPA on CPU would take its unfused math path here (the bias needs a
            # gradient); doing it by hand saves its extra passes over the (T, T) scores.
            scores = torch.baddbmm(bias.view(B * h, T, T), q.view(B * h, T, d),
                                   k.view(B * h, T, d).transpose(1, 2), alpha=self.scale)
            probs = dropout(torch.softmax(scores, dim=-1), p_drop, self.training)
            out = (probs @ v.reshape(B * h, T, d)).view(B, h, T, d)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p_drop, scale=self.scale)
        # Fully blocked rows (pads) got a finite dummy row in "additive"; their output is zero.
        return out * masks["row_keep"] if masks["any_empty_row"] else out

    def _flex(self, q, k, v, pos, pos_index, masks):
        R, h, d = pos.size(0), q.size(1), q.size(3)
        q_pos, k_pos = (pos * self.scale).view(R, 2, h, d).permute(1, 2, 3, 0)  # each (h, d, R)
        # (B, h, T, R) tables: query i against every bucket, key j against every bucket.
        score_mod = position_score_mod(q @ k_pos, k @ q_pos, pos_index)
        out = _flex_attention(q, k, v, score_mod=score_mod, block_mask=masks["block_mask"], scale=self.scale)
        return out * masks["row_keep"] if masks["any_empty_row"] else out


class _GEGLU(torch.autograd.Function):
    """value * GELU-tanh(gate) for x = [value | gate]; backward writes both halves of the input
    gradient into one buffer (no concatenation). GELU(gate) is kept from the forward: recomputing
    its tanh cost more than the extra (..., I) activation it holds."""

    @staticmethod
    def forward(ctx, x):
        value, gate = x.chunk(2, dim=-1)
        activated = F.gelu(gate, approximate="tanh")
        ctx.save_for_backward(x, activated)
        return value * activated

    @staticmethod
    def backward(ctx, grad):
        x, activated = ctx.saved_tensors
        value, gate = x.chunk(2, dim=-1)
        grad_x = torch.empty_like(x)
        grad_value, grad_gate = grad_x.chunk(2, dim=-1)
        torch.mul(grad, activated, out=grad_value)
        torch.ops.aten.gelu_backward.grad_input(grad * value, gate, approximate="tanh", grad_input=grad_gate)
        return grad_x


class _CompiledOnCpu:
    """``fn`` (row-wise maths over the last dimension) as one inductor-compiled kernel forward and
    one backward for CPU training steps; ``eager`` (the same maths) in inference, on other devices
    (which compile the whole model or have fast kernels), inside a model compiled as a whole, and
    where the compiler cannot run (no C++ toolchain; a warning says so once).

    Inputs are flattened to (rows, features) with only the row count dynamic: micro-batch sizes
    vary from step to step, and one graph for all of them keeps a resumed run numerically equal
    to an uninterrupted one (every row is computed by the same code whatever the count). Fully
    dynamic shapes made slower code.
    """

    def __init__(self, fn, eager, what: str):
        self.fn, self.eager, self.what = fn, eager, what
        self.compiled = None  # None: not tried yet; False: the compiler failed here

    def __call__(self, x: torch.Tensor, *args):
        rows = x.numel() // max(x.size(-1), 1)
        if (self.compiled is not False and x.device.type == "cpu" and x.requires_grad and rows >= 2
                and not torch.compiler.is_compiling()):  # inside a compiled model: the outer compile fuses
            if self.compiled is None:
                # Not fullgraph: under a dispatch mode (a FLOP counter) dynamo runs the frame
                # eagerly instead of failing (and compiles it no more in this process).
                self.compiled = torch.compile(self.fn)
            flat = x.reshape(rows, x.size(-1))
            torch._dynamo.mark_dynamic(flat, 0)
            try:
                out = self.compiled(flat, *args)
            except Exception as error:  # a missing or broken compiler shows up at the first call
                first_line = str(error).splitlines()[0] if str(error) else ""
                warnings.warn(f"gptbert: compiling the CPU {self.what} kernel failed "
                              f"({type(error).__name__}: {first_line}); using eager ops")
                self.compiled = False
            else:
                return out.view(*x.shape[:-1], out.size(-1))
        return self.eager(x, *args)


# GELU-tanh(g) = 0.5 g (1 + tanh(c (g + 0.044715 g^3))) = g * sigmoid(2c (g + 0.044715 g^3)), c = sqrt(2/pi).
_GELU_TANH_C1 = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_TANH_C3 = _GELU_TANH_C1 * 0.044715


def _geglu_norm_ops(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(value * GELU-tanh(gate)) for x = [value | gate], in the matmul dtype, as plain
    pointwise ops for the compiler to fuse."""
    value, gate = x.chunk(2, dim=-1)
    y = value * (gate * torch.sigmoid(gate * (_GELU_TANH_C1 + _GELU_TANH_C3 * gate * gate)))
    return _lower_precision(F.layer_norm(y, (y.size(-1),), eps=eps))


def _geglu_norm_eager(x: torch.Tensor, eps: float) -> torch.Tensor:
    y = _GEGLU.apply(x)
    return _lower_precision(F.layer_norm(y, (y.size(-1),), eps=eps))


# The middle of the feed-forward block. ATen's CPU GELU-tanh and its backward take about 2 ms each
# per (8 x 128 x 1280) tensor, several times the pointwise work, and the product, the norm and the
# casts around it add five more passes; compiled, it is one kernel each way.
geglu_norm = _CompiledOnCpu(_geglu_norm_ops, _geglu_norm_eager, "feed-forward")


class FeedForward(nn.Module):
    """The feed-forward block (recipe §1): LayerNorm, Linear H->2I, GEGLU, LayerNorm, Linear I->H and
    dropout; the caller adds the residual."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.eps = config.layer_norm_eps
        self.intermediate_size = config.intermediate_size
        self.up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.dropout = config.hidden_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) states -> the block's (..., H) output, residual not added."""
        x = self.up(F.layer_norm(x, (x.size(-1),), eps=self.eps))
        x = geglu_norm(x, self.eps)  # LayerNorm(first half * GELU-tanh(second half))
        return dropout(self.down(x), self.dropout, self.training)


class Layer(nn.Module):
    """One transformer layer: an attention and a feed-forward block, which ``GPTBERT.forward`` runs
    with a layer-weighting step after each."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = Attention(config)
        self.mlp = FeedForward(config)


class ClassifierHead(nn.Module):
    """Fine-tuning head on the first token: LN -> Linear -> GELU -> LN -> dropout -> Linear."""

    def __init__(self, config: ModelConfig, num_labels: int):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be positive, got {num_labels}")
        self.eps = config.layer_norm_eps
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, num_labels)
        self.dropout = config.hidden_dropout
        std = init_std(config)
        for lin in (self.dense, self.out):
            nn.init.trunc_normal_(lin.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(lin.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) hidden states -> (B, num_labels) logits, from the first token's state."""
        x = hidden[:, 0]
        H = x.size(-1)
        x = F.gelu(self.dense(F.layer_norm(x, (H,), eps=self.eps)))
        x = dropout(F.layer_norm(x, (H,), eps=self.eps), self.dropout, self.training)
        return self.out(x)


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
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        # Block k (attention of layer i is 2i, its FFN 2i+1) mixes k+2 stream states.
        self.layer_weights = nn.ParameterList(
            nn.Parameter(torch.empty(k + 2)) for k in range(self.num_blocks)
        ) if config.layer_weighting else None
        # LM head; its output projection is the word embedding (tied), with its own bias.
        self.head_dense = nn.Linear(H, H)
        self.head_bias = nn.Parameter(torch.empty(V))
        self.classifier: ClassifierHead | None = None
        self._pos_index_cache: dict[str, torch.Tensor] = {}
        self._history_pool: list[torch.Tensor] = []  # layer-weighting buffers reused across steps
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

    def _attention_masks(self, blocked: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The mask in the forms each attention path needs, computed once per forward."""
        full_rows = blocked.all(dim=-1, keepdim=True)  # (B, T, 1): pads
        flex = {}
        if self.config.attention_impl == "flex" and (not torch.is_grad_enabled()
                                                     or blocked.device.type in FLEX_BACKWARD_DEVICES):
            flex = {"block_mask": flex_block_mask(blocked)}
        # -inf where blocked, except in fully blocked rows, which get a finite dummy row (0) so the
        # fused softmax stays NaN-free; their output is zeroed with row_keep.
        additive = torch.zeros(blocked.shape, dtype=dtype, device=blocked.device)
        additive.masked_fill_(blocked & ~full_rows, float("-inf"))
        return {
            "blocked": blocked,
            "additive": additive[:, None],
            "row_keep": (~full_rows).to(dtype)[:, None],
            # Python bools (one sync per forward) let the common cases skip whole passes.
            "any_blocked": bool(blocked.any()),
            "any_empty_row": bool(full_rows.any()),
            **flex,
        }

    # -- forward ------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids + (B, T, T) bool mask (True = may NOT attend) -> (B, T, H) states."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if blocked.shape != (B, T, T) or blocked.dtype != torch.bool:
            raise ValueError(f"blocked must be a bool tensor of shape {(B, T, T)}, "
                             f"got {blocked.dtype} {tuple(blocked.shape)}")
        cfg = self.config
        x = self.word_embedding(input_ids)
        x = dropout(F.layer_norm(x, (cfg.hidden_size,), eps=cfg.layer_norm_eps),
                    cfg.hidden_dropout, self.training)
        rel_table = self.relative_norm(self.relative_embedding)
        pos_index = self.position_index(T, input_ids.device)
        # In the matmuls' dtype: an fp32 bias or row mask would promote the bf16 scores and context.
        masks = self._attention_masks(blocked, _compute_dtype(x))

        history = None
        if self.layer_weights is not None:
            # CPU training only: CUDA's caching allocator already reuses memory, and inference
            # should not hold buffers between calls.
            pool = self._history_pool if x.device.type == "cpu" and torch.is_grad_enabled() else None
            history = _History(x, self.layer_weights, pool)
        first = x
        for i, layer in enumerate(self.layers):
            x = self._residual(x, layer.attention(x, rel_table, pos_index, masks), first, history, 2 * i)
            x = self._residual(x, layer.mlp(x), first, history, 2 * i + 1)
        return x

    def _residual(self, x, delta, first, history, k):
        # x + delta, then layer weighting k where it is on (the mix does the add itself).
        if history is None:
            return x + delta
        # The first mix carries every mix's weights (their gradients come from its backward).
        return _LayerMix.apply(x, delta, first, history, k, *(history.params if k == 0 else ()))

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied LM head on (..., H) states -> (..., V) logits. Gather target positions first."""
        H = hidden.size(-1)
        eps = self.config.layer_norm_eps
        x = F.gelu(self.head_dense(F.layer_norm(hidden, (H,), eps=eps)))
        x = dropout(F.layer_norm(x, (H,), eps=eps), self.config.hidden_dropout, self.training)
        return F.linear(x, self.word_embedding.weight, self.head_bias)

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


# ---------------------------------------------------------------------------------------------
# The paper's parameter names <-> ours


def _reference_name_map(config: ModelConfig) -> dict[str, str]:
    """reference name -> our name, for every parameter of the reference layout."""
    names = {
        "embedding.word_embedding.weight": "word_embedding.weight",
        "embedding.relative_embedding": "relative_embedding",
        "embedding.relative_layer_norm.weight": "relative_norm.weight",
        "embedding.relative_layer_norm.bias": "relative_norm.bias",
        "classifier.nonlinearity.1.weight": "head_dense.weight",
        "classifier.nonlinearity.1.bias": "head_dense.bias",
        "classifier.nonlinearity.5.bias": "head_bias",
    }
    for i in range(config.num_layers):
        ref, ours = f"transformer.attention_layers.{i}", f"layers.{i}.attention"
        for lin in ("in_proj_qk", "in_proj_vg", "out_proj"):
            for kind in ("weight", "bias"):
                names[f"{ref}.{lin}.{kind}"] = f"{ours}.{lin}.{kind}"
        names[f"transformer.mlp_layers.{i}.mlp.1.weight"] = f"layers.{i}.mlp.up.weight"
        names[f"transformer.mlp_layers.{i}.mlp.4.weight"] = f"layers.{i}.mlp.down.weight"
    if config.layer_weighting:
        for k in range(2 * config.num_layers):
            names[f"transformer.dwa_modules.alphas.{k}"] = f"layer_weights.{k}"
    return names


def load_reference_state_dict(model: GPTBERT, state: Mapping[str, torch.Tensor]) -> None:
    """Load a state dict in the paper's (and the released checkpoints') layout into ``model``.

    Every reference parameter must be present with our shape. The tied LM-head weight
    (``classifier.nonlinearity.5.weight``) must equal the word embedding; the ``position_indices``
    buffers must equal our bucket table. Raises ValueError naming the first offending key.
    """
    state = {k.removeprefix("module."): torch.as_tensor(v) for k, v in state.items()}
    names = _reference_name_map(model.config)
    ours = dict(model.named_parameters())
    new: dict[str, torch.Tensor] = {}
    for ref_name, our_name in names.items():
        if ref_name not in state:
            raise ValueError(f"reference state dict lacks {ref_name!r} (needed for {our_name!r})")
        value = state[ref_name]
        if tuple(value.shape) != tuple(ours[our_name].shape):
            raise ValueError(f"reference {ref_name!r} has shape {tuple(value.shape)}, "
                             f"expected {tuple(ours[our_name].shape)} for this ModelConfig")
        new[our_name] = value
    tied = state.get("classifier.nonlinearity.5.weight")
    if tied is not None and not torch.equal(tied, state["embedding.word_embedding.weight"]):
        raise ValueError("reference 'classifier.nonlinearity.5.weight' differs from the word embedding; "
                         "GPT-BERT ties them")
    known = set(names) | {"classifier.nonlinearity.5.weight"}
    for key, value in state.items():
        if key.endswith("position_indices"):
            n = value.size(0)
            mine = position_index_table(n, model.config.position_buckets, model.config.max_position_embeddings)
            if not torch.equal(value.long(), mine):
                raise ValueError(f"reference {key!r} differs from this model's relative-position buckets")
            known.add(key)
    unknown = sorted(set(state) - known)
    if unknown:
        raise ValueError(f"reference state dict has unexpected key {unknown[0]!r} "
                         f"({len(unknown)} unexpected in all); is the ModelConfig right?")
    with torch.no_grad():
        for name, value in new.items():
            ours[name].copy_(value.to(ours[name].dtype))


def export_reference_state_dict(model: GPTBERT) -> dict[str, torch.Tensor]:
    """Our weights under the reference names (inverse of ``load_reference_state_dict``), including
    the tied head weight and the ``position_indices`` buffers the reference code stores."""
    ours = dict(model.named_parameters())
    out = {ref: ours[name].detach().clone() for ref, name in _reference_name_map(model.config).items()}
    out["classifier.nonlinearity.5.weight"] = out["embedding.word_embedding.weight"].clone()
    n = model.config.max_position_embeddings
    table = position_index_table(n, model.config.position_buckets, n)
    for i in range(model.config.num_layers):
        out[f"transformer.attention_layers.{i}.position_indices"] = table.clone()
    return out
