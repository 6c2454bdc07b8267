"""``FP8Linear``: an ``nn.Linear`` whose three GEMMs run on E4M3 operands (DeepSeek-V3 §3.3).

Legend: M tokens (every leading dimension of the input flattened), K ``in_features``,
N ``out_features``.

- forward  ``y_MN  = x_MK · W_NKᵀ``: x in 1×128 tiles along K, W in 128×128 blocks.
- dgrad    ``dx_MK = dy_MN · W_NK``: dy in 1×128 tiles along N, the *same* quantised W (a block
  scale does not care which way the block is read).
- wgrad    ``dW_NK = dy_MNᵀ · x_MK``: the contraction runs over tokens, so both operands are tiled
  1×128 along M: dyᵀ from the gradient, xᵀ re-quantised from the FP8 copy of x kept for
  backward (V3 stores activations in FP8 and transposes/re-quantises them for wgrad).

What stays high precision: the master weight (the optimizer's, fp32; under DeepSpeed bf16 with
DeepSpeed's fp32 master copy), the bias, the output (the autocast dtype, else the input's dtype)
and every gradient handed back to autograd. Kept for backward: x in E4M3 with its tile scales (half
the bytes of the BF16 copy a plain Linear keeps) and the E4M3 weight with its block scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moeframe.plugin import ConfigError
from moeframe_fp8.gemm import Backend, gemm
from moeframe_fp8.quantize import dequantize_tiles, quantize_tiles, quantize_weight, tensor_stats

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FP8ConfigError(ConfigError):
    """An FP8 setting or model that cannot work, found before any compute (the CLI reports it in
    one line)."""


@dataclass(frozen=True)
class FP8Recipe:
    """How one FP8Linear quantises: ``power_of_two`` scales, and the GEMM ``backend``."""

    power_of_two: bool = False
    backend: Backend = "emulated"


@dataclass
class StatsRecorder:
    """Filled by one forward/backward when ``enabled``: ``{"x"|"w"|"dy": TensorStats}``."""

    enabled: bool = False
    stats: dict[str, Any] = field(default_factory=dict)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a plain Linear would return here: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# -- the three GEMMs of one Linear; FP8 routed experts (moeframe_fp8.grouped) run them per expert --
def fprop(
    xq_MK: torch.Tensor,
    xs_MG: torch.Tensor,
    wq_NK: torch.Tensor,
    ws_BG: torch.Tensor,
    recipe: FP8Recipe,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``y = x · Wᵀ`` from tile-quantised x and block-quantised W."""
    return gemm(xq_MK, xs_MG, wq_NK, ws_BG, b_blocks=True, backend=recipe.backend, out_dtype=out_dtype)


def dgrad(
    dyq_MN: torch.Tensor,
    dys_MG: torch.Tensor,
    wq_NK: torch.Tensor,
    ws_BG: torch.Tensor,
    recipe: FP8Recipe,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``dx = dy · W``: b = Wᵀ [K, N] with its blocks transposed, the same E4M3 values read the other way."""
    return gemm(dyq_MN, dys_MG, wq_NK.t(), ws_BG.t(), b_blocks=True, backend=recipe.backend, out_dtype=out_dtype)


def wgrad(dy_MN: torch.Tensor, xq_MK: torch.Tensor, xs_MG: torch.Tensor, recipe: FP8Recipe) -> torch.Tensor:
    """fp32 ``dW = dyᵀ · x``: the contraction runs over the M tokens, so dyᵀ and xᵀ (re-quantised from
    the FP8 copy of x kept for backward) are both tiled 1×128 along M."""
    pow2 = recipe.power_of_two
    dyq_NM, dys_NG = quantize_tiles(dy_MN.t(), pow2)
    xq_KM, xs_KG = quantize_tiles(dequantize_tiles(xq_MK, xs_MG).t(), pow2)
    return gemm(dyq_NM, dys_NG, xq_KM, xs_KG, b_blocks=False, backend=recipe.backend, out_dtype=torch.float32)


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x_MK: torch.Tensor,
        weight_NK: torch.Tensor,
        bias_N: torch.Tensor | None,
        recipe: FP8Recipe,
        recorder: StatsRecorder | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        pow2 = recipe.power_of_two
        xq_MK, xs_MG = quantize_tiles(x_MK, pow2)
        wq_NK, ws_BG = quantize_weight(weight_NK, pow2)
        # with a bias the GEMM returns fp32 and the bias is added before the one rounding
        y_MN = fprop(xq_MK, xs_MG, wq_NK, ws_BG, recipe, torch.float32 if bias_N is not None else out_dtype)
        if bias_N is not None:
            y_MN = y_MN + bias_N.float()
        if recorder is not None and recorder.enabled:
            recorder.stats["x"] = tensor_stats(x_MK, xq_MK, xs_MG)
            recorder.stats["w"] = tensor_stats(weight_NK, wq_NK, ws_BG)
        ctx.save_for_backward(xq_MK, xs_MG, wq_NK, ws_BG)
        ctx.recipe, ctx.recorder, ctx.has_bias = recipe, recorder, bias_N is not None
        ctx.x_dtype, ctx.w_dtype = x_MK.dtype, weight_NK.dtype
        return y_MN.to(out_dtype)

    @staticmethod
    def backward(ctx: Any, dy_MN: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xq_MK, xs_MG, wq_NK, ws_BG = ctx.saved_tensors
        recipe: FP8Recipe = ctx.recipe
        pow2 = recipe.power_of_two
        dx = dw = db = None
        recording = ctx.recorder is not None and ctx.recorder.enabled
        if ctx.needs_input_grad[0] or recording:
            dyq_MN, dys_MG = quantize_tiles(dy_MN, pow2)
            if recording:
                ctx.recorder.stats["dy"] = tensor_stats(dy_MN, dyq_MN, dys_MG)
        if ctx.needs_input_grad[0]:
            dx = dgrad(dyq_MN, dys_MG, wq_NK, ws_BG, recipe, ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = wgrad(dy_MN, xq_MK, xs_MG, recipe).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy_MN.float().sum(0).to(ctx.w_dtype)
        return dx, dw, db, None, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    recipe: FP8Recipe = FP8Recipe(),
    recorder: StatsRecorder | None = None,
) -> torch.Tensor:
    """``F.linear`` with FP8 GEMMs; x may have any number of leading dimensions."""
    out_dtype = _out_dtype(x)
    x_MK = x.reshape(-1, x.shape[-1])
    # the recipe decides every precision inside; autocast must not recast the fp32 pieces
    with torch.autocast(x.device.type, enabled=False):
        y_MN = _FP8LinearFunction.apply(x_MK, weight, bias, recipe, recorder, out_dtype)
    return y_MN.view(*x.shape[:-1], weight.shape[0])


class FP8Linear(nn.Linear):
    """A drop-in ``nn.Linear`` (same parameters, same state-dict keys) computing in FP8.

    Built from an existing Linear by ``FP8Linear.from_linear`` so that the *same* Parameter
    objects move over: an optimizer, a DeepSpeed engine or a checkpoint sees no difference, and a
    model trained in FP8 loads into a model without this plugin.
    """

    recipe: FP8Recipe
    fp8_name: str
    recorder: StatsRecorder

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: FP8Recipe, name: str) -> FP8Linear:
        if linear.weight.dtype not in SUPPORTED_DTYPES:
            raise FP8ConfigError(
                f"fp8: module {name!r} has a {linear.weight.dtype} weight; FP8 training converts "
                f"Linear layers with float32/bfloat16/float16 weights only: exclude it (exclude: ['{name}'])"
            )
        if linear.weight.dim() != 2 or 0 in linear.weight.shape:
            raise FP8ConfigError(
                f"fp8: module {name!r} has a weight of shape {tuple(linear.weight.shape)}; "
                "an FP8 Linear needs a non-empty 2-D weight: exclude it"
            )
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", linear.bias)
        new.recipe, new.fp8_name, new.recorder = recipe, name, StatsRecorder()
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"fp8: module {self.fp8_name!r} expects inputs with last dimension {self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"fp8: module {self.fp8_name!r} got a {x.dtype} input; FP8 GEMMs take "
                "float32/bfloat16/float16 activations"
            )
        return fp8_linear(x, self.weight, self.bias, self.recipe, self.recorder)

    def extra_repr(self) -> str:
        scale = "pow2" if self.recipe.power_of_two else "fp32"
        return f"{super().extra_repr()}, fp8=e4m3, scale_format={scale}, backend={self.recipe.backend}"
