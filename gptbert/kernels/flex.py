"""Attention through ``flex_attention`` for ``attention_impl: flex`` (the GPU path).

Plain version: ``Attention.attend`` (the fused path: the position terms gathered into a
(B, h, T, T) additive bias, then scaled dot-product attention). Here the same two (B, h, T, R)
tables are read inside flex attention's ``score_mod``, and the mask is a block mask, so no
(B, h, T, T) tensor is built and tiles that packing or causality block entirely are skipped.
On a CPU the plain path always runs: flex attention has no CPU backward, and inductor's compiled
CPU flex kernel (torch 2.13-2.14) returns wrong values for some shapes of a padded batch, reading
memory it did not write (seen at T=24 and 40 with AVX2's 8-lane code, on AVX2 and AVX-512 CPUs
alike through ``cpp.simdlen=256``, and at T=48 with AVX-512's 16-lane code), so no self-check on a
few shapes can vouch for it. A flex model computes the same maths either way; the first CPU call
says so once. Flex kernels have no dropout on the attention probabilities, so the config requires
``attention_dropout: 0`` with it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch.nn.attention import flex_attention as flex_module

from ..model import Attention

# Device types whose flex_attention has a backward.
FLEX_BACKWARD_DEVICES = {"cuda", "xpu", "hpu"}
# Device types whose compiled flex kernel is not used at all (see the module docstring).
PLAIN_DEVICES = {"cpu"}
_compiled_flex = None
_told_plain = False


def flex_attention(*args, **kwargs):
    """flex_attention compiled once per process (its kernels exist only compiled). Dynamic shapes
    are left to torch.compile's default (static first, dynamic after a recompile), so the
    sequence-length stages and ragged last micro-batches do not exhaust the recompile limit."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_module.flex_attention)
    return _compiled_flex(*args, **kwargs)


def position_score_mod(c2p: torch.Tensor, p2c: torch.Tensor, pos_index: torch.Tensor):
    """A score_mod adding the disentangled position terms to q_i . k_j: the content->position term
    ``c2p[b, h, i, idx(i, j)]`` and the position->content term ``p2c[b, h, j, idx(i, j)]``, where
    the (B, h, T, R) tables hold each query (key) against every relative-distance bucket and
    ``pos_index`` is the (T, T) bucket index."""

    def score_mod(score, b, h, q_idx, kv_idx):
        r = pos_index[q_idx, kv_idx]
        return score + c2p[b, h, q_idx, r] + p2c[b, h, kv_idx, r]

    return score_mod


def block_mask(blocked: torch.Tensor):
    """The (B, T, T) blocked mask (True = may not attend) as a BlockMask shared by every head and
    layer; tiles blocked throughout (other segments, the causal upper triangle, padding) are
    skipped by the kernel."""
    B, T, _ = blocked.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return ~blocked[b, q_idx, kv_idx]

    return flex_module.create_block_mask(mask_mod, B, None, T, T, device=blocked.device)


def usable(q: torch.Tensor) -> bool:
    """Flex runs this call: the device's flex kernel is trusted, and no gradient is needed or the
    device has a flex backward. The first call refused on a CPU says so (a warning, once)."""
    global _told_plain
    if q.device.type in PLAIN_DEVICES:
        if not _told_plain:
            _told_plain = True
            warnings.warn("gptbert: attention_impl 'flex' runs the fused attention on CPU (the same maths): "
                          "torch's compiled CPU flex kernel gives wrong values for some padded batches")
        return False
    return not (torch.is_grad_enabled() and q.requires_grad) or q.device.type in FLEX_BACKWARD_DEVICES


class FlexAttend:
    """``Attention.attend`` through flex attention, the plain path where flex cannot run."""

    def __init__(self, block: Attention):
        self.block = block

    def __call__(self, q, k, v, pos, pos_index, masks, p_drop):
        if not usable(q):
            return Attention.attend(self.block, q, k, v, pos, pos_index, masks, p_drop)
        if "block_mask" not in masks:  # built once per forward, shared by every layer
            masks["block_mask"] = block_mask(masks["blocked"])
        R, h, d = pos.size(0), q.size(1), q.size(3)
        scale = self.block.scale
        q_pos, k_pos = (pos * scale).view(R, 2, h, d).permute(1, 2, 3, 0)  # each (h, d, R)
        score_mod = position_score_mod(q @ k_pos, k @ q_pos, pos_index)
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=masks["block_mask"], scale=scale)
        return out * masks["row_keep"] if masks["any_empty_row"] else out


def apply(model: nn.Module) -> int:
    """Route the attention of a model configured with ``attention_impl: flex`` through flex
    attention; returns how many blocks (0 for other implementations)."""
    if getattr(getattr(model, "config", None), "attention_impl", None) != "flex":
        return 0
    blocks = [m for m in model.modules() if isinstance(m, Attention)]
    for block in blocks:
        block.attend = FlexAttend(block)
    return len(blocks)
