"""The FP8 GEMM ``out_MN = Σ_k a_MK · b_NK`` with scaled E4M3 operands, two backends.

Every GEMM of the FP8 Linear has the same form: ``a`` is tile-scaled along the contraction
dimension K (``a_scale_MG``, 1×128 tiles) and ``b`` is either tile-scaled too (``b_scale_NG``) or
block-scaled (``b_scale_BG``, 128×128 blocks, B = ceil(N/128)), with G = ceil(K/128).

``emulated`` (any device): for each 128-wide slice k of K, the E4M3 values are multiplied exactly
in fp32 (a product of two E4M3 numbers has at most 8 significant bits, a sum of 128 of them fits
fp32's 24), the partial sum is scaled by ``a_scale[:, k] · b_scale[:, k]`` and added to an fp32
accumulator: the promotion every 128 elements of K that DeepSeek-V3 does on Hopper's tensor cores
(whose own accumulators keep only ~14 bits). A ragged last slice is simply shorter.

``hopper`` (CUDA capability 9.0): ``torch.nn.functional.scaled_mm`` with ``BlockWise1x128`` /
``BlockWise128x128`` scales (cuBLAS's DeepSeek-style block scaling). Operands are zero-padded to
whole tiles (zeros add nothing), ``b`` is handed over column-major and the scales in the layouts
cuBLAS documents: 1×128 scales outer-dimension-major, 128×128 scales ``[ceil(K/128) rounded up to
4, blocks of N]`` with K blocks contiguous.

``hopper`` has not yet been verified on real hardware, so ``backend: auto`` does not trust it:
:func:`disagreement` runs a candidate backend on a few tiles of the three GEMM shapes FP8 training
uses (forward, input gradient through the transposed weight, weight gradient), with ragged edges,
against ``gemm_emulated``, and the precision plugin falls back to ``emulated`` when they differ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from moeframe_fp8.quantize import TILE, num_tiles, quantize_tiles, quantize_weight

Backend = Literal["emulated", "hopper"]
BACKENDS = ("auto", "emulated", "hopper")
# (a_q, a_scale, b_q, b_scale, b_blocks, out_dtype) -> [M, N], the signature of gemm_hopper
GemmFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool, torch.dtype], torch.Tensor]
# a wrong tile or scale layout is off by O(1); bf16 output rounding and accumulation order by < 1e-2
PROBE_TOLERANCE = 2e-2


def _b_scale_columns(b_scale: torch.Tensor, k: int, n: int, b_blocks: bool) -> torch.Tensor:
    """The scale of every output column n for K-slice k: ``[N]``."""
    col = b_scale[:, k]
    return col.repeat_interleave(TILE)[:n] if b_blocks else col


def gemm_emulated(
    a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor, b_blocks: bool
) -> torch.Tensor:
    """fp32 ``[M, N]``; promotion (scale and fp32 add) after every 128 elements of K."""
    M, K = a_q.shape
    N = b_q.shape[0]
    out = torch.zeros(M, N, dtype=torch.float32, device=a_q.device)
    for k in range(num_tiles(K)):
        cols = slice(k * TILE, min(K, (k + 1) * TILE))
        partial = a_q[:, cols].float() @ b_q[:, cols].float().T
        out += partial * (a_scale[:, k, None] * _b_scale_columns(b_scale, k, N, b_blocks)[None, :])
    return out


def hopper_available(device: torch.device) -> tuple[bool, str]:
    """(usable, why not): the ``hopper`` backend needs CUDA capability 9.0 and torch's scaled_mm."""
    if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        return False, f"torch {torch.__version__} has no torch.nn.functional.scaled_mm with block-wise ScalingType"
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"it needs a CUDA GPU and this run's device is {device}"
    capability = torch.cuda.get_device_capability(device)
    if capability != (9, 0):
        return False, (
            f"cuBLAS block-wise FP8 scaling (1x128, 128x128) exists for compute capability 9.0 "
            f"(H100/H200/H800) only; {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}"
        )
    return True, ""


def _pad_rows_cols(t: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    """Pad a 2-D tensor at the bottom/right up to multiples of ``rows``/``cols`` (FP8 via bytes)."""
    R, C = t.shape
    pad_r, pad_c = -R % rows, -C % cols
    if not (pad_r or pad_c):
        return t
    if t.dtype == torch.float8_e4m3fn:  # pad the bytes: 0x00 is +0.0 in E4M3
        return F.pad(t.view(torch.uint8), (0, pad_c, 0, pad_r)).view(torch.float8_e4m3fn)
    return F.pad(t, (0, pad_c, 0, pad_r), value=value)


def gemm_hopper(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    b_blocks: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``[M, N]`` in ``out_dtype`` through cuBLAS block-scaled FP8 (H100/H200). Not exercised by
    the CPU test suite: benchmarks/fp8_linear.py checks it against ``gemm_emulated`` on a GPU."""
    ScalingType = F.ScalingType
    M, K = a_q.shape
    N = b_q.shape[0]
    a = _pad_rows_cols(a_q, 16, TILE).contiguous()  # [M16, K128] row-major
    b = _pad_rows_cols(b_q, TILE if b_blocks else 16, TILE).contiguous()  # [N', K128] row-major
    a_s = _pad_rows_cols(a_scale, 16, 1, value=1.0)
    a_s = a_s.t().contiguous().t()  # outer-dim-major
    if b_blocks:
        groups = b_scale.shape[1]
        b_s = F.pad(b_scale, (0, -groups % 4)).contiguous().t()  # [L4, N/128], K-major
        b_recipe = ScalingType.BlockWise128x128
    else:
        b_s = _pad_rows_cols(b_scale, 16, 1, value=1.0).t().contiguous().t()
        b_recipe = ScalingType.BlockWise1x128
    try:
        out = F.scaled_mm(a, b.t(), a_s, ScalingType.BlockWise1x128, b_s, b_recipe, output_dtype=out_dtype)
    except RuntimeError as exc:
        raise RuntimeError(
            f"fp8 backend 'hopper': torch.nn.functional.scaled_mm rejected a [{M}, {K}] x [{K}, {N}] "
            f"block-scaled GEMM ({exc}); use backend 'emulated' and report the shapes"
        ) from exc
    return out[:M, :N]


def gemm(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    b_blocks: bool,
    backend: Backend,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    if backend == "hopper":
        return gemm_hopper(a_q, a_scale, b_q, b_scale, b_blocks, out_dtype)
    return gemm_emulated(a_q, a_scale, b_q, b_scale, b_blocks).to(out_dtype)


def _probe_gemms(device: torch.device) -> list[tuple[str, tuple, bool, torch.dtype]]:
    """Operands of the three GEMM kinds an FP8 Linear runs, at sizes with partial tiles and blocks
    (M 40, K 320 = 2.5 tiles, N 200), on ``device``; scales vary by column so a transposed or
    misplaced scale shows."""
    g = torch.Generator().manual_seed(0)
    M, K, N = 40, 320, 200
    x_MK = torch.randn(M, K, generator=g) * torch.logspace(-2, 1, K)
    w_NK = torch.randn(N, K, generator=g) * torch.logspace(1, -2, N)[:, None]
    dy_MN = torch.randn(M, N, generator=g) * torch.logspace(-1, 1, N)
    xq, xs = quantize_tiles(x_MK)
    wq, ws = quantize_weight(w_NK)
    dyq, dys = quantize_tiles(dy_MN)
    dyq_NM, dys_NG = quantize_tiles(dy_MN.t())
    xq_KM, xs_KG = quantize_tiles(x_MK.t())
    on = lambda *ts: tuple(t.to(device) for t in ts)  # noqa: E731
    return [
        ("forward [40, 320] x [320, 200], 128x128 weight blocks", on(xq, xs, wq, ws), True, torch.bfloat16),
        (
            "input gradient [40, 200] x [200, 320], transposed weight blocks",
            on(dyq, dys, wq.t(), ws.t()),
            True,
            torch.bfloat16,
        ),
        ("weight gradient [200, 40] x [40, 320], 1x128 tiles", on(dyq_NM, dys_NG, xq_KM, xs_KG), False, torch.float32),
    ]


def disagreement(candidate: GemmFn, device: torch.device, tolerance: float = PROBE_TOLERANCE) -> str | None:
    """None when ``candidate`` computes what ``gemm_emulated`` computes on the probe GEMMs, else
    one line naming the first GEMM that differs and its max absolute and relative difference
    (relative to the largest reference value)."""
    for what, operands, b_blocks, out_dtype in _probe_gemms(device):
        reference = gemm_emulated(*operands, b_blocks)
        try:
            got = candidate(*operands, b_blocks, out_dtype).float()
        except Exception as exc:  # any failure of an unverified kernel means: do not use it
            return f"{what}: it failed ({(str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]})"
        if got.shape != reference.shape:
            return f"{what}: it returned shape {tuple(got.shape)}, expected {tuple(reference.shape)}"
        diff = (got - reference).abs().max().item() if got.numel() else 0.0
        relative = diff / max(reference.abs().max().item(), 1e-30)
        if not torch.isfinite(got).all() or not relative <= tolerance:
            return f"{what}: max abs difference {diff:.3g}, max relative difference {relative:.3g} (tolerance {tolerance:g})"
    return None
