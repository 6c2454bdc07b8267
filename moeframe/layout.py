"""Parallel layouts: which ranks hold which weights, validated in one place.

The strategies of the ``moeframe-parallel`` plugin and ``moeframe inspect`` both call these checks,
so a layout ``inspect`` accepts is one the strategies accept, with the same message when it is not.
They are plain arithmetic (no torch, no process group): a wrong layout must fail before any
collective exists, because a bad layout inside a collective is a hang, not an error.

Terms (Megatron/DeepSeek usage): the *world* is every rank; dense weights are data-parallel over
the whole world; routed experts are split over an *EP group* of ``ep`` ranks (each holds
``n_routed_experts / ep`` of them) and each expert shard is data-parallel over the
``world / ep`` ranks that hold the same shard (*expert-DP*).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from moeframe.errors import ConfigError

__all__ = ["ParallelLayout", "check_ep_layout", "check_zero_layout", "strategy_for"]


def check_ep_layout(ep_size: int, world_size: int, num_experts: Optional[int]) -> None:
    """ConfigError naming the fix when ``ep_size`` cannot lay the experts out on the ranks."""
    if ep_size < 1:
        raise ConfigError(f"ep_size must be >= 1, got {ep_size}")
    if world_size < 1:
        raise ConfigError(f"the world size must be >= 1, got {world_size}")
    if world_size % ep_size:
        raise ConfigError(f"expert parallelism: ep_size={ep_size} does not divide the world size {world_size} "
                          f"(num_nodes x devices); choose an ep_size among the divisors of {world_size}")
    if num_experts is not None and num_experts % ep_size:
        raise ConfigError(f"expert parallelism: ep_size={ep_size} does not divide n_routed_experts={num_experts}; "
                          "every rank of an EP group must hold the same number of experts")


def check_zero_layout(stage: int, offload_parameters: bool = False, offload_params_device: str = "cpu",
                      offload_optimizer_device: str = "cpu", nvme_path: Optional[str] = None) -> None:
    """ConfigError for a ZeRO setting DeepSpeed would ignore or fail on deep inside a run."""
    if stage not in (1, 2, 3):
        raise ConfigError(f"DeepSpeed ZeRO stage must be 1, 2 or 3, got {stage}")
    if offload_parameters and stage != 3:
        raise ConfigError(f"offload_parameters=True needs ZeRO stage 3 (only stage 3 partitions the parameters), "
                          f"got stage {stage}: use strategy zero3_offload, or set offload_parameters false")
    if "nvme" in (offload_params_device, offload_optimizer_device) and not nvme_path:
        raise ConfigError("offloading to nvme needs nvme_path (a folder on a local NVMe drive)")
    if offload_params_device == "nvme" and stage != 3:
        raise ConfigError(f"parameter offload to nvme needs ZeRO stage 3, got stage {stage}")


@dataclass(frozen=True)
class ParallelLayout:
    """``world_size`` ranks, experts split ``ep`` ways, ZeRO ``zero`` (0 = plain data parallel)."""

    world_size: int
    ep: int = 1
    zero: int = 0
    offload_parameters: bool = False

    def validate(self, n_routed_experts: Optional[int]) -> "ParallelLayout":
        check_ep_layout(self.ep, self.world_size, n_routed_experts)
        if self.zero:
            check_zero_layout(self.zero, self.offload_parameters)
        return self

    @property
    def expert_dp(self) -> int:
        """Ranks holding a copy of the same expert shard (the group expert gradients reduce over)."""
        return self.world_size // self.ep

    def experts_per_rank(self, n_routed_experts: int) -> int:
        return n_routed_experts // self.ep


def strategy_for(layout: ParallelLayout) -> Optional[str]:
    """The ``--trainer.strategy`` value that runs ``layout``, or None when no preset composes it."""
    if layout.ep > 1:
        return None if layout.zero else ("ep2_ddp" if layout.ep == 2 else f"ep (ep_size={layout.ep})")
    if layout.zero:
        return "zero3_offload" if layout.offload_parameters else f"zero{layout.zero}"
    return "ddp" if layout.world_size > 1 else "auto"
