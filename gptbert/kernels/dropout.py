"""CPU dropout with a cheaper mask, replacing ``nn.Dropout`` modules of a built model.

The plain version is ``nn.Dropout`` (``F.dropout``). On CPU, ``bernoulli_`` draws one value per
element and was about a fifth of a training step; this mask costs three to five times less. The
drop probability is rounded to a multiple of 2**-16 (0.1 -> 0.100006) and kept values are scaled
by the exact inverse keep rate, so the result is unbiased. Other devices keep ``F.dropout``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Integer types of a float's size (numpy unsigned, numpy signed, torch): ops that only move or
# compare bits run on these views.
SAME_SIZE_INT = {2: (np.uint16, np.int16, torch.int16), 4: (np.uint32, np.int32, torch.int32),
                 8: (np.uint64, np.int64, torch.int64)}


@functools.lru_cache(maxsize=None)
def _scale_bits(cut: int, dtype: torch.dtype) -> int:
    """The bit pattern, as an unsigned integer, of 65536 / (65536 - cut) in ``dtype``."""
    unsigned, _, torch_int = SAME_SIZE_INT[dtype.itemsize]
    return torch.tensor(65536 / (65536 - cut), dtype=dtype).view(torch_int).item() & np.iinfo(unsigned).max


def keep_mask(n: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    """``n`` values of ``dtype``: 0 with probability ``p`` rounded to a multiple of 2**-16, else
    the inverse keep rate. Each 64-bit random value gives four 16-bit uniforms.

    One 64-bit draw from torch's default generator seeds a numpy SFC64 stream, so
    ``torch.manual_seed`` and a saved torch RNG state still fix every mask. The mask is built in
    numpy as ``keep * bit pattern of the scale``: torch's CPU Mersenne Twister (about 10 ns per 64
    bits) and its comparisons and ``where`` with bool masks (scalar loops) cost three to five
    times as much.
    """
    cut = round(p * 65536)
    unsigned, signed, _ = SAME_SIZE_INT[dtype.itemsize]
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    uniforms = np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.uint16)[:n]
    keep = np.greater_equal(uniforms, cut).view(np.uint8)
    pattern = np.multiply(keep, unsigned(_scale_bits(cut, dtype)), dtype=unsigned)
    return torch.from_numpy(pattern.view(signed)).view(dtype)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the cheaper mask on CPU (see the module docstring)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    # The mask holds 0 or the scale in x's dtype, so autograd's backward is one multiply.
    return x * keep_mask(x.numel(), p, x.dtype).view(x.shape)


class CpuDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask is ``keep_mask``; the same module everywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop elements of ``x`` with probability ``p`` in training mode."""
        return dropout(x, self.p, self.training)


def apply(model: nn.Module) -> int:
    """Replace every plain ``nn.Dropout`` of ``model`` by a ``CpuDropout`` of the same rate; returns
    how many were replaced."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, name, CpuDropout(child.p, child.inplace))
                count += 1
    return count
