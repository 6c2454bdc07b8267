"""Precision plugin ``template_name``: bf16 weight storage for linear layers (a starting point).

A Lightning ``Precision``: ``convert_module`` swaps every ``nn.Linear`` outside the modules the
model keeps in high precision (``Decoder.high_precision_modules()``: embedding, head, routers,
norms) for a layer that stores its weight in bf16 and computes in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import Precision
from torch import nn


class BF16WeightLinear(nn.Module):
    """A linear layer whose weight is stored in bf16 (half the memory) and upcast to compute."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def converted_names(model: nn.Module) -> list[str]:
    """Qualified names of the linear layers this plugin converts in ``model``."""
    keep: list[str] = []
    for prefix, sub in model.named_modules():
        if hasattr(sub, "high_precision_modules"):  # the moeframe Decoder, wherever it sits
            keep += [f"{prefix}.{k}" if prefix else k for k in sub.high_precision_modules()]
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(n == k or n.startswith(k + ".") for k in keep)
    ]


class TemplateNamePrecision(Precision):
    plugin_api = "2"  # the moeframe plugin API this class is written against

    def convert_module(self, module: nn.Module) -> nn.Module:
        for name in converted_names(module):
            parent, _, child = name.rpartition(".")
            owner = module.get_submodule(parent) if parent else module
            setattr(owner, child, BF16WeightLinear(getattr(owner, child)))
        return module
