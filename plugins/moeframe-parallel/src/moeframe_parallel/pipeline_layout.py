"""Pipeline layouts as arithmetic: schedules by name, stage boundaries, stage → rank, bubbles.

Nothing here touches a process group, so a layout is checked (one line naming the fix) before any
process exists, and ``moeframe inspect`` estimates layouts for machines this one is not.

Terms (torch.distributed.pipelining / Megatron usage): ``pp`` ranks form a pipeline; each holds
``vpp`` *virtual stages* (model chunks), so the decoder is cut into S = pp·vpp stages of whole
layers; a batch is split into m *micro-batches* that flow through the stages. Stage s lives on
rank ``s % pp`` for looped (interleaved) schedules and on rank ``s`` / ``2·pp − 1 − s`` for
V-shaped ones (ZB-V, DualPipeV: every rank holds one stage of the way down and one of the way
back, so the first and the last stage share rank 0).

Bubble (idle) fractions below are analytic, with unit costs per stage and micro-batch: forward
F = 1, backward B = 2 of which the weight-gradient part W = 1 (the zero-bubble papers' F = B_input
= W). Per rank the work is m·vpp·(F + B); the idle time before and after it is:
gpipe / 1f1b (p − 1)(F + B), interleaved 1F1B (p − 1)(F + B) (over chunks 1/vpp as long),
zero-bubble ZB1P-style (interleaved_zb, zbv) (p − 1)(F + B − 2W), DualPipeV (p − 1)(F&B + B − 3W)
with F&B = F + B (DeepSeek's DualPipe table with no forward/backward overlap, which a CPU has
not; arXiv 2401.10241, 2412.19437). They are estimates from idealised costs: the benchmark
``benchmarks/pipeline_bubble.py`` measures the real idle share.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeframe.plugin import ConfigError, build_decoder

__all__ = [
    "SCHEDULES",
    "RankGrid",
    "ScheduleSpec",
    "bubble_fraction",
    "check_pipeline",
    "default_vpp",
    "in_flight",
    "layer_costs",
    "split_by_cost",
    "stage_ranks",
    "torch_refuses",
]


@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule of ``torch.distributed.pipelining``: its class, the virtual stages per rank it
    runs (``vpp``: exact, or the least), and where stages sit (``loop`` or ``v``)."""

    torch_class: str
    vpp: int
    exact_vpp: bool
    style: str
    note: str


SCHEDULES: dict[str, ScheduleSpec] = {
    "gpipe": ScheduleSpec(
        "ScheduleGPipe", 1, True, "loop", "all forwards, then all backwards: m activations in flight"
    ),
    "1f1b": ScheduleSpec("Schedule1F1B", 1, True, "loop", "one forward, one backward: at most p activations in flight"),
    "interleaved_1f1b": ScheduleSpec(
        "ScheduleInterleaved1F1B", 2, False, "loop", "1F1B over vpp chunks per rank: bubble / vpp, more messages"
    ),
    "interleaved_zb": ScheduleSpec(
        "ScheduleInterleavedZeroBubble", 2, False, "loop", "interleaved, weight gradients moved into the bubble"
    ),
    "zbv": ScheduleSpec("ScheduleZBVZeroBubble", 2, True, "v", "zero bubble, V-shaped: 2 chunks per rank"),
    "dualpipev": ScheduleSpec(
        "ScheduleDualPipeV", 2, True, "v", "DeepSeek's DualPipe folded into a V: 2 chunks per rank"
    ),
}


# torch 2.11's schedules open each stage's neighbour links with a point-to-point handshake in the
# first step; in a V layout two neighbouring stages sit on one rank, and that rank's send to itself
# fails (gloo: "Pair is not connected"). torch 2.13 runs zbv and dualpipev (tests/test_pipeline.py).
V_LAYOUTS_RUN = torch.__version__ >= "2.13"


def schedule_spec(name: str) -> ScheduleSpec:
    if name not in SCHEDULES:
        close = difflib.get_close_matches(name, SCHEDULES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"pipeline schedule {name!r} is unknown; {hint}choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def torch_refuses(schedule: str) -> str | None:
    """Why this torch cannot run ``schedule`` (one line naming the fix), or None when it can."""
    if schedule_spec(schedule).style == "v" and not V_LAYOUTS_RUN:
        return (
            f"schedule {schedule!r} needs torch >= 2.13 (torch {torch.__version__} fails its first step: a "
            f"V layout's handshake between two stages of one rank); choose 1f1b, interleaved_1f1b or interleaved_zb"
        )
    return None


def default_vpp(schedule: str) -> int:
    return schedule_spec(schedule).vpp


def check_pipeline(
    pp: int,
    schedule: str,
    vpp: int,
    microbatches: int,
    n_layers: int | None = None,
    layers_per_stage: Sequence[int] | None = None,
    world_size: int | None = None,
) -> None:
    """ConfigError, one line naming the fix, for a pipeline layout that cannot run."""
    spec = schedule_spec(schedule)
    refused = torch_refuses(schedule)
    if refused:
        raise ConfigError(refused)
    if pp < 2:
        raise ConfigError(
            f"pp_size must be >= 2 (got {pp}); a single stage is plain training: use strategy auto or ddp"
        )
    if (spec.exact_vpp and vpp != spec.vpp) or vpp < spec.vpp:
        need = f"exactly {spec.vpp}" if spec.exact_vpp else f"at least {spec.vpp}"
        raise ConfigError(f"schedule {schedule!r} needs vpp={need} virtual stages per rank, got vpp={vpp}")
    stages = pp * vpp
    if microbatches < stages:
        raise ConfigError(
            f"microbatches={microbatches} is below the {stages} pipeline stages (pp_size={pp} x vpp={vpp}): "
            f"use at least {stages} micro-batches, or fewer stages"
        )
    if spec.style == "loop" and vpp > 1 and microbatches % pp:
        raise ConfigError(f"schedule {schedule!r} needs microbatches a multiple of pp_size={pp}, got {microbatches}")
    if world_size is not None and world_size % pp:
        raise ConfigError(
            f"pp_size={pp} does not divide the world size {world_size} (num_nodes x devices); "
            f"the data-parallel degree is world / pp_size"
        )
    if layers_per_stage is not None:
        _check_explicit(layers_per_stage, stages, n_layers)
    elif n_layers is not None and n_layers < stages:
        raise ConfigError(
            f"model.n_layers={n_layers} cannot be split into {stages} pipeline stages (pp_size={pp} x "
            f"vpp={vpp}): every stage needs a layer; use at most {n_layers} stages"
        )


def _check_explicit(layers_per_stage: Sequence[int], stages: int, n_layers: int | None) -> None:
    counts = list(layers_per_stage)
    if len(counts) != stages or any(c < 1 for c in counts):
        raise ConfigError(f"layers_per_stage={counts} must list {stages} positive layer counts (pp_size x vpp)")
    if n_layers is not None and sum(counts) != n_layers:
        raise ConfigError(f"layers_per_stage={counts} sums to {sum(counts)} but model.n_layers={n_layers}")


def split_by_cost(costs: Sequence[float], stages: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[int]:
    """Layers per stage, contiguous, minimising the costliest stage (then the layer count spread):
    ``costs`` per layer, ``first_extra``/``last_extra`` what the first/last stage adds (embedding;
    final norm, head and MTP). Dynamic programming over cut points, O(stages · layers²)."""
    n = len(costs)
    if n < stages:
        raise ConfigError(f"{n} layers cannot be split into {stages} pipeline stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def stage_cost(s: int, i: int, j: int) -> float:
        return prefix[j] - prefix[i] + (first_extra if s == 0 else 0.0) + (last_extra if s == stages - 1 else 0.0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]  # best[s][j]: first j layers in s stages
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, n - (stages - s) + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], stage_cost(s - 1, i, j))
                if value < best[s][j] - 1e-12:
                    best[s][j], cut[s][j] = value, i
    counts, j = [], n
    for s in range(stages, 0, -1):
        counts.append(j - cut[s][j])
        j = cut[s][j]
    return counts[::-1]


def stage_ranks(pp: int, vpp: int, schedule: str) -> list[int]:
    """The pipeline rank of each of the pp·vpp stages."""
    style = schedule_spec(schedule).style
    stages = pp * vpp
    if style == "v":
        return [s if s < pp else 2 * pp - 1 - s for s in range(stages)]
    return [s % pp for s in range(stages)]


@dataclass(frozen=True)
class RankGrid:
    """Where each rank sits: ``ep`` innermost, then data parallelism, pipeline outermost, the order
    Megatron-Core uses (tp-ep-dp-pp, without tp). Rank = pp_rank · dp + dp_rank: the ranks holding
    one stage are consecutive, and an expert-parallel group is ``ep`` consecutive ranks of those, so
    its all-to-alls, the heaviest traffic, stay inside a node (or the fewest nodes); a pipeline
    (one rank per stage, ``dp`` apart) crosses nodes with point-to-point activations only."""

    world: int
    pp: int
    ep: int = 1

    @property
    def dp(self) -> int:
        return self.world // self.pp

    def rank(self, pp_rank: int, dp_rank: int) -> int:
        return pp_rank * self.dp + dp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """(pp_rank, dp_rank) of a global rank."""
        return divmod(rank, self.dp)

    def pipelines(self) -> list[list[int]]:
        """One pipeline per data-parallel rank: its ranks in stage order."""
        return [[self.rank(p, d) for p in range(self.pp)] for d in range(self.dp)]

    def stage_holders(self, pp_rank: int) -> list[int]:
        """The data-parallel group of pipeline rank ``pp_rank``: every rank holding its stages."""
        return [self.rank(pp_rank, d) for d in range(self.dp)]

    def ep_groups(self, pp_rank: int) -> list[list[int]]:
        """The holders of a stage in blocks of ``ep``: each block splits the stage's routed experts."""
        holders = self.stage_holders(pp_rank)
        return [holders[i : i + self.ep] for i in range(0, self.dp, self.ep)]

    def edp_groups(self, pp_rank: int) -> list[list[int]]:
        """The holders of the same expert shard (one per EP group): they average its gradients."""
        holders = self.stage_holders(pp_rank)
        return [holders[j :: self.ep] for j in range(self.ep)]


def bubble_fraction(schedule: str, pp: int, microbatches: int, vpp: int | None = None) -> float:
    """Idle share of a rank's step time, from the unit costs of the module docstring."""
    vpp = vpp or default_vpp(schedule)
    F, B, W = 1.0, 2.0, 1.0  # per stage and micro-batch
    work = microbatches * vpp * (F + B)
    idle = {
        "gpipe": (pp - 1) * (F + B) * vpp,
        "1f1b": (pp - 1) * (F + B) * vpp,
        "interleaved_1f1b": (pp - 1) * (F + B),
        "interleaved_zb": (pp - 1) * (F + B - 2 * W),
        "zbv": (pp - 1) * (F + B - 2 * W),
        "dualpipev": (pp - 1) * (F + 2 * B - 3 * W),
    }[schedule if schedule_spec(schedule) else schedule]
    return idle / (idle + work)


def in_flight(schedule: str, pp: int, microbatches: int, vpp: int | None = None) -> list[float]:
    """Per rank, the activations it holds at the peak, in units of one stage's activations of one
    micro-batch (a chunk of 1/vpp of a rank's layers counts 1/vpp): GPipe keeps every micro-batch;
    1F1B keeps pp − r on rank r; interleaved 1F1B warms up 2(pp − r − 1) + (vpp − 1)·pp + 1 chunks
    (Megatron's count); ZB-V keeps about pp like 1F1B, DualPipeV pp + 1 (their papers' tables)."""
    vpp = vpp or default_vpp(schedule)
    if schedule == "gpipe":
        return [float(microbatches)] * pp
    if schedule == "1f1b":
        return [float(min(pp - r, microbatches)) for r in range(pp)]
    if schedule in ("interleaved_1f1b", "interleaved_zb"):
        return [min(2 * (pp - r - 1) + (vpp - 1) * pp + 1, microbatches * vpp) / vpp for r in range(pp)]
    return [float(pp + (1 if schedule == "dualpipev" else 0))] * pp


def layer_costs(config: Any) -> tuple[list[float], float]:
    """Compute per layer (activated parameters: a MoE layer counts its shared and top-k routed
    experts, a dense one its FFN) and what the last stage adds (head, MTP blocks), from a decoder
    built on the meta device."""
    decoder = build_decoder(config, device="meta")
    top_k = config.n_activated_experts / max(config.n_routed_experts, 1)

    def activated(block: nn.Module) -> float:
        total = 0.0
        for name, p in block.named_parameters():
            total += p.numel() * (top_k if ".experts." in f".{name}" and "shared" not in name else 1.0)
        return total

    costs = [activated(b) for b in decoder.layers]
    last = decoder.head.weight.numel() * (1 + config.mtp_depth)
    last += sum(activated(m) for m in decoder.mtp)
    return costs, last
