"""The two rotary embeddings of DeepSeek-V4's attention, on the trailing slice of a head.

V4 rotates only the last ``R`` channels of each head (partial RoPE, ``R`` = 64 of 512 in the
released models): the leading ``d - R`` channels carry content only. Pairs are *interleaved*
(channels ``2i`` and ``2i+1`` turn together), as in DeepSeek's weights.

Two settings exist side by side. ``main`` (theta 10k, no scaling) serves the pure sliding-window
layers; ``compress`` (theta 160k, YaRN in the released models) serves every layer that has a
compressor: its queries, its sliding keys, its compressed entries and its indexer all share it,
so that query·key products depend on relative distance only. Unlike V3's YaRN, V4 does not scale
cos/sin by YaRN's ``mscale`` (the reference forces the attention factor to 1).

Shapes: T positions, R rotated channels, P = R/2 pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["RopeSetting", "apply_rope_tail", "rope_cos_sin_P"]


@dataclass(frozen=True)
class RopeSetting:
    """One rotary embedding: base ``theta`` and, when ``factor`` > 1, YaRN's frequency blend."""

    theta: float
    factor: float = 1.0
    original_seq_len: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def inv_freq_P(self, rope_dim: int, device: torch.device | None = None) -> torch.Tensor:
        """Angular speed of each channel pair (YaRN: interpolated slow pairs, kept fast pairs)."""
        exponent_P = torch.arange(0, rope_dim, 2, dtype=torch.float32, device=device) / rope_dim
        extrapolated_P = 1.0 / (self.theta**exponent_P)
        if self.factor <= 1:
            return extrapolated_P
        assert self.original_seq_len is not None  # the options' validate() guarantees it
        low, high = self._ramp_bounds(rope_dim)
        pair_P = torch.arange(rope_dim // 2, dtype=torch.float32, device=device)
        # 1 for pairs that turn often within the original context (keep), 0 for slow ones (interpolate)
        keep_P = 1 - ((pair_P - low) / (high - low if high != low else 1e-3)).clamp(0, 1)
        return extrapolated_P / self.factor * (1 - keep_P) + extrapolated_P * keep_P

    def _ramp_bounds(self, rope_dim: int) -> tuple[float, float]:
        """Pair indices where a pair turns ``beta_fast`` resp. ``beta_slow`` times in the original
        context (YaRN's correction range), widened to whole pairs."""

        def pair_for(turns: float) -> float:
            assert self.original_seq_len is not None
            return rope_dim * math.log(self.original_seq_len / (turns * 2 * math.pi)) / (2 * math.log(self.theta))

        low = max(math.floor(pair_for(self.beta_fast)), 0)
        high = min(math.ceil(pair_for(self.beta_slow)), rope_dim - 1)
        return float(low), float(high)


def rope_cos_sin_P(positions: torch.Tensor, inv_freq_P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [..., P] (fp32) of the given positions [...]."""
    angle = positions.to(torch.float32)[..., None] * inv_freq_P
    return angle.cos(), angle.sin()


def apply_rope_tail(x: torch.Tensor, cos_TP: torch.Tensor, sin_TP: torch.Tensor) -> torch.Tensor:
    """Rotate the last 2P channels of ``x`` [..., T, (heads,) d] pairwise-interleaved, in fp32.

    ``cos_TP``/``sin_TP`` broadcast against ``x``'s leading dims once a head axis is inserted by the
    caller when ``x`` has one. Passing ``-sin`` turns by the opposite angle (V4 uses this to take the
    query's own position back out of the attention output)."""
    P = cos_TP.shape[-1]
    nope, rope = x[..., : -2 * P], x[..., -2 * P :]
    even, odd = rope.float().unflatten(-1, (P, 2)).unbind(-1)
    turned = torch.stack((even * cos_TP - odd * sin_TP, odd * cos_TP + even * sin_TP), dim=-1).flatten(-2)
    return torch.cat((nope, turned.to(x.dtype)), dim=-1)
