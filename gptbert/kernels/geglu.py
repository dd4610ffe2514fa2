"""The middle of the feed-forward block, LayerNorm(value * GELU-tanh(gate)), as one compiled kernel.

Plain version: ``gptbert.model.geglu_norm``. ATen's CPU GELU-tanh and its backward take about
2 ms each per (8 x 128 x 1280) tensor, several times the pointwise work, and the product, the norm
and the casts around it add five more passes; compiled by inductor it is one kernel each way. It
is compiled for CPU training steps only; inference, other devices (which compile the whole model
or have fast kernels), a model compiled as a whole, and machines where the compiler cannot run
take the eager ops (``GEGLU``, which keeps GELU(gate) from the forward for its backward).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import FeedForward, compute_dtype
from .compiled import CompiledOnCpu


class GEGLU(torch.autograd.Function):
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


# GELU-tanh(g) = 0.5 g (1 + tanh(c (g + 0.044715 g^3))) = g * sigmoid(2c (g + 0.044715 g^3)), c = sqrt(2/pi).
_GELU_TANH_C1 = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_TANH_C3 = _GELU_TANH_C1 * 0.044715


def _geglu_norm_ops(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The maths as plain pointwise ops for the compiler to fuse, output in the matmul dtype."""
    value, gate = x.chunk(2, dim=-1)
    y = value * (gate * torch.sigmoid(gate * (_GELU_TANH_C1 + _GELU_TANH_C3 * gate * gate)))
    return F.layer_norm(y, (y.size(-1),), eps=eps).to(compute_dtype(x))


def _geglu_norm_eager(x: torch.Tensor, eps: float) -> torch.Tensor:
    y = GEGLU.apply(x)
    return F.layer_norm(y, (y.size(-1),), eps=eps).to(compute_dtype(x))


# One compiled kernel per process, shared by every feed-forward block of every model.
geglu_norm = CompiledOnCpu(_geglu_norm_ops, _geglu_norm_eager, "feed-forward")


def apply(model: nn.Module) -> int:
    """Install the kernel in every feed-forward block of ``model``; returns how many."""
    blocks = [m for m in model.modules() if isinstance(m, FeedForward)]
    for block in blocks:
        block.geglu_norm = geglu_norm
    return len(blocks)
