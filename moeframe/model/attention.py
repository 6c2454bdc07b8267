"""Multi-head / grouped-query attention with RoPE, registered as attention ``mha``.

The baseline against which MLA is measured. The score matrix is never built in Python: the
core is ``scaled_dot_product_attention`` (flash/memory-efficient kernels where available).

For generation it keeps the plain cache: rotated keys and values of every key/value head,
``2·G·d`` values per token per layer (G key/value heads of size d). MLA exists to shrink that.
Shapes: G key/value heads, d head size, S cached tokens (see ``moeframe.model.base``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.model.base import AttentionBase, AttentionCache, PluginOptions
from moeframe.model.compat import as_context
from moeframe.model.context import ForwardContext
from moeframe.model.rope import apply_rope, rope_cos_sin

if TYPE_CHECKING:
    from moeframe.config import ModelConfig


@dataclass
class MHAOptions(PluginOptions):
    """``n_kv_heads``: key/value heads (None = n_heads, i.e. plain MHA; fewer = GQA/MQA)."""

    n_kv_heads: int | None = None
    qkv_bias: bool = False

    def validate(self, config: ModelConfig) -> None:
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


def cached_causal_mask(start: int, num_new: int, device: torch.device) -> torch.Tensor:
    """Boolean [T, S] mask for T new tokens at positions ``start...`` over all S = start + T
    cached tokens. SDPA's ``is_causal`` aligns the diagonal top-left, which is wrong as soon as
    earlier tokens are cached, hence an explicit mask."""
    query_pos_T = torch.arange(start, start + num_new, device=device)
    key_pos_S = torch.arange(start + num_new, device=device)
    return key_pos_S[None, :] <= query_pos_T[:, None]


class KVCache(AttentionCache):
    """Per-head keys (after RoPE) and values: [B, G, max_len, d] each."""

    def __init__(
        self, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__(batch_size, max_len)
        self.k_BGSd = torch.zeros(batch_size, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v_BGSd = torch.zeros_like(self.k_BGSd)

    def tensors(self) -> list[torch.Tensor]:
        return [self.k_BGSd, self.v_BGSd]

    def append(self, k_BGTd: torch.Tensor, v_BGTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens; return views of every cached key and value (S = new length)."""
        start, end = self.reserve(k_BGTd.shape[2])
        self.k_BGSd[:, :, start:end] = k_BGTd
        self.v_BGSd[:, :, start:end] = v_BGTd
        return self.k_BGSd[:, :, :end], self.v_BGSd[:, :, :end]


class MultiHeadAttention(AttentionBase):
    Options = MHAOptions
    plugin_api = "2"  # the moeframe plugin API this class is written against

    def __init__(self, config: ModelConfig, options: MHAOptions, layer_id: int) -> None:
        super().__init__(config, options, layer_id)
        self.n_heads = config.n_heads
        self.n_kv_heads = options.n_kv_heads or config.n_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=options.qkv_bias)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=options.qkv_bias)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=options.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    @classmethod
    def kv_cache_values_per_token(cls, config: ModelConfig, options: MHAOptions) -> int:
        return 2 * (options.n_kv_heads or config.n_heads) * config.head_dim

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        # the names of HF transformers' Llama-style attention (``self_attn.q_proj`` ...)
        names = {f"w{p}.{t}": f"{p}_proj.{t}" for p in "qkv" for t in ("weight", "bias")}
        return {**names, "wo.weight": "o_proj.weight"}

    @classmethod
    def hf_config(cls, family: str, config: ModelConfig, options: PluginOptions) -> dict[str, Any]:
        assert isinstance(options, MHAOptions)
        return {"num_key_value_heads": options.n_kv_heads or config.n_heads, "attention_bias": options.qkv_bias}

    @classmethod
    def options_from_hf(cls, family: str, hf: dict[str, Any]) -> dict[str, Any]:
        return {"n_kv_heads": hf.get("num_key_value_heads"), "qkv_bias": bool(hf.get("attention_bias", False))}

    def new_cache(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        return KVCache(batch_size, self.n_kv_heads, self.head_dim, max_len, device, dtype)

    def project_qkv(
        self, x_BTD: torch.Tensor, positions_T: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Heads-first q ``[B, H, T, d]`` and k, v ``[B, G, T, d]``, RoPE applied to q and k: the
        part of the forward that attention variants built on this class (e.g. a sliding window)
        share; they change only how the heads attend."""
        B, T, _ = x_BTD.shape
        q_BHTd = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k_BGTd = self.wk(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BGTd = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(positions_T, self.head_dim, self.rope_theta, x_BTD.dtype)
        return apply_rope(q_BHTd, cos, sin), apply_rope(k_BGTd, cos, sin), v_BGTd

    def forward(
        self,
        x_BTD: torch.Tensor,
        ctx: ForwardContext,
        document_ids_BT: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
    ) -> torch.Tensor:
        # the last two: API-1 subclasses may still call super().forward(x, positions_T, document_ids_BT, cache)
        ctx = as_context(ctx, document_ids_BT, cache)
        B, T, _ = x_BTD.shape
        document_ids_BT, cache = ctx.document_ids_BT, ctx.cache
        q_BHTd, k_BGTd, v_BGTd = self.project_qkv(x_BTD, ctx.positions_T)
        gqa = self.n_kv_heads != self.n_heads
        if cache is not None:
            if document_ids_BT is not None:
                raise ValueError("packed documents (document_ids_BT) cannot be decoded with a cache")
            assert isinstance(cache, KVCache), f"mha got a {type(cache).__name__}, not its own KVCache"
            start = cache.length
            k_BGSd, v_BGSd = cache.append(k_BGTd, v_BGTd)
            # one new token sees everything cached: no mask needed
            mask_TS = None if T == 1 else cached_causal_mask(start, T, x_BTD.device)
            out = F.scaled_dot_product_attention(q_BHTd, k_BGSd, v_BGSd, attn_mask=mask_TS, enable_gqa=gqa)
        elif document_ids_BT is None:
            out = F.scaled_dot_product_attention(q_BHTd, k_BGTd, v_BGTd, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(
                q_BHTd, k_BGTd, v_BGTd, attn_mask=document_mask(document_ids_BT), enable_gqa=gqa
            )
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
