"""DeepSpeed ZeRO presets for MoE training that run on GPUs (nccl) and on CPUs (gloo).

ZeRO partitions what plain data parallelism replicates: stage 1 the optimizer state, stage 2
also the gradients, stage 3 also the parameters (gathered layer by layer just in time).
ZeRO-Offload moves the partitions to host memory. For a MoE the routed experts hold most of the
parameters but each token touches only K of them, so the memory ZeRO saves is mostly expert
state while the communication it adds is paid on every parameter: stage 1/2 is the usual choice,
stage 3 when even the parameters do not fit.

Lightning's ``DeepSpeedStrategy`` refuses anything but CUDA. DeepSpeed itself runs on the CPU
(it falls back to gloo), so ``CPUCapableDeepSpeedStrategy`` only removes Lightning's guards on a
CPU accelerator: the CUDA check and the device-index validation (the process group is set up as
``DDPStrategy`` does it; DeepSpeed adopts it). Its root device on a CPU is ``cpu:<local rank>``:
Lightning passes that index to ``deepspeed.initialize`` as the device rank, which a bare ``cpu``
device lacks. On a GPU it behaves exactly like the stock strategy.

Settings DeepSpeed cannot honour are rejected when the strategy is constructed, before any
process group exists: a hang in a collective is a far worse error message than a ValueError.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.accelerators.cuda import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from moeframe.plugin import check_zero_layout, moe_layers
from moeframe_parallel.atomic import AtomicFolderCheckpoints
from moeframe_parallel.layouts import Zero1Layout, Zero2Layout, Zero3Layout, Zero3OffloadLayout, ZeroPresetLayout

__all__ = [
    "CPUCapableDeepSpeedStrategy",
    "Zero1Strategy",
    "Zero2Strategy",
    "Zero3Strategy",
    "Zero3OffloadStrategy",
    "check_zero_settings",
]


def check_zero_settings(
    stage: int,
    offload_parameters: bool,
    offload_params_device: str,
    offload_optimizer_device: str,
    nvme_path: str | None,
) -> None:
    """The ZeRO check ``moeframe inspect`` runs too: a ConfigError for a setting DeepSpeed would
    ignore or fail on deep inside a run."""
    check_zero_layout(stage, offload_parameters, offload_params_device, offload_optimizer_device, nvme_path)


class CPUCapableDeepSpeedStrategy(AtomicFolderCheckpoints, DeepSpeedStrategy, ZeroPresetLayout):
    """Lightning's DeepSpeedStrategy, also on a CPU accelerator (gloo), with atomic checkpoint folders.

    The layout a preset runs (``zero_stage``, ``offloads_parameters``) comes from its description
    in ``moeframe_parallel.layouts``, which ``moeframe inspect`` reads without importing Lightning."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_zero_settings(
            kwargs.get("stage", 2),
            kwargs.get("offload_parameters", False),
            kwargs.get("offload_params_device", "cpu"),
            kwargs.get("offload_optimizer_device", "cpu"),
            kwargs.get("nvme_path", "/local_nvme"),
        )
        super().__init__(*args, **kwargs)

    def _on_cpu(self) -> bool:
        return not isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        if not self._on_cpu():
            return super().setup_environment()
        # skip DeepSpeedStrategy's CUDA-only guard, keep everything DDPStrategy sets up
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            return super().setup_distributed()
        # the stock version validates CUDA device indices, which a CPU does not have. DDP's setup
        # starts the gloo group; deepspeed.initialize adopts an initialised torch.distributed
        DDPStrategy.setup_distributed(self)

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        # Lightning builds a ZeRO-3 model inside ``deepspeed.zero.Init``, which hands out
        # parameters already flattened to 1-D. moeframe's optimizer groups weights for decay by
        # ``p.dim() >= 2``, so every matrix would lose its weight decay (and DeepSpeed then drops
        # the empty group under the LR scheduler). The model is therefore built whole and
        # partitioned by ``deepspeed.initialize``: correct groups, at the price of one full copy
        # per rank while the model is set up (fine up to models that fit one host's memory).
        yield

    def setup(self, trainer: Any) -> None:
        # DeepSpeed only uses the micro-batch size for throughput logging. Lightning would read it
        # from the loader's batch sampler, which an iterable (streaming) dataset does not have;
        # ask the DataModule, else the loader Lightning has set up (none yet when fit starts), else 1.
        self.config.setdefault("train_micro_batch_size_per_gpu", _micro_batch_size(trainer))
        super().setup(trainer)

    @property
    def root_device(self) -> torch.device:
        # Lightning hands ``deepspeed.initialize`` this device's index as the engine's device rank,
        # which DeepSpeedEngine compares with ints; a plain CPU device has none. A CPU device that
        # names the local rank gives it one; tensors and modules moved to ``cpu:N`` land on ``cpu``.
        device = super().root_device
        return torch.device("cpu", self.local_rank) if device.type == "cpu" and device.index is None else device

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Evaluating a ZeRO-3 checkpoint folder (``moeframe validate|test|predict``): DeepSpeed 0.19's
        optimizer-less engine cannot read the weight partitions itself (it calls a ZeRO-optimizer
        method its inference wrapper lacks, on GPU and CPU alike), so the fp32 weights are
        consolidated from the partition files with DeepSpeed's own reader and loaded through
        Lightning's gathered ZeRO-3 load. Every rank holds the full fp32 model once while loading;
        for models beyond one host, convert the checkpoint first (``moeframe convert``)."""
        from lightning.pytorch.trainer.states import TrainerFn

        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        if not (self.zero_stage_3 and not fitting and Path(checkpoint_path).is_dir()):
            return super().load_checkpoint(checkpoint_path, weights_only)
        return _consolidated_zero3_checkpoint(Path(checkpoint_path))

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        if checkpoint.get(_CONSOLIDATED):
            self.model_to_device()
            _load_into_zero3(self.lightning_module, checkpoint["state_dict"], strict)
            return
        super().load_model_state_dict(checkpoint, strict)

    def init_deepspeed(self) -> None:
        if self.zero_stage_3:
            _register_router_weights_with_moe(self.model)
        super().init_deepspeed()


def _micro_batch_size(trainer: Any) -> int:
    batch_size = getattr(trainer.datamodule, "batch_size", None)
    if isinstance(batch_size, int) and batch_size > 0:
        return batch_size
    loader = trainer.train_dataloader
    return getattr(getattr(loader, "batch_sampler", None), "batch_size", None) or getattr(loader, "batch_size", 1) or 1


_CONSOLIDATED = "moeframe_zero3_consolidated"
# what DeepSpeed keeps for itself in a model-states file; the rest is Lightning's client state
_DEEPSPEED_KEYS = (
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "sparse_tensor_module_names",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "ds_config",
    "ds_version",
)


def _consolidated_zero3_checkpoint(folder: Path) -> dict[str, Any]:
    """Lightning's checkpoint dict for a ZeRO-3 folder, its weights gathered from the partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (folder / "latest").read_text().strip() if (folder / "latest").exists() else "checkpoint"
    states = sorted((folder / tag).glob("*model_states.pt"))
    if not states:
        raise FileNotFoundError(f"{folder}: no DeepSpeed model-states file under {tag}/; is this a ZeRO checkpoint?")
    # our own checkpoint, written by DeepSpeed's pickle-based saver: not loadable with weights_only
    client = {
        k: v
        for k, v in torch.load(states[0], map_location="cpu", weights_only=False).items()
        if k not in _DEEPSPEED_KEYS
    }
    client["state_dict"] = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    client[_CONSOLIDATED] = True
    return client


def _load_into_zero3(module: Any, state_dict: dict[str, Any], strict: bool) -> None:
    """Load a whole (consolidated) state dict into a ZeRO-3 model: every rank gathers the full
    parameters, loads the same file's values (buffers, which ZeRO does not partition, included),
    and DeepSpeed scatters rank 0's values into the partitions when the gather ends. This holds the
    gathered parameters once more while loading, beside the state dict."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
        module.load_state_dict(state_dict, strict=strict)


def _register_router_weights_with_moe(model: Any) -> None:
    """ZeRO-3 gathers a module's partitioned weights again for backward through hooks on the
    module's output tensors. A router returns a ``RouterOutput`` dataclass, which those hooks do
    not look into, so its weight would still be released (empty) when its gradient is computed.
    Registering the router weights as external parameters of the enclosing MoE layer (whose
    output is a plain tuple) makes ZeRO-3 gather them together with that layer."""
    import deepspeed

    for _, moe in moe_layers(model):
        for param in moe.gate.parameters():
            deepspeed.zero.register_external_parameter(moe, param)


class Zero1Strategy(Zero1Layout, CPUCapableDeepSpeedStrategy):
    """``zero1``: optimizer state partitioned over the data-parallel ranks."""

    strategy_name = "zero1"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("stage", 1)
        super().__init__(**kwargs)


class Zero2Strategy(Zero2Layout, CPUCapableDeepSpeedStrategy):
    """``zero2``: optimizer state and gradients partitioned."""

    strategy_name = "zero2"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("stage", 2)
        super().__init__(**kwargs)


class Zero3Strategy(Zero3Layout, CPUCapableDeepSpeedStrategy):
    """``zero3``: optimizer state, gradients and parameters partitioned."""

    strategy_name = "zero3"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("stage", 3)
        super().__init__(**kwargs)


class Zero3OffloadStrategy(Zero3OffloadLayout, CPUCapableDeepSpeedStrategy):
    """``zero3_offload``: ZeRO-3 with parameters and optimizer state in host memory.

    ``zero_force_ds_cpu_optimizer: false`` lets a client optimizer (torch's AdamW, which
    moeframe's ``configure_optimizers`` builds) run on the offloaded state; DeepSpeed otherwise
    insists on its own CPU Adam, a C++ extension compiled at first use.
    """

    strategy_name = "zero3_offload"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("stage", 3)
        kwargs.setdefault("offload_optimizer", True)
        kwargs.setdefault("offload_parameters", True)
        super().__init__(**kwargs)
        if kwargs.get("config") is None:  # Lightning built the default config: let AdamW run offloaded
            self.config.setdefault("zero_force_ds_cpu_optimizer", False)
