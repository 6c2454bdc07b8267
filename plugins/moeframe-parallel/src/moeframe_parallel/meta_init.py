"""Initialise a decoder that was built on the meta device and then sharded (FSDP2) or cut (PP).

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

A pipeline rank (``materialize_kept``) holds only some layers of the decoder: it allocates those,
and walks the whole meta decoder in init order; a tensor it keeps is drawn in place, a tensor of a
layer another rank runs is drawn into a scratch buffer freed right after (one parameter at a time;
a module with its own ``init_weights``, a router, all of its small tensors at once). Random numbers
are consumed exactly as by the whole build (a random stream cannot skip ahead portably), so the
kept weights are bit-equal to it while the memory is the stage plus the largest tensor (at 671B:
one stacked expert weight of a layer, 256 × 2048 × 7168, 7 GiB in bf16, 14 GiB in fp32). Every
rank draws the whole model's numbers once; on a GPU that is seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from moeframe.plugin import default_init, init_random_stream

__all__ = ["InitStep", "has_meta_tensors", "init_order", "materialize_kept", "materialize_sharded"]


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


#: meta tensor id -> keeps its part of the whole tensor drawn for it (an expert-parallel shard)
Slices = dict[int, Callable[[torch.Tensor], None]]


@dataclass(frozen=True)
class InitStep:
    """One module of a whole meta-device decoder, as ``Decoder.init_weights`` visits it: its own
    parameters and buffers (the meta tensors, which identify them after the decoder is cut)."""

    module: nn.Module
    params: tuple[tuple[str, nn.Parameter], ...]
    buffers: tuple[tuple[str, torch.Tensor], ...]
    custom: bool  # the module initialises itself (``init_weights(std)``), else ``default_init``


def init_order(decoder: nn.Module) -> list[InitStep]:
    """Record the decoder's modules in ``Decoder.init_weights`` order, before it is cut."""
    return [
        InitStep(
            module,
            tuple(module.named_parameters(recurse=False)),
            tuple(module.named_buffers(recurse=False)),
            module is not decoder and callable(getattr(module, "init_weights", None)),
        )
        for module in decoder.modules()
    ]


def _allocate(kept: nn.Module, device: torch.device) -> dict[int, torch.Tensor]:
    """Give every meta tensor left in ``kept`` uninitialised storage on ``device``; tied parameters
    (the head sharing the embedding) stay one tensor. Returns meta tensor id -> real tensor."""
    real: dict[int, torch.Tensor] = {}
    for module in kept.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                if id(p) not in real:
                    real[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                setattr(module, name, real[id(p)])
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_meta:
                real.setdefault(id(b), torch.empty_like(b, device=device))
                setattr(module, name, real[id(b)])
    return real


@torch.no_grad()
def materialize_kept(
    order: list[InitStep],
    kept: nn.Module,
    std: float,
    device: str | torch.device,
    slices: Slices | None = None,
) -> None:
    """Allocate what ``kept`` (the cut model) still holds on the meta device and initialise it as
    the whole decoder's ``init_weights`` would (``order`` from ``init_order`` before the cut).

    ``slices``: meta parameter id -> a function keeping its part of the whole drawn tensor (an
    expert-parallel shard built on meta); such a parameter is drawn whole into scratch.
    """
    device, slices = torch.device(device), slices or {}
    real = _allocate(kept, device)
    with init_random_stream():
        for step in order:
            if step.custom:
                _init_custom(step, std, device, real, slices)
            else:
                for name, t in step.params:  # one parameter at a time: the scratch is one tensor
                    holder = nn.Module()  # default_init's rules (by name and rank) on this one alone
                    holder.register_parameter(name, _target(t, device, real, slices))
                    default_init(holder, std)
                    if id(t) in slices:
                        slices[id(t)](getattr(holder, name))


def _target(t: torch.Tensor, device: torch.device, real: dict[int, torch.Tensor], slices: Slices) -> torch.Tensor:
    """Where ``t``'s values are drawn: its allocated tensor when this rank keeps it, else scratch
    (another rank's tensor, or an expert-parallel shard's whole tensor), dropped after the draw."""
    if id(t) in real and id(t) not in slices:
        return real[id(t)]
    scratch = torch.empty_like(t, device=device)
    return nn.Parameter(scratch, requires_grad=False) if isinstance(t, nn.Parameter) else scratch


def _init_custom(
    step: InitStep, std: float, device: torch.device, real: dict[int, torch.Tensor], slices: Slices
) -> None:
    """A module that initialises itself (a router with its buffers): all its tensors at once."""
    tensors = (*step.params, *step.buffers)
    drawn: dict[int, torch.Tensor] = {}
    for name, t in tensors:
        drawn[id(t)] = _target(t, device, real, slices)
        setattr(step.module, name, drawn[id(t)])
    try:
        step.module.init_weights(std)
    finally:
        for name, t in tensors:  # a dropped module goes back to meta
            if id(t) not in real:
                setattr(step.module, name, t)
    for key, whole in drawn.items():
        if key in slices:
            slices[key](whole)
