"""Experts plugin ``template_name``: SwiGLU experts, one loop over the experts (a starting point)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.plugin import ExpertsBase, ForwardContext, ModelConfig, PluginOptions


@dataclass
class TemplateNameExpertsOptions(PluginOptions):
    """This plugin takes no options yet; add typed fields here."""


class TemplateNameExperts(ExpertsBase):
    """``y_t = sum_k weights[t, k] * expert_{indices[t, k]}(x_t)``; stacked weights in the
    checkpoint layout: w1, w3 [E, F, D], w2 [E, D, F]."""

    Options = TemplateNameExpertsOptions
    plugin_api = "2"  # the moeframe plugin API this class is written against

    def __init__(
        self,
        config: ModelConfig,
        options: TemplateNameExpertsOptions,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        layer_id: int,
    ) -> None:
        super().__init__(config, options, num_experts, dim, hidden_dim, layer_id)
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        # one SwiGLU per expert in HF checkpoints: {e} is the expert index along dim 0
        return {"w1": "{e}.gate_proj.weight", "w3": "{e}.up_proj.weight", "w2": "{e}.down_proj.weight"}

    def forward(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        y_TD = torch.zeros_like(x_TD)
        for e in indices_TK.unique().tolist():
            token_N, slot_N = (indices_TK == e).nonzero(as_tuple=True)
            x_ND = x_TD[token_N]
            h_NF = F.silu(x_ND @ self.w1[e].T) * (x_ND @ self.w3[e].T)
            y_ND = (h_NF @ self.w2[e].T) * weights_TK[token_N, slot_N, None].to(x_TD.dtype)
            y_TD = y_TD.index_add(0, token_N, y_ND)
        return y_TD
