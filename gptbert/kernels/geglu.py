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
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import error_line

from ..model import FeedForward, compute_dtype


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


class CompiledOnCpu:
    """``fn`` (row-wise maths over the last dimension) as one inductor-compiled kernel forward and
    one backward for CPU training steps; ``eager`` (the same maths) everywhere else (see the module
    docstring), and where the compiler fails (a warning says so once).

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
                warnings.warn(f"gptbert: compiling the CPU {self.what} kernel failed "
                              f"({type(error).__name__}: {error_line(error, first=True)}); using eager ops")
                self.compiled = False
            else:
                return out.view(*x.shape[:-1], out.size(-1))
        return self.eager(x, *args)


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
