"""Rotary position embedding (RoPE) in the rotate-half convention.

Frequencies are computed on the fly from positions: a [T, d/2] outer product is negligible next
to attention, and it means no buffers to rebuild after a meta-device build.
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    positions_T: torch.Tensor, rot_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [T, rot_dim] for the given positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, device=positions_T.device, dtype=torch.float32) / rot_dim))
    angles_TR = torch.outer(positions_T.to(torch.float32), inv_freq)
    angles_TR = torch.cat((angles_TR, angles_TR), dim=-1)
    return angles_TR.cos().to(dtype), angles_TR.sin().to(dtype)


def apply_rope(x_BHTd: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of the last dimension by the position angle."""
    half = x_BHTd.shape[-1] // 2
    x1, x2 = x_BHTd[..., :half], x_BHTd[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x_BHTd * cos_Td + rotated * sin_Td
