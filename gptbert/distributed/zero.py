"""ZeRO specifics: the flat partition layouts LAMB needs, ZeRO-3 model preparation, and the EMA over
ZeRO-3 partitions.

DeepSpeed imports happen inside the functions that need them, so the layouts and checks can be
used (and tested) without DeepSpeed running.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from common.config import ConfigError, TrainConfig

from ..objective import num_micro_batches, rank_slice, segment_pieces
from ..optim import ShardedLAMB


def zero_partition_segments(zero_optimizer, group_index: int, rank: int):
    """Parameter index of every element of this rank's flat slice of group ``group_index``
    (DeepSpeed ZeRO 1/2 layout: parameters at ``round_robin_bit16_offsets``, equal slices of
    ``partition_size``); padding gets the index ``num_params``."""
    offsets = zero_optimizer.round_robin_bit16_offsets[group_index]
    numels = [m.numel() for m in zero_optimizer.round_robin_bit16_meta[group_index]]
    size = int(zero_optimizer.partition_size[group_index])
    start = rank * size
    seg = torch.full((size,), len(numels), dtype=torch.long)
    for j, (off, n) in enumerate(zip(offsets, numels)):
        a, b = max(off, start), min(off + n, start + size)
        if a < b:
            seg[a - start:b - start] = j
    return seg, len(numels)


def attach_zero_partitions(optimizer: ShardedLAMB, zero_optimizer) -> int:
    """Tell ``optimizer`` the layout of ZeRO 1/2's flat slices; returns how many were attached."""
    flats = getattr(zero_optimizer, "single_partition_of_fp32_groups", None)
    if flats is None:
        return 0
    for i, flat in enumerate(flats):
        pg = zero_optimizer.real_dp_process_group[i]
        seg, n = zero_partition_segments(zero_optimizer, i, dist.get_rank(group=pg))
        if seg.numel() != flat.numel():
            raise RuntimeError(f"ZeRO partition {i}: {flat.numel()} elements, layout says {seg.numel()}")
        optimizer.attach_partitions(flat, seg, n, pg)
    return len(flats)


def zero3_partition_segments(numels: list[int], partition_numels: list[int], rank: int):
    """Parameter index of every element of this rank's ZeRO-3 flat fp32 partition of one sub group.

    ZeRO-3 splits every parameter on its own: rank r holds elements [r*P, (r+1)*P) of the flattened
    parameter (P = its partition size, the last rank's slice zero-padded past the end), and the
    optimizer's flat tensor is these slices concatenated in sub-group order. Padding gets the index
    ``len(numels)``."""
    parts = []
    for j, (n, size) in enumerate(zip(numels, partition_numels)):
        valid = max(0, min(size, n - rank * size))
        parts.append(torch.full((valid,), j, dtype=torch.long))
        parts.append(torch.full((size - valid,), len(numels), dtype=torch.long))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long), len(numels)


def attach_zero3_partitions(optimizer: ShardedLAMB, zero_optimizer) -> int:
    """Tell ``optimizer`` the layout of ZeRO-3's flat fp32 sub-group partitions (the tensors DeepSpeed
    hands the client optimizer, one sub group per step call); returns how many were attached."""
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    groups = getattr(zero_optimizer, "fp16_groups", None)
    if not flats or groups is None:
        return 0
    pg = zero_optimizer.dp_process_group
    rank = dist.get_rank(group=pg)
    for flat, params in zip(flats, groups):
        seg, n = zero3_partition_segments([int(p.ds_numel) for p in params],
                                          [int(p.partition_numel()) for p in params], rank)
        if seg.numel() != flat.numel():
            raise RuntimeError(f"ZeRO-3 partition: {flat.numel()} elements, layout says {seg.numel()}")
        optimizer.attach_partitions(flat, seg, n, pg)
    return len(flats)


def prepare_zero3_model(model) -> None:
    """Make GPTBERT's parameter uses that happen outside their owning module's forward visible to
    ZeRO-3, which gathers parameters per module in forward/backward hooks.

    - ``lm_logits`` (the tied LM head) runs after the model's forward and uses
      ``word_embedding.weight`` and ``head_bias``: it is routed through a parameterless child module
      (so DeepSpeed hooks its forward and backward) with both registered as its external
      parameters. ``state_dict`` names are unchanged (the child owns no parameters).
    - ``layer_weights`` (a ParameterList, never called itself) are read in the root forward:
      registered as external parameters of the root module.
    The relative-position table is owned by the root module and normalised in its forward, so the
    layers only see an activation. Call before ``deepspeed.initialize`` (which hooks submodules).
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    from ..model import GPTBERT

    class Zero3LMHead(torch.nn.Module):
        def __init__(self, owner):
            super().__init__()
            self._owner = [owner]  # a list: not a child module (no cycle, no parameters)

        def forward(self, hidden):
            return GPTBERT.lm_logits(self._owner[0], hidden)

    head = Zero3LMHead(model)
    model.add_module("zero3_lm_head", head)
    model.__dict__["lm_logits"] = head  # instance attribute wins over the class method
    register_external_parameter(head, model.word_embedding.weight)
    register_external_parameter(head, model.head_bias)
    if model.layer_weights is not None:
        for alpha in model.layer_weights:
            register_external_parameter(model, alpha)


class Zero3EMA:
    """The trainer's EMA under ZeRO-3, over this rank's parameter partitions (``param.ds_tensor``).

    The average is elementwise, so averaging each rank's slice equals slicing the full average: no
    communication per step and 1/world of the memory. ``state_dict()`` is collective (every rank
    calls it; an all-gather per parameter) and returns full fp32 tensors, the same format as
    ``optim.EMA``, so a checkpoint resumes at any world size; ``load_state_dict`` takes full
    tensors and keeps this rank's slice.
    """

    def __init__(self, model, decay: float, process_group=None):
        self.decay = decay
        self.group = process_group
        self.params = dict(model.named_parameters())
        self.shadow = {n: p.ds_tensor.detach().float().clone() for n, p in self.params.items()}
        self._version = 0
        self._full: tuple[int, dict] | None = None

    @torch.no_grad()
    def update(self, model=None) -> None:
        """Fold this rank's current partitions into the average (``model`` is unused: the parameters are bound
        at construction)."""
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.ds_tensor.detach().float(), 1.0 - self.decay)
        self._version += 1

    def _gather(self, tensors: dict) -> dict:
        world = dist.get_world_size(group=self.group)
        out = {}
        for n, p in self.params.items():
            part = tensors[n].contiguous()
            pieces = [torch.empty_like(part) for _ in range(world)]
            dist.all_gather(pieces, part, group=self.group)
            out[n] = torch.cat(pieces)[: p.ds_numel].view(p.ds_shape).cpu()
        return out

    def state_dict(self) -> dict:
        """Full fp32 EMA tensors by parameter name (collective; gathered once per step)."""
        if self._full is None or self._full[0] != self._version:
            self._full = (self._version, self._gather(self.shadow))
        return dict(self._full[1])

    def _slice(self, name: str, full):
        p = self.params[name]
        size = int(p.partition_numel())
        start = dist.get_rank(group=self.group) * size
        flat = full.detach().reshape(-1).float()
        out = torch.zeros(size, dtype=torch.float32, device=p.ds_tensor.device)
        valid = max(0, min(size, flat.numel() - start))
        out[:valid] = flat[start:start + valid]
        return out

    def load_state_dict(self, state: dict) -> None:
        """Keep this rank's slice of the full tensors in ``state`` (as ``state_dict`` returns them); a missing
        parameter or a shape other than the model's is a ValueError."""
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks parameters: {sorted(missing)[:3]}")
        for n in self.shadow:
            if tuple(state[n].shape) != tuple(self.params[n].ds_shape):
                raise ValueError(f"EMA state: {n} has shape {tuple(state[n].shape)}, "
                                 f"model has {tuple(self.params[n].ds_shape)}")
            self.shadow[n].copy_(self._slice(n, state[n]))
        self._version += 1
        self._full = None

    @torch.no_grad()
    def _write(self, partitions: dict, full: dict) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        for n, p in self.params.items():
            p.ds_tensor.copy_(partitions[n].to(p.ds_tensor.dtype))
            # Persistent (small) parameters stay gathered between forwards: refresh their data.
            if p.ds_status == ZeroParamStatus.AVAILABLE and p.numel() == p.ds_numel:
                p.data.copy_(full[n].to(p.device, p.dtype).view_as(p))

    def backup(self, model=None) -> tuple[dict, dict]:
        """This rank's current partitions and full copies of gathered parameters, for ``restore``."""
        parts = {n: p.ds_tensor.detach().clone() for n, p in self.params.items()}
        full = {n: p.detach().clone() for n, p in self.params.items() if p.numel() == p.ds_numel}
        return parts, full

    def restore(self, model, saved: tuple[dict, dict]) -> None:
        """Write the partitions and full copies saved by ``backup`` back into the engine."""
        parts, full = saved
        self._write(parts, full)

    def copy_to(self, model=None) -> None:
        """Write the average into the engine's partitions (collective: every rank calls it)."""
        self._write(self.shadow, self.state_dict())


def check_zero3_steps(train_cfg: TrainConfig, world: int) -> None:
    """Under ZeRO-3 every rank must run every forward (parameters are gathered collectively inside
    each one), so refuse a schedule in which some step leaves a rank without examples in a
    micro-batch (the loop would give that rank a zero loss and no forward)."""
    seen = set()
    for step in range(train_cfg.steps):
        seq_len, batch = train_cfg.seq_len_at(step), train_cfg.batch_size_at(step)
        if (seq_len, batch) in seen:
            continue
        seen.add((seq_len, batch))
        micro = max(1, train_cfg.micro_batch_tokens // seq_len)
        n = num_micro_batches(batch, world, micro)
        smallest = min(len(rank_slice(batch, r, world)) for r in range(world))
        if smallest < n:
            raise ConfigError("train.micro_batch_tokens",
                              f"step {step}: {batch} examples over {world} ranks leave a rank without "
                              "examples in a micro-batch, which ZeRO-3 cannot run (every rank must run "
                              "each forward); use larger batches or ZeRO 0-2")


def check_zero3_validation(train_cfg: TrainConfig, valid, world: int) -> None:
    """Under ZeRO-3 every rank must run the same number of validation forwards (each one gathers
    parameters collectively); refuse a validation set whose split leaves ranks uneven."""
    tc = train_cfg
    if valid is None or tc.valid_examples == 0:
        return
    n = len(segment_pieces(valid.lengths, tc.max_seq_len, tc.valid_examples))
    micro = max(1, tc.micro_batch_tokens // tc.max_seq_len)
    counts = {-(-len(rank_slice(n, r, world)) // micro) for r in range(world)}
    if len(counts) > 1:
        raise ConfigError("train.valid_examples",
                          f"{n} validation examples in micro-batches of {micro} give the {world} ranks "
                          f"different numbers of forwards ({sorted(counts)}), which ZeRO-3 cannot run; "
                          f"use a multiple of {world * micro} examples or ZeRO 0-2")


__all__ = ["Zero3EMA", "attach_zero3_partitions", "attach_zero_partitions", "check_zero3_steps",
           "check_zero3_validation", "prepare_zero3_model", "zero3_partition_segments", "zero_partition_segments"]
