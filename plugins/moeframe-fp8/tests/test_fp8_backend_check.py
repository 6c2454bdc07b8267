"""``backend: auto`` checks an unverified GPU backend against ``emulated`` before trusting it.

On the CPU a candidate backend function stands in for ``hopper`` (which needs an H100/H200): one
computed independently (dequantise, one fp32 matmul) must be kept; deliberately wrong ones (a
scale misplaced, a crash) must make the check fall back to ``emulated`` with one line naming the
difference. The emulated GEMM they are compared with runs for real.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from moeframe_fp8 import resolve_backend
from moeframe_fp8.gemm import disagreement
from moeframe_fp8.precision import checked_backend
from moeframe_fp8.quantize import TILE

CPU = torch.device("cpu")


def _dequantised(q: torch.Tensor, scale: torch.Tensor, blocks: bool) -> torch.Tensor:
    """fp32 values of a tile-scaled (1x128 per row) or block-scaled (128x128) operand, written
    from the format description: every element times the scale of the tile/block it lies in."""
    rows, cols = q.shape
    row_scale = scale.repeat_interleave(TILE, 0)[:rows] if blocks else scale
    return q.float() * row_scale.repeat_interleave(TILE, 1)[:, :cols]


def dequantise_then_matmul(a_q, a_scale, b_q, b_scale, b_blocks, out_dtype):
    """A correct backend by another route: no per-128 promotion, one fp32 matmul."""
    return (_dequantised(a_q, a_scale, False) @ _dequantised(b_q, b_scale, b_blocks).T).to(out_dtype)


def first_tile_scale_only(a_q, a_scale, b_q, b_scale, b_blocks, out_dtype):
    """Wrong: applies the first K tile's activation scale to the whole row (a scale-layout bug)."""
    return dequantise_then_matmul(a_q, a_scale[:, :1].expand_as(a_scale), b_q, b_scale, b_blocks, out_dtype)


def crashes(a_q, a_scale, b_q, b_scale, b_blocks, out_dtype):
    raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED\nsecond line")


def test_a_correct_backend_is_kept() -> None:
    assert disagreement(dequantise_then_matmul, CPU) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        assert checked_backend("hopper", dequantise_then_matmul, CPU) == "hopper"


def test_a_wrong_backend_falls_back_to_emulated_naming_the_difference() -> None:
    with pytest.warns(UserWarning) as record:
        assert checked_backend("hopper", first_tile_scale_only, CPU) == "emulated"
    messages = [str(w.message) for w in record if "fp8:" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "falls back to 'emulated'" in messages[0] and "'hopper' disagrees with 'emulated' on forward" in messages[0]
    assert "max abs difference" in messages[0] and "max relative difference" in messages[0]


def test_a_crashing_backend_falls_back_with_its_first_error_line() -> None:
    with pytest.warns(UserWarning, match=r"falls back to 'emulated'.*it failed \(CUBLAS_STATUS_NOT_SUPPORTED\)"):
        assert checked_backend("hopper", crashes, CPU) == "emulated"


def test_auto_on_the_cpu_is_emulated_without_a_check() -> None:
    assert resolve_backend("auto", CPU) == "emulated"
