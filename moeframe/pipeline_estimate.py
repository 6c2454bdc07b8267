"""``moeframe inspect --pp N``: a pipeline layout estimated on the meta device, nothing allocated.

The layout arithmetic (stage boundaries, which rank holds which stage, the schedule's bubble and
how many micro-batches of activations a rank keeps) belongs to the strategy that runs it: an
installed strategy plugin declares it (``DescribesLayout.plan_pipeline``); this module adds the
model's side: parameters per stage (routed experts split over EP) and activation bytes.

Activation bytes use the estimate of Korthikanti et al. (arXiv 2205.05198) for a transformer
layer without recomputation and with a fused attention kernel: about 34·b·T·D bytes per layer
for a micro-batch of b sequences of T tokens in 16-bit (attention scores not kept). MLA and MoE
layers hold somewhat different tensors; the figure is for planning, not a measurement.
"""

from __future__ import annotations

from typing import Any

from moeframe.config import ModelConfig
from moeframe.errors import ConfigError
from moeframe.layout import DescribesLayout, _installed_strategies
from moeframe.model.decoder import build_decoder
from moeframe.model.moe import MoE

__all__ = ["pipeline_section", "print_pipeline"]

ACTIVATION_BYTES_PER_BTD = 34  # Korthikanti et al., 16-bit, no recomputation, fused attention
SETUP_BYTES_PER_PARAM = 4  # float32 weights at setup (half in bf16-true); no optimizer state yet


def _layer_params(cfg: ModelConfig, ep: int) -> tuple[list[float], list[float], float, float, int]:
    """(per-rank parameters of each layer, activated parameters of each layer, embedding, what the
    last stage adds: final norm + head + MTP, the largest single tensor), from a meta-device decoder."""
    decoder = build_decoder(cfg, device="meta")
    largest = max(p.numel() for p in decoder.parameters())
    top_k = cfg.n_activated_experts / max(cfg.n_routed_experts, 1)

    def sizes(block: Any) -> tuple[float, float]:
        routed = sum(p.numel() for p in block.ffn.experts.parameters()) if isinstance(block.ffn, MoE) else 0
        total = sum(p.numel() for p in block.parameters())
        return total - routed + routed / ep, total - routed + routed * top_k

    held, active = zip(*(sizes(b) for b in decoder.layers))
    embed = decoder.embed.weight.numel()
    mtp = sum(
        sizes(m.block)[0] + sum(p.numel() for n, p in m.named_parameters() if not n.startswith("block."))
        for m in decoder.mtp
    )
    head = decoder.head.weight.numel() if not cfg.tie_embeddings else 0
    last = head + sum(p.numel() for p in decoder.norm.parameters()) + mtp
    return list(held), list(active), float(embed), float(last), largest


def _plan(cfg: ModelConfig, pp: int, vpp: int | None, schedule: str, microbatches: int | None) -> dict[str, Any]:
    for name, cls in _installed_strategies().items():
        if isinstance(cls, type) and issubclass(cls, DescribesLayout):
            plan = cls.plan_pipeline(cfg, pp, vpp, schedule, microbatches)
            if plan is not None:
                return {**plan, "strategy": name}
    raise ConfigError(
        "no installed strategy plans pipeline stages (--pp): install a parallel-strategy plugin that does "
        "(`moeframe plugins` lists the installed strategies)"
    )


def pipeline_section(
    cfg: ModelConfig,
    pp: int,
    vpp: int | None,
    schedule: str,
    microbatches: int | None,
    ep: int = 1,
    seq_len: int = 4096,
    micro_batch_size: int = 1,
) -> dict[str, Any]:
    """Per stage: layers, rank, parameters held (routed experts / ep); per rank: parameters, the
    weight bytes a rank allocates at setup, and the activation bytes in flight at the peak; the
    schedule's bubble fraction."""
    held, active, embed, last_extra, largest = _layer_params(cfg, ep)
    plan = _plan(cfg, pp, vpp, schedule, microbatches)
    stages, start = [], 0
    for s, (count, rank) in enumerate(zip(plan["layers_per_stage"], plan["stage_ranks"])):
        params = sum(held[start : start + count]) + (embed if s == 0 else 0)
        if s == len(plan["layers_per_stage"]) - 1:
            params += last_extra
            copy = rank != plan["stage_ranks"][0] and (cfg.mtp_depth > 0 or cfg.tie_embeddings)
            params += embed if copy else 0  # MTP / the tied head need the embedding on this rank too
        stages.append({"stage": s, "rank": rank, "layers": [start, start + count - 1], "params": int(params)})
        start += count
    per_layer_bytes = ACTIVATION_BYTES_PER_BTD * micro_batch_size * seq_len * cfg.dim
    ranks = []
    for r in range(pp):
        mine = [st for st in stages if st["rank"] == r]
        layers = sum(st["layers"][1] - st["layers"][0] + 1 for st in mine) / len(mine)  # per stage, mean
        params = sum(st["params"] for st in mine)
        ranks.append(
            {
                "rank": r,
                "params": params,
                # a rank builds on the meta device and allocates its stages only, drawing the other
                # ranks' weights one tensor at a time into scratch (the random stream of a whole build)
                "setup_bytes_fp32": SETUP_BYTES_PER_PARAM * (params + largest),
                "activation_bytes_in_flight": int(plan["in_flight"][r] * layers * per_layer_bytes),
            }
        )
    return {
        "pp": pp,
        "vpp": plan["vpp"],
        "schedule": schedule,
        "microbatches": plan["microbatches"],
        "micro_batch_size": micro_batch_size,
        "seq_len": seq_len,
        "ep": ep,
        "bubble_fraction": plan["bubble_fraction"],
        "strategy": plan["strategy"],
        "stages": stages,
        "ranks": ranks,
    }


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def print_pipeline(section: dict[str, Any]) -> None:
    s = section
    print(
        f"pipeline: PP {s['pp']} x vpp {s['vpp']} ({len(s['stages'])} stages), schedule {s['schedule']}, "
        f"{s['microbatches']} micro-batches of {s['micro_batch_size']} x {s['seq_len']} tokens, EP {s['ep']}; "
        f"bubble {100 * s['bubble_fraction']:.1f}% (analytic); --trainer.strategy {s['strategy']}"
    )
    for st in s["stages"]:
        print(
            f"  stage {st['stage']:<3} rank {st['rank']:<3} layers {st['layers'][0]}-{st['layers'][1]:<4} "
            f"params {_count(st['params'])}"
        )
    for r in s["ranks"]:
        print(
            f"  rank {r['rank']:<3} params {_count(r['params'])}, weights at setup {_gib(r['setup_bytes_fp32'])} "
            f"(fp32, with one tensor of scratch), activations in flight "
            f"{_gib(r['activation_bytes_in_flight'])} (bf16, estimate)"
        )
