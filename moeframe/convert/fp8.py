"""DeepSeek-V3's FP8 block format for weights: E4M3 values with one fp32 scale per 128×128 block.

A weight ``W [out, in]`` is stored as ``float8_e4m3fn`` plus ``weight_scale_inv`` of shape
``[ceil(out/128), ceil(in/128)]``: ``W ≈ fp8_block.float() · weight_scale_inv[block]``. Blocks at
the right and bottom edges may be partial (dimensions that are not multiples of 128); their
scale covers only the elements that exist. ``scale = amax / 448`` (E4M3's largest finite value),
with amax floored at 1e-4 so an all-zero block does not divide by zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 128
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = w.shape
    return F.pad(w, (0, _blocks(cols, block) * block - cols, 0, _blocks(rows, block) * block - rows))


def dequantize_blocks(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[out, in]`` in ``dtype`` from E4M3 values and their per-block scales."""
    rows, cols = w_fp8.shape
    expected = (_blocks(rows, block), _blocks(cols, block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} "
                         f"for a [{rows}, {cols}] weight in {block}x{block} blocks")
    scale = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (w_fp8.float() * scale).to(dtype)


def quantize_blocks(w: torch.Tensor, block: int = BLOCK, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 weight, weight_scale_inv) for a 2-D weight, 128×128 blocks, amax scaling."""
    rows, cols = w.shape
    br, bc = _blocks(rows, block), _blocks(cols, block)
    tiles = _pad_to_blocks(w.float(), block).view(br, block, bc, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(AMAX_FLOOR)
    scale = amax / E4M3_MAX
    if power_of_two:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (tiles / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(br * block, bc * block)[:rows, :cols].contiguous(), scale.contiguous()
