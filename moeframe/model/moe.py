"""The DeepSeekMoE layer: a router plugin, an experts plugin and optional shared experts.

``y = shared(x) + Σ_k g_k · expert_k(x)``; dropless (every token reaches its K experts).
The layer accumulates routed-token counts per expert in the buffer ``tokens_per_expert`` so that
callbacks (bias updates, load metrics) can read and reset them after a step without touching
the forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from moeframe.config import ModelPlan
from moeframe.model.compat import build_experts, build_router, call_experts, call_router
from moeframe.model.context import ForwardContext
from moeframe.model.ffn import SwiGLU
from moeframe.model.recompute import activation_checkpoint, is_recomputing


def _recomputing_in_backward() -> bool:
    """True while an activation-checkpoint recompute runs this code inside backward.

    Under ``torch.compile`` the recompute is part of the compiled backward graph and never
    re-runs this Python code, so a compiled forward always counts (and dynamo never reads the
    thread-local mark)."""
    if torch.compiler.is_compiling():
        return False
    return is_recomputing()


class MoE(nn.Module):
    def __init__(self, plan: ModelPlan, layer_id: int = 0) -> None:
        super().__init__()
        cfg = plan.config
        layer = plan.layer(layer_id)
        self.num_experts = cfg.n_routed_experts
        self.layer_id = layer_id  # the block's index: ranks holding different layers match counts by it
        self.gate = build_router(layer.router, cfg, layer_id)
        self.experts = build_experts(layer.experts, cfg, layer_id)
        self.shared_experts: nn.Module | None = None
        if cfg.n_shared_experts:
            hidden = cfg.n_shared_experts * cfg.moe_ffn_dim
            # the experts plugin may give the shared experts its own expert function (declared hook)
            own = layer.experts.cls.shared_ffn(cfg, layer.experts.options, cfg.dim, hidden)
            self.shared_experts = own if own is not None else SwiGLU(cfg.dim, hidden)
        # not a parameter, not saved: a running count that callbacks read and reset. Integer, so a
        # low-precision cast of the module (bf16-true) cannot round the counts.
        self.register_buffer(
            "tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.int64), persistent=False
        )
        # selective activation checkpointing: recompute the shared experts' SwiGLU in backward
        self.recompute_shared = False

    def init_weights(self, std: float) -> None:
        self.tokens_per_expert.zero_()

    def forward(
        self, x_BTD: torch.Tensor, ctx: ForwardContext | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``ctx`` defaults to a context of positions only (a layer called on its own)."""
        if ctx is None:
            ctx = ForwardContext(torch.arange(x_BTD.shape[1], device=x_BTD.device))
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        routing = call_router(self.gate, x_TD, ctx)
        # activation checkpointing re-runs this forward inside backward: count each token once
        if not _recomputing_in_backward():
            with torch.no_grad():
                self.tokens_per_expert.add_(routing.tokens_per_expert_E.to(self.tokens_per_expert.dtype))
        y_TD = call_experts(self.experts, x_TD, routing.weights_TK, routing.indices_TK, ctx)
        if self.shared_experts is not None:
            if self.recompute_shared and torch.is_grad_enabled():
                y_TD = y_TD + activation_checkpoint(self.shared_experts, x_TD)
            else:
                y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view_as(x_BTD), routing.aux_loss


def moe_layers(module: nn.Module) -> list[tuple[str, MoE]]:
    """Every MoE layer under ``module``, in model order, with its qualified name (a strategy that
    swaps the experts, a callback that reads the routed-token counts ``tokens_per_expert``)."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, MoE)]
