"""Attention plugin ``template_name``: causal multi-head attention with RoPE (a starting point)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.plugin import (
    AttentionBase,
    ForwardContext,
    ModelConfig,
    PluginOptions,
    apply_rope,
    document_mask,
    rope_cos_sin,
)


@dataclass
class TemplateNameAttentionOptions(PluginOptions):
    """The options a config can give: ``attention: {name: template_name, qkv_bias: true}``."""

    qkv_bias: bool = False

    def validate(self, config: ModelConfig) -> None:
        if config.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size; dim/n_heads = {config.head_dim}")


class TemplateNameAttention(AttentionBase):
    """``forward(x_BTD, ctx) -> y_BTD``, causal, documents (``ctx.document_ids_BT``) kept apart."""

    Options = TemplateNameAttentionOptions
    plugin_api = "2"  # the moeframe plugin API this class is written against

    def __init__(self, config: ModelConfig, options: TemplateNameAttentionOptions, layer_id: int) -> None:
        super().__init__(config, options, layer_id)
        self.n_heads, self.head_dim, self.rope_theta = config.n_heads, config.head_dim, config.rope_theta
        self.wqkv = nn.Linear(config.dim, 3 * config.dim, bias=options.qkv_bias)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        # its names in HF checkpoints, below the attention module (what `moeframe convert` writes)
        return {"wqkv.weight": "qkv_proj.weight", "wqkv.bias": "qkv_proj.bias", "wo.weight": "o_proj.weight"}

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if ctx.decoding:
            raise NotImplementedError(
                "template_name has no KV cache yet: implement new_cache() to decode incrementally"
            )
        B, T, D = x_BTD.shape
        q, k, v = self.wqkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rope_cos_sin(ctx.positions_T, self.head_dim, self.rope_theta, x_BTD.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if ctx.document_ids_BT is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(ctx.document_ids_BT))
        return self.wo(out.transpose(1, 2).reshape(B, T, D))
