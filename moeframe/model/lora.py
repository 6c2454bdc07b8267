"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for moeframe.

A frozen weight ``W`` [out, in] is adapted by a trainable low-rank product:
``W' = W + (α/r)·B·A`` with ``A`` [r, in] and ``B`` [out, r]. ``B`` starts at zero, so training
starts exactly at the pretrained model; only ``r·(in + out)`` numbers per matrix are trained and
stored in the optimizer. The scale ``α/r`` keeps the update size roughly independent of ``r``.

Stacked experts (``GroupedExperts``: ``w1``/``w3`` [E, F, D], ``w2`` [E, D, F]) get one
adapter per expert: ``A`` [E, r, in] and ``B`` [E, out, r]. The adapter path runs through the
same sorted grouped layout as the base experts, so each token only touches the adapters of
the experts it is routed to.

Export merges: ``merge_lora`` folds ``(α/r)·B·A`` into every adapted weight and puts the plain
modules back, so a merged decoder has exactly the pretrained parameter names (and converts to
HF like any other) and computes what the adapter model computed.

Shapes: E experts, D model dim, F expert hidden dim, r rank, N routed (token, expert) slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.errors import ConfigError
from moeframe.model.base import AttentionBase, ExpertsBase
from moeframe.model.context import ForwardContext
from moeframe.model.experts import (
    GroupedExperts,
    _cast_like,
    _grouped_linear,
    autocast_dtype,
    grouped_mm_supported,
    pad_expert_groups,
    pad_expert_groups_static,
)
from moeframe.model.moe import MoE
from moeframe.model.router import count_per_expert


@dataclass
class LoRAOptions:
    """``rank`` r and ``alpha`` α (update scale α/r); which weights get adapters: every linear
    layer of ``attention``, the routed ``experts`` (per expert), the ``shared_experts``."""

    rank: int = 8
    alpha: float = 16.0
    attention: bool = True
    experts: bool = True
    shared_experts: bool = False

    def validate(self) -> None:
        if self.rank <= 0 or self.alpha <= 0:
            raise ConfigError(f"model.lora: rank and alpha must be > 0, got rank={self.rank}, alpha={self.alpha}")
        if not (self.attention or self.experts or self.shared_experts):
            raise ConfigError("model.lora adapts nothing: enable attention, experts or shared_experts")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """``base(x) + (α/r)·B(A x)`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, rank: int, scale: float) -> None:
        super().__init__()
        self.base, self.scale = base, scale
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear, following the paper's code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += (self.lora_B @ self.lora_A * self.scale).to(self.base.weight.dtype)
        return self.base


class LoRAGroupedExperts(ExpertsBase):
    """Per-expert adapters on the stacked ``w1``, ``w2``, ``w3`` of a frozen ``GroupedExperts``.

    An experts module like the one it wraps (the decoder calls its declared hooks); it declares no
    grouped-GEMM seam of its own: a precision plugin takes over the base layer's projections."""

    plugin_api = "2"  # called with the forward context (unused: adapters are per expert, not per token)

    def __init__(self, base: GroupedExperts, rank: int, scale: float) -> None:
        nn.Module.__init__(self)  # wraps a built experts module; no model config to pass
        self.base, self.scale, self.num_experts = base, scale, base.num_experts
        for name in ("w1", "w2", "w3"):
            w_EOI = getattr(base, name)
            w_EOI.requires_grad_(False)
            E, out_dim, in_dim = w_EOI.shape
            a = torch.empty(E, rank, in_dim, device=w_EOI.device, dtype=w_EOI.dtype)
            for e in range(E):
                nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
            setattr(self, f"{name}_lora_A", nn.Parameter(a))
            setattr(
                self,
                f"{name}_lora_B",
                nn.Parameter(torch.zeros(E, out_dim, rank, device=w_EOI.device, dtype=w_EOI.dtype)),
            )

    def _project(self, name: str, x_NI: torch.Tensor, offs_E: torch.Tensor, counts: list[int] | None) -> torch.Tensor:
        a, b = getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")
        low_rank = _grouped_linear(_grouped_linear(x_NI, a, offs_E, counts), b, offs_E, counts)
        # the frozen base through the base's own projection (an FP8 grouped GEMM when fp8 set one)
        return self.base.project(name, x_NI, offs_E, counts) + low_rank * self.scale

    def forward(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor, ctx: ForwardContext | None = None
    ) -> torch.Tensor:
        # the base layer's sorted layout (see moeframe.model.experts), with adapters on each projection
        T, K = indices_TK.shape
        out_dtype = x_TD.dtype
        if self.base.grouped_gemm is None:  # under autocast the products run in its dtype, as the base layer's
            x_TD = x_TD.to(autocast_dtype(x_TD))
        order_N = indices_TK.flatten().argsort(stable=True)
        token_N = order_N // K
        counts_E = count_per_expert(indices_TK, self.num_experts)  # not bincount: a graph break under compile
        offs_E = counts_E.cumsum(0).to(torch.int32)
        operands = (self.base.w1, self.base.w2, *(p for n, p in self.named_parameters(recurse=False)))
        fast = self.base.use_grouped_mm and all(grouped_mm_supported(x_TD, _cast_like(w, x_TD)) for w in operands)
        x_ND = x_TD.index_select(0, token_N)  # index_select: its backward is an index_add (see experts)
        multiple = self.base._group_multiple(x_TD)  # CPU bf16: few GEMM shapes, as the base layer does
        if multiple and fast:
            x_ND, offs_E, slot_N = pad_expert_groups_static(x_ND, indices_TK.flatten()[order_N], counts_E, multiple)
        elif multiple:
            x_ND, counts_E, offs_E, slot_N = pad_expert_groups(x_ND, counts_E, multiple)
        counts = None if fast else counts_E.tolist()
        h_NF = F.silu(self._project("w1", x_ND, offs_E, counts)) * self._project("w3", x_ND, offs_E, counts)
        y_ND = self._project("w2", h_NF, offs_E, counts)
        if multiple:
            y_ND = y_ND.index_select(0, slot_N)
        y_ND = y_ND.to(out_dtype)
        y_ND = y_ND * weights_TK.flatten()[order_N].unsqueeze(-1).to(y_ND.dtype)
        return y_ND.new_zeros(T, y_ND.shape[1]).index_add_(0, token_N, y_ND)

    @torch.no_grad()
    def merged(self) -> GroupedExperts:
        for name in ("w1", "w2", "w3"):
            w = getattr(self.base, name)
            w += (torch.bmm(getattr(self, f"{name}_lora_B"), getattr(self, f"{name}_lora_A")) * self.scale).to(w.dtype)
        return self.base


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def apply_lora(decoder: nn.Module, options: LoRAOptions) -> list[str]:
    """Freeze every parameter of ``decoder`` and wrap the chosen weights with adapters (in place);
    return the names of the adapted modules."""
    options.validate()
    decoder.requires_grad_(False)
    targets: list[tuple[str, nn.Module]] = []
    for name, module in decoder.named_modules():
        if options.attention and isinstance(module, AttentionBase):
            targets += [(f"{name}.{n}", m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        if isinstance(module, MoE):
            if options.experts:
                if not isinstance(module.experts, GroupedExperts):
                    raise ConfigError(
                        f"model.lora.experts needs the 'grouped' experts plugin, {name}.experts is "
                        f"{type(module.experts).__name__}; set model.lora.experts: false"
                    )
                targets.append((f"{name}.experts", module.experts))
            if options.shared_experts and module.shared_experts is not None:
                targets += [(f"{name}.shared_experts.{n}", m) for n, m in module.shared_experts.named_children()]
    for name, module in targets:
        wrapper = (LoRAGroupedExperts if isinstance(module, GroupedExperts) else LoRALinear)(
            module, options.rank, options.scale
        )
        _replace(decoder, name, wrapper)
    return [name for name, _ in targets]


def merge_lora(decoder: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and restore the plain modules (in place)."""
    wrapped = [(n, m) for n, m in decoder.named_modules() if isinstance(m, (LoRALinear, LoRAGroupedExperts))]
    for name, module in wrapped:
        _replace(decoder, name, module.merged())
    decoder.requires_grad_(True)
    return decoder
