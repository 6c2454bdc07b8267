"""Norm plugin ``template_name``: layer normalisation without bias (a starting point)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.plugin import ForwardContext, NormBase, PluginOptions


@dataclass
class TemplateNameNormOptions(PluginOptions):
    """This plugin takes no options beyond the model's ``norm_eps``; add typed fields here."""


class TemplateNameNorm(NormBase):
    """``(x - mean) / std * g`` over the last dimension, computed in fp32 whatever the input."""

    Options = TemplateNameNormOptions
    plugin_api = "2"  # the moeframe plugin API this class is written against

    def __init__(self, dim: int, eps: float, options: TemplateNameNormOptions, layer_id: int | None = None) -> None:
        super().__init__(dim, eps, options, layer_id)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        return {"weight": "weight"}  # its name in HF checkpoints, below the norm's module

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), None, self.eps).to(x.dtype)
