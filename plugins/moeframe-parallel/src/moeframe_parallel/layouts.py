"""What each strategy of this package runs, described without Lightning (for ``moeframe inspect``).

``moeframe inspect`` names the ``--trainer.strategy`` that runs the layout it estimates. The
strategies are Lightning classes, and importing Lightning (and DeepSpeed) costs more than the whole
estimate; so each strategy's layout description lives here, in a module that imports only
``moeframe.plugin``, registered under the strategy's name in the entry-point group
``moeframe.strategy_layout``. Each strategy class derives from its description, so the two cannot
disagree.
"""

from __future__ import annotations

from typing import Any, ClassVar

from moeframe.plugin import DescribesLayout, ParallelLayout
from moeframe_parallel.pipeline_layout import (
    bubble_fraction,
    check_pipeline,
    default_vpp,
    in_flight,
    layer_costs,
    split_by_cost,
    stage_ranks,
)

__all__ = [
    "EP2DDPLayout",
    "EPLayout",
    "FSDP2Layout",
    "PPLayout",
    "Zero1Layout",
    "Zero2Layout",
    "Zero3Layout",
    "Zero3OffloadLayout",
    "ZeroPresetLayout",
]


class ZeroPresetLayout(DescribesLayout):
    """A DeepSpeed ZeRO preset: the stage it runs as registered (None: not a preset)."""

    zero_stage: ClassVar[int | None] = None
    offloads_parameters: ClassVar[bool] = False

    @classmethod
    def runs_layout(cls, layout: ParallelLayout) -> dict[str, Any] | None:
        runs = (
            cls.zero_stage is not None
            and layout.ep == 1
            and layout.zero == cls.zero_stage
            and layout.offload_parameters == cls.offloads_parameters
        )
        return {} if runs else None


class Zero1Layout(ZeroPresetLayout):
    zero_stage = 1


class Zero2Layout(ZeroPresetLayout):
    zero_stage = 2


class Zero3Layout(ZeroPresetLayout):
    zero_stage = 3


class Zero3OffloadLayout(ZeroPresetLayout):
    zero_stage, offloads_parameters = 3, True


class EPLayout(DescribesLayout):
    """``ep``: routed experts sharded over ``ep_size`` ranks, plain data parallelism for the rest."""

    @classmethod
    def runs_layout(cls, layout: ParallelLayout) -> dict[str, Any] | None:
        return {"ep_size": layout.ep} if layout.ep > 1 and not layout.zero else None


class EP2DDPLayout(EPLayout):
    """``ep2_ddp``: experts sharded over pairs of ranks."""

    @classmethod
    def runs_layout(cls, layout: ParallelLayout) -> dict[str, Any] | None:
        return {} if layout.ep == 2 and not layout.zero else None


class FSDP2Layout(DescribesLayout):
    """``fsdp2``: shards everything like ZeRO-3 but is not named for a ZeRO layout (its own knobs)."""


class PPLayout(DescribesLayout):
    """``pp``: pipeline stages; ``ParallelLayout`` has no pipeline degree, ``inspect --pp`` asks
    :meth:`plan_pipeline`."""

    @classmethod
    def plan_pipeline(
        cls, config: Any, pp: int, vpp: int | None, schedule: str, microbatches: int | None
    ) -> dict[str, Any] | None:
        vpp = default_vpp(schedule) if vpp is None else vpp
        microbatches = pp * vpp if microbatches is None else microbatches
        check_pipeline(pp, schedule, vpp, microbatches, config.n_layers)
        costs, last_extra = layer_costs(config)
        return {
            "layers_per_stage": split_by_cost(costs, pp * vpp, last_extra=last_extra),
            "stage_ranks": stage_ranks(pp, vpp, schedule),
            "vpp": vpp,
            "microbatches": microbatches,
            "bubble_fraction": bubble_fraction(schedule, pp, microbatches, vpp),
            "in_flight": in_flight(schedule, pp, microbatches, vpp),
        }
