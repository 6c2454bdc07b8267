"""The SwiGLU feed-forward network used for dense layers and shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.model.hfnames import HFNamed


class SwiGLU(nn.Module, HFNamed):
    """``w2(silu(w1 x) · w3 x)``; names follow the DeepSeek reference (w1 gate, w3 up, w2 down)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        return {"w1.weight": "gate_proj.weight", "w3.weight": "up_proj.weight", "w2.weight": "down_proj.weight"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
