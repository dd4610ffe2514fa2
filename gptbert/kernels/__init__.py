"""Faster implementations of ``gptbert.model``'s maths, applied to a built model from outside.

The model is plain PyTorch and reads as the paper; each module here replaces one of its hooks
with code that computes the same thing faster, and sits beside a test of that equality
(``tests/test_kernels.py``, forward and backward):

| module | replaces | why |
|---|---|---|
| ``dropout`` | every ``nn.Dropout`` | CPU masks from a numpy SFC64 stream, 3-5x cheaper than ``bernoulli_`` |
| ``position_bias`` | ``Attention.position_bias`` | gathers on integer views of the tables (no bf16 gather copy) |
| ``layer_mix`` | ``GPTBERT.layer_mix`` | the layer-weighting history as one buffer: ``mv`` sums, one product for the weights' gradients, buffers recycled on CPU |
| ``geglu`` | ``FeedForward.geglu_norm`` | GELU-tanh, product and LayerNorm as one inductor kernel in CPU training |
| ``flex`` | ``Attention.attend`` (``attention_impl: flex``) | flex attention: no (B, h, T, T) bias, blocked tiles skipped |
| ``cross_entropy`` | ``GPTBERT.lm_loss_terms`` | log-sum-exp and target logit over the vocabulary as one inductor kernel each way in CPU training |

``apply_kernels(model)`` installs them all unless ``model.config.kernels`` is false, which keeps
the plain model (the one checked against the paper's code). Every place that builds a model to
compute with goes through ``build_model``. ``compiled.compile_model`` (``train.compile``) routes the
whole forward through ``torch.compile``, eager where compiling fails.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from common.config.model import ModelConfig

from ..model import GPTBERT
from . import cross_entropy, dropout, flex, geglu, layer_mix, position_bias

# name -> installer (returns how many places it replaced), in the order they are applied.
KERNELS: dict[str, Callable[[nn.Module], int]] = {
    "dropout": dropout.apply,
    "position_bias": position_bias.apply,
    "layer_mix": layer_mix.apply,
    "geglu": geglu.apply,
    "flex": flex.apply,
    "cross_entropy": cross_entropy.apply,
}


def apply_kernels(model: GPTBERT) -> GPTBERT:
    """Install every kernel in ``model`` (in place) unless ``model.config.kernels`` is false; returns
    ``model``. Applying twice changes nothing."""
    if getattr(model.config, "kernels", True):
        for install in KERNELS.values():
            install(model)
    return model


def build_model(config: ModelConfig, device: torch.device | str | None = None, compile: bool = False) -> GPTBERT:
    """A freshly initialised ``GPTBERT(config)`` on ``device``, with the kernels applied and, with
    ``compile``, its forward compiled (``compiled.compile_model``)."""
    from .compiled import compile_model

    model = GPTBERT(config)
    if device is not None:
        model = model.to(device)
    apply_kernels(model)
    return compile_model(model) if compile else model


__all__ = ["KERNELS", "apply_kernels", "build_model"]
