"""Router plugin ``template_name``: softmax top-k with renormalised weights (a starting point)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeframe.plugin import ForwardContext, ModelConfig, PluginOptions, RouterBase, RouterOutput, gate_logits_fp32


@dataclass
class TemplateNameRouterOptions(PluginOptions):
    """The options a config can give: ``router: {name: template_name, temperature: 1.0}``."""

    temperature: float = 1.0

    def validate(self, config: ModelConfig) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


class TemplateNameRouter(RouterBase):
    """``forward(x_TD, ctx) -> RouterOutput``: K experts per token, weights summing to route_scale.
    ``x_TD`` is the block's normalised residual, flattened (B*T rows); ``ctx`` is the forward context
    (``ctx.token_ids_BT.flatten()`` are the rows' token ids, ``ctx.layer_id`` the layer, ``ctx.step``)."""

    Options = TemplateNameRouterOptions
    plugin_api = "2"  # the moeframe plugin API this class is written against

    def __init__(self, config: ModelConfig, options: TemplateNameRouterOptions, layer_id: int) -> None:
        super().__init__(config, options, layer_id)
        self.top_k, self.route_scale, self.temperature = (
            config.n_activated_experts,
            config.route_scale,
            options.temperature,
        )
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.dim))

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        # its names in HF checkpoints, below the router's module (what `moeframe convert` writes)
        return {"weight": "weight"}

    def forward(self, x_TD: torch.Tensor, ctx: ForwardContext) -> RouterOutput:
        # routing in fp32, also under autocast (bf16-mixed re-casts F.linear): bf16 scores flip near-tied choices
        scores_TE = (gate_logits_fp32(x_TD, self.weight) / self.temperature).softmax(dim=-1)
        top_TK = scores_TE.topk(self.top_k, dim=-1)
        weights_TK = top_TK.values / top_TK.values.sum(dim=-1, keepdim=True)
        counts_E = torch.bincount(top_TK.indices.flatten(), minlength=scores_TE.shape[1])
        return RouterOutput(weights_TK * self.route_scale, top_TK.indices, counts_E, aux_loss=None)
