"""What a training step needs to know about a batch's targets, planned on the host.

A GPU's host waits for the device at every data-dependent shape or scalar read; so everything the
step takes from the targets and the mask (which positions have a target, of which kind, how many,
whether anything is blocked) is computed with numpy where the batch is built (the prefetch
thread), and the step uses fixed-shape device ops on it (``objective.hybrid_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100  # the target id of a position without a target


@dataclass
class TargetPlan:
    """What a training step needs to know about a batch's targets and mask, computed on the host
    where the batch is built (the prefetch thread), so that the step on a GPU needs no host read:
    the flat positions with a target (row-major, the order of boolean-mask indexing), their token
    ids and kinds, the counts, and whether the mask blocks anything or has fully blocked rows."""

    index: torch.Tensor  # (N,) long: flat positions b * T + t that have a target
    tokens: torch.Tensor  # (N,) long: the target ids there
    causal: torch.Tensor  # (N,) bool: the target belongs to a causal example
    masked_count: int
    causal_count: int
    num_tokens: int  # real (non-pad) input tokens
    mask_flags: tuple[bool, bool]  # (anything blocked, some row fully blocked): ``GPTBERT.forward``'s hints

    @classmethod
    def of(cls, target_ids: np.ndarray, segment_ids: np.ndarray, causal: np.ndarray) -> "TargetPlan":
        """The plan of (B, T) targets and segment ids and (B,) causal flags, all numpy."""
        B, T = target_ids.shape
        index = np.flatnonzero(target_ids.reshape(-1) != IGNORE)
        kinds = np.repeat(np.asarray(causal, dtype=bool), T)[index]
        n_causal = int(kinds.sum())
        pad = segment_ids == 0
        # Blocked somewhere: a pad, two segments in a row, or a causal row (its later keys).
        blocked = bool(pad.any()) or bool((segment_ids.max(1, initial=0) != segment_ids.min(1, initial=0)).any()) \
            or (T > 1 and bool(np.any(causal)))
        return cls(torch.from_numpy(index), torch.from_numpy(target_ids.reshape(-1)[index]),
                   torch.from_numpy(kinds), len(index) - n_causal, n_causal, int((~pad).sum()),
                   (blocked, bool(pad.any())))

    def to(self, device, non_blocking: bool = False) -> "TargetPlan":
        """The plan with its tensors on ``device`` (host numbers unchanged)."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return TargetPlan(move(self.index), move(self.tokens), move(self.causal), self.masked_count,
                          self.causal_count, self.num_tokens, self.mask_flags)

    def pin_memory(self) -> "TargetPlan":
        """The plan with its tensors in pinned memory (for asynchronous copies to a GPU)."""
        return TargetPlan(self.index.pin_memory(), self.tokens.pin_memory(), self.causal.pin_memory(),
                          self.masked_count, self.causal_count, self.num_tokens, self.mask_flags)


__all__ = ["IGNORE", "TargetPlan"]
