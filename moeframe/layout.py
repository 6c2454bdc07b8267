"""Parallel layouts: which ranks hold which weights, validated in one place.

Strategy plugins and ``moeframe inspect`` both call these checks, so a layout ``inspect`` accepts
is one the strategies accept, with the same message when it is not.
They are plain arithmetic (no torch, no process group): a wrong layout must fail before any
collective exists, because a bad layout inside a collective is a hang, not an error.

Terms (Megatron/DeepSeek usage): the *world* is every rank; dense weights are data-parallel over
the whole world; routed experts are split over an *EP group* of ``ep`` ranks (each holds
``n_routed_experts / ep`` of them) and each expert shard is data-parallel over the
``world / ep`` ranks that hold the same shard (*expert-DP*).

Strategies and precisions describe themselves: a strategy plugin that runs layouts derives from
``DescribesLayout`` and says which (``runs_layout``); a precision plugin derives from
``DescribesMemory`` and says what it keeps per parameter (``training_bytes``). ``strategy_for``
and ``moeframe inspect`` read those declarations from the installed plugins, so this module
names no strategy or precision plugin. A strategy package may also register each strategy's
description alone, from a module without Lightning, in the entry-point group
``moeframe.strategy_layout`` (same name as the strategy): ``inspect`` then never imports Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moeframe.errors import ConfigError

__all__ = [
    "DescribesLayout",
    "DescribesMemory",
    "ParallelLayout",
    "TrainingBytes",
    "check_ep_layout",
    "check_zero_layout",
    "data_parallel_rank_size",
    "precision_bytes",
    "strategy_for",
]


def data_parallel_rank_size(trainer: Any) -> tuple[int, int]:
    """(replica index, replicas) of the data: every replica reads its own micro-batches. Lightning's
    parallel strategies say it in ``distributed_sampler_kwargs``; it is the global rank and world
    size except where several ranks share one micro-batch (the stages of one pipeline)."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("rank", trainer.global_rank)), int(kwargs.get("num_replicas", trainer.world_size))


def check_ep_layout(ep_size: int, world_size: int, num_experts: int | None) -> None:
    """ConfigError naming the fix when ``ep_size`` cannot lay the experts out on the ranks."""
    if ep_size < 1:
        raise ConfigError(f"ep_size must be >= 1, got {ep_size}")
    if world_size < 1:
        raise ConfigError(f"the world size must be >= 1, got {world_size}")
    if world_size % ep_size:
        raise ConfigError(
            f"expert parallelism: ep_size={ep_size} does not divide the world size {world_size} "
            f"(num_nodes x devices); choose an ep_size among the divisors of {world_size}"
        )
    if num_experts is not None and num_experts % ep_size:
        raise ConfigError(
            f"expert parallelism: ep_size={ep_size} does not divide n_routed_experts={num_experts}; "
            "every rank of an EP group must hold the same number of experts"
        )


def check_zero_layout(
    stage: int,
    offload_parameters: bool = False,
    offload_params_device: str = "cpu",
    offload_optimizer_device: str = "cpu",
    nvme_path: str | None = None,
) -> None:
    """ConfigError for a ZeRO setting DeepSpeed would ignore or fail on deep inside a run."""
    if stage not in (1, 2, 3):
        raise ConfigError(f"DeepSpeed ZeRO stage must be 1, 2 or 3, got {stage}")
    if offload_parameters and stage != 3:
        raise ConfigError(
            f"offload_parameters=True needs ZeRO stage 3 (only stage 3 partitions the parameters), "
            f"got stage {stage}: use a ZeRO stage-3 strategy, or set offload_parameters false"
        )
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

    def validate(self, n_routed_experts: int | None) -> ParallelLayout:
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


class DescribesLayout:
    """Mixed into a strategy plugin (a Lightning ``Strategy``) that runs parallel layouts, so that
    ``moeframe inspect`` can name the ``--trainer.strategy`` for a layout it estimates."""

    @classmethod
    def runs_layout(cls, layout: ParallelLayout) -> dict[str, Any] | None:
        """The init arguments with which this strategy runs ``layout`` (``{}``: as registered),
        or None when it does not run it."""
        return None

    @classmethod
    def plan_pipeline(
        cls, config: Any, pp: int, vpp: int | None, schedule: str, microbatches: int | None
    ) -> dict[str, Any] | None:
        """For a strategy that runs pipeline parallelism: how it would run the model ``config`` on
        ``pp`` ranks × ``vpp`` stages with ``schedule`` (the same split a run makes):
        ``{"layers_per_stage", "stage_ranks", "vpp", "microbatches",
        "bubble_fraction", "in_flight"}`` (``in_flight``: per rank, the micro-batch activations of
        one stage held at the peak), raising ConfigError for a layout it refuses; None when this
        strategy has no pipeline."""
        return None

    def model_state_shapes(self) -> dict[str, Any] | None:
        """The whole model's state-dict entries (tensors; meta ones will do) for a strategy whose ranks
        each hold only part of the model (pipeline stages), so that a checkpoint is checked against
        the whole model; None: the module's own state dict is the whole model."""
        return None


# Strategy packages may describe each strategy's layout in this entry-point group, under the
# strategy's name, with a ``DescribesLayout`` class from a module that does not import Lightning:
# estimating a layout (``moeframe inspect``) then costs no Lightning import (seconds).
STRATEGY_LAYOUT_GROUP = "moeframe.strategy_layout"


def _layout_descriptions() -> dict[str, type]:
    """The ``DescribesLayout`` classes registered in ``STRATEGY_LAYOUT_GROUP``, by strategy name; a
    broken or ambiguous one is left out (its strategy is then asked itself)."""
    import importlib
    import importlib.metadata as md

    found: dict[str, set[str]] = {}
    for ep in md.entry_points(group=STRATEGY_LAYOUT_GROUP):
        found.setdefault(ep.name, set()).add(ep.value)
    described = {}
    for name, values in found.items():
        if len(values) != 1:
            continue
        module, _, attr = next(iter(values)).partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except Exception:  # a broken description must not break an estimate
            continue
        if isinstance(cls, type) and issubclass(cls, DescribesLayout):
            described[name] = cls
    return described


def _installed_strategies() -> dict[str, type]:
    """Each installed strategy's layout description: its registered one, else the strategy class."""
    from moeframe import registry

    described = _layout_descriptions()
    strategies = {}
    for name in sorted(registry.available("strategy")):
        if name in described:
            strategies[name] = described[name]
            continue
        try:
            strategies[name] = registry.load("strategy", name)
        except registry.PluginError:  # a broken strategy package must not break an estimate
            continue
    return strategies


def strategy_for(layout: ParallelLayout, strategies: dict[str, type] | None = None) -> str | None:
    """The ``--trainer.strategy`` value that runs ``layout`` (e.g. ``name (ep_size=4)``), or None
    when no installed strategy declares it; plain data parallelism is Lightning's own ``ddp``.
    Among several strategies the one needing the fewest arguments wins (a preset over a knob)."""
    if layout.ep == 1 and not layout.zero:
        return "ddp" if layout.world_size > 1 else "auto"
    found = []
    for name, cls in (_installed_strategies() if strategies is None else strategies).items():
        args = cls.runs_layout(layout) if issubclass(cls, DescribesLayout) else None
        if args is not None:
            found.append((len(args), name, args))
    if not found:
        return None
    _, name, args = min(found, key=lambda f: (f[0], f[1]))
    return name if not args else f"{name} ({', '.join(f'{k}={v}' for k, v in args.items())})"


@dataclass(frozen=True)
class TrainingBytes:
    """Bytes per parameter a precision keeps for training: the weights it computes with, the fp32
    master copy, and each of AdamW's two moments."""

    weights: int = 2
    master: int = 4
    moment: int = 4


class DescribesMemory:
    """Mixed into a precision plugin so that ``moeframe inspect --precision NAME`` can estimate
    its memory."""

    @classmethod
    def training_bytes(cls) -> TrainingBytes:
        return TrainingBytes()


BUILTIN_PRECISION = "bf16"  # bf16 weights, fp32 master weights and moments: TrainingBytes()


def precision_bytes(name: str) -> TrainingBytes:
    """What precision ``name`` (``bf16`` or an installed precision plugin) keeps per parameter."""
    if name == BUILTIN_PRECISION:
        return TrainingBytes()
    from moeframe import registry

    cls = registry.load("precision", name)
    if not issubclass(cls, DescribesMemory):
        raise ConfigError(
            f"precision plugin {name!r} does not describe its memory: it must derive from "
            "moeframe.layout.DescribesMemory and return its TrainingBytes from training_bytes()"
        )
    return cls.training_bytes()
