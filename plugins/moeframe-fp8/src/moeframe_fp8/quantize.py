"""Fine-grained E4M3 quantisation: 1×128 tiles for activations and gradients, 128×128 blocks for
weights (DeepSeek-V3 §3.3).

Why tiles this small: E4M3 has 3 mantissa bits and a range of ±448. One scale per tensor lets a
single outlier channel push every other value into the subnormals (or to zero). One scale per
128 values of a row (a *tile*) bounds the damage to those 128 values; weights change slowly and
are reused by every token, so a coarser 128×128 *block* is enough, and a block scale is the same
whether the matrix is read as ``W`` (forward) or ``Wᵀ`` (input gradient), so a weight is
quantised once per step for both GEMMs.

Per tile/block: ``amax = max|x|`` (floored at 1e-4 so an all-zero tile does not divide by zero),
``scale = amax / 448`` (or, with ``power_of_two``, ``2^ceil(log2(scale))``, which makes the
rescaling exact in binary at the price of up to one bit of range), ``q = E4M3(x / scale)`` with
a clamp to ±448 first (``x / scale`` can round above 448). ``scale`` is the *decode* factor:
``x ≈ q · scale``, the convention of ``weight_scale_inv`` in V3 checkpoints and of
``torch.nn.functional.scaled_mm``.

Shapes: ``x_RC`` is quantised along its last dimension C; ``scale_RG`` has ``G = ceil(C/128)``
columns and the last tile of a row may be partial (ragged C). Weights use
``moeframe.convert.fp8.quantize_blocks``, the same code the FP8 checkpoint export uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeframe.plugin import AMAX_FLOOR, BLOCK, E4M3_MAX, quantize_blocks

__all__ = [
    "TILE",
    "BLOCK",
    "E4M3_MAX",
    "AMAX_FLOOR",
    "FP8",
    "num_tiles",
    "scale_from_amax",
    "quantize_tiles",
    "quantize_weight",
    "dequantize_tiles",
    "TensorStats",
    "tensor_stats",
]

TILE = 128
FP8 = torch.float8_e4m3fn
# smallest positive E4M3 subnormal is 2^-9; values below half of it round to zero
_E4M3_ZERO_BELOW = 2.0**-10


def num_tiles(n: int, tile: int = TILE) -> int:
    return -(-n // tile)


def scale_from_amax(amax: torch.Tensor, power_of_two: bool) -> torch.Tensor:
    """Decode scale of a tile or block from its absolute maximum (fp32)."""
    scale = amax.float().clamp_min(AMAX_FLOOR) / E4M3_MAX
    if power_of_two:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def _tiled(x_RC: torch.Tensor) -> torch.Tensor:
    """``[R, G, 128]`` view of x, zero-padded on the right to whole tiles (zeros do not move amax)."""
    R, C = x_RC.shape
    pad = num_tiles(C) * TILE - C
    x = F.pad(x_RC, (0, pad)) if pad else x_RC
    return x.view(R, num_tiles(C), TILE)  # sizes spelled out: -1 is ambiguous for 0 rows


def quantize_tiles(x_RC: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_RC float8_e4m3fn, scale_RG fp32)``: one scale per 1×128 tile along the last dimension."""
    if x_RC.dim() != 2:
        raise ValueError(f"quantize_tiles expects a 2-D tensor, got shape {tuple(x_RC.shape)}")
    R, C = x_RC.shape
    tiles = _tiled(x_RC.float().contiguous())  # transposed inputs (wgrad) become row-major once
    scale_RG = scale_from_amax(tiles.abs().amax(dim=-1), power_of_two)
    q = (tiles / scale_RG.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return q.view(R, num_tiles(C) * TILE)[:, :C].contiguous(), scale_RG


def dequantize_tiles(q_RC: torch.Tensor, scale_RG: torch.Tensor) -> torch.Tensor:
    """fp32 values of tile-quantised data (the inverse of ``quantize_tiles`` up to rounding)."""
    R, C = q_RC.shape
    return (_tiled(q_RC.float()) * scale_RG.unsqueeze(-1)).view(R, num_tiles(C) * TILE)[:, :C]


def quantize_weight(w_NK: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_NK float8_e4m3fn, scale [ceil(N/128), ceil(K/128)] fp32)``: 128×128 block scaling."""
    return quantize_blocks(w_NK, BLOCK, power_of_two=power_of_two)


@dataclass
class TensorStats:
    """What one quantisation did to one tensor (reported per layer by ``stats_every_n_steps``).

    ``amax``: largest |x|; ``scale_min``/``scale_max``: range of the decode scales over its tiles or
    blocks (a wide range is what fine-grained scaling buys over one scale per tensor);
    ``underflow``: fraction of the non-zero values that became 0 in E4M3; ``overflow``: fraction
    of values that did not fit ±448 after scaling or were not finite (0 with amax scaling unless
    the tensor holds inf/nan).
    """

    amax: float
    scale_min: float
    scale_max: float
    underflow: float
    overflow: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@torch.no_grad()
def tensor_stats(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> TensorStats:
    """Statistics of quantising ``x`` into ``(q, scale)`` (any tiling; computed only on demand)."""
    x = x.float()
    nonzero = x != 0
    lost = nonzero & (q.float() == 0)
    finite = torch.isfinite(x)
    amax = x[finite].abs().amax() if finite.any() else torch.tensor(float("nan"))
    # an element overflows when |x| exceeds 448 times the largest scale used for it; with dynamic
    # amax scaling only non-finite values can, but a bad scale (e.g. a stale one) would show here.
    # (amax / 448) · 448 can round one ulp below amax: a few ulps of slack keep the tile's own
    # maximum from counting as an overflow.
    too_big = ~finite | (x.abs() > E4M3_MAX * scale.max() * (1 + 4 * torch.finfo(torch.float32).eps))
    n = max(1, x.numel())
    return TensorStats(
        amax=float(amax),
        scale_min=float(scale.min()),
        scale_max=float(scale.max()),
        underflow=float(lost.sum()) / max(1, int(nonzero.sum())),
        overflow=float(too_big.sum()) / n,
    )
