"""DeepSeek-V4's clamped SwiGLU experts, registered as experts ``v4_swiglu``.

V4 clips the SwiGLU's pre-activations to keep rare outliers bounded (HF ``swiglu_limit``, 10 in
the release): ``w2(silu(min(w1 x, L)) · clamp(w3 x, -L, L))``, in the routed and the shared
experts alike. The core's grouped experts compute an unclamped SwiGLU, so this plugin reuses
their grouped layout and dispatch (``GroupedExperts``) and changes only the expert function; it
also hands the MoE layer a clamped shared expert through the declared ``shared_ffn`` hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.plugin import EXPERT, GroupedExperts, HFNamed, ModelConfig

__all__ = ["ClampedSwiGLU", "ClampedSwiGLUExperts", "ClampedSwiGLUOptions", "clamped_swiglu"]


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """``silu(min(gate, L)) · clamp(up, -L, L)``: only the gate's upper side is clipped (silu is
    already bounded below), the linear ``up`` branch on both sides."""
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


@dataclass
class ClampedSwiGLUOptions(GroupedExperts.Options):  # type: ignore[name-defined,misc]
    """The grouped experts' options plus ``swiglu_limit`` L (HF ``swiglu_limit``)."""

    swiglu_limit: float = 10.0

    def validate(self, config: ModelConfig) -> None:
        super().validate(config)
        if self.swiglu_limit <= 0:
            raise ValueError(f"experts v4_swiglu: swiglu_limit must be > 0, got {self.swiglu_limit}")


def _v4_names(family: str) -> bool:
    return family == "deepseek_v4"


class ClampedSwiGLU(nn.Module, HFNamed):
    """The shared experts' clamped SwiGLU (``w1`` gate, ``w3`` up, ``w2`` down, like the core's)."""

    def __init__(self, dim: int, hidden_dim: int, limit: float) -> None:
        super().__init__()
        self.limit = limit
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(clamped_swiglu(self.w1(x), self.w3(x), self.limit))

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        if _v4_names(family):  # V4 folders keep the reference's w1/w2/w3
            return {n: n for n in ("w1.weight", "w2.weight", "w3.weight")}
        return {"w1.weight": "gate_proj.weight", "w3.weight": "up_proj.weight", "w2.weight": "down_proj.weight"}


class ClampedSwiGLUExperts(GroupedExperts):
    """E clamped SwiGLU experts in the grouped layout (``w1``/``w3`` [E, F, D], ``w2`` [E, D, F])."""

    Options = ClampedSwiGLUOptions
    plugin_api = "2"

    def __init__(
        self,
        config: ModelConfig,
        options: ClampedSwiGLUOptions,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        layer_id: int | None = None,
    ) -> None:
        super().__init__(config, options, num_experts, dim, hidden_dim, layer_id)
        self.limit = options.swiglu_limit

    def _ffn(self, x_ND: torch.Tensor, offs_E: torch.Tensor, counts: list[int] | None) -> torch.Tensor:
        gate_NF = self.project("w1", x_ND, offs_E, counts)
        up_NF = self.project("w3", x_ND, offs_E, counts)
        return self.project("w2", clamped_swiglu(gate_NF, up_NF, self.limit), offs_E, counts)

    @classmethod
    def shared_ffn(cls, config: ModelConfig, options: Any, dim: int, hidden_dim: int) -> nn.Module:
        return ClampedSwiGLU(dim, hidden_dim, options.swiglu_limit)

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        if _v4_names(family):
            return {n: f"{EXPERT}.{n}.weight" for n in ("w1", "w2", "w3")}
        return super().hf_tensor_names(family)

    @classmethod
    def hf_config(cls, family: str, config: ModelConfig, options: Any) -> dict[str, Any]:
        return {"swiglu_limit": options.swiglu_limit}

    @classmethod
    def options_from_hf(cls, family: str, hf: dict[str, Any]) -> dict[str, Any]:
        return {"swiglu_limit": float(hf.get("swiglu_limit", 10.0))}
