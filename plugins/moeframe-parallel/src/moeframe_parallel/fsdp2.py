"""``fsdp2``: PyTorch FSDP2 (``fully_shard``) per decoder block, through Lightning's
ModelParallelStrategy.

Each decoder block becomes one FSDP unit: its parameters are sharded over the data-parallel
ranks, all-gathered just before the block runs and freed after it (``reshard_after_forward``),
so the peak holds one block's full weights at a time; the root unit takes the embedding,
final norm and head. A block is the natural unit for a MoE decoder: its experts are the bulk of
the parameters and they are used (all-gathered) together.

Lightning's ModelParallelStrategy expects ``configure_model`` to apply the parallelism; moeframe's
LightningModules build a plain decoder there (they do not know the layout), so this strategy
applies ``fully_shard`` itself right after ``configure_model`` and before Lightning moves the model
and builds the optimizer over the sharded parameters (DTensors).

Initialisation: the decoder is built and initialised whole on every rank (same seed, so the
same weights as under DDP), then sharded; each rank then keeps only its shards. Meta-device
init (shapes only, each rank allocating and initialising just its shards) is NOT done yet:
on the CPU, DTensor random ops draw every rank's shard from the same local stream (checked with
torch 2.13: rows 0 and 4 of an 8-row weight sharded over 2 ranks come out identical), which
would duplicate experts. It needs a per-parameter materialise-then-shard init.

Mixed precision: ``param_dtype`` (e.g. ``bfloat16``) is the dtype blocks compute in,
``reduce_dtype`` the gradient reduce-scatter dtype (float32 by default: summing many ranks'
gradients in bf16 loses digits); the sharded master weights stay float32.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

__all__ = ["FSDP2Strategy"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"fsdp2: unknown dtype {name!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


class FSDP2Strategy(ModelParallelStrategy):
    """Pure data-parallel FSDP2 over every rank, one unit per decoder block."""

    strategy_name = "fsdp2"

    def __init__(self, reshard_after_forward: bool = True, param_dtype: Optional[str] = None,
                 reduce_dtype: Optional[str] = "float32", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.mp_policy = MixedPrecisionPolicy(param_dtype=_dtype(param_dtype), reduce_dtype=_dtype(reduce_dtype))

    def setup_environment(self) -> None:
        # all ranks shard the weights (no tensor parallelism in this preset)
        assert self.parallel_devices is not None
        self._data_parallel_size = self.num_nodes * len(self.parallel_devices)
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        self.shard(self.lightning_module)
        super().setup(trainer)

    def shard(self, module: torch.nn.Module) -> None:
        decoder = getattr(module, "decoder", None)
        if decoder is None or getattr(decoder, "_moeframe_fsdp2", False):
            return
        mesh = self.device_mesh["data_parallel"]
        options = dict(mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=self.mp_policy)
        for block in decoder.layers:
            fully_shard(block, **options)
        fully_shard(decoder, **options)
        decoder._moeframe_fsdp2 = True
