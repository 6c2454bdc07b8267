"""DeepSeek Sparse Attention (DSA), the attention of DeepSeek-V3.2-Exp, registered as attention ``dsa``.

Why. MLA made the KV cache small, but each query still attends to every earlier token: O(T²) in
the context. DSA keeps MLA and adds a lightning indexer (``moeframe_dsa.indexer``) that scores
every visible token cheaply (few heads, ReLU, one shared key); MLA then attends only to the
``index_topk`` best tokens of each query (2048 in the release): per token in MLA's MQA (absorbed)
form over the shared latent, or, in training, in blocks of neighbouring tokens in MLA's expanded
form (``moeframe_dsa.selected``). The main attention's cost grows with k, not with the context;
the indexer stays O(T·S) but with a small constant (64 heads × 128 channels in FP8 in the release).

How it is trained (V3.2 report §2.1-2.2), from a dense MLA checkpoint, the ``mode`` option:

- ``dense_warmup``: attention stays dense (the model computes exactly what the MLA checkpoint
  did); only the indexer learns (freeze the rest: ``PretrainModule(train_only=["*.indexer.*"])``).
  Its target is the main attention's distribution, summed over heads and L1-normalised;
  loss ``Σ_t KL(p_t ‖ softmax(I_t))`` over the visible tokens.
- ``sparse`` (default; also inference): MLA attends to the selected tokens; the indexer's KL is
  taken over the selected tokens only, and its inputs are detached from the main graph, so the
  language-model loss alone trains the model and the KL alone trains the indexer.

The KL is reported through the declared hook ``take_training_losses`` (``indexer_kl``, scaled by
``indexer_loss_coef``, averaged over query tokens): the decoder adds it to the training loss and
the trainer logs it as ``train/indexer_kl``.

Cache (``IndexedLatentCache``): MLA's latent row (C + R values) plus the index key (I values) per
token and layer: 576 + 128 = 704 for V3.2.

Shapes: as in ``moeframe_mla.attention`` (B, T, S, D, H, Q, C, d, R, v, L = C + R) and K selected
tokens per query, I indexer head width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from moeframe.plugin import (
    ConfigError,
    ForwardContext,
    PluginOptions,
    cached_causal_mask,
    causal_pair_count,
    document_mask,
)
from moeframe_dsa import selected
from moeframe_dsa.indexer import QUERY_CHUNK, LightningIndexer, score_chunk, selected_scores
from moeframe_mla import LatentCache, MLAOptions, MultiHeadLatentAttention, rotate

if TYPE_CHECKING:
    from moeframe.plugin import ModelConfig

__all__ = ["DSAOptions", "DeepSeekSparseAttention", "IndexedLatentCache", "indexer_kl", "V32_FAMILY"]

V32_FAMILY = "deepseek_v32"  # the only HF checkpoint family whose files hold the indexer
_INDEXER_HF = ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")


@dataclass
class DSAOptions(MLAOptions):
    """MLA's options plus the indexer (defaults: DeepSeek-V3.2-Exp).

    ``index_n_heads``/``index_head_dim``: the indexer's heads and their width; ``index_topk``:
    tokens each query attends to; ``mode``: ``sparse`` (inference, and stage 2 of the recipe) or
    ``dense_warmup`` (stage 1: dense attention, the indexer learns to imitate it);
    ``indexer_loss_coef``: weight of the indexer's KL loss in training.
    """

    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    mode: Literal["sparse", "dense_warmup"] = "sparse"
    indexer_loss_coef: float = 1.0

    def validate(self, config: ModelConfig) -> None:
        if self.q_lora_rank is None:
            raise ConfigError(
                "attention dsa needs MLA with a query latent (q_lora_rank, e.g. 1536): the indexer's "
                "queries are up-projected from it; set q_lora_rank or use attention mla"
            )
        super().validate(config)
        if self.index_n_heads <= 0 or self.index_head_dim <= 0:
            raise ConfigError(
                f"attention dsa: index_n_heads={self.index_n_heads} and index_head_dim="
                f"{self.index_head_dim} must be > 0"
            )
        if self.qk_rope_head_dim > self.index_head_dim:
            raise ConfigError(
                f"attention dsa: index_head_dim={self.index_head_dim} must be >= qk_rope_head_dim="
                f"{self.qk_rope_head_dim} (the indexer rotates its first qk_rope_head_dim channels)"
            )
        if not 0 < self.index_topk <= config.max_seq_len:
            raise ConfigError(
                f"attention dsa: index_topk={self.index_topk} must be in 1..max_seq_len="
                f"{config.max_seq_len}; with k >= the context every token is selected and the "
                "attention is dense: lower index_topk or use attention mla"
            )
        if self.indexer_loss_coef < 0:
            raise ConfigError(f"attention dsa: indexer_loss_coef={self.indexer_loss_coef} must be >= 0")


class IndexedLatentCache(LatentCache):
    """MLA's latent rows plus the indexer's key of each token [B, S, I]."""

    def __init__(
        self,
        batch_size: int,
        kv_lora_rank: int,
        rope_dim: int,
        index_dim: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(batch_size, kv_lora_rank, rope_dim, max_len, device, dtype)
        self.index_keys_BSI = torch.zeros(batch_size, max_len, index_dim, device=device, dtype=dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.latent_BSL, self.index_keys_BSI]

    def append_indexed(
        self, c_kv_BTC: torch.Tensor, k_pe_BTR: torch.Tensor, k_index_BTI: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens; return every cached latent row [B,S,L] and index key [B,S,I]."""
        start = self.length
        latent_BSL = self.append(c_kv_BTC, k_pe_BTR)
        self.index_keys_BSI[:, start : self.length] = k_index_BTI
        return latent_BSL, self.index_keys_BSI[:, : self.length]


def indexer_kl(index_BTX: torch.Tensor, target_BTX: torch.Tensor, keep_BTX: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(target ‖ softmax(index)) over the kept tokens (target 0 elsewhere)."""
    log_q_BTX = F.log_softmax(index_BTX.masked_fill(~keep_BTX, float("-inf")), dim=-1).masked_fill(~keep_BTX, 0.0)
    kl_BT = (torch.xlogy(target_BTX, target_BTX) - target_BTX * log_q_BTX).sum(-1)
    return kl_BT.mean()


def _flop_terms(config: ModelConfig, options: PluginOptions, seq_len: int) -> tuple[int, int, int, int]:
    """(query, key) pairs the indexer scores and MLA attends to over one causal sequence, and the
    multiply-adds of each: G·(I + 1) for the indexer, H·(d_qk + v) for MLA's scores and values."""
    assert isinstance(options, DSAOptions)
    topk = options.index_topk if options.mode == "sparse" else None
    per_index_pair = options.index_n_heads * (options.index_head_dim + 1)
    per_attended_pair = config.n_heads * (options.qk_nope_head_dim + options.qk_rope_head_dim + options.v_head_dim)
    return causal_pair_count(seq_len), causal_pair_count(seq_len, cap=topk), per_index_pair, per_attended_pair


class DeepSeekSparseAttention(MultiHeadLatentAttention):
    """MLA + lightning indexer + top-k selection (see the module docstring)."""

    Options = DSAOptions
    plugin_api = "2"

    def __init__(self, config: ModelConfig, options: DSAOptions, layer_id: int) -> None:
        super().__init__(config, options, layer_id)
        assert options.q_lora_rank is not None  # DSAOptions.validate
        self.index_topk, self.mode, self.indexer_loss_coef = options.index_topk, options.mode, options.indexer_loss_coef
        self.indexer = LightningIndexer(
            config.dim, options.q_lora_rank, options.index_n_heads, options.index_head_dim, options.qk_rope_head_dim
        )
        self._losses: dict[str, torch.Tensor] = {}

    # -- declared hooks ---------------------------------------------------------------------------
    def take_training_losses(self) -> dict[str, torch.Tensor]:
        losses, self._losses = self._losses, {}
        return losses

    @classmethod
    def kv_cache_values_per_token(cls, config: ModelConfig, options: PluginOptions) -> int:
        assert isinstance(options, DSAOptions)
        return options.kv_lora_rank + options.qk_rope_head_dim + options.index_head_dim

    @classmethod
    def attention_flops_per_token(cls, config: ModelConfig, options: PluginOptions, seq_len: int) -> float:
        """The indexer scores every visible token (``index_n_heads`` dot products of
        ``index_head_dim`` plus the weighted sum over heads); MLA then attends, in its expanded form,
        to ``min(index_topk, t + 1)`` tokens at position t (``sparse``) or to all t + 1
        (``dense_warmup``). The warm-up's KL target (no gradient) is left out."""
        index_pairs, attended_pairs, per_index_pair, per_attended_pair = _flop_terms(config, options, seq_len)
        return 2 * (index_pairs * per_index_pair + attended_pairs * per_attended_pair) / max(seq_len, 1)

    @classmethod
    def attention_backward_flops_per_token(cls, config: ModelConfig, options: PluginOptions, seq_len: int) -> float:
        """Twice the forward of what has gradient: MLA over the attended tokens and the indexer's
        scores of those same tokens (``sparse`` selects without gradient and learns from the KL over
        the top-k only; ``dense_warmup`` attends to, and learns from, every visible token)."""
        _, attended_pairs, per_index_pair, per_attended_pair = _flop_terms(config, options, seq_len)
        return 2 * 2 * attended_pairs * (per_index_pair + per_attended_pair) / max(seq_len, 1)

    def new_cache(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> IndexedLatentCache:
        return IndexedLatentCache(
            batch_size, self.kv_lora_rank, self.qk_rope_head_dim, self.indexer.head_dim, max_len, device, dtype
        )

    # -- HF form ------------------------------------------------------------------------------------
    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        return {**super().hf_tensor_names(family), **{f"indexer.{n}": f"indexer.{n}" for n in _INDEXER_HF}}

    @classmethod
    def hf_fp32_tensors(cls, family: str) -> frozenset[str]:
        # the per-token head weights stay fp32 (transformers' _keep_in_fp32_modules for V3.2)
        return frozenset({"indexer.weights_proj.weight"})

    @classmethod
    def hf_config(cls, family: str, config: ModelConfig, options: PluginOptions) -> dict[str, Any]:
        assert isinstance(options, DSAOptions)
        if family != V32_FAMILY:
            raise ConfigError(
                f"attention dsa (its indexer) has no form in HF {family!r} checkpoints; export to family {V32_FAMILY!r}"
            )
        fields = super().hf_config(family, config, options)
        fields.pop("rope_interleave")  # V3.2 configs have none: MLA interleaved, the indexer rotate-half
        return {
            **fields,
            "index_n_heads": options.index_n_heads,
            "index_head_dim": options.index_head_dim,
            "index_topk": options.index_topk,
        }

    @classmethod
    def options_from_hf(cls, family: str, hf: dict[str, Any]) -> dict[str, Any]:
        options = super().options_from_hf(family, {**hf, "rope_interleave": True})
        return {
            **options,
            "index_n_heads": hf.get("index_n_heads", 64),
            "index_head_dim": hf.get("index_head_dim", 128),
            "index_topk": hf.get("index_topk", 2048),
        }

    # -- forward ------------------------------------------------------------------------------------
    def _queries(
        self, x_BTD: torch.Tensor, cos_TP: torch.Tensor, sin_TP: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MLA's q_nope [B,T,H,d] and rotated q_pe [B,T,H,R], and the normalised query latent
        [B,T,Q] that the indexer's queries are projected from."""
        B, T, _ = x_BTD.shape
        q_latent_BTQ = self.q_norm(self.wq_a(x_BTD))
        q_nope_BTHd, q_pe_BTHR = (
            self.wq_b(q_latent_BTQ)
            .view(B, T, self.n_heads, self.qk_head_dim)
            .split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        )
        return q_nope_BTHd, rotate(q_pe_BTHR, cos_TP, sin_TP, self.interleaved), q_latent_BTQ

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        cos_TP, sin_TP = self._rope(ctx.positions_T)
        q_nope_BTHd, q_pe_BTHR, q_latent_BTQ = self._queries(x_BTD, cos_TP, sin_TP)
        learn = self.training and torch.is_grad_enabled()
        # the indexer learns from its KL loss only: its inputs are cut from the main graph
        x_idx_BTD, q_idx_BTQ = (x_BTD.detach(), q_latent_BTQ.detach()) if learn else (x_BTD, q_latent_BTQ)
        latent_BSL, k_index_BSI, start = self._store(x_BTD, x_idx_BTD, cos_TP, sin_TP, ctx)
        S = latent_BSL.shape[1]
        sparse = self.mode == "sparse" and S > self.index_topk  # else every visible token is selected
        if sparse:
            idx_BTK, keep_BTK, index_BTK = self._select(x_idx_BTD, q_idx_BTQ, k_index_BSI, cos_TP, sin_TP, ctx)
            o_BTHv, p_BTK = self._attend_selected(q_nope_BTHd, q_pe_BTHR, latent_BSL, idx_BTK, keep_BTK)
            if index_BTK is not None:  # training, stage 2: the KL over the selected tokens only
                self._set_kl(index_BTK, p_BTK, keep_BTK)
            return self.wo(o_BTHv.reshape(B, T, self.n_heads * self.v_head_dim))
        o_BTHv = self._attend_dense(
            q_nope_BTHd, q_pe_BTHR, latent_BSL, start, ctx.cache is not None, ctx.document_ids_BT
        )
        if learn:  # stage 1 (or a context within k): the KL over every visible token
            visible_BTS = self._visible(B, T, start, S, ctx.document_ids_BT, x_BTD.device)
            index_BTS = self.indexer.scores(x_idx_BTD, q_idx_BTQ, k_index_BSI, cos_TP, sin_TP)
            index_BTS = index_BTS.masked_fill(~visible_BTS, float("-inf"))
            self._set_kl(
                index_BTS, self._dense_distribution(q_nope_BTHd, q_pe_BTHR, latent_BSL, visible_BTS), visible_BTS
            )
        return self.wo(o_BTHv.reshape(B, T, self.n_heads * self.v_head_dim))

    def _store(
        self,
        x_BTD: torch.Tensor,
        x_idx_BTD: torch.Tensor,
        cos_TP: torch.Tensor,
        sin_TP: torch.Tensor,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Latent rows [B,S,L] and index keys [B,S,I] of every visible token (the new ones
        appended to the cache while decoding), and the cache position of the first new token."""
        c_kv_BTC, k_pe_BTR = self._latent(x_BTD, cos_TP, sin_TP)
        k_index_BTI = self.indexer.keys(x_idx_BTD, cos_TP, sin_TP)
        cache = ctx.cache
        if cache is None:
            return torch.cat((c_kv_BTC, k_pe_BTR), dim=-1), k_index_BTI, 0
        if ctx.document_ids_BT is not None:
            raise ValueError("packed documents (document_ids_BT) cannot be decoded with a cache")
        assert isinstance(cache, IndexedLatentCache), f"dsa got a {type(cache).__name__}, not an IndexedLatentCache"
        start = cache.length
        return (*cache.append_indexed(c_kv_BTC, k_pe_BTR, k_index_BTI), start)

    def _select(
        self,
        x_idx_BTD: torch.Tensor,
        q_idx_BTQ: torch.Tensor,
        k_index_BSI: torch.Tensor,
        cos_TP: torch.Tensor,
        sin_TP: torch.Tensor,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Each query's top-k tokens [B,T,K], whether each may be seen [B,T,K], and (training) their
        index scores [B,T,K] with gradient. Chunks of queries score only the keys up to their
        last query; no [B,T,S] tensor is kept."""
        B, T, _ = x_idx_BTD.shape
        S, K = k_index_BSI.shape[1], self.index_topk
        q_BTGI, w_BTG = self.indexer.queries(x_idx_BTD, q_idx_BTQ, cos_TP, sin_TP)
        k_BSI = k_index_BSI.float()
        learn = self.training and torch.is_grad_enabled()
        idx, keep, scores = [], [], []
        for t0 in range(0, T, QUERY_CHUNK):
            t1 = min(T, t0 + QUERY_CHUNK)
            # causal: the chunk sees S - T + t1 keys; at least K so that top-k has K to pick from
            seen = min(S, max(S - T + t1, K))
            visible_BtS = self._visible_chunk(B, t0, t1, S - T, seen, ctx.document_ids_BT, x_idx_BTD.device)
            with torch.no_grad():
                index_BtS = score_chunk(q_BTGI[:, t0:t1], w_BTG[:, t0:t1], k_BSI[:, :seen])
                # unsorted: the order of the K is irrelevant, and sorting costs 1.5-3x the selection
                top_BtK = index_BtS.masked_fill_(~visible_BtS, float("-inf")).topk(K, dim=-1, sorted=False)
            idx_BtK = top_BtK.indices
            idx.append(idx_BtK)
            keep.append(visible_BtS.gather(-1, idx_BtK))
            if learn:
                q_BtGI, w_BtG = q_BTGI[:, t0:t1], w_BTG[:, t0:t1]
                scores.append(selected_scores(q_BtGI, w_BtG, k_BSI[:, :seen], idx_BtK, top_BtK.values))
        return torch.cat(idx, dim=1), torch.cat(keep, dim=1), torch.cat(scores, dim=1) if learn else None

    def _set_kl(self, index_BTX: torch.Tensor, target_BTX: torch.Tensor, keep_BTX: torch.Tensor) -> None:
        self._losses = {"indexer_kl": self.indexer_loss_coef * indexer_kl(index_BTX, target_BTX, keep_BTX)}

    @staticmethod
    def _visible(
        B: int, T: int, start: int, S: int, document_ids_BT: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """Which cached tokens each query may see [B, T, S]: causal, and in its own document."""
        return DeepSeekSparseAttention._visible_chunk(B, 0, T, start, S, document_ids_BT, device)

    @staticmethod
    def _visible_chunk(
        B: int, t0: int, t1: int, start: int, S: int, document_ids_BT: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """Which of the first S cached tokens queries t0:t1 may see [B, t, S] (query t sits at
        cache position start + t)."""
        causal_tS = (
            torch.arange(S, device=device)[None, :] <= torch.arange(start + t0, start + t1, device=device)[:, None]
        )
        if document_ids_BT is None:
            return causal_tS.expand(B, t1 - t0, S)
        return causal_tS & (document_ids_BT[:, t0:t1, None] == document_ids_BT[:, None, :S])

    def _attend_dense(
        self,
        q_nope_BTHd: torch.Tensor,
        q_pe_BTHR: torch.Tensor,
        latent_BSL: torch.Tensor,
        start: int,
        cached: bool,
        document_ids_BT: torch.Tensor | None,
    ) -> torch.Tensor:
        """MLA over every visible token: its training path without a cache, else its decode path."""
        c_kv_BSC, k_pe_BSR = latent_BSL.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        if not cached:
            mask = None if document_ids_BT is None else document_mask(document_ids_BT)
            return self._attend_expanded(q_nope_BTHd, q_pe_BTHR, c_kv_BSC, k_pe_BSR, mask, causal=mask is None)
        T = q_nope_BTHd.shape[1]
        # a single new token sees every cached one: no mask needed
        mask_TS = None if T == 1 else cached_causal_mask(start, T, latent_BSL.device)
        if self.decode == "absorbed":
            return self._attend_absorbed(q_nope_BTHd, q_pe_BTHR, latent_BSL, mask_TS)
        return self._attend_expanded(q_nope_BTHd, q_pe_BTHR, c_kv_BSC, k_pe_BSR, mask_TS, causal=False)

    def _absorbed_queries(self, q_nope_BTHd: torch.Tensor, q_pe_BTHR: torch.Tensor) -> torch.Tensor:
        """Queries in the latent space [B,T,H,L]: q_nope·(W_uk c) = (W_ukᵀ q_nope)·c."""
        H, C = self.n_heads, self.kv_lora_rank
        w_uk_HdC = self.wkv_b.weight.view(H, self.qk_nope_head_dim + self.v_head_dim, C)[:, : self.qk_nope_head_dim]
        return torch.cat((torch.einsum("bthd,hdc->bthc", q_nope_BTHd, w_uk_HdC), q_pe_BTHR), dim=-1)

    def _attend_selected(
        self,
        q_nope_BTHd: torch.Tensor,
        q_pe_BTHR: torch.Tensor,
        latent_BSL: torch.Tensor,
        idx_BTK: torch.Tensor,
        keep_BTK: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over each query's K selected tokens (``moeframe_dsa.selected``: O(T·K); blocks
        of neighbouring tokens whose selections overlap share their gathered keys in the expanded
        form, the rest go per token in the absorbed MQA form). Returns the output [B,T,H,v] and the
        attention distribution over the selected tokens, summed over heads and L1-normalised
        [B,T,K] (no gradient: the indexer's target)."""
        H, C, d, R = self.n_heads, self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim
        (B, S, L), E = latent_BSL.shape, d + R
        selection = selected.plan(idx_BTK, keep_BTK, S, L + C, E + self.v_head_dim, S * C * (d + self.v_head_dim))
        w_kv_HXC = self.wkv_b.weight.view(H, d + self.v_head_dim, C)
        dist_BTK = torch.zeros(idx_BTK.shape, dtype=torch.float32, device=latent_BSL.device)
        o_BTHv = q_nope_BTHd.new_zeros(*q_nope_BTHd.shape[:3], self.v_head_dim)
        if selection.blocks:
            c_kv_BSC, k_pe_BSR = latent_BSL.split([C, R], dim=-1)
            # per-head keys and values of every token, as dense MLA computes them (one GEMM, linear
            # in S), laid out [B,H,S,·] so that a block gathers contiguous rows of each head
            kv_BHSX = self.wkv_b(c_kv_BSC).view(B, S, H, -1).transpose(1, 2)
            k_nope_BHSd, v_BHSv = kv_BHSX.split([d, self.v_head_dim], dim=-1)
            k_BHSE = torch.cat((k_nope_BHSd, k_pe_BSR[:, None].expand(-1, H, -1, -1)), dim=-1)
            v_BHSv = v_BHSv.contiguous()
            q_BTHE = torch.cat((q_nope_BTHd, q_pe_BTHR), dim=-1)
            o_BTHv = selected.attend_blocks(q_BTHE, k_BHSE, v_BHSv, selection, self.softmax_scale, dist_BTK)
        if selection.tokens_N.numel():
            q_BTHL = self._absorbed_queries(q_nope_BTHd, q_pe_BTHR)
            o_BTHC = selected.attend_tokens(
                q_BTHL, latent_BSL, idx_BTK, keep_BTK, selection, self.softmax_scale, C, dist_BTK
            )
            # fold the value up-projection after the weighted sum: Σ p·(W_uv c) = W_uv (Σ p·c)
            o_BTHv = o_BTHv + torch.einsum("bthc,hvc->bthv", o_BTHC, w_kv_HXC[:, d:])
        return o_BTHv, dist_BTK

    @torch.no_grad()
    def _dense_distribution(
        self, q_nope_BTHd: torch.Tensor, q_pe_BTHR: torch.Tensor, latent_BSL: torch.Tensor, visible_BTS: torch.Tensor
    ) -> torch.Tensor:
        """The dense attention's distribution over the visible tokens, summed over heads and
        L1-normalised [B,T,S] (the warm-up target; each head's row sums to 1, so the mean)."""
        q_BTHL = self._absorbed_queries(q_nope_BTHd, q_pe_BTHR).float()
        scores_BTHS = torch.einsum("bthl,bsl->bths", q_BTHL, latent_BSL.float()) * self.softmax_scale
        return scores_BTHS.masked_fill(~visible_BTS[:, :, None], float("-inf")).softmax(-1).mean(2)
