"""RMSNorm, registered as norm ``rmsnorm``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeframe.model.base import NormBase, PluginOptions
from moeframe.model.context import ForwardContext


@dataclass
class RMSNormOptions(PluginOptions):
    """RMSNorm has no options beyond the model's ``norm_eps``."""


class RMSNorm(NormBase):
    """``x / rms(x) · g``, computed in fp32 whatever the input dtype (low precision loses the rms)."""

    Options = RMSNormOptions
    plugin_api = "2"  # the moeframe plugin API this class is written against

    def __init__(
        self, dim: int, eps: float, options: PluginOptions = RMSNormOptions(), layer_id: int | None = None
    ) -> None:
        super().__init__(dim, eps, options, layer_id)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        return {"weight": "weight"}

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        return nn.functional.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
