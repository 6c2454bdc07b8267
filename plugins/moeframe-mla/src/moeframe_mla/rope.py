"""Decoupled RoPE for MLA: DeepSeek's pairing convention and YaRN context extension.

Pairing. RoPE rotates pairs of channels by an angle proportional to the position. Which channels
form a pair is a convention that trained weights bake in. DeepSeek's reference code views the
rope slice as complex numbers, so channels (0, 1), (2, 3), ... are the pairs ("interleaved").
Llama-style code pairs channel i with channel i + R/2 ("rotate half"). Weights trained one way
give wrong attention the other way unless the projection rows are permuted. HF's DeepSeek-V3
keeps the official weights and de-interleaves the activations (``rope_interleave=True``); we
rotate the adjacent pairs directly, which is the same arithmetic, and offer rotate-half for
checkpoints whose rows were permuted.

YaRN. To run at ``factor`` times the training length, YaRN divides by ``factor`` the frequencies of
the slow channels (whose wavelength does not fit into the original context, so they never saw a
full turn in training), keeps the fast channels (many turns already: they generalise), and blends
linearly in between. The band edges are the channels that turn ``beta_fast`` and ``beta_slow``
times over the original length. A longer context also flattens attention, so logits are
sharpened by ``mscale(m) = 0.1·m·ln(factor) + 1``: DeepSeek puts ``mscale(mscale_all_dim)²``
into the softmax scale and the ratio ``mscale(mscale) / mscale(mscale_all_dim)`` onto cos/sin
(exactly 1 in the released V2/V3 configs, where both are equal).

Shapes: B batch, T tokens, H heads (1 for the shared rope key), R rope channels, P = R/2 pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class YaRN:
    """YaRN settings; field names follow the DeepSeek reference (HF names in brackets)."""

    factor: float  # [rope_scaling.factor]
    original_seq_len: int  # [original_max_position_embeddings]
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


def yarn_mscale(factor: float, m: float) -> float:
    """YaRN's logit sharpening for a context ``factor`` times longer (1 when not extended)."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def yarn_cos_sin_scale(yarn: YaRN | None) -> float:
    """The factor on cos/sin: mscale(mscale) / mscale(mscale_all_dim), 1 without YaRN."""
    if yarn is None:
        return 1.0
    return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)


def _correction_pair(num_rotations: float, rot_dim: int, theta: float, seq_len: int) -> float:
    """The (fractional) pair index whose frequency turns ``num_rotations`` times over ``seq_len``.

    Pair i has wavelength 2π·theta^(2i/R); solving seq_len / wavelength = num_rotations for i.
    """
    return rot_dim * math.log(seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))


def rope_inv_freq(
    rot_dim: int, theta: float, yarn: YaRN | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Inverse frequency of every pair [P] in fp32, YaRN-corrected when ``yarn`` is given."""
    inv_freq_P = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, device=device, dtype=torch.float32) / rot_dim))
    if yarn is None:
        return inv_freq_P
    # whole pair indices: the band is widened to the nearest pairs on both sides
    low = max(math.floor(_correction_pair(yarn.beta_fast, rot_dim, theta, yarn.original_seq_len)), 0)
    high = min(math.ceil(_correction_pair(yarn.beta_slow, rot_dim, theta, yarn.original_seq_len)), rot_dim - 1)
    span = (high - low) or 0.001  # a one-pair band would divide by zero
    ramp_P = ((torch.arange(rot_dim // 2, device=device, dtype=torch.float32) - low) / span).clamp(0, 1)
    # ramp 0: fast pairs keep their frequency; ramp 1: slow pairs are interpolated (÷ factor)
    return inv_freq_P * (1 - ramp_P) + inv_freq_P / yarn.factor * ramp_P


def rope_cos_sin(
    positions_T: torch.Tensor, inv_freq_P: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, P] in fp32 (bf16 angles lose whole turns at long positions)."""
    angles_TP = torch.outer(positions_T.to(torch.float32), inv_freq_P)
    return angles_TP.cos() * scale, angles_TP.sin() * scale


def rotate(x_BTHR: torch.Tensor, cos_TP: torch.Tensor, sin_TP: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate each channel pair of ``x`` by its position angle; computed in fp32, returned in x's dtype.

    ``interleaved``: pairs are adjacent channels (DeepSeek checkpoints); else channel i pairs with
    i + R/2. The output keeps the input's channel layout, so a cached rope key and a query
    rotated later still pair up channel by channel.
    """
    x = x_BTHR.float()
    cos, sin = cos_TP[:, None, :], sin_TP[:, None, :]  # broadcast over heads
    if interleaved:
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2).to(x_BTHR.dtype)
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).to(x_BTHR.dtype)


def hf_rope_parameters(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from an HF ``config.json``: transformers 5 writes ``rope_parameters``,
    older configs ``rope_theta`` and ``rope_scaling``; scaling is None for plain RoPE."""
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    return theta, scaling
