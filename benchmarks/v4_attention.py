"""DeepSeek-V4 attention: moeframe's ``v4`` plugin beside HF transformers' DeepseekV4Attention.

Same weights, same inputs, per layer type: a training step (forward + backward over T tokens) and
cached decoding (a prefill, then one token per step), CPU time on one thread (the machine is
shared, so wall time says little), plus the bytes each cache holds at the end and the largest
output difference. Shapes are V4-Flash's ratios at a CPU size (see SHAPE).

    python benchmarks/v4_attention.py [--seq 2048] [--prefill 256] [--steps 128]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DeepseekV4Config, DynamicCache
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Attention, DeepseekV4RotaryEmbedding

from moeframe.plugin import ForwardContext, resolve_model_config
from moeframe.testing import tiny_config
from moeframe_v4.attention import HF_TENSOR_NAMES, LAYER_TYPES, V4Attention

SHAPE: dict[str, Any] = dict(
    dim=256,
    heads=8,
    head_dim=64,
    rope=16,
    q_lora=64,
    window=64,
    csa=4,
    hca=32,
    index_heads=16,
    index_dim=32,
    topk=32,
    o_groups=2,
    o_lora=64,
)


def _pair(layer_type: str) -> tuple[DeepseekV4Attention, V4Attention, DeepseekV4Config]:
    s = SHAPE
    hf_cfg = DeepseekV4Config(
        vocab_size=64,
        hidden_size=s["dim"],
        num_attention_heads=s["heads"],
        head_dim=s["head_dim"],
        q_lora_rank=s["q_lora"],
        num_hidden_layers=1,
        layer_types=[layer_type],
        mlp_layer_types=["moe"],
        partial_rotary_factor=s["rope"] / s["head_dim"],
        sliding_window=s["window"],
        compress_rates={"compressed_sparse_attention": s["csa"], "heavily_compressed_attention": s["hca"]},
        o_groups=s["o_groups"],
        o_lora_rank=s["o_lora"],
        index_n_heads=s["index_heads"],
        index_head_dim=s["index_dim"],
        index_topk=s["topk"],
        max_position_embeddings=4096,
    )
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = DeepseekV4Attention(hf_cfg, layer_idx=0)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.05)
    options = dict(
        name="v4",
        layer_type=layer_type,
        head_dim=s["head_dim"],
        rope_head_dim=s["rope"],
        q_lora_rank=s["q_lora"],
        sliding_window=s["window"],
        compress_rate_csa=s["csa"],
        compress_rate_hca=s["hca"],
        index_n_heads=s["index_heads"],
        index_head_dim=s["index_dim"],
        index_topk=s["topk"],
        o_groups=s["o_groups"],
        o_lora_rank=s["o_lora"],
    )
    cfg = tiny_config(dim=s["dim"], n_heads=s["heads"], max_seq_len=4096, attention=options)
    plan = resolve_model_config(cfg)
    ours = V4Attention(plan.config, plan.attention.options, 0)
    state = hf.state_dict()
    ours.load_state_dict({k: state[HF_TENSOR_NAMES[k]] for k in ours.state_dict()})
    return hf, ours, hf_cfg


def _hf_call(
    hf: DeepseekV4Attention, hf_cfg: DeepseekV4Config, x: torch.Tensor, start: int, cache: Any
) -> torch.Tensor:
    positions = torch.arange(start, start + x.shape[1])[None].expand(x.shape[0], -1)
    rotary = DeepseekV4RotaryEmbedding(hf_cfg)
    embeddings = {kind: rotary(x, positions, layer_type=kind) for kind in ("main", "compress")}
    mask = create_sliding_window_causal_mask(
        config=hf_cfg, inputs_embeds=x, attention_mask=None, cache=cache, position_ids=positions
    )
    return hf(x, embeddings, positions, mask, cache=cache)[0]


def _cpu_seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def _train_step(
    module: torch.nn.Module,
    call: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    kept: list[int] | None = None,
) -> torch.Tensor:
    """Forward + backward; ``kept`` collects the bytes autograd keeps for backward (views counted
    by their own size: an upper bound where saved tensors share storage)."""
    module.zero_grad(set_to_none=True)
    sink = kept if kept is not None else []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: sink.append(t.numel() * t.element_size()) or t, lambda t: t
    ):
        y = call(x)
    y.square().mean().backward()
    return y.detach()


def _decode(call: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, prefill: int) -> torch.Tensor:
    with torch.no_grad():
        outs = [call(x[:, :prefill], 0)]
        outs += [call(x[:, t : t + 1], t) for t in range(prefill, x.shape[1])]
    return torch.cat(outs, dim=1)


def _hf_cache_bytes(cache: Any) -> int:
    seen: dict[int, int] = {}
    for layer in cache.layers:
        for value in vars(layer).values():
            tensors = value.values() if isinstance(value, dict) else [value]
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure(layer_type: str, seq: int, prefill: int, steps: int) -> dict[str, Any]:
    hf, ours, hf_cfg = _pair(layer_type)
    torch.manual_seed(1)
    x = torch.randn(1, seq, SHAPE["dim"])
    ours_call = lambda x_: ours(x_, ForwardContext(torch.arange(x_.shape[1])))  # noqa: E731
    hf_call = lambda x_: _hf_call(hf, hf_cfg, x_, 0, None)  # noqa: E731
    _train_step(ours, ours_call, x[:, :64]), _train_step(hf, hf_call, x[:, :64])  # warm-up
    kept_ours: list[int] = []
    kept_hf: list[int] = []
    t_ours, y_ours = _cpu_seconds(lambda: _train_step(ours, ours_call, x, kept_ours))
    t_hf, y_hf = _cpu_seconds(lambda: _train_step(hf, hf_call, x, kept_hf))
    xd = x[:, : prefill + steps]
    our_cache = ours.new_cache(1, prefill + steps, x.device, x.dtype)
    hf_cache = DynamicCache(config=hf_cfg)
    d_ours, z_ours = _cpu_seconds(
        lambda: _decode(
            lambda x_, s: ours(x_, ForwardContext(torch.arange(s, s + x_.shape[1]), cache=our_cache)), xd, prefill
        )
    )
    d_hf, z_hf = _cpu_seconds(lambda: _decode(lambda x_, s: _hf_call(hf, hf_cfg, x_, s, hf_cache), xd, prefill))
    return {
        "layer_type": layer_type,
        "train_ours_s": t_ours,
        "train_hf_s": t_hf,
        "kept_ours_mb": sum(kept_ours) / 2**20,
        "kept_hf_mb": sum(kept_hf) / 2**20,
        "train_max_diff": (y_ours - y_hf).abs().max().item(),
        "decode_ours_ms": 1e3 * d_ours / steps,
        "decode_hf_ms": 1e3 * d_hf / steps,
        "decode_max_diff": (z_ours - z_hf).abs().max().item(),
        "cache_ours_bytes": our_cache.nbytes(),
        "cache_hf_bytes": _hf_cache_bytes(hf_cache),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--steps", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"shape {SHAPE}; train T={args.seq}; decode prefill {args.prefill} + {args.steps} steps; fp32, 1 thread")
    print(
        "| layer type | train fwd+bwd ours / HF (CPU s) | kept for backward ours / HF (MiB) | decode per token ours / HF (CPU ms) | cache bytes ours / HF | max abs diff train / decode |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for layer_type in LAYER_TYPES:
        r = measure(layer_type, args.seq, args.prefill, args.steps)
        print(
            f"| {layer_type} | {r['train_ours_s']:.2f} / {r['train_hf_s']:.2f} | {r['kept_ours_mb']:.1f} / "
            f"{r['kept_hf_mb']:.1f} | {r['decode_ours_ms']:.2f} / "
            f"{r['decode_hf_ms']:.2f} | {r['cache_ours_bytes']:,} / {r['cache_hf_bytes']:,} | "
            f"{r['train_max_diff']:.1e} / {r['decode_max_diff']:.1e} |"
        )


if __name__ == "__main__":
    main()
