"""``moeframe inspect MODEL.yaml``: what a model costs, computed on the meta device.

Nothing is allocated: the decoder is built on ``torch.device("meta")`` and every figure comes
from its parameter shapes, so the 671B preset is inspected in seconds on a laptop.

- Parameters by component, total and *activated per token* (every non-routed parameter plus
  K/E of the routed experts of each MoE layer), with and without the input embedding; and per
  layer, with the plugins each layer uses (per-layer choices in ``model.layers`` change them).
- KV-cache bytes per token: as each layer's attention plugin stores it (absorbed latent for MLA)
  and as a plain per-head K/V cache would.
- Training FLOPs per token: 6 per activated matrix parameter (forward 2, backward 4; the
  embedding lookup is not a matmul) plus the attention core, ``6·H·(d_qk + d_v)·T/2`` per layer
  for full causal attention over a sequence of T tokens, or the forward and backward counts an
  attention plugin declares (``AttentionBase.attention_flops_per_token``: DSA's top-k and indexer,
  V4's window and compressed entries), so that MFU is right for every attention kind.
- A per-GPU memory estimate for weights, gradients and AdamW states under a parallel layout
  (ZeRO stage over data parallelism, expert parallelism, precision). Activations depend on the
  micro-batch, sequence length and recomputation, so they are not included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from moeframe.config import ConfigError, ModelConfig
from moeframe.layout import BUILTIN_PRECISION, ParallelLayout, precision_bytes, strategy_for
from moeframe.model.base import AttentionBase, NormBase, ResidualBase, RouterBase
from moeframe.model.decoder import Decoder, build_decoder
from moeframe.model.ffn import SwiGLU
from moeframe.model.moe import MoE

COMPONENTS = (
    "embedding",
    "head",
    "attention",
    "dense_ffn",
    "routed_experts",
    "shared_experts",
    "router",
    "norms",
    "residual",
    "mtp",
)


@dataclass
class Report:
    name: str
    parameters: dict[str, int]
    total: int  # the main model; MTP modules are counted in parameters["mtp"] and total_with_mtp
    total_with_mtp: int
    activated: int
    activated_without_embedding: int
    kv_cache_bytes_per_token: int | None
    naive_kv_cache_bytes_per_token: int
    training_flops_per_token: int
    seq_len: int
    memory_per_gpu_gib: dict[str, float]
    layout: dict[str, Any]
    # per main layer: its id, the plugins it uses, its parameters and those activated per token
    layers: list[dict[str, Any]] = field(default_factory=list)


def load_model_config(path: str | Path, role: str = "model config") -> ModelConfig:
    from moeframe.badinput import load_yaml_file

    data = load_yaml_file(path, role)
    # a run config (model: {init_args: {config: ...}}) works too
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        inner = (data["model"].get("init_args") or data["model"]).get("config")
        if isinstance(inner, str):
            return load_model_config(Path(path).parent / inner, f"model.init_args.config (in {path})")
        data = inner
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} holds a YAML {type(data).__name__}, not a model config (a mapping of "
            "moeframe.config.ModelConfig fields); pass a configs/model/*.yaml file or a run config"
        )
    try:
        return ModelConfig(**data)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}; see moeframe.config.ModelConfig for the fields") from None


def _component(name: str, owners: dict[str, str]) -> str:
    for prefix, comp in owners.items():
        if name == prefix or name.startswith(prefix + "."):
            return comp
    raise AssertionError(f"unclassified parameter {name}")


def _owners(decoder: Decoder) -> dict[str, str]:
    """Module name prefix -> component, most specific first."""
    owners: dict[str, str] = {}
    for name, m in decoder.named_modules():
        if name.startswith("mtp"):
            owners.setdefault("mtp", "mtp")
        elif isinstance(m, AttentionBase):
            owners[name] = "attention"
        elif isinstance(m, RouterBase):
            owners[name] = "router"
        elif isinstance(m, MoE):
            owners[f"{name}.experts"] = "routed_experts"
            owners[f"{name}.shared_experts"] = "shared_experts"
        elif isinstance(m, SwiGLU) and name.endswith(".ffn"):
            owners[name] = "dense_ffn"
        elif isinstance(m, NormBase):
            owners[name] = "norms"
        elif isinstance(m, ResidualBase):
            owners[name] = "residual"
    owners["embed"], owners["head"] = "embedding", "head"
    return dict(sorted(owners.items(), key=lambda kv: -len(kv[0])))


def count_by_component(decoder: Decoder) -> dict[str, int]:
    counts = dict.fromkeys(COMPONENTS, 0)
    owners = _owners(decoder)
    for name, p in decoder.named_parameters():  # tied weights appear once
        counts[_component(name, owners)] += p.numel()
    return counts


def _inactive_routed_of(moe: MoE, cfg: ModelConfig) -> int:
    """Routed-expert parameters a token does not use in one MoE layer (all but K/E of them)."""
    n = sum(p.numel() for p in moe.experts.parameters())
    return n - n * cfg.n_activated_experts // cfg.n_routed_experts


def _inactive_routed(decoder: Decoder) -> int:
    return sum(
        _inactive_routed_of(m, decoder.config) for name, m in decoder.moe_layers() if not name.startswith("mtp.")
    )


def per_layer(decoder: Decoder) -> list[dict[str, Any]]:
    """Each main layer's plugins (by registered name), parameters and activated parameters."""
    from moeframe.config import resolve_model_config

    plan = resolve_model_config(decoder.config)
    rows = []
    for block in decoder.layers:
        layer = plan.layer(block.layer_id)
        params = sum(p.numel() for p in block.parameters())
        moe = block.ffn if isinstance(block.ffn, MoE) else None
        rows.append(
            {
                "layer": block.layer_id,
                "attention": layer.attention.name,
                "router": layer.router.name if moe else None,
                "experts": layer.experts.name if moe else None,
                "norm": layer.norm.name,
                "residual": layer.residual.name,
                "params": params,
                "activated": params - (_inactive_routed_of(moe, decoder.config) if moe else 0),
            }
        )
    return rows


def _attention_dims(attn: nn.Module) -> tuple[int, int, int]:
    heads = int(attn.n_heads)
    qk = int(getattr(attn, "qk_head_dim", getattr(attn, "head_dim", 0)))
    v = int(getattr(attn, "v_head_dim", getattr(attn, "head_dim", 0)))
    return heads, qk, v


def attention_training_flops(decoder: Decoder, seq_len: int) -> int:
    """Training FLOPs per token of every main layer's attention core (scores and values, and an
    indexer's scoring): the forward and backward counts the plugin declares
    (``attention_flops_per_token``, ``attention_backward_flops_per_token``: by default twice the
    forward), else the full-causal count ``6·H·(d_qk + d_v)·T/2`` from the module's dimensions."""
    from moeframe.config import resolve_model_config

    plan = resolve_model_config(decoder.config)
    core = 0
    for block in decoder.layers:
        options = plan.layer(block.layer_id).attention.options
        kind = type(block.attn)
        forward = kind.attention_flops_per_token(decoder.config, options, seq_len)
        if forward is None:
            heads, qk, v = _attention_dims(block.attn)
            core += 6 * heads * (qk + v) * seq_len // 2
            continue
        backward = kind.attention_backward_flops_per_token(decoder.config, options, seq_len)
        core += round(forward + (2 * forward if backward is None else backward))
    return core


def training_flops_per_token(decoder: Decoder, activated_matmul_params: int, seq_len: int) -> int:
    return 6 * activated_matmul_params + attention_training_flops(decoder, seq_len)


def kv_bytes_per_token(decoder: Decoder, element_bytes: int) -> tuple[int | None, int]:
    """(as the plugin caches it, as a plain per-head K and V cache would), all layers."""
    from moeframe.config import resolve_model_config

    cfg = decoder.config
    plan = resolve_model_config(cfg)
    naive, values = 0, 0
    for block in decoder.layers:
        heads, qk, v = _attention_dims(block.attn)
        naive += heads * (qk + v) * element_bytes
        try:
            values += type(block.attn).kv_cache_values_per_token(cfg, plan.layer(block.layer_id).attention.options)
        except NotImplementedError:
            return None, naive
    return values * element_bytes, naive


def attn_options(decoder: Decoder) -> Any:
    from moeframe.config import resolve_model_config

    return resolve_model_config(decoder.config).attention.options


def memory_per_gpu(counts: dict[str, int], zero: int, dp: int, ep: int, precision: str) -> dict[str, float]:
    """GiB per GPU for weights, gradients and AdamW (two moments) under the layout."""
    routed = counts["routed_experts"]  # MTP modules train too: they are in the memory estimate
    dense = sum(counts.values()) - routed
    expert_dp = max(1, dp // ep)  # expert weights are data-parallel over the remaining ranks
    per_param = precision_bytes(precision)  # as the precision plugin declares it
    weight_bytes, master, moment_bytes = per_param.weights, per_param.master, per_param.moment

    def sharded(n_dense: float, n_routed: float, stage_min: int) -> float:
        return (n_dense / dp + n_routed / expert_dp) if zero >= stage_min else n_dense + n_routed

    weights = sharded(dense, routed / ep, 3) * weight_bytes
    grads = sharded(dense, routed / ep, 2) * 4
    states = sharded(dense, routed / ep, 1) * (master + 2 * moment_bytes)
    gib = 1024**3
    return {
        "weights": weights / gib,
        "gradients": grads / gib,
        "optimizer": states / gib,
        "total": (weights + grads + states) / gib,
    }


def inspect_model(
    cfg: ModelConfig,
    name: str,
    seq_len: int = 4096,
    zero: int = 1,
    dp: int = 1,
    ep: int = 1,
    precision: str = BUILTIN_PRECISION,
) -> Report:
    # the strategies' own checks: a layout accepted here is one `moeframe fit` accepts
    layout = ParallelLayout(world_size=dp, ep=ep, zero=zero).validate(cfg.n_routed_experts)
    decoder = build_decoder(cfg, device="meta")
    counts = count_by_component(decoder)
    total = sum(counts.values()) - counts["mtp"]  # what inference runs; MTP is a training aid
    activated = total - _inactive_routed(decoder)
    kv, naive = kv_bytes_per_token(decoder, element_bytes=2)
    return Report(
        name,
        counts,
        total,
        total + counts["mtp"],
        activated,
        activated - counts["embedding"],
        kv,
        naive,
        decoder_training_flops_per_token(decoder, seq_len, counts),
        seq_len,
        memory_per_gpu(counts, zero, dp, ep, precision),
        layout_section(layout, cfg, counts),
        per_layer(decoder),
    )


def layout_section(layout: ParallelLayout, cfg: ModelConfig, counts: dict[str, int]) -> dict[str, Any]:
    """Who holds what under ``layout`` (parameters per rank before ZeRO partitioning)."""
    routed = counts["routed_experts"]
    return {
        "world_size": layout.world_size,
        "ep": layout.ep,
        "expert_dp": layout.expert_dp,
        "zero": layout.zero,
        "experts_per_rank_per_layer": layout.experts_per_rank(cfg.n_routed_experts),
        "routed_expert_params_per_rank": routed // layout.ep,
        "dense_params_per_rank": sum(counts.values()) - routed,
        "strategy": strategy_for(layout),
    }


def decoder_training_flops_per_token(decoder: Decoder, seq_len: int, counts: dict[str, int] | None = None) -> int:
    """Training FLOPs per token of the main model (MTP modules excluded) at sequence length T."""
    counts = counts or count_by_component(decoder)
    activated = sum(counts.values()) - counts["mtp"] - _inactive_routed(decoder)
    # vectors (norm scales, biases) and the embedding lookup are not matrix products
    vectors = sum(p.numel() for n, p in decoder.named_parameters() if p.dim() < 2 and not n.startswith("mtp."))
    return training_flops_per_token(decoder, activated - counts["embedding"] - vectors, seq_len)


def _fmt(n: float) -> str:
    if n >= 1e9:
        return f"{n:,.0f} ({n / 1e9:.2f} B)"
    return f"{n:,.0f} ({n / 1e6:.2f} M)" if n >= 1e6 else f"{n:,.0f}"


def print_report(r: Report, zero: int, dp: int, ep: int, precision: str) -> None:
    print(f"model {r.name}")
    print("parameters by component:")
    for comp in COMPONENTS:
        if r.parameters[comp]:
            print(f"  {comp:<16} {_fmt(r.parameters[comp])}")
    print(f"total parameters                 {_fmt(r.total)}")
    if r.parameters["mtp"]:
        print(f"total with MTP modules           {_fmt(r.total_with_mtp)}")
    print(f"activated per token              {_fmt(r.activated)}")
    print(f"activated per token, no embedding {_fmt(r.activated_without_embedding)}")
    if _layers_differ(r.layers):
        _print_layers(r.layers)
    kv = f"{r.kv_cache_bytes_per_token:,}" if r.kv_cache_bytes_per_token is not None else "n/a (plugin has no cache)"
    print(f"KV cache bytes/token (bf16)      {kv}   (plain per-head K/V: {r.naive_kv_cache_bytes_per_token:,})")
    print(f"training FLOPs/token (T={r.seq_len})  {r.training_flops_per_token:.4g}")
    lay = r.layout
    strategy = lay["strategy"] or "none yet (no installed strategy declares this layout; estimate only)"
    print(
        f"parallel layout: {lay['world_size']} ranks = EP {lay['ep']} x expert-DP {lay['expert_dp']}; "
        f"{lay['experts_per_rank_per_layer']} routed experts per rank per MoE layer; per rank before ZeRO: "
        f"{_fmt(lay['routed_expert_params_per_rank'])} routed-expert + {_fmt(lay['dense_params_per_rank'])} "
        f"dense parameters; --trainer.strategy {strategy}"
    )
    m = r.memory_per_gpu_gib
    print(
        f"memory per GPU, ZeRO-{zero} DP={dp} EP={ep} {precision}: weights {m['weights']:.1f} GiB, "
        f"gradients {m['gradients']:.1f} GiB, optimizer {m['optimizer']:.1f} GiB, total {m['total']:.1f} GiB "
        "(activations not included)"
    )


def _layers_differ(rows: list[dict[str, Any]]) -> bool:
    """Whether per-layer choices make layers of one kind (dense or MoE) differ."""

    def signature(row: dict[str, Any]) -> tuple:
        return tuple(row[k] for k in ("attention", "router", "experts", "norm", "residual", "params"))

    return any(len({signature(row) for row in rows if bool(row["router"]) is moe}) > 1 for moe in (True, False))


def _print_layers(rows: list[dict[str, Any]]) -> None:
    print("per layer:")
    for row in rows:
        ffn = f"{row['router']}/{row['experts']}" if row["router"] else "dense"
        print(
            f"  layer {row['layer']:<3} {row['attention']:<10} {ffn:<20} {row['norm']:<9} {row['residual']:<10} "
            f"params {_fmt(row['params'])}, activated {_fmt(row['activated'])}"
        )


def __getattr__(name: str) -> Any:
    # the command front-end that lived here before moeframe.commands (deprecated, one release)
    from moeframe.deprecated_commands import old_name

    return old_name(__name__, name)
