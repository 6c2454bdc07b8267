"""FP8 routed experts: the three projections of stacked experts (``w1``/``w3``/``w2`` [E, O, I])
as FP8 GEMMs, one per expert over its contiguous rows (DeepSeek-V3 runs its MoE GEMMs in FP8 too:
they are most of the model's FLOPs).

Legend: N expert-sorted rows (T·K), E experts, I the projection's input width, O its output width;
expert e owns rows ``[offs[e-1], offs[e])``.

Per expert the recipe is exactly ``FP8Linear``'s:

- forward ``y_e = x_e · W_eᵀ``: x in 1×128 tiles along I (a tile never leaves its row, so the
  whole [N, I] input is quantised once), each ``W_e`` in its own 128×128 blocks;
- dgrad ``dx_e = dy_e · W_e`` with dy tiled along O (again once for all rows) and the same E4M3 W_e;
- wgrad ``dW_e = dy_eᵀ · x_e``: the contraction runs over the expert's own tokens, so the 1×128
  tiles along M start at the expert's first row; an expert that received no token gets zeros.

Installed by ``convert_to_fp8`` as the experts module's ``grouped_gemm`` hook (``GroupedExperts``
and the parallel plugin's ``EPExperts`` have it), so the parameters, their names and the
checkpoint layout do not change.

Two ways to run it, the same numbers:

- ``emulated`` backend: all experts at once, no host synchronisation (on a GPU nothing reads the
  row offsets on the host, no shape depends on the routing, so the layer also compiles in one graph).
  One quantisation pass per operand (the stacked weights in one batched block quantisation), and
  per 128-wide slice of the contraction one grouped product (``F.grouped_mm`` over the experts'
  row groups, the same fp32 products the per-expert loop runs) scaled per row and column. The
  weight gradient tiles along each expert's own rows: the rows are first placed in a buffer where
  every expert's group starts on a 128-row boundary (its size follows from N and E alone, like
  the core's ``pad_expert_groups_static``), so every 1×128 tile belongs to one expert; the tile
  products are then summed into their expert in tile order, as the per-expert loop sums them.
- ``hopper`` backend: one block-scaled ``scaled_mm`` per expert in a Python loop over the row
  ranges, which reads the offsets on the host (one sync per projection): cuBLAS in this torch has
  no block-scaled grouped FP8 GEMM (``torch._scaled_grouped_mm`` takes row-wise scales only).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

from moeframe.plugin import grouped_mm
from moeframe_fp8.linear import SUPPORTED_DTYPES, FP8Recipe, StatsRecorder, dgrad, fprop, wgrad
from moeframe_fp8.quantize import (
    E4M3_MAX,
    FP8,
    TILE,
    dequantize_tiles,
    num_tiles,
    quantize_tiles,
    quantize_weight,
    scale_from_amax,
    tensor_stats,
)

__all__ = ["FP8GroupedGemm", "fp8_grouped_linear"]

# torch 2.11's dynamo traces this module's autograd Function so that its backward yields zero
# gradients (seen on the CPU, eager and aot_eager backends alike; torch 2.13 traces it right). Before
# 2.13 the FP8 grouped GEMM therefore runs outside the compiled graph: a graph break, right numbers.
COMPILES_IN_GRAPH = torch.__version__ >= "2.13"


def _row_ranges(counts: list[int]) -> list[slice]:
    """The rows of each expert, in expert order."""
    ranges, start = [], 0
    for n in counts:
        ranges.append(slice(start, start + n))
        start += n
    return ranges


def _quantize_experts(w_EOI: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [E, O, I] E4M3, scale [E, ceil(O/128), ceil(I/128)])``: blocks never straddle two experts."""
    pairs = [quantize_weight(w_EOI[e], pow2) for e in range(w_EOI.shape[0])]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def _quantize_experts_batched(w_EOI: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_quantize_experts` in one pass over all experts (the same elementwise operations,
    so the same bits as ``quantize_weight`` per expert)."""
    E, O, I = w_EOI.shape
    bo, bi = num_tiles(O), num_tiles(I)
    w = F.pad(w_EOI.float(), (0, bi * TILE - I, 0, bo * TILE - O)).view(E, bo, TILE, bi, TILE)
    scale_EBG = scale_from_amax(w.abs().amax(dim=(2, 4)), pow2)
    q = (w / scale_EBG[:, :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return q.view(E, bo * TILE, bi * TILE)[:, :O, :I].contiguous(), scale_EBG.contiguous()


def _expert_of_rows(offs_E: torch.Tensor, n: int) -> torch.Tensor:
    """[N] the expert owning each row (row i belongs to the first e with i < offs[e])."""
    return torch.searchsorted(offs_E.long(), torch.arange(n, device=offs_E.device), right=True)


def _block_scales_of_rows(s_EBG: torch.Tensor, expert_N: torch.Tensor, k: int, width: int) -> torch.Tensor:
    """[N, width]: for K-slice k, the 128×128 block scale of each row's expert at every output column."""
    return s_EBG[:, :, k].index_select(0, expert_N).repeat_interleave(TILE, dim=1)[:, :width]


def _pad_last(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero columns up to a multiple (``grouped_mm`` on the CPU wants 16-byte row strides); zeros
    at the end of a dot product add nothing."""
    pad = -t.shape[-1] % multiple
    return F.pad(t, (0, pad)) if pad else t


def _grouped_gemm_emulated(
    aq_NK: torch.Tensor,
    as_NG: torch.Tensor,
    bq_EKO: torch.Tensor,
    bs_EBG: torch.Tensor,
    offs_E: torch.Tensor,
    expert_N: torch.Tensor,
) -> torch.Tensor:
    """fp32 ``out[rows of e] = Σ_k (a[rows, k-slice] · b_e[k-slice]) · a_scale · b_scale`` for all
    experts at once: ``gemm_emulated``'s promotion every 128 elements of K, per expert's rows.
    ``bq_EKO``: each expert's second operand as [K, O] (a view); ``bs_EBG``: its block scales,
    indexed [expert, block of O, slice of K]."""
    N, K = aq_NK.shape
    O = bq_EKO.shape[-1]
    out_NO = torch.zeros(N, O, dtype=torch.float32, device=aq_NK.device)
    for k in range(num_tiles(K)):  # a static count: the shapes decide it, not the routing
        cols = slice(k * TILE, min(K, (k + 1) * TILE))
        # the operand layouts of the per-expert loop (a row-major, b transposed): the same products
        a_NC = _pad_last(aq_NK[:, cols].float(), 4)
        b_EOC = _pad_last(bq_EKO[:, cols, :].transpose(-2, -1).float(), 4)
        b_EOC = F.pad(b_EOC, (0, 0, 0, -O % 4))
        partial_NO = grouped_mm(a_NC, b_EOC.transpose(-2, -1), offs_E)[:, :O]
        out_NO += partial_NO * (as_NG[:, k, None] * _block_scales_of_rows(bs_EBG, expert_N, k, O))
    return out_NO


def _aligned_rows(
    x_NC: torch.Tensor, offs_E: torch.Tensor, expert_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_MC, tile_expert_T)``: the rows placed so that every expert's group starts on a TILE
    boundary (zero rows between; M = N + E·(TILE-1) rounded up to a TILE, from the shapes alone),
    and the expert owning each 1×TILE tile along M (E for tiles after the last group)."""
    N, E = x_NC.shape[0], offs_E.shape[0]
    counts_E = torch.diff(offs_E.long(), prepend=offs_E.new_zeros(1).long())
    padded_E = (counts_E + TILE - 1) // TILE * TILE
    shift_E = (padded_E.cumsum(0) - padded_E) - (offs_E.long() - counts_E)
    slot_N = torch.arange(N, device=x_NC.device) + shift_E[expert_N]
    M = num_tiles(N + E * (TILE - 1)) * TILE
    x_MC = x_NC.new_zeros(M, x_NC.shape[1]).index_copy(0, slot_N, x_NC)
    tile_starts_T = torch.arange(0, M, TILE, device=x_NC.device)
    return x_MC, torch.searchsorted(padded_E.cumsum(0), tile_starts_T, right=True)


def _grouped_wgrad_emulated(
    dy_NO: torch.Tensor,
    xq_NI: torch.Tensor,
    xs_NG: torch.Tensor,
    offs_E: torch.Tensor,
    expert_N: torch.Tensor,
    num_experts: int,
    pow2: bool,
) -> torch.Tensor:
    """fp32 ``dW[e] = dy[rows of e]ᵀ · x[rows of e]`` with both operands tiled 1×128 along each
    expert's own rows (``wgrad``'s recipe per expert, all experts at once)."""
    dy_MO, tile_expert_T = _aligned_rows(dy_NO.float(), offs_E, expert_N)
    x_MI, _ = _aligned_rows(dequantize_tiles(xq_NI, xs_NG), offs_E, expert_N)
    dyq_OM, dys_OT = quantize_tiles(dy_MO.t(), pow2)
    xq_IM, xs_IT = quantize_tiles(x_MI.t(), pow2)
    O, M = dyq_OM.shape
    T = M // TILE
    a_TOC = dyq_OM.view(O, T, TILE).transpose(0, 1).float()
    b_TIC = xq_IM.view(-1, T, TILE).transpose(0, 1).float()
    partial_TOI = torch.bmm(a_TOC, b_TIC.transpose(-2, -1))
    partial_TOI = partial_TOI * (dys_OT.t()[:, :, None] * xs_IT.t()[:, None, :])
    # tiles after the last group hold zeros only; they go to a spare slot that is dropped.
    # index_add_ sums each expert's tiles in tile order, starting from zeros, as the loop does
    dw_EOI = partial_TOI.new_zeros(num_experts + 1, O, partial_TOI.shape[-1]).index_add_(0, tile_expert_T, partial_TOI)
    return dw_EOI[:num_experts]


def _loop_forward(
    xq_NI: torch.Tensor,
    xs_NG: torch.Tensor,
    wq_EOI: torch.Tensor,
    ws_EBG: torch.Tensor,
    counts: list[int],
    recipe: FP8Recipe,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    y_NO = xq_NI.new_empty(xq_NI.shape[0], wq_EOI.shape[1], dtype=out_dtype)
    for e, rows in enumerate(_row_ranges(counts)):
        if rows.stop > rows.start:
            y_NO[rows] = fprop(xq_NI[rows], xs_NG[rows], wq_EOI[e], ws_EBG[e], recipe, out_dtype)
    return y_NO


def _loop_dgrad(
    dyq_NO: torch.Tensor,
    dys_NG: torch.Tensor,
    wq_EOI: torch.Tensor,
    ws_EBG: torch.Tensor,
    counts: list[int],
    recipe: FP8Recipe,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    dx = dyq_NO.new_zeros(dyq_NO.shape[0], wq_EOI.shape[2], dtype=out_dtype)
    for e, rows in enumerate(_row_ranges(counts)):
        if rows.stop > rows.start:
            dx[rows] = dgrad(dyq_NO[rows], dys_NG[rows], wq_EOI[e], ws_EBG[e], recipe, out_dtype)
    return dx


def _loop_wgrad(
    dy_NO: torch.Tensor, xq_NI: torch.Tensor, xs_NG: torch.Tensor, counts: list[int], recipe: FP8Recipe
) -> torch.Tensor:
    dw = torch.zeros(len(counts), dy_NO.shape[1], xq_NI.shape[1], dtype=torch.float32, device=dy_NO.device)
    for e, rows in enumerate(_row_ranges(counts)):
        if rows.stop > rows.start:  # an expert without tokens has a zero gradient
            dw[e] = wgrad(dy_NO[rows], xq_NI[rows], xs_NG[rows], recipe)
    return dw


def _host_counts(offs_E: torch.Tensor) -> list[int]:
    """The rows per expert on the host: a sync, the ``hopper`` backend's per-expert loop only."""
    return torch.diff(offs_E.long(), prepend=offs_E.new_zeros(1).long()).tolist()


class _FP8GroupedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x_NI: torch.Tensor,
        w_EOI: torch.Tensor,
        offs_E: torch.Tensor,
        recipe: FP8Recipe,
        recorder: StatsRecorder | None,
        tag: str,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        pow2 = recipe.power_of_two
        xq_NI, xs_NG = quantize_tiles(x_NI, pow2)
        wq_EOI, ws_EBG = _quantize_experts_batched(w_EOI, pow2)
        if recipe.backend == "emulated":
            expert_N = _expert_of_rows(offs_E, x_NI.shape[0])
            y_NO = _grouped_gemm_emulated(xq_NI, xs_NG, wq_EOI.transpose(-2, -1), ws_EBG, offs_E, expert_N).to(
                out_dtype
            )
        else:
            y_NO = _loop_forward(xq_NI, xs_NG, wq_EOI, ws_EBG, _host_counts(offs_E), recipe, out_dtype)
        if recorder is not None and recorder.enabled:
            recorder.stats[f"{tag}.x"] = tensor_stats(x_NI, xq_NI, xs_NG)
            recorder.stats[f"{tag}.w"] = tensor_stats(w_EOI, wq_EOI, ws_EBG)
        ctx.save_for_backward(xq_NI, xs_NG, wq_EOI, ws_EBG, offs_E)
        ctx.recipe, ctx.recorder, ctx.tag = recipe, recorder, tag
        ctx.x_dtype, ctx.w_dtype = x_NI.dtype, w_EOI.dtype
        return y_NO

    @staticmethod
    def backward(ctx: Any, dy_NO: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xq_NI, xs_NG, wq_EOI, ws_EBG, offs_E = ctx.saved_tensors
        recipe: FP8Recipe = ctx.recipe
        emulated = recipe.backend == "emulated"
        expert_N = _expert_of_rows(offs_E, xq_NI.shape[0]) if emulated else None
        counts = None if emulated else _host_counts(offs_E)
        dx = dw = None
        recording = ctx.recorder is not None and ctx.recorder.enabled
        if ctx.needs_input_grad[0] or recording:
            dyq_NO, dys_NG = quantize_tiles(dy_NO, recipe.power_of_two)
            if recording:
                ctx.recorder.stats[f"{ctx.tag}.dy"] = tensor_stats(dy_NO, dyq_NO, dys_NG)
        if ctx.needs_input_grad[0]:
            if emulated:  # dx = dy · W_e: W_e itself is the [O, I] operand, its blocks read transposed
                dx = _grouped_gemm_emulated(dyq_NO, dys_NG, wq_EOI, ws_EBG.transpose(1, 2), offs_E, expert_N).to(
                    ctx.x_dtype
                )
            else:
                dx = _loop_dgrad(dyq_NO, dys_NG, wq_EOI, ws_EBG, counts, recipe, ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            if emulated:
                dw = _grouped_wgrad_emulated(
                    dy_NO, xq_NI, xs_NG, offs_E, expert_N, wq_EOI.shape[0], recipe.power_of_two
                )
            else:
                dw = _loop_wgrad(dy_NO, xq_NI, xs_NG, counts, recipe)
            dw = dw.to(ctx.w_dtype)
        return dx, dw, None, None, None, None, None


def _check_offsets(offs_E: torch.Tensor, n: int, recipe: FP8Recipe) -> None:
    """The row offsets must rise from >= 0 to exactly ``n``. Read on the host only where that
    costs no device sync: offsets in host memory, or the ``hopper`` backend (it reads them on the
    host anyway); not on a GPU with the ``emulated`` backend, nor under ``torch.compile`` (a host
    read is a graph break): torch has no public device-side assert that checks without a sync."""
    if torch.compiler.is_compiling() or (offs_E.device.type != "cpu" and recipe.backend == "emulated"):
        return
    offs_E = offs_E.long()
    if bool(offs_E[-1] != n) or bool(offs_E[0] < 0) or bool((offs_E.diff() < 0).any()):
        raise ValueError(
            f"fp8: the expert row offsets do not cover the {n} rows: they must rise from >= 0 to "
            f"exactly {n} (cumulative row ends, one per expert); got {offs_E.tolist()}"
        )


def fp8_grouped_linear(
    x_NI: torch.Tensor,
    w_EOI: torch.Tensor,
    offs_E: torch.Tensor,
    recipe: FP8Recipe = FP8Recipe(),
    recorder: StatsRecorder | None = None,
    tag: str = "w",
) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] · w[e]ᵀ`` for every expert, each GEMM in FP8 (``offs_E``: the
    cumulative row ends, as ``torch.nn.functional.grouped_mm`` takes them; their values are checked
    where that costs no device sync, see ``_check_offsets``)."""
    _check_offsets(_offsets_per_expert(offs_E, w_EOI), x_NI.shape[0], recipe)
    return _grouped_linear(x_NI, w_EOI, offs_E, recipe, recorder, tag)


def _offsets_per_expert(offs_E: torch.Tensor, w_EOI: torch.Tensor) -> torch.Tensor:
    if offs_E.dim() != 1 or offs_E.shape[0] != w_EOI.shape[0]:
        raise ValueError(
            f"fp8: {offs_E.shape[0] if offs_E.dim() == 1 else tuple(offs_E.shape)} expert row offsets "
            f"for {w_EOI.shape[0]} experts; give one cumulative row end per expert"
        )
    return offs_E


def _grouped_linear(
    x_NI: torch.Tensor,
    w_EOI: torch.Tensor,
    offs_E: torch.Tensor,
    recipe: FP8Recipe,
    recorder: StatsRecorder | None,
    tag: str,
) -> torch.Tensor:
    # the rows' dtype, not autocast's: the experts' combine adds the rows back into a tensor of the
    # input's dtype (under CPU autocast moeframe's grouped GEMMs also keep the input's dtype)
    out_dtype = x_NI.dtype
    # dynamo reads is_compiling() as True while it traces, so only a compiled region leaves the graph
    outside = not COMPILES_IN_GRAPH and torch.compiler.is_compiling()
    apply = _apply_outside_the_graph if outside else _FP8GroupedLinearFunction.apply
    with torch.autocast(x_NI.device.type, enabled=False):
        return apply(x_NI, w_EOI, offs_E, recipe, recorder, tag, out_dtype)


@torch.compiler.disable
def _apply_outside_the_graph(*args: Any) -> torch.Tensor:
    """The Function run eagerly also inside a compiled region (see ``COMPILES_IN_GRAPH``)."""
    _say_once_they_run_outside_the_graph()
    return _FP8GroupedLinearFunction.apply(*args)


_TOLD_OUTSIDE_THE_GRAPH = False


def _say_once_they_run_outside_the_graph() -> None:
    """One warning per process, said where it happens: an uncompiled run has nothing to be told."""
    global _TOLD_OUTSIDE_THE_GRAPH
    if not _TOLD_OUTSIDE_THE_GRAPH:
        _TOLD_OUTSIDE_THE_GRAPH = True
        warnings.warn(
            f"fp8: under torch.compile the FP8 routed experts need torch >= 2.13 to stay in the graph; "
            f"with torch {torch.__version__} they run outside it (a graph break; the numbers are right)",
            stacklevel=1,  # no caller to point at: it is the compiled region that leaves the graph
        )


class FP8GroupedGemm:
    """The ``grouped_gemm`` hook ``convert_to_fp8`` installs on a stacked-experts module.

    Holds the recipe, the module's name (for errors and statistics) and a ``StatsRecorder`` whose
    keys are ``<projection>.<x|w|dy>`` (``w1.x``, ``w2.dy``, ...)."""

    def __init__(self, recipe: FP8Recipe, name: str) -> None:
        self.recipe, self.fp8_name, self.recorder = recipe, name, StatsRecorder()

    def __call__(self, projection: str, x_NI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        if x_NI.dtype not in SUPPORTED_DTYPES or w_EOI.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"fp8: experts {self.fp8_name!r}.{projection} got {x_NI.dtype} rows and a {w_EOI.dtype} "
                "weight; FP8 GEMMs take float32/bfloat16/float16"
            )
        if w_EOI.dim() != 3 or x_NI.shape[-1] != w_EOI.shape[-1]:
            raise ValueError(
                f"fp8: experts {self.fp8_name!r}.{projection}: rows of shape {tuple(x_NI.shape)} do not "
                f"fit stacked weights of shape {tuple(w_EOI.shape)} ([experts, out, in])"
            )
        # the experts' own offsets: cumulative sums of the router's non-negative counts, which end
        # at the row count by construction; their values are not read (no host sync on a GPU)
        offs_E = _offsets_per_expert(offs_E, w_EOI)
        return _grouped_linear(x_NI, w_EOI, offs_E, self.recipe, self.recorder, projection)

    def __repr__(self) -> str:
        scale = "pow2" if self.recipe.power_of_two else "fp32"
        return f"FP8GroupedGemm(e4m3, scale_format={scale}, backend={self.recipe.backend})"
