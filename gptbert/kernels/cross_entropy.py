"""The LM losses' per-target terms, log-sum-exp over the vocabulary and the target's logit, as one
compiled kernel each way in CPU training.

Plain version: ``GPTBERT.lm_loss_terms``. Eagerly, the (targets, vocabulary) logits take a cast to
fp32, a max and an exp pass for ``logsumexp``, a gather, and in the backward a subtraction, an exp,
a product and a scatter into a zero tensor: with a vocabulary of 8,192 and a model of width 128
that was about a third of a CPU training step, more than every matmul together. Inductor fuses it
into one loop per row forward (cast, online max and sum) and one backward (the softmax scaled by
the incoming gradients, the target's one-hot subtracted in place).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model import GPTBERT
from .compiled import CompiledOnCpu


def _loss_terms_ops(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The maths as plain ops for the compiler to fuse (the same as ``GPTBERT.lm_loss_terms``)."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1), logits.gather(1, targets[:, None]).squeeze(1)


# One compiled kernel per process, shared by every model.
lm_loss_terms = CompiledOnCpu(_loss_terms_ops, GPTBERT.lm_loss_terms, "LM loss")


def apply(model: nn.Module) -> int:
    """Install the kernel as ``model``'s ``lm_loss_terms``; returns how many places (1 or 0)."""
    if not isinstance(model, GPTBERT):
        return 0
    model.lm_loss_terms = lm_loss_terms
    return 1
