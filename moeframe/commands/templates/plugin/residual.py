"""Residual plugin ``template_name``: the pre-norm residual with a learned scale per sublayer
(a starting point; several streams, as in hyper-connections, are a state of shape [B, T, n, D])."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moeframe.plugin import ForwardContext, ModelConfig, PluginOptions, ResidualBase


@dataclass
class TemplateNameResidualOptions(PluginOptions):
    """The options a config can give: ``residual: {name: template_name, init_scale: 1.0}``."""

    init_scale: float = 1.0


class TemplateNameResidual(ResidualBase):
    """``h = x + a * attention(x)``, ``out = h + f * ffn(h)``; ``a`` and ``f`` are learned scalars."""

    Options = TemplateNameResidualOptions
    plugin_api = "2"  # the moeframe plugin API this class is written against

    def __init__(self, config: ModelConfig, options: TemplateNameResidualOptions, layer_id: int) -> None:
        super().__init__(config, options, layer_id)
        self.init_scale = options.init_scale
        self.scale_2 = nn.Parameter(torch.empty(2))

    def init_weights(self, std: float) -> None:
        with torch.no_grad():
            self.scale_2.fill_(self.init_scale)

    def forward(
        self,
        h_BTD: torch.Tensor,
        attention: Callable[[torch.Tensor], torch.Tensor],
        ffn: Callable[[torch.Tensor], torch.Tensor],
        ctx: ForwardContext,
    ) -> torch.Tensor:
        h_BTD = h_BTD + self.scale_2[0].to(h_BTD.dtype) * attention(h_BTD)
        return h_BTD + self.scale_2[1].to(h_BTD.dtype) * ffn(h_BTD)
