"""Softmax top-k router with a switch-style auxiliary balance loss, registered as router ``topk``.

This is the classic baseline (GShard/Switch, DeepSeek-V2): probabilities ``softmax(x·Wᵀ)`` in
fp32, optional group-limited selection (a group scores by its best expert, as in V2), the top-k
probabilities as gate weights, and ``α·E·Σ_i f_i·P_i`` pushing the load towards uniform.

Routing precision: the gate projection runs through :func:`gate_logits_fp32`, which switches
autocast off around it. Casting the inputs to fp32 is not enough: autocast (``bf16-mixed``, the
FP8 plugin) re-casts ``F.linear``'s inputs to bf16, and bf16 logits flip near-tied expert choices
(benchmarks/RESULTS.md measures how many tokens change their expert set).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.model.base import PluginOptions, RouterBase, RouterOutput
from moeframe.model.context import ForwardContext

if TYPE_CHECKING:
    from moeframe.config import ModelConfig


@dataclass
class TopKOptions(PluginOptions):
    """``aux_loss_coef``: α of the balance loss (0 disables it); ``norm_topk_prob``: renormalise
    the chosen probabilities to sum to 1 before the routed scaling factor."""

    aux_loss_coef: float = 0.01
    norm_topk_prob: bool = False

    def validate(self, config: ModelConfig) -> None:
        if self.aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef must be >= 0, got {self.aux_loss_coef}")


def _autocast_off(device_type: str) -> AbstractContextManager:
    """A context with autocast disabled on ``device_type`` (nothing to do where autocast cannot run,
    e.g. the meta device of ``moeframe inspect``, or where it is not enabled)."""
    if device_type not in ("cpu", "cuda", "xpu", "mps", "hpu") or not torch.is_autocast_enabled(device_type):
        return nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def gate_logits_fp32(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    """Router logits ``x·Wᵀ`` [T, E] in fp32 under any autocast: routing decisions are made in fp32."""
    with _autocast_off(x_TD.device.type):
        return F.linear(x_TD.float(), weight_ED.float())


def limit_to_groups(scores_TE: torch.Tensor, group_scores_TG: torch.Tensor, keep: int) -> torch.Tensor:
    """Zero the scores of experts outside each token's ``keep`` best groups (node-limited routing)."""
    T, E = scores_TE.shape
    G = group_scores_TG.shape[1]
    kept_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
    kept_TG.scatter_(1, group_scores_TG.topk(keep, dim=-1).indices, True)
    kept_TE = kept_TG.repeat_interleave(E // G, dim=1)
    return scores_TE.masked_fill(~kept_TE, float("-inf"))


def count_per_expert(indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routed slots per expert [E] (int64). ``bincount`` would do, but its output length depends on
    the data, which breaks a ``torch.compile`` graph on the MoE hot path; a scatter-add does not."""
    flat_N = indices_TK.flatten().long()
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=indices_TK.device)
    return counts_E.scatter_add_(0, flat_N, torch.ones_like(flat_N))


def switch_balance_loss(scores_TE: torch.Tensor, counts_E: torch.Tensor, k: int) -> torch.Tensor:
    """``E·Σ_i f_i·P_i``: f_i = share of routed slots taken by expert i, P_i = its mean probability."""
    T, E = scores_TE.shape
    f_E = counts_E.to(scores_TE.dtype) / (T * k)
    P_E = scores_TE.mean(dim=0)
    return E * (f_E * P_E).sum()


class TopKRouter(RouterBase):
    Options = TopKOptions
    plugin_api = "2"  # the moeframe plugin API this class is written against

    def __init__(self, config: ModelConfig, options: TopKOptions, layer_id: int | None = None) -> None:
        super().__init__(config, options, layer_id)
        self.options = options
        self.top_k = config.n_activated_experts
        self.n_groups = config.n_expert_groups
        self.topk_groups = config.n_limited_groups
        self.route_scale = config.route_scale
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.dim))

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        return {"weight": "weight"}

    @classmethod
    def hf_config(cls, family: str, config: ModelConfig, options: PluginOptions) -> dict[str, Any]:
        assert isinstance(options, TopKOptions)
        # HF's names for softmax top-k routing (DeepSeek-V2's ``greedy``) and its balance loss α
        return {
            "scoring_func": "softmax",
            "topk_method": "greedy",
            "norm_topk_prob": options.norm_topk_prob,
            "aux_loss_alpha": options.aux_loss_coef,
        }

    @classmethod
    def options_from_hf(cls, family: str, hf: dict[str, Any]) -> dict[str, Any]:
        return {
            "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
            "aux_loss_coef": float(hf.get("aux_loss_alpha", 0.001)),
        }

    def forward(self, x_TD: torch.Tensor, ctx: ForwardContext | None = None) -> RouterOutput:
        # routing decisions are made in fp32 (also under autocast): bf16 logits flip near-tied choices
        scores_TE = gate_logits_fp32(x_TD, self.weight).softmax(dim=-1)
        select_TE = scores_TE
        if self.n_groups > 1:
            group_best_TG = scores_TE.view(scores_TE.shape[0], self.n_groups, -1).amax(dim=-1)
            select_TE = limit_to_groups(scores_TE, group_best_TG, self.topk_groups)
        indices_TK = select_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, indices_TK)
        if self.options.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        counts_E = count_per_expert(indices_TK, scores_TE.shape[1])
        aux_loss = None
        if self.training and self.options.aux_loss_coef > 0:
            aux_loss = self.options.aux_loss_coef * switch_balance_loss(scores_TE, counts_E, self.top_k)
        return RouterOutput(weights_TK * self.route_scale, indices_TK, counts_E, aux_loss)
