"""Multi-head / grouped-query attention with RoPE, registered as attention ``mha``.

The baseline against which MLA is measured. The score matrix is never built in Python: the
core is ``scaled_dot_product_attention`` (flash/memory-efficient kernels where available).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.model.base import AttentionBase, PluginOptions
from moeframe.model.rope import apply_rope, rope_cos_sin

if TYPE_CHECKING:
    from moeframe.config import ModelConfig


@dataclass
class MHAOptions(PluginOptions):
    """``n_kv_heads``: key/value heads (None = n_heads, i.e. plain MHA; fewer = GQA/MQA)."""

    n_kv_heads: Optional[int] = None
    qkv_bias: bool = False

    def validate(self, config: "ModelConfig") -> None:
        kv = self.n_kv_heads or config.n_heads
        if kv <= 0 or config.n_heads % kv:
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} must be a positive divisor of model.n_heads="
                f"{config.n_heads} (each key/value head serves a whole group of query heads)"
            )
        if config.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size; dim/n_heads = {config.head_dim}")


def document_mask(document_ids_BT: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask: causal and within the same document."""
    T = document_ids_BT.shape[1]
    same_doc_BTT = document_ids_BT[:, :, None] == document_ids_BT[:, None, :]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=document_ids_BT.device).tril()
    return (same_doc_BTT & causal_TT)[:, None]


class MultiHeadAttention(AttentionBase):
    Options = MHAOptions

    def __init__(self, config: "ModelConfig", options: MHAOptions, layer_id: int) -> None:
        super().__init__(config, options, layer_id)
        self.n_heads = config.n_heads
        self.n_kv_heads = options.n_kv_heads or config.n_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=options.qkv_bias)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=options.qkv_bias)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=options.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    def forward(
        self, x_BTD: torch.Tensor, positions_T: torch.Tensor, document_ids_BT: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTd = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k_BGTd = self.wk(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BGTd = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(positions_T, self.head_dim, self.rope_theta, x_BTD.dtype)
        q_BHTd, k_BGTd = apply_rope(q_BHTd, cos, sin), apply_rope(k_BGTd, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if document_ids_BT is None:
            out = F.scaled_dot_product_attention(q_BHTd, k_BGTd, v_BGTd, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(
                q_BHTd, k_BGTd, v_BGTd, attn_mask=document_mask(document_ids_BT), enable_gqa=gqa
            )
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
