"""How many tokens choose a different expert set when the router's gate runs in bf16.

Under ``bf16-mixed`` (and the FP8 plugin) Lightning runs the forward inside
``torch.autocast(bfloat16)``, which re-casts ``F.linear``'s inputs to bf16 even after ``.float()``.
This script routes the same tokens three ways on a V3-shaped router (sigmoid + bias, expert
groups) and on the core ``topk`` router:

- fp32: no autocast (the reference);
- "gate in bf16": ``F.linear(x.float(), W.float())`` inside autocast, what the routers did before
  ``gate_logits_fp32`` (the expression is evaluated here, not the router);
- router under autocast: the router as shipped, inside the same autocast.

and prints the fraction of tokens whose set of chosen experts differs from fp32.

    python benchmarks/routing_precision.py [--tokens 8192 --dim 2048 --experts 64 --groups 8]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from moeframe.config import ModelConfig, resolve_model_config
from moeframe.model.router import TopKRouter, limit_to_groups


def _config(args: argparse.Namespace, router: dict) -> ModelConfig:
    return ModelConfig(
        vocab_size=300,
        dim=args.dim,
        n_layers=2,
        first_k_dense=1,
        n_heads=2,
        dense_ffn_dim=64,
        moe_ffn_dim=16,
        n_routed_experts=args.experts,
        n_activated_experts=args.top_k,
        n_expert_groups=args.groups,
        n_limited_groups=args.kept_groups,
        route_scale=2.5,
        max_seq_len=64,
        router=router,
    )


def _router(cfg: ModelConfig, std: float) -> torch.nn.Module:
    plan = resolve_model_config(cfg)
    router = plan.router.cls(cfg, plan.router.options).eval()
    torch.nn.init.normal_(router.weight, std=std)
    if hasattr(router, "e_score_correction_bias"):
        router.e_score_correction_bias.normal_(0, 0.01)  # a balancing bias of a trained router's size
    return router


def _bf16_gate_indices(router: torch.nn.Module, x_TD: torch.Tensor) -> torch.Tensor:
    """The routers' former expression: logits cast to fp32 by hand, but autocast left on."""
    from moeframe_auxfree.router import select_experts

    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_TE = F.linear(x_TD.float(), router.weight.float())
        if isinstance(router, TopKRouter):
            scores_TE = logits_TE.softmax(dim=-1)
            if router.n_groups > 1:
                best_TG = scores_TE.view(scores_TE.shape[0], router.n_groups, -1).amax(dim=-1)
                scores_TE = limit_to_groups(scores_TE, best_TG, router.topk_groups)
            return scores_TE.topk(router.top_k, dim=-1).indices
        biased_TE = logits_TE.sigmoid() + router.e_score_correction_bias.float()
        return select_experts(biased_TE, router.top_k, router.n_groups, router.n_limited_groups)


def changed_fraction(a_TK: torch.Tensor, b_TK: torch.Tensor) -> float:
    """Share of tokens whose expert SET differs (order within the top-k does not matter)."""
    return (a_TK.sort(dim=-1).values != b_TK.sort(dim=-1).values).any(dim=-1).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--kept-groups", type=int, default=4)
    p.add_argument("--std", type=float, default=0.006, help="gate weight std (V3's init std)")
    args = p.parse_args()
    torch.manual_seed(0)
    # tokens as the RMSNorm before the MoE hands them over: unit RMS, already bf16 under autocast
    x_TD = torch.randn(args.tokens, args.dim).bfloat16().float()
    print(
        f"{args.tokens} tokens, dim {args.dim}, {args.experts} experts in {args.groups} groups "
        f"(keep {args.kept_groups}), top-{args.top_k}, gate std {args.std}"
    )
    for router_options in ({"name": "aux_free"}, {"name": "topk", "norm_topk_prob": True}):
        router = _router(_config(args, router_options), args.std)
        with torch.no_grad():
            ref = router(x_TD)
            before = _bf16_gate_indices(router, x_TD)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                after = router(x_TD)
        print(
            f"  {router_options['name']:9s} tokens with another expert set than fp32: "
            f"gate in bf16 {changed_fraction(before, ref.indices_TK):6.1%}, "
            f"router under autocast {changed_fraction(after.indices_TK, ref.indices_TK):6.1%} "
            f"(weights {after.weights_TK.dtype}, max |Δw| {(after.weights_TK - ref.weights_TK).abs().max().item():.1e})"
        )


if __name__ == "__main__":
    main()
