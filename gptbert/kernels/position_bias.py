"""The disentangled position terms as one (B, h, T, T) bias, gathered on integer views.

Plain version: ``gptbert.model.position_bias`` (two ``torch.gather`` calls and adds, autograd's
backward). CPU ``gather`` on bf16 writes into a temporary and copies it (a second full pass over
the bias), and on fp32 its integer path is also faster, so this kernel gathers the tables' bits.
The backward is the plain one's: a scatter-add into each table.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model import Attention
from .dropout import SAME_SIZE_INT


class PositionBias(torch.autograd.Function):
    """``bias[b, h, i, j] = c2p[b, h, i, idx] + p2c[b, h, j, idx]`` (+ the additive mask), with
    ``idx = idx(i, j)`` the relative-distance bucket of the pair."""

    @staticmethod
    def forward(ctx, c2p, p2c, idx, additive):
        bits = SAME_SIZE_INT[c2p.element_size()][2]
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


def position_bias(c2p: torch.Tensor, p2c: torch.Tensor, idx: torch.Tensor,
                  additive: torch.Tensor | None) -> torch.Tensor:
    """The kernel with the plain function's signature."""
    return PositionBias.apply(c2p, p2c, idx, additive)


def apply(model: nn.Module) -> int:
    """Install the kernel in every attention block of ``model``; returns how many."""
    blocks = [m for m in model.modules() if isinstance(m, Attention)]
    for block in blocks:
        block.position_bias = position_bias
    return len(blocks)
