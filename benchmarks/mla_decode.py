"""MLA decoding on the CPU: the absorbed latent cache against recomputing per-head K/V.

One MLA layer with DeepSeek-V2-Lite's attention shape (dim 2048, 16 heads, no q_lora, kv_lora 512,
nope/rope/v 128/64/128). For each context length S the cache is filled with S tokens, then one
decode step is timed (median of a few) three ways on the same weights and the same cache:

- absorbed: ``decode: absorbed``, attention straight over the 576-value latent rows;
- expanded: the same latent cache, but per-head keys and values of all S tokens are recomputed
  from it at every step (``decode: expanded``, what HF transformers does);
- no cache: the training path over the whole prefix, S + 1 tokens, at every step.

Also prints the cache size per token of the V3 shape (absorbed latent versus a plain per-head
K/V cache) and checks the bytes the benchmark's cache really holds against the analytic figure.

    python benchmarks/mla_decode.py [--contexts 256 1024 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from moeframe.config import ModelConfig, resolve_model_config
from moeframe_mla import MultiHeadLatentAttention, kv_cache_values_per_token, per_head_kv_values_per_token
from moeframe_mla.attention import LatentCache

V2_LITE_ATTENTION = dict(
    name="mla", q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128
)
V3_ATTENTION = dict(
    name="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128
)


def median_seconds(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_layer(max_len: int) -> tuple[MultiHeadLatentAttention, ModelConfig]:
    cfg = ModelConfig(dim=2048, n_heads=16, max_seq_len=max_len, attention=V2_LITE_ATTENTION)
    torch.manual_seed(0)
    layer = MultiHeadLatentAttention(cfg, resolve_model_config(cfg).attention.options, 0).eval()
    for p in layer.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.02)
    return layer, cfg


def time_context(layer: MultiHeadLatentAttention, S: int, repeats: int) -> dict[str, float]:
    D = layer.wo.out_features
    x_BSD = torch.randn(1, S + 1, D)
    cache = layer.new_cache(1, S + 1, torch.device("cpu"), torch.float32)
    layer(x_BSD[:, :S], torch.arange(S), cache=cache)  # prefill: S tokens in the cache
    new_x, new_pos = x_BSD[:, S:], torch.tensor([S])

    def decode(mode: str) -> Callable[[], None]:
        def step() -> None:
            layer.decode = mode
            cache.length = S  # step again from the same S cached tokens
            layer(new_x, new_pos, cache=cache)

        return step

    result = {mode: median_seconds(decode(mode), repeats) for mode in ("absorbed", "expanded")}
    result["no cache"] = median_seconds(lambda: layer(x_BSD, torch.arange(S + 1)), repeats)
    # same output either way: the timing compares equal work
    layer.decode, cache.length = "absorbed", S
    absorbed = layer(new_x, new_pos, cache=cache)
    layer.decode, cache.length = "expanded", S
    expanded = layer(new_x, new_pos, cache=cache)
    full = layer(x_BSD, torch.arange(S + 1))[:, -1:]
    result["max |absorbed - no cache|"] = (absorbed - full).abs().max().item()
    result["max |absorbed - expanded|"] = (absorbed - expanded).abs().max().item()
    assert isinstance(cache, LatentCache)
    result["cache bytes"] = cache.nbytes()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    v3 = ModelConfig(dim=7168, n_heads=128, attention=V3_ATTENTION)
    latent, per_head = kv_cache_values_per_token(v3), per_head_kv_values_per_token(v3)
    print(
        f"DeepSeek-V3 shape, cache values per token per layer: absorbed latent {latent} vs per-head K/V "
        f"{per_head:,} -> {per_head / latent:.1f}x smaller\n"
    )

    layer, cfg = build_layer(max(args.contexts) + 1)
    per_token = kv_cache_values_per_token(cfg)
    print(
        f"one MLA layer, V2-Lite shape (dim 2048, 16 heads, kv_lora 512, rope 64), fp32, "
        f"{torch.get_num_threads()} CPU threads, median of {args.repeats} decode steps"
    )
    print(
        "| context S | absorbed ms | expanded ms | no cache ms | expanded / absorbed | no cache / absorbed "
        "| max abs diff | cache bytes (measured = analytic) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for S in args.contexts:
        r = time_context(layer, S, args.repeats)
        analytic = (S + 1) * per_token * 4
        diff = max(r["max |absorbed - no cache|"], r["max |absorbed - expanded|"])
        print(
            f"| {S} | {r['absorbed'] * 1e3:.2f} | {r['expanded'] * 1e3:.2f} | {r['no cache'] * 1e3:.1f} "
            f"| {r['expanded'] / r['absorbed']:.1f}x | {r['no cache'] / r['absorbed']:.1f}x | {diff:.1e} "
            f"| {int(r['cache bytes']):,} {'=' if r['cache bytes'] == analytic else '!='} {analytic:,} |"
        )


if __name__ == "__main__":
    main()
