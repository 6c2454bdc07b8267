"""Initialise a decoder that was built on the meta device and then sharded with FSDP2.

Each rank allocates only its own shards (``to_empty``), then fills them module by module: the
module's parameters are drawn whole, in the order and with the rules of ``Decoder.init_weights``,
and each rank keeps its slice. So the sharded model holds exactly the weights an unsharded build
with the same seed would hold (the same weights DDP and single-device runs start from), whatever
the number of ranks.

Why not DTensor random ops directly: on the CPU (gloo) torch draws every rank's shard from the
same local random stream (torch 2.13: rows 0 and 4 of an 8-row weight over 2 ranks come out equal),
which silently duplicates experts; drawing whole and slicing is correct on every device. The cost
is that each rank draws every parameter once (one module's full parameters at a time, not the
model), the scheme Megatron uses for its CPU initialisation of sharded weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from moeframe.plugin import default_init, init_random_stream

__all__ = ["has_meta_tensors", "materialize_sharded"]


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


@contextmanager
def _whole_parameters(module: nn.Module, device: torch.device) -> Iterator[dict[str, tuple[nn.Parameter, DTensor]]]:
    """Swap the module's own sharded parameters for whole, unsharded ones while it initialises."""
    swapped: dict[str, tuple[nn.Parameter, DTensor]] = {}
    for name, param in list(module.named_parameters(recurse=False)):
        if isinstance(param, DTensor):
            whole = nn.Parameter(
                torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=param.requires_grad
            )
            swapped[name] = (whole, param)
            module.register_parameter(name, whole)
    try:
        yield swapped
    finally:
        for name, (_, sharded) in swapped.items():
            module.register_parameter(name, sharded)


@torch.no_grad()
def _keep_local_slices(swapped: dict[str, tuple[nn.Parameter, DTensor]]) -> None:
    for whole, sharded in swapped.values():
        # every rank drew the same whole tensor, so each takes its slice locally (no scatter)
        local = distribute_tensor(whole.detach(), sharded.device_mesh, sharded.placements, src_data_rank=None)
        sharded.to_local().copy_(local.to_local())


@torch.no_grad()
def materialize_sharded(decoder: nn.Module, device: str | torch.device) -> None:
    """Allocate ``decoder``'s shards on ``device`` and initialise them as ``Decoder.init_weights``
    would initialise the whole model (same random stream, same order, same rules)."""
    device = torch.device(device)
    decoder.to_empty(device=device)
    std = decoder.config.init_std
    with init_random_stream():
        for module in decoder.modules():
            custom = getattr(module, "init_weights", None)
            with _whole_parameters(module, device) as swapped:
                if module is not decoder and callable(custom):
                    custom(std)
                else:
                    default_init(module, std)
            _keep_local_slices(swapped)
