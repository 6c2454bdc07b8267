"""The pre-norm residual, registered as residual ``prenorm``: the default residual stream.

``h = x + attention(x)``, ``out = h + ffn(h)`` where each sublayer normalises its own input
(``attention(x)`` is ``attn(attn_norm(x))``): one stream of width D, carried unchanged between
blocks. This is the block of the DeepSeek-V3 reference; multi-stream residuals (hyper-connections)
are other plugins of the same kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeframe.model.base import PluginOptions, ResidualBase
from moeframe.model.context import ForwardContext


@dataclass
class PreNormOptions(PluginOptions):
    """The pre-norm residual has no options."""


class PreNormResidual(ResidualBase):
    """One residual stream; the sublayers' outputs are added to it (no parameters)."""

    Options = PreNormOptions
    plugin_api = "2"  # the moeframe plugin API this class is written against

    def forward(
        self,
        h_BTD: torch.Tensor,
        attention: Callable[[torch.Tensor], torch.Tensor],
        ffn: Callable[[torch.Tensor], torch.Tensor],
        ctx: ForwardContext,
    ) -> torch.Tensor:
        h_BTD = h_BTD + attention(h_BTD)
        return h_BTD + ffn(h_BTD)
