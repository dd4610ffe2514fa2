"""ShardedLAMB against LAMB: the check the optimiser and launch tests share."""

from __future__ import annotations

import torch

from gptbert.optim import LAMB, ShardedLAMB


def assert_sharded_steps_as_lamb(groups: list[list[torch.Tensor]], weight_decays: list[float], pad: int,
                                 steps: int = 3) -> None:
    """One flat tensor per group (``pad`` zero elements at its end, as ZeRO pads partitions) with
    the element layout attached must step exactly like LAMB on the separate parameters."""
    real = [[p.detach().clone().requires_grad_() for p in params] for params in groups]
    flats = [torch.cat([p.detach().reshape(-1) for p in params] + [torch.zeros(pad)]).requires_grad_()
             for params in real]
    lamb = LAMB([{"params": ps, "weight_decay": w} for ps, w in zip(real, weight_decays)], lr=0.05)
    sharded = ShardedLAMB([{"params": [f], "weight_decay": w} for f, w in zip(flats, weight_decays)], lr=0.05)
    for f, params in zip(flats, real):
        layout = torch.cat([torch.full((p.numel(),), i) for i, p in enumerate(params)]
                           + [torch.full((pad,), len(params))])
        sharded.attach_partitions(f, layout, len(params))
    for _ in range(steps):
        for params, f in zip(real, flats):
            grads = [torch.randn_like(p) for p in params]
            for p, g in zip(params, grads):
                p.grad = g
            f.grad = torch.cat([g.reshape(-1) for g in grads] + [torch.zeros(pad)])
        lamb.step()
        sharded.step()
    for params, f in zip(real, flats):
        expect = torch.cat([p.detach().reshape(-1) for p in params])
        assert torch.allclose(f.detach()[:-pad], expect, atol=1e-6, rtol=1e-5)
