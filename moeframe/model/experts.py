"""Routed experts stored as stacked weights, registered as experts ``grouped``.

Hot path: sort the T·K (token, expert) pairs by expert, gather the tokens once, run the SwiGLU
projections as grouped matrix products over all experts (``F.grouped_mm`` with per-expert
offsets), scale by the gate weights and scatter-add back. No Python loop over experts.
Where grouped_mm cannot run (unsupported dtype/device, rows not 16-byte aligned), a per-expert
loop over contiguous slices of the same sorted layout gives identical results.

On the CPU in bfloat16 each expert's group of rows is first padded with zero rows to a multiple
of 32 (:func:`pad_expert_groups_static`): oneDNN builds a kernel per new GEMM shape, and unpadded
group sizes change every step. Results are unchanged. The padded rows live in a buffer whose size
follows from the shapes alone (N + E·31 rows), so the padding has no host sync and compiles into
the block's graph (``compile: block``) like the rest of the dispatch.

Under ``torch.compile`` the grouped product goes through the custom op ``moeframe::grouped_mm``
when the dtype is not bf16: torch's own shape function for ``_grouped_mm`` accepts bf16 only,
although the CPU kernel runs float32 too, so without the op tracing would fail (or break the
graph) exactly on the MoE hot path. The op runs the same kernel, so results are identical.

Under autocast (``bf16-mixed``) the grouped products run in the autocast dtype, as ``nn.Linear``
does there: torch's autocast has no rule for ``grouped_mm``, so without :func:`autocast_dtype` the
routed experts, most of an MoE model's GEMM FLOPs, stayed in float32 under ``bf16-mixed`` (and,
being float32, were never padded). The gate-weighted combine returns to the input's dtype, as the
other MoE paths add in it. Without autocast nothing changes.

Precision plugins may take over the three projections through the grouped-GEMM seam declared on
``ExpertsBase``: ``set_grouped_gemm(gemm)`` makes the forward call ``gemm(projection, x_NI, w_EOI,
offs_E)`` for ``w1``, ``w3`` and ``w2`` (the ``fp8`` plugin installs its FP8 grouped GEMM there).
The weights stay ordinary Parameters of this module, so optimizers, ZeRO and checkpoints see no
difference.

Step-time breakdown: ``ExpertsBase.set_phase_timer`` installs a callback that the forward calls
(``mark_phase``) at the boundaries of dispatch (sort, gather, combine) and expert compute (the
grouped GEMMs); it is ``None`` unless a breakdown step is being measured
(``moeframe.training.throughput``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.model.base import ExpertsBase, GroupedGemm, PhaseTimer, PluginOptions  # noqa: F401 (re-exported)
from moeframe.model.context import ForwardContext
from moeframe.model.hfnames import EXPERT
from moeframe.model.recompute import activation_checkpoint
from moeframe.model.router import count_per_expert

if TYPE_CHECKING:
    from moeframe.config import ModelConfig


@dataclass
class GroupedOptions(PluginOptions):
    """``use_grouped_mm``: False forces the per-expert loop (debugging, unusual hardware).
    ``cpu_bf16_group_multiple``: on the CPU in bfloat16, round each expert's group of rows up to a
    multiple of this many (zero rows, results unchanged) so that the expert GEMMs keep a few shapes
    (see :func:`pad_expert_groups`); 0 turns it off."""

    use_grouped_mm: bool = True
    cpu_bf16_group_multiple: int = 32

    def validate(self, config: ModelConfig) -> None:
        if self.cpu_bf16_group_multiple < 0:
            raise ValueError(f"cpu_bf16_group_multiple must be >= 0 (0 = off), got {self.cpu_bf16_group_multiple}")


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


# -- grouped_mm as a custom op, for tracing float32 (see the module docstring) ----------------------
@torch.library.custom_op("moeframe::grouped_mm", mutates_args=())
def grouped_mm_op(x_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ w[e]`` over the expert-sorted rows (offsets: row ends)."""
    return F.grouped_mm(x_NI, w_EIO, offs=offs_E)


@grouped_mm_op.register_fake
def _grouped_mm_fake(x_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return x_NI.new_empty(x_NI.shape[0], w_EIO.shape[-1])


@torch.library.custom_op("moeframe::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x_NI: torch.Tensor, g_NO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """``dw[e] = x[rows of e]ᵀ @ g[rows of e]``; an expert without rows gets zeros."""
    return F.grouped_mm(x_NI.t(), g_NO, offs=offs_E)


@grouped_mm_weight_grad.register_fake
def _grouped_mm_weight_grad_fake(x_NI: torch.Tensor, g_NO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return x_NI.new_empty(offs_E.shape[0], x_NI.shape[1], g_NO.shape[1])


def _grouped_mm_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x_NI, w_EIO, offs_E = inputs
    ctx.save_for_backward(x_NI, w_EIO, offs_E)


def _grouped_mm_backward(ctx: torch.autograd.function.FunctionCtx, g_NO: torch.Tensor) -> tuple:
    x_NI, w_EIO, offs_E = ctx.saved_tensors
    g_NO = g_NO.contiguous()  # the kernel's backward needs a contiguous output gradient
    dx = grouped_mm_op(g_NO, w_EIO.transpose(-2, -1), offs_E) if ctx.needs_input_grad[0] else None
    dw = _weight_grad_like(x_NI, g_NO, offs_E, w_EIO) if ctx.needs_input_grad[1] else None
    return dx, dw, None


def _weight_grad_like(
    x_NI: torch.Tensor, g_NO: torch.Tensor, offs_E: torch.Tensor, w_EIO: torch.Tensor
) -> torch.Tensor:
    """The weight gradient in the memory layout of the weight it belongs to.

    The experts pass their [E, O, I] parameters transposed (``w_EOI.transpose(-2, -1)``). A
    gradient computed as [E, I, O] must then be copied into the parameter's layout before it
    accumulates (three copies of every expert weight per step, ~5% of a compiled float32 step);
    computed as ``gᵀx`` [E, O, I] and handed back transposed, it already is in that layout."""
    if w_EIO.stride(-2) == 1 and w_EIO.stride(-1) != 1:  # a transposed view of [E, O, I]
        return grouped_mm_weight_grad(g_NO, x_NI, offs_E).transpose(-2, -1)
    return grouped_mm_weight_grad(x_NI, g_NO, offs_E)


grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def pad_expert_groups(
    x_ND: torch.Tensor, counts_E: torch.Tensor, multiple: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert-sorted rows with each expert's group rounded up to ``multiple`` rows by zero rows.

    Why: torch's CPU bfloat16 matmul (oneDNN) builds a kernel for every new matrix shape, about
    0.6 ms each, and keeps ~1k of them; the per-expert row counts change every training step, so
    unpadded groups meet new shapes in most expert GEMMs and run ~3x slower than the same GEMMs
    with shapes seen before. Groups of whole multiples keep the shapes few. Zero rows give zero
    outputs and add nothing to the weight gradients.

    Returns ``(x_MD, counts_E, offs_E, slot_N)``: the padded rows (M >= N), the padded counts and
    row ends, and where each of the N input rows went (``y_ND = y_MD[slot_N]``)."""
    padded_E = (counts_E + multiple - 1) // multiple * multiple
    # output_size: the rows are the counts' sum already; without it the op's size depends on the data
    # and a compiled block breaks its graph here
    expert_N = torch.repeat_interleave(
        torch.arange(len(counts_E), device=counts_E.device), counts_E, output_size=x_ND.shape[0]
    )
    shift_E = (padded_E.cumsum(0) - padded_E) - (counts_E.cumsum(0) - counts_E)
    slot_N = torch.arange(x_ND.shape[0], device=x_ND.device) + shift_E[expert_N]
    x_MD = x_ND.new_zeros(int(padded_E.sum()), x_ND.shape[1]).index_copy(0, slot_N, x_ND)
    return x_MD, padded_E, padded_E.cumsum(0).to(torch.int32), slot_N


def pad_expert_groups_static(
    x_ND: torch.Tensor, expert_N: torch.Tensor, counts_E: torch.Tensor, multiple: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`pad_expert_groups` with a size fixed by the shapes alone, for ``torch.compile``.

    Σ_e ceil(c_e/m)·m never exceeds N + E·(m-1), so the padded rows always fit a buffer of that
    many rows: no host sync, no data-dependent shape, one graph. The rows after the last group's
    end (``offs_E[-1]``) belong to no expert; they stay zero in ``x_MD``, the grouped GEMMs skip
    them and the caller reads back only ``slot_N``. ``expert_N`` is the expert of each (sorted)
    input row, which replaces ``pad_expert_groups``' ``repeat_interleave`` (data-dependent size).

    Returns ``(x_MD, offs_E, slot_N)``."""
    N, E = x_ND.shape[0], counts_E.shape[0]
    padded_E = (counts_E + multiple - 1) // multiple * multiple
    shift_E = (padded_E.cumsum(0) - padded_E) - (counts_E.cumsum(0) - counts_E)
    slot_N = torch.arange(N, device=x_ND.device) + shift_E[expert_N]
    x_MD = x_ND.new_zeros(N + E * (multiple - 1), x_ND.shape[1]).index_copy(0, slot_N, x_ND)
    return x_MD, padded_E.cumsum(0).to(torch.int32), slot_N


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products of ``x`` run in: autocast's lower precision where autocast is on
    for ``x``'s device and ``x`` is a float tensor, else ``x``'s own dtype."""
    device_type = x.device.type
    if (
        x.is_floating_point()
        and torch.amp.is_autocast_available(device_type)
        and torch.is_autocast_enabled(device_type)
    ):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _cast_like(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A stand-in for ``w.to(x.dtype)`` with no storage (``grouped_mm_supported`` reads only dtype,
    device and shape): the real cast happens once, in :func:`_grouped_linear`."""
    return w if w.dtype == x.dtype else torch.empty((), dtype=x.dtype, device=w.device).expand(w.shape)


def grouped_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """``F.grouped_mm(x, w, offs=offs)`` that also traces in float32 under ``torch.compile`` (through
    ``moeframe::grouped_mm``, see the module docstring); same kernel, same results."""
    if torch.compiler.is_compiling() and x_NI.dtype != torch.bfloat16:
        return grouped_mm_op(x_NI, w_EIO, offs_E)
    return F.grouped_mm(x_NI, w_EIO, offs=offs_E)


def _grouped_linear(
    x_ND: torch.Tensor, w_EOD: torch.Tensor, offs_E: torch.Tensor, counts: list[int] | None
) -> torch.Tensor:
    """Per-expert ``x @ w_eᵀ`` over contiguous token slices; ``counts`` given → loop fallback. The
    weights are cast to the rows' dtype (autocast: bf16 rows, float32 master weights)."""
    w_EOD = w_EOD.to(x_ND.dtype)
    if counts is None:
        return grouped_mm(x_ND, w_EOD.transpose(-2, -1), offs_E)
    chunks = torch.split(x_ND, counts)
    return torch.cat([c @ w.T for c, w in zip(chunks, w_EOD)], dim=0)


class GroupedExperts(ExpertsBase):
    """E SwiGLU experts; ``w1``/``w3`` [E, F, D] and ``w2`` [E, D, F] (checkpoint layout per expert).

    ``recompute`` (``set_selective_recompute``, by selective activation checkpointing): the expert
    FFN keeps only its gathered input for backward and recomputes the [N, F] hidden activations
    there."""

    Options = GroupedOptions
    plugin_api = "2"  # the moeframe plugin API this class is written against
    grouped_gemm_seam = True  # projections run through self.grouped_gemm when a precision plugin sets it
    marks_phases = True

    def __init__(
        self,
        config: ModelConfig,
        options: GroupedOptions,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        layer_id: int | None = None,
    ) -> None:
        super().__init__(config, options, num_experts, dim, hidden_dim, layer_id)
        self.num_experts = num_experts
        self.use_grouped_mm = options.use_grouped_mm
        self.cpu_bf16_group_multiple = options.cpu_bf16_group_multiple
        self.recompute = False
        self.grouped_gemm: GroupedGemm | None = None  # the seam (see the module docstring)
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    def set_selective_recompute(self, enabled: bool) -> None:
        self.recompute = enabled

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        # stacked [E, ...] here, one SwiGLU per expert in HF checkpoints
        return {
            "w1": f"{EXPERT}.gate_proj.weight",
            "w3": f"{EXPERT}.up_proj.weight",
            "w2": f"{EXPERT}.down_proj.weight",
        }

    def _ffn(self, x_ND: torch.Tensor, offs_E: torch.Tensor, counts: list[int] | None) -> torch.Tensor:
        # Not fused into one GEMM over [w1; w3] (~15% less bf16 expert time on the CPU): the wider
        # product rounds differently, and LoRA's and EP's experts, which run w1 and w3 separately,
        # must reproduce this layer bit for bit.
        h_NF = F.silu(self.project("w1", x_ND, offs_E, counts)) * self.project("w3", x_ND, offs_E, counts)
        return self.project("w2", h_NF, offs_E, counts)

    def _group_multiple(self, x_TD: torch.Tensor) -> int:
        """Rows per group multiple for :func:`pad_expert_groups_static`, 0 where padding does not
        pay: off the CPU or bf16 and under a precision plugin's ``grouped_gemm`` (it runs its own
        GEMMs). The padded buffer's size depends on the shapes only, so this holds under
        ``torch.compile`` too."""
        if (
            self.cpu_bf16_group_multiple
            and x_TD.device.type == "cpu"
            and x_TD.dtype == torch.bfloat16
            and self.grouped_gemm is None
        ):
            return self.cpu_bf16_group_multiple
        return 0

    def project(self, name: str, x_NI: torch.Tensor, offs_E: torch.Tensor, counts: list[int] | None) -> torch.Tensor:
        """One projection (``w1``, ``w2`` or ``w3``) of every expert over its rows of ``x_NI``."""
        w_EOI = getattr(self, name)
        if self.grouped_gemm is not None:
            return self.grouped_gemm(name, x_NI, w_EOI, offs_E)
        return _grouped_linear(x_NI, w_EOI, offs_E, counts)

    def forward(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor, ctx: ForwardContext | None = None
    ) -> torch.Tensor:
        self.mark_phase("moe_dispatch")
        T, K = indices_TK.shape
        out_dtype = x_TD.dtype
        if self.grouped_gemm is None:  # a precision plugin's GEMM chooses its own dtypes
            x_TD = x_TD.to(autocast_dtype(x_TD))
        order_N = indices_TK.flatten().argsort(stable=True)
        token_N = order_N // K  # which token each sorted slot belongs to
        counts_E = count_per_expert(indices_TK, self.num_experts)
        offs_E = counts_E.cumsum(0).to(torch.int32)
        fast = self.use_grouped_mm and all(grouped_mm_supported(x_TD, _cast_like(w, x_TD)) for w in (self.w1, self.w2))
        # index_select, not x_TD[token_N]: same rows, but its backward is an index_add (bf16 on the
        # CPU: ~40x faster than the sort-based accumulate of advanced indexing's backward)
        x_ND = x_TD.index_select(0, token_N)
        multiple = self._group_multiple(x_TD)
        if multiple and fast:
            x_ND, offs_E, slot_N = pad_expert_groups_static(x_ND, indices_TK.flatten()[order_N], counts_E, multiple)
        elif multiple:  # the per-expert loop needs the group sizes on the host anyway
            x_ND, counts_E, offs_E, slot_N = pad_expert_groups(x_ND, counts_E, multiple)
        counts = None if fast else counts_E.tolist()
        self.mark_phase("moe_experts")
        if self.recompute and torch.is_grad_enabled():
            y_ND = activation_checkpoint(self._ffn, x_ND, offs_E, counts)
        else:
            y_ND = self._ffn(x_ND, offs_E, counts)
        self.mark_phase("moe_dispatch")  # the combine: weight, scatter back to tokens
        if multiple:
            y_ND = y_ND.index_select(0, slot_N)
        y_ND = y_ND.to(out_dtype)
        y_ND = y_ND * weights_TK.flatten().index_select(0, order_N).unsqueeze(-1).to(y_ND.dtype)
        y_TD = y_ND.new_zeros(T, y_ND.shape[1]).index_add_(0, token_N, y_ND)
        self.mark_phase(None)
        return y_TD
