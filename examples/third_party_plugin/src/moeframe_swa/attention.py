"""Sliding-window attention (SWA), registered as attention ``swa``.

Each token attends to itself and the ``window - 1`` tokens before it (Longformer's local
attention, Mistral 7B's SWA), so attention costs O(T·window) instead of O(T²) and, above all,
the KV cache for generation never holds more than ``window`` tokens per layer, however long the
generated text. Information still travels further than the window: layer l sees
``l·(window - 1)`` tokens back through the layers below it.

The layers are grouped-query attention with RoPE, exactly moeframe's ``mha`` (this class
subclasses it, so the parameters have the same names and shapes): an ``mha`` checkpoint loads
into ``swa`` and, with a window at least as long as the sequence, gives the same outputs.

Shapes: B batch, T new tokens, S keys attended (held + new), G key/value heads, H query heads,
d head size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moeframe.plugin import (
    AttentionCache,
    ForwardContext,
    MHAOptions,
    MultiHeadAttention,
    causal_pair_count,
    document_mask,
)

if TYPE_CHECKING:
    from moeframe.plugin import ModelConfig


@dataclass
class SWAOptions(MHAOptions):
    """``window``: tokens each query sees, itself included; ``n_kv_heads``, ``qkv_bias`` as in ``mha``."""

    window: int = 256

    def validate(self, config: ModelConfig) -> None:
        super().validate(config)
        if self.window < 1:
            raise ValueError(f"window must be at least 1 token (the token itself), got {self.window}")


def window_mask(query_pos_T: torch.Tensor, key_pos_S: torch.Tensor, window: int) -> torch.Tensor:
    """Boolean [T, S]: key s is visible to query t when ``q - window < k <= q``."""
    q, k = query_pos_T[:, None], key_pos_S[None, :]
    return (k <= q) & (k > q - window)


class RollingKVCache(AttentionCache):
    """Rotated keys and values of the last ``window`` tokens in a ring of ``min(window, max_len)``
    slots: position p lives in slot ``p % slots``. Which position a slot holds follows from
    ``length`` alone, so the cache keeps no bookkeeping tensors."""

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        window: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(batch_size, max_len)
        self.slots = min(window, max_len)
        self.k_BGSd = torch.zeros(batch_size, n_kv_heads, self.slots, head_dim, device=device, dtype=dtype)
        self.v_BGSd = torch.zeros_like(self.k_BGSd)

    def tensors(self) -> list[torch.Tensor]:
        return [self.k_BGSd, self.v_BGSd]

    def held_positions(self) -> torch.Tensor:
        """[slots] the position stored in each slot, -1 for a slot not written yet."""
        slot = torch.arange(self.slots, device=self.k_BGSd.device)
        last = self.length - 1
        held = last - (last - slot) % self.slots  # the latest position p <= last with p % slots == slot
        return torch.where(held >= 0, held, -1)

    def write(self, k_BGTd: torch.Tensor, v_BGTd: torch.Tensor) -> None:
        """Store the new tokens (only the last ``slots`` of them can ever be attended again)."""
        start, end = self.reserve(k_BGTd.shape[2])
        keep = min(end - start, self.slots)
        slot = torch.arange(end - keep, end, device=k_BGTd.device) % self.slots
        self.k_BGSd[:, :, slot] = k_BGTd[:, :, -keep:]
        self.v_BGSd[:, :, slot] = v_BGTd[:, :, -keep:]


class SlidingWindowAttention(MultiHeadAttention):
    """Grouped-query attention with RoPE over a sliding window of ``options.window`` tokens."""

    Options = SWAOptions
    plugin_api = "2"  # the moeframe plugin API this class is written against

    def __init__(self, config: ModelConfig, options: SWAOptions, layer_id: int) -> None:
        super().__init__(config, options, layer_id)
        self.window = options.window

    def new_cache(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> RollingKVCache:
        return RollingKVCache(batch_size, self.n_kv_heads, self.head_dim, max_len, self.window, device, dtype)

    @classmethod
    def kv_cache_values_per_token(cls, config: ModelConfig, options: SWAOptions) -> int:
        # per token held; the cache holds at most `window` tokens, so its size stops growing there
        return 2 * (options.n_kv_heads or config.n_heads) * config.head_dim

    @classmethod
    def attention_flops_per_token(cls, config: ModelConfig, options: SWAOptions, seq_len: int) -> float:
        # the query at position t reads min(window, t + 1) keys: a score and a value product of
        # head_dim per query head each (what `moeframe inspect` and the MFU count, not full causal)
        pairs = causal_pair_count(seq_len, cap=options.window)
        return 2 * pairs * config.n_heads * 2 * config.head_dim / max(seq_len, 1)

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """``ctx``: the forward context (positions, packed documents, the cache while decoding)."""
        positions_T, document_ids_BT, cache = ctx.positions_T, ctx.document_ids_BT, ctx.cache
        B, T, _ = x_BTD.shape
        q_BHTd, k_BGTd, v_BGTd = self.project_qkv(x_BTD, positions_T)  # mha's projections and RoPE
        if cache is not None:
            out = self._attend_cached(q_BHTd, k_BGTd, v_BGTd, positions_T, document_ids_BT, cache)
        else:
            out = self._attend(q_BHTd, k_BGTd, v_BGTd, positions_T, document_ids_BT)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _attend(
        self,
        q_BHTd: torch.Tensor,
        k_BGTd: torch.Tensor,
        v_BGTd: torch.Tensor,
        positions_T: torch.Tensor,
        document_ids_BT: torch.Tensor | None,
    ) -> torch.Tensor:
        gqa = self.n_kv_heads != self.n_heads
        T = q_BHTd.shape[2]
        if self.window >= T and document_ids_BT is None:
            # the window covers the whole sequence: plain causal attention (fused kernels)
            return F.scaled_dot_product_attention(q_BHTd, k_BGTd, v_BGTd, is_causal=True, enable_gqa=gqa)
        mask = window_mask(positions_T, positions_T, self.window)
        if document_ids_BT is not None:
            mask = mask & document_mask(document_ids_BT)
        return F.scaled_dot_product_attention(q_BHTd, k_BGTd, v_BGTd, attn_mask=mask, enable_gqa=gqa)

    def _attend_cached(
        self,
        q_BHTd: torch.Tensor,
        k_BGTd: torch.Tensor,
        v_BGTd: torch.Tensor,
        positions_T: torch.Tensor,
        document_ids_BT: torch.Tensor | None,
        cache: AttentionCache,
    ) -> torch.Tensor:
        if document_ids_BT is not None:
            raise ValueError("packed documents (document_ids_BT) cannot be decoded with a cache")
        if not isinstance(cache, RollingKVCache):
            raise TypeError(f"swa needs its own RollingKVCache, got a {type(cache).__name__}")
        # attend over the held tokens and the new ones together, then keep the newest in the ring
        held_pos_S = cache.held_positions()
        key_pos_S = torch.cat([held_pos_S, positions_T])
        mask_TS = window_mask(positions_T, key_pos_S, self.window) & (key_pos_S >= 0)[None, :]
        k_BGSd = torch.cat([cache.k_BGSd, k_BGTd], dim=2)
        v_BGSd = torch.cat([cache.v_BGSd, v_BGTd], dim=2)
        out = F.scaled_dot_product_attention(
            q_BHTd, k_BGSd, v_BGSd, attn_mask=mask_TS, enable_gqa=self.n_kv_heads != self.n_heads
        )
        cache.write(k_BGTd, v_BGTd)
        return out
