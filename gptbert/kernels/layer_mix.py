"""Layer weighting (DenseFormer / ELC-BERT style) as one buffer and matrix-vector products.

Plain version: ``gptbert.model.LayerWeighting`` keeps the block outputs in a list and takes each
weighted sum term by term; its backward reads history rows 0..k+1 again for every mix (quadratic
in depth) and allocates fresh tensors each step. This kernel stores the history [embedding,
block 0, ..., block k] as rows of one buffer, so each weighted sum is a single ``mv``; the
weights' gradients of every mix come from one (blocks+1, N) x (N, blocks) product; and on CPU the
buffers are recycled between training steps (their first writes are page faults otherwise, which
cost more than the writes themselves). The sums run in fp32 whatever the autocast context, as the
plain version's elementwise products do, so CPU and CUDA give one meaning of bf16.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class History:
    """Per-forward storage of the block outputs as one buffer. ``params`` are the mixes' weight
    Parameters, one per block; ``pool`` (a list the kernel keeps) recycles the buffers between
    steps. A history gives its buffers back when it is freed, i.e. once its backward graph is gone.
    """

    POOL_SIZE = 4  # buffers kept: two histories alive at once (e.g. two forwards, one backward)

    def __init__(self, first: torch.Tensor, params, pool: list | None = None):
        self.params = list(params)
        self.pool = pool
        self.buf = self._take((len(self.params) + 1, first.numel()), first)
        self.buf[0].copy_(first.detach().reshape(-1))
        self.alphas = [a.detach() for a in self.params]  # each mix's weights, as values
        self.upstream: torch.Tensor | None = None  # backward: row k = gradient of mix k's output
        self.hi = -1  # backward: the highest mix whose gradient this pass has written
        self.last_k = -1  # backward: the mix that ran last (mixes run in decreasing k in a pass)

    def _take(self, shape, like: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            for i, t in enumerate(self.pool):
                if t.shape == shape and t.dtype == like.dtype and t.device == like.device:
                    return self.pool.pop(i)
        return like.new_empty(shape)

    def take_upstream(self) -> torch.Tensor:
        """The backward's buffer of incoming gradients, one row per mix."""
        if self.upstream is None:
            self.upstream = self._take((len(self.alphas), self.buf.size(1)), self.buf)
        return self.upstream

    def __del__(self):
        # getattr: under torch.compile, dynamo may build an instance without running __init__.
        if getattr(self, "pool", None) is not None:
            for t in (self.buf, self.upstream):
                if t is not None:
                    self.pool.insert(0, t)
            del self.pool[self.POOL_SIZE:]


class LayerMix(torch.autograd.Function):
    """After block k: write its output, the residual sum ``x + delta``, straight into the history
    (no separate add and copy), return sum_j alpha^k_j * history_j.

    Backward stores its incoming gradient g_k as row k of an upstream buffer; the gradient of block
    k's output (history entry k+1) is then sum_{k' >= k} alpha^{k'}_{k+1} g_{k'}, one matrix-vector
    product over rows already written (every later mix, its only other reader, ran before it). That
    gradient goes to both ``x`` and ``delta`` (autograd casts it to delta's dtype).

    The weights' gradients, grad alpha^k_j = history_j . g_k, come from the first mix (k = 0), which
    takes every mix's Parameter as an input and runs last in a backward pass: one product reads the
    history and the upstream rows once.
    """

    @staticmethod
    def forward(ctx, x, delta, first, history: History, k: int, *params):
        torch.add(x, delta, out=history.buf[k + 1].view(x.shape))
        ctx.history, ctx.k, ctx.shape = history, k, x.shape
        with torch.autocast(history.buf.device.type, enabled=False):  # fp32, as the plain sums
            # mv, not mm: a weighted sum, and FLOP counters leave it out of the matmul FLOPs.
            return torch.mv(history.buf[: k + 2].t(), history.alphas[k]).view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        history, k = ctx.history, ctx.k
        upstream = history.take_upstream()
        if k >= history.last_k:  # a (new) backward pass begins here
            history.hi = k
        history.last_k = k
        hi = history.hi
        upstream[k].copy_(grad_out.reshape(-1))
        with torch.autocast(history.buf.device.type, enabled=False):
            rows = upstream[k: hi + 1]
            coeff = torch.stack([history.alphas[j][k + 1] for j in range(k, hi + 1)])
            grad_x = torch.mv(rows.t(), coeff).view(ctx.shape)
            if k > 0:
                return grad_x, grad_x, None, None, None
            coeff0 = torch.stack([history.alphas[j][0] for j in range(hi + 1)])
            grad_first = torch.mv(upstream[: hi + 1].t(), coeff0).view(ctx.shape)
            dots = history.buf[: hi + 2] @ upstream[: hi + 1].t()  # [j, k'] = history_j . g_k'
        grads = [dots[: j + 2, j] if j <= hi else torch.zeros_like(history.alphas[j])
                 for j in range(len(history.alphas))]
        return (grad_x, grad_x, grad_first, None, None, *grads)


class BufferedLayerWeighting:
    """The kernel with the plain ``LayerWeighting``'s interface: ``begin`` a forward's history,
    then ``__call__`` once per block."""

    def __init__(self):
        self.pool: list[torch.Tensor] = []  # buffers reused across CPU training steps

    def begin(self, first: torch.Tensor, weights) -> tuple[History, torch.Tensor]:
        """A history starting with the embedding output ``first`` (kept beside it: its gradient
        comes from the first mix's backward)."""
        # CPU training only: CUDA's caching allocator already reuses memory, and inference should
        # not hold buffers between calls.
        pool = self.pool if first.device.type == "cpu" and torch.is_grad_enabled() else None
        return History(first, weights, pool), first

    def __call__(self, state, x: torch.Tensor, delta: torch.Tensor, k: int) -> torch.Tensor:
        history, first = state
        # The first mix carries every mix's weights (their gradients come from its backward).
        return LayerMix.apply(x, delta, first, history, k, *(history.params if k == 0 else ()))


def apply(model: nn.Module) -> int:
    """Install the kernel in ``model`` when it has layer weighting; returns 1 if installed."""
    if getattr(model, "layer_weights", None) is None:
        return 0
    model.layer_mix = BufferedLayerWeighting()
    return 1
