"""``torch.compile`` in the kernels: the whole model's forward (``train.compile``), eager where that
fails, and ``CompiledOnCpu``, the one way a kernel compiles its row-wise maths for CPU training.

Compiling is worth it on GPUs, where inductor fuses the pointwise work between the matmuls; on a
CPU the hand-written kernels of this package are faster (measured: 0.87x of eager, first step
14-16 s). A compile that fails (no working C++/Triton toolchain, an op dynamo cannot trace) must not
end a run: the first failure is a warning naming the error and how long the attempt took, and the
model runs eagerly from then on. Under compilation the layer weighting takes the plain model's
sums, which dynamo traces and fuses (the buffered kernel keeps Python state between the forward and
the backward, a graph break at every block).
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
import torch.nn as nn

from common.errors import error_line

from ..model import GPTBERT, LayerWeighting

log = logging.getLogger("gptbert")


class CompiledOnCpu:
    """``fn`` (row-wise maths: every tensor argument's first dimension is the same rows) as one
    inductor-compiled kernel forward and one backward for CPU training steps; ``eager`` (the same
    maths) everywhere else (inference, other devices, inside a model compiled as a whole), and
    where the compiler fails (a warning says so once).

    The first input is flattened to (rows, features) and only the row count is dynamic, in it and in
    every other tensor argument with those rows: micro-batch sizes vary from step to step, and one
    graph for all of them keeps a resumed run numerically equal to an uninterrupted one (every row is
    computed by the same code whatever the count). Fully dynamic shapes made slower code.
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
            for a in args:
                if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.size(0) == rows:
                    torch._dynamo.mark_dynamic(a, 0)
            try:
                out = self.compiled(flat, *args)
            except Exception as error:  # a missing or broken compiler shows up at the first call
                warnings.warn(f"gptbert: compiling the CPU {self.what} kernel failed "
                              f"({type(error).__name__}: {error_line(error, first=True)}); using eager ops")
                self.compiled = False
            else:
                if isinstance(out, tuple):
                    return out
                return out.view(*x.shape[:-1], out.size(-1))
        return self.eager(x, *args)


class CompiledForward:
    """``model.forward`` compiled, falling back to the eager forward after a failed compile."""

    def __init__(self, model: nn.Module):
        self.eager = model.forward  # the bound method of the class, before this object replaces it
        self.compiled = torch.compile(self.eager)
        self.failed: str | None = None  # the error that sent the model back to eager
        self.first_call_s: float | None = None  # the first call: tracing and compiling included

    def __call__(self, *args, **kwargs):
        if self.failed is None:
            started = time.perf_counter()
            try:
                out = self.compiled(*args, **kwargs)
            except Exception as error:  # a compiler failure shows up at the call that compiles
                elapsed = time.perf_counter() - started
                self.failed = f"{type(error).__name__}: {error_line(error, first=True)}"
                warnings.warn(f"gptbert: torch.compile of the model failed after {elapsed:.1f} s "
                              f"({self.failed}); training continues with the eager model")
            else:
                if self.first_call_s is None:
                    self.first_call_s = time.perf_counter() - started
                    log.info("model compiled in %.1f s (first forward)", self.first_call_s)
                return out
        return self.eager(*args, **kwargs)


def compile_model(model: GPTBERT) -> GPTBERT:
    """Route ``model``'s forward through ``CompiledForward`` (in place); returns ``model``."""
    if isinstance(model.__dict__.get("forward"), CompiledForward):
        return model
    if model.layer_weights is not None:
        model.layer_mix = LayerWeighting()
    model.forward = CompiledForward(model)  # an instance attribute: nn.Module.__call__ calls it
    return model


__all__ = ["CompiledForward", "CompiledOnCpu", "compile_model"]
