"""FP4 weights with power-of-two block scales (the MXFP4 layout), read on HF import.

DeepSeek-V4's released folders store the routed experts' weights this way (``expert_dtype: fp4``
in ``config.json`` or its ``quantization_config``), beside FP8 blocks for the other matrices:

- values are E2M1 (1 sign bit, 2 exponent bits with bias 1, 1 mantissa bit): the magnitudes
  0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; code ``s e1 e0 m`` (sign in bit 3);
- two values per byte: a weight ``W [out, in]`` is stored as ``[out, in / 2]`` bytes (safetensors
  ``I8``/``U8``, or torch's ``float4_e2m1fn_x2``); element ``2j`` of a row sits in the low nibble
  of byte ``j``, element ``2j + 1`` in the high nibble;
- one scale per 32 consecutive inputs of a row: ``[out, in / 32]``, a power of two stored as
  ``float8_e8m0fnu`` (UE8M0: the byte is the biased exponent, ``2 ** (byte - 127)``), as raw
  ``uint8`` exponent bytes, or as a float;
- ``W[r, c] = E2M1(code[r, c]) * scale[r, c // 32]``.

Every product is exact in float32 (and in bfloat16: a value has at most 2 significant bits), so
dequantising on the way in loses nothing. Exporting writes bf16/fp32 (or FP8 blocks with
``--fp8``), never FP4: the format exists to serve the release, not to train from.
"""

from __future__ import annotations

import torch

from moeframe.errors import ConfigError

__all__ = ["FP4_BLOCK", "E2M1_MAGNITUDES", "dequantize_fp4", "is_fp4_packed", "scales_as_float", "unpack_e2m1"]

FP4_BLOCK = 32  # inputs per scale
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0..7; code | 8 is the negative
_E8M0_BIAS = 127


def _packed_dtypes() -> tuple[torch.dtype, ...]:
    fp4x2 = getattr(torch, "float4_e2m1fn_x2", None)
    return (torch.int8, torch.uint8) + ((fp4x2,) if fp4x2 is not None else ())


def is_fp4_packed(t: torch.Tensor) -> bool:
    """Whether ``t`` has one of the byte dtypes packed FP4 is stored in."""
    return t.dtype in _packed_dtypes()


def scales_as_float(scale: torch.Tensor) -> torch.Tensor:
    """Block scales in float32: UE8M0 (``float8_e8m0fnu``, or raw exponent bytes as ``uint8``)
    or any float dtype."""
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.float() - _E8M0_BIAS)
    return scale.float()


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """``[..., n / 2]`` bytes -> ``[..., n]`` float32 values (low nibble first)."""
    b = packed.contiguous().view(torch.uint8).long()
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)  # element 2j: low nibble of byte j
    table = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32)
    table = torch.cat([table, -table])
    return table[codes]


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, key: str = "weight") -> torch.Tensor:
    """``W [out, in]`` in float32 from packed E2M1 ``[out, in / 2]`` and scales ``[out, in / 32]``;
    a scale grid of another shape is a ConfigError naming ``key``."""
    if packed.dim() != 2:
        raise ConfigError(f"{key}: packed FP4 weight must be 2-D [out, in/2], got shape {tuple(packed.shape)}")
    rows, cols = packed.shape[0], 2 * packed.shape[1]
    expected = (rows, -(-cols // FP4_BLOCK))
    if tuple(scale.shape) != expected:
        raise ConfigError(
            f"{key}: packed FP4 weight {tuple(packed.shape)} needs a scale of shape {expected} "
            f"(one per {FP4_BLOCK} inputs of a row), found {tuple(scale.shape)}; this FP4 layout is not understood"
        )
    per_input = scales_as_float(scale).repeat_interleave(FP4_BLOCK, dim=1)[:, :cols]
    return unpack_e2m1(packed) * per_input
