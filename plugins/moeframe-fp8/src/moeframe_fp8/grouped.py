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
checkpoint layout do not change. The per-expert loop costs one host sync (``offs`` to Python) per
projection; with the ``hopper`` backend each expert is one ``scaled_mm`` (cuBLAS has no block-
scaled grouped FP8 GEMM in this torch; a fused kernel is the next step for speed, not accuracy).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from moeframe_fp8.linear import SUPPORTED_DTYPES, FP8Recipe, StatsRecorder, dgrad, fprop, wgrad
from moeframe_fp8.quantize import quantize_tiles, quantize_weight, tensor_stats

__all__ = ["FP8GroupedGemm", "fp8_grouped_linear"]


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


class _FP8GroupedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_NI: torch.Tensor, w_EOI: torch.Tensor, counts: list[int], recipe: FP8Recipe,
                recorder: Optional[StatsRecorder], tag: str, out_dtype: torch.dtype) -> torch.Tensor:
        pow2 = recipe.power_of_two
        xq_NI, xs_NG = quantize_tiles(x_NI, pow2)
        wq_EOI, ws_EBG = _quantize_experts(w_EOI, pow2)
        y_NO = x_NI.new_empty(x_NI.shape[0], w_EOI.shape[1], dtype=out_dtype)
        for e, rows in enumerate(_row_ranges(counts)):
            if rows.stop > rows.start:
                y_NO[rows] = fprop(xq_NI[rows], xs_NG[rows], wq_EOI[e], ws_EBG[e], recipe, out_dtype)
        if recorder is not None and recorder.enabled:
            recorder.stats[f"{tag}.x"] = tensor_stats(x_NI, xq_NI, xs_NG)
            recorder.stats[f"{tag}.w"] = tensor_stats(w_EOI, wq_EOI, ws_EBG)
        ctx.save_for_backward(xq_NI, xs_NG, wq_EOI, ws_EBG)
        ctx.counts, ctx.recipe, ctx.recorder, ctx.tag = counts, recipe, recorder, tag
        ctx.x_dtype, ctx.w_dtype = x_NI.dtype, w_EOI.dtype
        return y_NO

    @staticmethod
    def backward(ctx: Any, dy_NO: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        xq_NI, xs_NG, wq_EOI, ws_EBG = ctx.saved_tensors
        recipe: FP8Recipe = ctx.recipe
        ranges = _row_ranges(ctx.counts)
        dx = dw = None
        recording = ctx.recorder is not None and ctx.recorder.enabled
        if ctx.needs_input_grad[0] or recording:
            dyq_NO, dys_NG = quantize_tiles(dy_NO, recipe.power_of_two)
            if recording:
                ctx.recorder.stats[f"{ctx.tag}.dy"] = tensor_stats(dy_NO, dyq_NO, dys_NG)
        if ctx.needs_input_grad[0]:
            dx = dy_NO.new_zeros(xq_NI.shape, dtype=ctx.x_dtype)
            for e, rows in enumerate(ranges):
                if rows.stop > rows.start:
                    dx[rows] = dgrad(dyq_NO[rows], dys_NG[rows], wq_EOI[e], ws_EBG[e], recipe, ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = torch.zeros(wq_EOI.shape, dtype=torch.float32, device=dy_NO.device)
            for e, rows in enumerate(ranges):
                if rows.stop > rows.start:  # an expert without tokens has a zero gradient
                    dw[e] = wgrad(dy_NO[rows], xq_NI[rows], xs_NG[rows], recipe)
            dw = dw.to(ctx.w_dtype)
        return dx, dw, None, None, None, None, None


def fp8_grouped_linear(x_NI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor,
                       recipe: FP8Recipe = FP8Recipe(), recorder: Optional[StatsRecorder] = None,
                       tag: str = "w") -> torch.Tensor:
    """``y[rows of e] = x[rows of e] · w[e]ᵀ`` for every expert, each GEMM in FP8 (``offs_E``: the
    cumulative row ends, as ``torch.nn.functional.grouped_mm`` takes them)."""
    counts = torch.diff(offs_E.long(), prepend=offs_E.new_zeros(1)).tolist()
    if sum(counts) != x_NI.shape[0] or min(counts, default=0) < 0:
        raise ValueError(f"fp8: expert row offsets {offs_E.tolist()} do not cover the {x_NI.shape[0]} rows")
    # the rows' dtype, not autocast's: the experts' combine adds the rows back into a tensor of the
    # input's dtype (under CPU autocast moeframe's grouped GEMMs also keep the input's dtype)
    out_dtype = x_NI.dtype
    with torch.autocast(x_NI.device.type, enabled=False):
        return _FP8GroupedLinearFunction.apply(x_NI, w_EOI, counts, recipe, recorder, tag, out_dtype)


class FP8GroupedGemm:
    """The ``grouped_gemm`` hook ``convert_to_fp8`` installs on a stacked-experts module.

    Holds the recipe, the module's name (for errors and statistics) and a ``StatsRecorder`` whose
    keys are ``<projection>.<x|w|dy>`` (``w1.x``, ``w2.dy``, ...)."""

    def __init__(self, recipe: FP8Recipe, name: str) -> None:
        self.recipe, self.fp8_name, self.recorder = recipe, name, StatsRecorder()

    def __call__(self, projection: str, x_NI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        if x_NI.dtype not in SUPPORTED_DTYPES or w_EOI.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"fp8: experts {self.fp8_name!r}.{projection} got {x_NI.dtype} rows and a {w_EOI.dtype} "
                            "weight; FP8 GEMMs take float32/bfloat16/float16")
        if w_EOI.dim() != 3 or x_NI.shape[-1] != w_EOI.shape[-1]:
            raise ValueError(f"fp8: experts {self.fp8_name!r}.{projection}: rows of shape {tuple(x_NI.shape)} do not "
                             f"fit stacked weights of shape {tuple(w_EOI.shape)} ([experts, out, in])")
        return fp8_grouped_linear(x_NI, w_EOI, offs_E, self.recipe, self.recorder, projection)

    def __repr__(self) -> str:
        scale = "pow2" if self.recipe.power_of_two else "fp32"
        return f"FP8GroupedGemm(e4m3, scale_format={scale}, backend={self.recipe.backend})"
