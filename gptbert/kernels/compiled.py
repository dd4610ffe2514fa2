"""The whole model's forward through ``torch.compile`` (``train.compile``), eager where that fails.

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


__all__ = ["CompiledForward", "compile_model"]
