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

Initialisation: when the LightningModule says its ``configure_model`` only builds fresh weights
(``meta_device_init = True``, as PretrainModule does), the decoder is built on the meta device
(shapes only, nothing allocated), sharded, and then each rank allocates and initialises just its
own shards (``meta_init.materialize_sharded``): the result equals the weights an unsharded build
with the same seed holds, so fsdp2 starts from the same model as ddp. Modules that load weights
in ``configure_model`` (fine-tuning) are built whole, then sharded.

Mixed precision: ``param_dtype`` (e.g. ``bfloat16``) is the dtype blocks compute in,
``reduce_dtype`` the gradient reduce-scatter dtype (float32 by default: summing many ranks'
gradients in bf16 loses digits); the sharded master weights stay float32.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from moeframe_parallel.atomic import AtomicFolderCheckpoints
from moeframe_parallel.layouts import FSDP2Layout
from moeframe_parallel.meta_init import has_meta_tensors, materialize_sharded

__all__ = ["FSDP2Strategy"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"fsdp2: unknown dtype {name!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


class FSDP2Strategy(AtomicFolderCheckpoints, ModelParallelStrategy, FSDP2Layout):
    """Pure data-parallel FSDP2 over every rank, one unit per decoder block."""

    strategy_name = "fsdp2"

    def __init__(
        self,
        reshard_after_forward: bool = True,
        param_dtype: str | None = None,
        reduce_dtype: str | None = "float32",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.mp_policy = MixedPrecisionPolicy(param_dtype=_dtype(param_dtype), reduce_dtype=_dtype(reduce_dtype))

    def setup_environment(self) -> None:
        # all ranks shard the weights (no tensor parallelism in this preset)
        assert self.parallel_devices is not None
        self._data_parallel_size = self.num_nodes * len(self.parallel_devices)
        self._tensor_parallel_size = 1
        super().setup_environment()

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        if empty_init is None:
            empty_init = bool(getattr(self.lightning_module, "meta_device_init", False))
        with super().tensor_init_context(empty_init=empty_init):
            yield

    def setup(self, trainer: Any) -> None:
        module = self.lightning_module
        self.shard(module)
        decoder = getattr(module, "decoder", None)
        if decoder is not None and has_meta_tensors(decoder):
            # before Lightning's own materialisation, which would call nn.Linear.reset_parameters
            # (the wrong init, drawn per shard)
            materialize_sharded(decoder, self.root_device)
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
