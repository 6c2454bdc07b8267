"""The routed-experts computation of one MoE layer, forward + backward, three ways on the same weights.

For each (tokens, experts) pair the same routing (random top-k indices, softmax-normalised gate
weights) and the same expert weights are given to:

- moeframe: ``GroupedExperts`` (experts ``grouped``): sort the T·K routed rows by expert, one
  grouped GEMM per projection, weighted scatter-add back;
- naive: the classic per-expert loop (for each expert, find its tokens with ``torch.where``, run
  its SwiGLU, add the weighted result), as Mixtral-style reference code does;
- transformers: ``DeepseekV3Experts`` with ``experts_implementation`` ``grouped_mm`` (its
  fastest on this machine; gate and up projections fused into one weight) and ``eager`` (its
  own per-expert loop).

Outputs and input gradients are checked against moeframe's (max abs difference printed). Times
are medians of ``--repeats`` forward + backward passes (weight and input gradients), float32,
with denormals flushed (``--dtype bfloat16``: weights, tokens and gradients in bf16). Ratios > 1 mean moeframe is faster.

    python benchmarks/moe_layer.py [--tokens 256 1024 4096] [--experts 8:2 64:6] [--repeats 5]
    python benchmarks/moe_layer.py --smoke
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers

from moeframe.config import ModelConfig
from moeframe.model.experts import GroupedExperts, GroupedOptions

Experts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def naive_loop(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> Experts:
    def forward(x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x_TD)
        for e in range(w1.shape[0]):
            token, slot = torch.where(indices_TK == e)
            h = F.silu(x_TD[token] @ w1[e].T) * (x_TD[token] @ w3[e].T)
            out.index_add_(0, token, ((h @ w2[e].T) * weights_TK[token, slot, None]).to(out.dtype))
        return out

    return forward


def hf_experts(
    w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, implementation: str
) -> tuple[Experts, list[torch.Tensor]]:
    E, F_, D = w1.shape
    cfg = transformers.DeepseekV3Config(hidden_size=D, moe_intermediate_size=F_, n_routed_experts=E)
    cfg._experts_implementation = implementation
    experts = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3Experts(cfg)
    experts.to(w1.dtype)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.cat([w1, w3], dim=1))
        experts.down_proj.copy_(w2)
    return (lambda x, weights, indices: experts(x, indices, weights)), [experts.gate_up_proj, experts.down_proj]


def median_ms(fn: Callable[[], None], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def fwd_bwd(
    experts: Experts,
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    dy: torch.Tensor,
    params: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    y = experts(x, weights, indices)
    grads = torch.autograd.grad(y, [x, *params], dy)
    return y.detach(), grads[0]


def routing(T: int, E: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k indices of random scores and their softmax-normalised gate weights."""
    scores = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))
    indices = scores.topk(K, dim=-1).indices
    return scores.gather(1, indices).softmax(-1), indices


def compare(
    T: int, E: int, K: int, D: int, F_: int, repeats: int, dtype: torch.dtype, fresh_routing: bool = False
) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=D, moe_ffn_dim=F_, n_routed_experts=E, n_activated_experts=K)
    ours = GroupedExperts(cfg, GroupedOptions(), E, D, F_)
    with torch.no_grad():
        for w in (ours.w1, ours.w2, ours.w3):
            w.normal_(0, 0.02)
    ours.to(dtype)
    x = torch.randn(T, D, dtype=dtype)
    weights, indices = routing(T, E, K, seed=0)
    # --fresh-routing: every timed pass routes anew (the same sequence for every contestant), as a
    # training step does; the per-expert group sizes, hence the GEMM shapes, then change each time
    routings = [routing(T, E, K, seed=1 + i) for i in range(repeats + 1)] if fresh_routing else [(weights, indices)]
    dy = torch.randn(T, D, dtype=dtype)
    contestants: dict[str, tuple[Experts, list[torch.Tensor]]] = {"moeframe": (ours, [ours.w1, ours.w2, ours.w3])}
    w1, w2, w3 = (w.detach().clone().requires_grad_() for w in (ours.w1, ours.w2, ours.w3))
    contestants["naive loop"] = (naive_loop(w1, w2, w3), [w1, w2, w3])
    for impl in ("grouped_mm", "eager"):
        contestants[f"transformers {impl}"] = hf_experts(ours.w1.detach(), ours.w2.detach(), ours.w3.detach(), impl)
    ref_y, ref_dx = fwd_bwd(ours, x, weights, indices, dy, [ours.w1, ours.w2, ours.w3])
    row: dict[str, float] = {}
    for name, (fn, params) in contestants.items():
        y, dx = fwd_bwd(fn, x, weights, indices, dy, params)
        # relative to the largest reference value: bf16 rounds differently in each implementation
        row[f"{name} diff"] = max(
            ((y - ref_y).abs().max() / ref_y.abs().max()).item(),
            ((dx - ref_dx).abs().max() / ref_dx.abs().max()).item(),
        )
        passes = iter(routings * (repeats + 1))
        row[name] = median_ms(lambda: fwd_bwd(fn, x, *next(passes), dy, params), repeats)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--experts", nargs="+", default=["8:2", "64:6"], help="E:K pairs (experts : top-k)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=64, help="expert width (fine-grained: dim/4 as in V3)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--fresh-routing",
        action="store_true",
        help="a new routing for every timed pass (as in training) instead of one fixed routing",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, checks the script runs")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        args.tokens, args.experts, args.dim, args.ffn, args.repeats = [32], ["8:2"], 32, 16, 1
    pairs = [tuple(int(v) for v in p.split(":")) for p in args.experts]
    print(
        f"routed experts fwd+bwd, D={args.dim}, F={args.ffn}, {args.dtype}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; median of {args.repeats} (ms)"
    )
    names = ["moeframe", "naive loop", "transformers grouped_mm", "transformers eager"]
    print(
        f"| tokens | E:K | {' | '.join(names)} | naive / moeframe | transformers grouped_mm / moeframe | "
        f"transformers eager / moeframe | max rel. diff |"
    )
    print("|---:|---|" + "---:|" * (len(names) + 4))
    ok = True
    for E, K in pairs:
        for T in args.tokens:
            r = compare(T, E, K, args.dim, args.ffn, args.repeats, dtype, args.fresh_routing)
            diff = max(r[f"{n} diff"] for n in names)
            ok &= diff < (1e-4 if dtype == torch.float32 else 5e-2)
            print(
                f"| {T} | {E}:{K} | "
                + " | ".join(f"{r[n]:.2f}" for n in names)
                + f" | {r['naive loop'] / r['moeframe']:.2f}x | {r['transformers grouped_mm'] / r['moeframe']:.2f}x"
                + f" | {r['transformers eager'] / r['moeframe']:.2f}x | {diff:.1e} |"
            )
    print(
        "naive / moeframe etc.: time ratios, > 1 = moeframe faster; outputs and input gradients agree"
        if ok
        else "MISMATCH: an implementation disagrees with moeframe"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
