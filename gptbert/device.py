"""Where a stage computes: one meaning of a device setting for every stage that runs a model.

``train.device`` (pretraining, on every launcher) and ``eval.device`` (evaluation, fine-tuning,
scoring, generation, export checks) take the same values:

- ``auto``: the first CUDA device when one is present, else the CPU;
- ``cpu``;
- ``cuda``: the current CUDA device; ``cuda:N``: device N.

Asking for CUDA where there is none (or for a device index that does not exist) is a
``DeviceError`` naming the config field, raised before any work: never a silent CPU run.
"""

from __future__ import annotations

import re

import torch

from common.config.base import ConfigError, check_device

_CUDA_INDEX = re.compile(r"cuda:(\d+)")


class DeviceError(ConfigError):
    """A device setting that this machine cannot honour (the message names the config field)."""


def resolve_device(spec: str, field: str = "train.device") -> torch.device:
    """The ``torch.device`` that ``spec`` names on this machine (see the module docstring).

    ``field`` is the config field the value came from, for the error message.
    """
    check_device(spec, field)
    if spec == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if available else torch.device("cpu")
    if not available:
        raise DeviceError(field, f"{spec!r} requested but this machine has no CUDA device (torch "
                                 f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use cpu or auto")
    match = _CUDA_INDEX.fullmatch(spec)
    index = int(match.group(1)) if match else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(field, f"{spec!r} requested but this machine has {count} CUDA "
                                 f"device{'s' if count != 1 else ''}")
    return torch.device("cuda", index)


def wants_cuda(spec: str) -> bool:
    """True when ``spec`` can only be satisfied by CUDA (``cuda`` or ``cuda:N``)."""
    return spec == "cuda" or bool(_CUDA_INDEX.fullmatch(str(spec)))


__all__ = ["DeviceError", "resolve_device", "wants_cuda"]
