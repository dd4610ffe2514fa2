"""DeepSpeed checkpoints read without unpickling code.

DeepSpeed's ``TorchCheckpointEngine`` loads with ``torch.load(weights_only=False)``, so anyone who
can write to a run's checkpoint storage (a shared bucket or NFS) could run code on every worker
that resumes from it. This engine loads with ``weights_only=True``: tensors, plain containers and
the three plain record types DeepSpeed's ZeRO optimizers store (a loss-scaler settings object, the
stage enum and a fragment address dataclass), nothing that executes on load.
"""

from __future__ import annotations

import pickle

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from ..checkpoint import UnsafeCheckpointError

SAFE_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """``TorchCheckpointEngine`` whose ``load`` refuses anything but tensors and plain data."""

    def load(self, path: str, map_location=None):
        """The state stored at ``path``; a file holding other objects raises UnsafeCheckpointError."""
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError.refuse(path, exc) from None


__all__ = ["SAFE_GLOBALS", "WeightsOnlyCheckpointEngine"]
