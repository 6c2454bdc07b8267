"""Routed experts stored as stacked weights, registered as experts ``grouped``.

Hot path: sort the T·K (token, expert) pairs by expert, gather the tokens once, run each of the
three SwiGLU projections as ONE grouped matrix product over all experts (``F.grouped_mm`` with
per-expert offsets), scale by the gate weights and scatter-add back. No Python loop over experts.
Where grouped_mm cannot run (unsupported dtype/device, rows not 16-byte aligned), a per-expert
loop over contiguous slices of the same sorted layout gives identical results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.model.base import ExpertsBase, PluginOptions

if TYPE_CHECKING:
    from moeframe.config import ModelConfig


@dataclass
class GroupedOptions(PluginOptions):
    """``use_grouped_mm``: False forces the per-expert loop (debugging, unusual hardware)."""

    use_grouped_mm: bool = True


def grouped_mm_supported(x: torch.Tensor, w_EXY: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` runs for these operands on this device in this torch build."""
    if not hasattr(F, "grouped_mm") or x.dtype != w_EXY.dtype:
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    # the CPU kernel needs every row stride to be a multiple of 16 bytes
    return all((n * x.element_size()) % 16 == 0 for n in w_EXY.shape[1:])


def _grouped_linear(x_ND: torch.Tensor, w_EOD: torch.Tensor, offs_E: torch.Tensor, counts: list[int] | None) -> torch.Tensor:
    """Per-expert ``x @ w_eᵀ`` over contiguous token slices; ``counts`` given → loop fallback."""
    if counts is None:
        return F.grouped_mm(x_ND, w_EOD.transpose(-2, -1), offs=offs_E)
    chunks = torch.split(x_ND, counts)
    return torch.cat([c @ w.T for c, w in zip(chunks, w_EOD)], dim=0)


class GroupedExperts(ExpertsBase):
    """E SwiGLU experts; ``w1``/``w3`` [E, F, D] and ``w2`` [E, D, F] (checkpoint layout per expert)."""

    Options = GroupedOptions

    def __init__(
        self, config: "ModelConfig", options: GroupedOptions, num_experts: int, dim: int, hidden_dim: int
    ) -> None:
        super().__init__(config, options, num_experts, dim, hidden_dim)
        self.num_experts = num_experts
        self.use_grouped_mm = options.use_grouped_mm
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    def forward(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor:
        T, K = indices_TK.shape
        order_N = indices_TK.flatten().argsort(stable=True)
        token_N = order_N // K  # which token each sorted slot belongs to
        counts_E = torch.bincount(indices_TK.flatten(), minlength=self.num_experts)
        offs_E = counts_E.cumsum(0).to(torch.int32)
        fast = self.use_grouped_mm and grouped_mm_supported(x_TD, self.w1) and grouped_mm_supported(x_TD, self.w2)
        counts = None if fast else counts_E.tolist()
        x_ND = x_TD[token_N]
        h_NF = F.silu(_grouped_linear(x_ND, self.w1, offs_E, counts)) * _grouped_linear(x_ND, self.w3, offs_E, counts)
        y_ND = _grouped_linear(h_NF, self.w2, offs_E, counts)
        y_ND = y_ND * weights_TK.flatten()[order_N].unsqueeze(-1).to(y_ND.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND)

