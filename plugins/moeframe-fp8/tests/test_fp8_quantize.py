"""The quantisers and the emulated GEMM against references written here from the recipe
(DeepSeek-V3 §3.3; ../shared/V3-REFERENCE.md §5), element by element, including ragged shapes."""

from __future__ import annotations

import math

import pytest
import torch

from moeframe_fp8.gemm import gemm_emulated
from moeframe_fp8.quantize import dequantize_tiles, quantize_tiles, quantize_weight, tensor_stats

E4M3 = torch.float8_e4m3fn


def reference_scale(values: list[float], power_of_two: bool) -> float:
    """The recipe for one tile/block: amax floored at 1e-4, divided by 448, optionally 2^ceil(log2)."""
    amax = max(max(abs(v) for v in values), 1e-4)
    scale = amax / 448.0
    return 2.0 ** math.ceil(math.log2(scale)) if power_of_two else scale


def reference_tiles(x: torch.Tensor, power_of_two: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row, 128 columns at a time, with plain Python loops over the tiles."""
    rows, cols = x.shape
    q = torch.empty(rows, cols, dtype=E4M3)
    scales = torch.empty(rows, -(-cols // 128))
    for r in range(rows):
        for g, start in enumerate(range(0, cols, 128)):
            tile = x[r, start : start + 128].float()
            s = torch.tensor(reference_scale(tile.tolist(), power_of_two), dtype=torch.float32)
            scales[r, g] = s
            q[r, start : start + 128] = torch.clamp(tile / s, -448.0, 448.0).to(E4M3)
    return q, scales


def reference_blocks(w: torch.Tensor, power_of_two: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=E4M3)
    scales = torch.empty(-(-rows // 128), -(-cols // 128))
    for i, r0 in enumerate(range(0, rows, 128)):
        for j, c0 in enumerate(range(0, cols, 128)):
            block = w[r0 : r0 + 128, c0 : c0 + 128].float()
            s = torch.tensor(reference_scale(block.flatten().tolist(), power_of_two), dtype=torch.float32)
            scales[i, j] = s
            q[r0 : r0 + 128, c0 : c0 + 128] = torch.clamp(block / s, -448.0, 448.0).to(E4M3)
    return q, scales


def spread(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Values over many binades, an outlier channel and an all-zero tile: the cases scaling is for."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-12, 6, (rows, 1), generator=g).float())
    x[:, min(3, cols - 1)] *= 300.0
    x[0, :] = 0.0
    return x


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("shape", [(4, 128), (5, 300), (3, 1), (2, 257), (7, 640)])
def test_tile_quantiser_matches_the_recipe_bit_for_bit(shape: tuple[int, int], power_of_two: bool) -> None:
    x = spread(*shape, seed=sum(shape))
    q, scale = quantize_tiles(x, power_of_two)
    q_ref, scale_ref = reference_tiles(x, power_of_two)
    assert q.dtype == E4M3 and q.shape == x.shape and scale.shape == scale_ref.shape
    assert torch.equal(scale, scale_ref)
    assert same_bits(q, q_ref)
    if power_of_two:
        assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)


def test_tile_quantiser_from_bf16_and_the_zero_tile() -> None:
    x = spread(6, 200, seed=1).bfloat16()
    q, scale = quantize_tiles(x)
    q_ref, scale_ref = reference_tiles(x, False)
    assert torch.equal(scale, scale_ref) and same_bits(q, q_ref)
    assert torch.all(scale[0] == 1e-4 / 448.0)  # the all-zero row: floored amax, no division by zero
    assert torch.all(q[0].float() == 0)


@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("shape", [(128, 128), (200, 300), (64, 129), (257, 40)])
def test_block_quantiser_matches_the_recipe_bit_for_bit(shape: tuple[int, int], power_of_two: bool) -> None:
    w = spread(*shape, seed=7)
    q, scale = quantize_weight(w, power_of_two)
    q_ref, scale_ref = reference_blocks(w, power_of_two)
    assert torch.equal(scale, scale_ref) and same_bits(q, q_ref)


def test_dequantised_tiles_are_close_and_the_largest_value_is_exact() -> None:
    x = torch.randn(3, 256)
    q, scale = quantize_tiles(x)
    back = dequantize_tiles(q, scale)
    # E4M3 keeps 3 mantissa bits: relative rounding error at most 2^-4 for normal values
    normal = back.abs() > scale.repeat_interleave(128, 1) * 2.0**-6
    assert torch.all(((back - x).abs() / x.abs())[normal] <= 2.0**-4 + 1e-7)
    # the tile maximum maps to exactly 448 * scale
    first_tile = x[:, :128].abs().amax(1)
    assert torch.allclose(back[:, :128].abs().amax(1), first_tile, rtol=1e-6)


@pytest.mark.parametrize(
    "M, K, N, blocks", [(5, 128, 7, True), (9, 300, 130, True), (4, 257, 3, False), (130, 40, 260, True)]
)
def test_emulated_gemm_is_the_exact_sum_of_scaled_e4m3_products(M: int, K: int, N: int, blocks: bool) -> None:
    """Each 128-slice of K is an exact fp32 product of E4M3 values; the result must equal the
    float64 sum of dequantised products up to fp32 rounding of the accumulator."""
    a_q, a_s = quantize_tiles(torch.randn(M, K))
    b = torch.randn(N, K) * 0.1
    b_q, b_s = quantize_weight(b) if blocks else quantize_tiles(b)
    out = gemm_emulated(a_q, a_s, b_q, b_s, b_blocks=blocks)
    a64 = a_q.double() * a_s.double().repeat_interleave(128, 1)[:, :K]
    if blocks:
        b_scale = b_s.double().repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
    else:
        b_scale = b_s.double().repeat_interleave(128, 1)[:, :K]
    expected = a64 @ (b_q.double() * b_scale).T
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=2e-6, atol=1e-6 * expected.abs().max().item())


def test_stats_count_underflow_against_a_direct_count() -> None:
    x = torch.zeros(1, 128)
    x[0, 0] = 448.0  # scale 1.0
    x[0, 1:11] = 2.0**-11  # below half the smallest subnormal (2^-10): become 0
    x[0, 11:21] = 0.5  # representable
    q, scale = quantize_tiles(x)
    stats = tensor_stats(x, q, scale)
    assert stats.amax == 448.0 and stats.scale_min == stats.scale_max == 1.0
    assert stats.underflow == pytest.approx(10 / 21)
    assert stats.overflow == 0.0
    x[0, 30] = float("inf")
    assert tensor_stats(x, *quantize_tiles(torch.nan_to_num(x, posinf=448.0))).overflow == pytest.approx(1 / 128)


def test_a_tiles_own_maximum_is_not_an_overflow() -> None:
    """(amax / 448) · 448 rounds below amax for some values (about 1 random tile in 70): the
    element that set the scale still fits, and the statistic must not count it."""
    torch.manual_seed(0)
    tiles = torch.randn(500, 1, 128)
    overflowing = [i for i, x in enumerate(tiles) if tensor_stats(x, *quantize_tiles(x)).overflow > 0]
    assert overflowing == []
