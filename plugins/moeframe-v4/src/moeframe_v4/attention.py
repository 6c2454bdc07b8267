"""DeepSeek-V4's attention, registered as attention ``v4``; one class for V4's three layer types.

What V4 changes against V3's MLA. Every layer reads the last ``sliding_window`` tokens exactly;
what lies further back it reads only in compressed form, and how strongly it is compressed is the
layer's type (``layer_type``, chosen per layer with ``layers:`` overrides, as HF's ``layer_types``):

- ``sliding_attention``: the window only;
- ``heavily_compressed_attention`` (HCA): the window plus one entry per ``compress_rate_hca`` (128)
  tokens, all of them;
- ``compressed_sparse_attention`` (CSA): the window plus one entry per ``compress_rate_csa`` (4)
  tokens over overlapping windows, of which a lightning indexer picks ``index_topk`` per query.

(Pooling and the indexer are in ``attn_compress``.) The rest is shared by the three types:

- *Shared-KV multi-query attention*: ONE key/value head of width ``head_dim`` (512) serves all
  heads, and the key IS the value (``kv_proj``, RMS-normalised). The cache holds one vector per
  token, half of what separate keys and values would need.
- *Low-rank queries*: ``q_a_proj`` to a ``q_lora_rank`` latent (RMS-normalised, and reused by the
  indexer), ``q_b_proj`` up to the heads, each head RMS-normalised without a scale so that query
  and key (also normalised) meet at a controlled magnitude.
- *Partial RoPE*: only the last ``rope_head_dim`` (64) channels of queries and keys turn. Since the
  value is the key, the output picks up the key's rotation on those channels; turning the output
  back by the query's own position leaves a rotation by the relative distance only.
- *Attention sink*: a learned logit per head joins every softmax as one more column whose value is
  zero, so a head may attend "nowhere" rather than be forced onto the tokens it sees.
- *Grouped low-rank output*: heads·head_dim is large (32,768 for V4-Flash); the heads are cut into
  ``o_groups`` groups, each projected to ``o_lora_rank`` on its own (``o_a_proj``, block diagonal),
  then ``o_b_proj`` mixes the groups into the model width.
- *Two rotary settings*: ``main`` (``rope_theta``) for sliding layers, ``compress``
  (``compress_rope_theta``, optionally YaRN) for every layer with a compressor (see ``attn_rope``).

Decoding. ``V4Cache`` keeps the last ``sliding_window - 1`` keys, the compressed entries made so
far (1/m of the tokens) and the tokens of each unfinished window; ``kv_cache_values_per_token``
reports the resulting average per token at ``model.max_seq_len``.

Checkpoint names are HF transformers' ``self_attn.*`` (see ``HF_TENSOR_NAMES``); ours differ only
in that the indexer is the attention's own child (HF nests it in the compressor).

Shapes: B batch, T new tokens, S keys in the window, N compressed entries, D model width, H heads,
d head_dim, Q q_lora_rank, G o_groups, O o_lora_rank, P rotated pairs (rope_head_dim / 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moeframe.plugin import (
    AttentionBase,
    AttentionCache,
    ConfigError,
    ForwardContext,
    PluginOptions,
    RMSNorm,
    causal_pair_count,
    default_init,
)
from moeframe_v4.attn_compress import Compressor, Indexer
from moeframe_v4.attn_rope import RopeSetting, apply_rope_tail, rope_cos_sin_P

if TYPE_CHECKING:
    from moeframe.plugin import ModelConfig

__all__ = ["HF_TENSOR_NAMES", "LAYER_TYPES", "V4Attention", "V4AttentionOptions", "V4Cache"]

LayerType = Literal["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
LAYER_TYPES: tuple[str, ...] = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")

_POOL = ("kv_proj.weight", "gate_proj.weight", "position_bias", "kv_norm.weight")
# our state-dict key -> HF transformers' key under ``self_attn`` (a superset: each layer type has some)
HF_TENSOR_NAMES: dict[str, str] = {
    **{
        f"{n}.weight": f"{n}.weight"
        for n in ("q_a_proj", "q_a_norm", "q_b_proj", "kv_proj", "kv_norm", "o_a_proj", "o_b_proj")
    },
    "sinks": "sinks",
    **{f"compressor.{n}": f"compressor.{n}" for n in _POOL},
    **{f"indexer.{n}": f"compressor.indexer.{n}" for n in (*_POOL, "q_b_proj.weight")},
    "indexer.weights_proj.weight": "compressor.indexer.scorer.weights_proj.weight",
}


@dataclass
class V4AttentionOptions(PluginOptions):
    """V4 attention (defaults: the V4-Flash shape). ``layer_type`` is usually set per layer.

    ``rope_theta``: the ``main`` rotary base, null = ``model.rope_theta``. The ``compress`` rotary
    (layers with a compressor) uses ``compress_rope_theta`` and YaRN when ``compress_rope_factor`` > 1
    (then ``compress_original_seq_len`` is required; HF: ``rope_parameters.compress``).
    ``attention_sink``: the learned per-head sink logit (every released V4 has it). ``query_block``:
    queries per block of the training forward (bounds its logits to T·(block + window + entries));
    numerics do not depend on it.
    """

    layer_type: LayerType = "sliding_attention"
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    sliding_window: int = 128
    compress_rate_csa: int = 4
    compress_rate_hca: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    o_groups: int = 8
    o_lora_rank: int = 1024
    attention_sink: bool = True
    query_block: int = 512
    rope_theta: float | None = None
    compress_rope_theta: float = 160000.0
    compress_rope_factor: float = 1.0
    compress_original_seq_len: int | None = None
    compress_beta_fast: float = 32.0
    compress_beta_slow: float = 1.0

    def validate(self, config: ModelConfig) -> None:
        for name in (
            "head_dim",
            "q_lora_rank",
            "sliding_window",
            "compress_rate_csa",
            "compress_rate_hca",
            "index_n_heads",
            "index_topk",
            "o_groups",
            "o_lora_rank",
            "query_block",
        ):
            _require(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be > 0")
        _require(
            self.rope_head_dim > 0 and self.rope_head_dim % 2 == 0 and self.rope_head_dim <= self.head_dim,
            f"rope_head_dim={self.rope_head_dim} must be a positive even number (RoPE turns channel pairs) "
            f"and at most head_dim={self.head_dim}",
        )
        _require(
            self.index_head_dim >= self.rope_head_dim,
            f"index_head_dim={self.index_head_dim} must be >= rope_head_dim={self.rope_head_dim}: the indexer "
            "rotates the same trailing channels as the attention",
        )
        width = config.n_heads * self.head_dim
        _require(
            width % self.o_groups == 0,
            f"o_groups={self.o_groups} must divide model.n_heads * head_dim = {width} "
            "(each group projects a whole slice of the heads)",
        )
        _require(self.rope_theta is None or self.rope_theta > 0, f"rope_theta={self.rope_theta} must be > 0")
        _require(self.compress_rope_theta > 0, f"compress_rope_theta={self.compress_rope_theta} must be > 0")
        self._validate_yarn()

    def _validate_yarn(self) -> None:
        _require(
            self.compress_rope_factor >= 1,
            f"compress_rope_factor={self.compress_rope_factor} must be >= 1 (1 = no YaRN)",
        )
        if self.compress_rope_factor == 1:
            return
        _require(
            self.compress_original_seq_len is not None and self.compress_original_seq_len > 0,
            f"compress_rope_factor={self.compress_rope_factor} needs compress_original_seq_len (the context "
            f"length YaRN extends), got {self.compress_original_seq_len}",
        )
        _require(
            self.compress_beta_fast > self.compress_beta_slow > 0,
            f"YaRN needs compress_beta_fast > compress_beta_slow > 0, got {self.compress_beta_fast}, "
            f"{self.compress_beta_slow}",
        )

    def compress_rate(self) -> int | None:
        """Tokens per compressed entry of this layer type (None: sliding only)."""
        return {
            "compressed_sparse_attention": self.compress_rate_csa,
            "heavily_compressed_attention": self.compress_rate_hca,
        }.get(self.layer_type)

    def rope(self, config: ModelConfig) -> RopeSetting:
        """The rotary this layer uses: ``main`` for sliding layers, ``compress`` otherwise."""
        if self.layer_type == "sliding_attention":
            return RopeSetting(self.rope_theta or config.rope_theta)
        return RopeSetting(
            self.compress_rope_theta,
            self.compress_rope_factor,
            self.compress_original_seq_len,
            self.compress_beta_fast,
            self.compress_beta_slow,
        )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class GroupedLinear(nn.Module):
    """Block-diagonal projection: group g of the input [.., G, I] meets only its own [O, I] block.
    ``weight`` is [G·O, I] (the groups' blocks stacked), as in the checkpoints."""

    def __init__(self, in_per_group: int, out_per_group: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups * out_per_group, in_per_group))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear; the decoder re-initialises

    def forward(self, x_BTGI: torch.Tensor) -> torch.Tensor:
        w_GOI = self.weight.view(self.groups, -1, self.weight.shape[-1])
        return torch.einsum("btgi,goi->btgo", x_BTGI, w_GOI)


class V4Cache(AttentionCache):
    """The last ``window - 1`` keys (right-aligned: the newest row last) and the compressors' states."""

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        head_dim: int,
        window: int,
        compressor: Compressor | None,
        indexer: Indexer | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(batch_size, max_len)
        self.recent_BWd = torch.zeros(batch_size, window - 1, head_dim, device=device, dtype=dtype)
        self.compressor = None if compressor is None else compressor.new_state(batch_size, max_len, device, dtype)
        self.indexer = None if indexer is None else indexer.new_state(batch_size, max_len, device, dtype)

    def tensors(self) -> list[torch.Tensor]:
        states = [s for s in (self.compressor, self.indexer) if s is not None]
        return [self.recent_BWd] + [t for s in states for t in s.tensors()]

    def slide(self, kv_BTd: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys the new tokens may see [B, S, d] (kept ones, then the new) and their positions [S];
        keep the newest ``window - 1`` for the next call."""
        W1 = self.recent_BWd.shape[1]
        kept = min(start, W1)
        keys_BSd = torch.cat((self.recent_BWd[:, W1 - kept :], kv_BTd), dim=1)
        keep = min(keys_BSd.shape[1], W1)
        if keep:
            self.recent_BWd[:, W1 - keep :] = keys_BSd[:, keys_BSd.shape[1] - keep :]
        return keys_BSd, torch.arange(start - kept, start + kv_BTd.shape[1], device=kv_BTd.device)


class V4Attention(AttentionBase):
    """DeepSeek-V4 attention of one layer type (see the module docstring)."""

    Options = V4AttentionOptions
    plugin_api = "2"  # the moeframe plugin API this class is written against

    def __init__(self, config: ModelConfig, options: V4AttentionOptions, layer_id: int) -> None:
        super().__init__(config, options, layer_id)
        H, d, eps = config.n_heads, options.head_dim, config.norm_eps
        self.n_heads, self.head_dim, self.eps = H, d, eps
        self.layer_type = options.layer_type
        self.window = options.sliding_window
        self.query_block = options.query_block
        self.rope_head_dim = options.rope_head_dim
        self.rope_setting = options.rope(config)
        self.q_a_proj = nn.Linear(config.dim, options.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(options.q_lora_rank, eps)
        self.q_b_proj = nn.Linear(options.q_lora_rank, H * d, bias=False)
        self.kv_proj = nn.Linear(config.dim, d, bias=False)
        self.kv_norm = RMSNorm(d, eps)
        self.o_a_proj = GroupedLinear(H * d // options.o_groups, options.o_lora_rank, options.o_groups)
        self.o_b_proj = nn.Linear(options.o_groups * options.o_lora_rank, config.dim, bias=False)
        self.sinks = nn.Parameter(torch.zeros(H, dtype=torch.float32)) if options.attention_sink else None
        rate = options.compress_rate()
        csa = options.layer_type == "compressed_sparse_attention"
        self.compressor = None if rate is None else Compressor(config.dim, d, rate, overlap=csa, eps=eps)
        self.indexer = (
            Indexer(
                config.dim,
                options.q_lora_rank,
                options.index_n_heads,
                options.index_head_dim,
                options.index_topk,
                rate,
                eps,
            )
            if csa and rate
            else None
        )
        # selective activation checkpointing: recompute the per-head queries (H·d wide: 32,768 values
        # a token for V4-Flash) in backward from the Q-wide latent instead of keeping them
        self.recompute_queries = False

    def init_weights(self, std: float) -> None:
        default_init(self, std)
        if self.sinks is not None:
            nn.init.zeros_(self.sinks)  # no sink at first: plain softmax

    def set_selective_recompute(self, enabled: bool) -> None:
        self.recompute_queries = enabled

    # -- cache contract -------------------------------------------------------------------------
    @classmethod
    def kv_cache_values_per_token(cls, config: ModelConfig, options: PluginOptions) -> int:
        """Average values per token at ``model.max_seq_len`` (rounded up): the window's keys, plus
        one entry of head_dim (and one of index_head_dim for CSA) per ``m`` tokens."""
        assert isinstance(options, V4AttentionOptions)
        S = config.max_seq_len
        values = min(options.sliding_window - 1, S) * options.head_dim
        rate = options.compress_rate()
        if rate is not None:
            csa = options.layer_type == "compressed_sparse_attention"
            per_entry = options.head_dim + (options.index_head_dim if csa else 0)
            values += S // rate * per_entry
        return -(-values // S)

    @classmethod
    def attention_flops_per_token(cls, config: ModelConfig, options: PluginOptions, seq_len: int) -> float:
        """Model FLOPs, as the definition needs them (the masked blocks of the training forward
        compute more): at position t, the query reads ``min(sliding_window, t + 1)`` keys and, with a
        compressor of rate m, the ``(t + 1) // m`` entries completed by then (CSA: the indexer
        scores them all, ``index_n_heads`` dot products of ``index_head_dim`` plus the weighted sum,
        and the attention reads ``index_topk`` of them). Each key or entry costs a score and a value
        product of ``head_dim`` per head (the key is the value); the sink column is left out."""
        attention_flops, index_flops = _flop_terms(config, options, seq_len)
        return (attention_flops + index_flops) / max(seq_len, 1)

    @classmethod
    def attention_backward_flops_per_token(cls, config: ModelConfig, options: PluginOptions, seq_len: int) -> float:
        """Twice the forward of the attention over the window and the entries; the indexer's scores
        only choose entries (a discrete selection: no gradient reaches them), so they have none."""
        attention_flops, _ = _flop_terms(config, options, seq_len)
        return 2 * attention_flops / max(seq_len, 1)

    def new_cache(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> V4Cache:
        return V4Cache(batch_size, max_len, self.head_dim, self.window, self.compressor, self.indexer, device, dtype)

    # -- HF form --------------------------------------------------------------------------------
    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        return dict(HF_TENSOR_NAMES)

    @classmethod
    def hf_config(cls, family: str, config: ModelConfig, options: PluginOptions) -> dict[str, Any]:
        """The fields shared by all layers; the family writes ``layer_types`` from each layer's option."""
        assert isinstance(options, V4AttentionOptions)
        if not options.attention_sink:
            raise ConfigError(
                "attention_sink: false has no HF form (transformers' DeepseekV4Attention always has a "
                "sink; a zero sink is not the same as none): export with attention_sink: true"
            )
        factor = options.rope_head_dim / options.head_dim
        compress: dict[str, Any] = {
            "rope_type": "default",
            "rope_theta": options.compress_rope_theta,
            "partial_rotary_factor": factor,
        }
        if options.compress_rope_factor > 1:
            compress.update(
                rope_type="yarn",
                factor=options.compress_rope_factor,
                attention_factor=1.0,
                original_max_position_embeddings=options.compress_original_seq_len,
                beta_fast=options.compress_beta_fast,
                beta_slow=options.compress_beta_slow,
            )
        main = {
            "rope_type": "default",
            "rope_theta": options.rope_theta or config.rope_theta,
            "partial_rotary_factor": factor,
        }
        return {
            "num_key_value_heads": 1,
            "head_dim": options.head_dim,
            "q_lora_rank": options.q_lora_rank,
            "sliding_window": options.sliding_window,
            "partial_rotary_factor": factor,
            "compress_rates": {
                "compressed_sparse_attention": options.compress_rate_csa,
                "heavily_compressed_attention": options.compress_rate_hca,
            },
            "index_n_heads": options.index_n_heads,
            "index_head_dim": options.index_head_dim,
            "index_topk": options.index_topk,
            "o_groups": options.o_groups,
            "o_lora_rank": options.o_lora_rank,
            "rope_theta": main["rope_theta"],
            "compress_rope_theta": options.compress_rope_theta,
            "rope_parameters": {"main": main, "compress": compress},
            "attention_bias": False,
        }

    @classmethod
    def options_from_hf(cls, family: str, hf: dict[str, Any]) -> dict[str, Any]:
        """The shared options; ``layer_type`` per layer comes from ``hf["layer_types"]`` (the family)."""
        head_dim = int(hf["head_dim"])
        rates = hf.get("compress_rates") or {}
        options: dict[str, Any] = {
            "head_dim": head_dim,
            "q_lora_rank": hf["q_lora_rank"],
            "sliding_window": hf["sliding_window"],
            "rope_head_dim": _rope_head_dim(hf, head_dim),
            "compress_rate_csa": rates.get("compressed_sparse_attention", 4),
            "compress_rate_hca": rates.get("heavily_compressed_attention", 128),
            "index_n_heads": hf["index_n_heads"],
            "index_head_dim": hf["index_head_dim"],
            "index_topk": hf["index_topk"],
            "o_groups": hf["o_groups"],
            "o_lora_rank": hf["o_lora_rank"],
        }
        options.update(_rope_options_from_hf(hf))
        return options

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        cache, docs_BT, positions_T = ctx.cache, ctx.document_ids_BT, ctx.positions_T
        if cache is not None:
            if docs_BT is not None:
                raise ValueError("packed documents (document_ids_BT) cannot be decoded with a cache")
            assert isinstance(cache, V4Cache), f"v4 attention got a {type(cache).__name__}, not its own V4Cache"
            start, _ = cache.reserve(T)
        inv_freq_P = self.rope_setting.inv_freq_P(self.rope_head_dim, x_BTD.device)
        cos_TP, sin_TP = rope_cos_sin_P(positions_T, inv_freq_P)
        q_latent_BTQ = self.q_a_norm(self.q_a_proj(x_BTD))
        if self.recompute_queries and torch.is_grad_enabled():
            q_BTHd = checkpoint(self._queries, q_latent_BTQ, cos_TP, sin_TP, use_reentrant=False)
        else:
            q_BTHd = self._queries(q_latent_BTQ, cos_TP, sin_TP)
        kv_BTd = apply_rope_tail(self.kv_norm(self.kv_proj(x_BTD)), cos_TP, sin_TP)
        if cache is None:
            keys_BSd, key_positions_S = kv_BTd, positions_T
        else:
            keys_BSd, key_positions_S = cache.slide(kv_BTd, start)
        far_BNd, far_BTN = self._compressed(x_BTD, q_latent_BTQ, cos_TP, sin_TP, inv_freq_P, ctx)
        o_BTHd = self._attend_blocks(q_BTHd, keys_BSd, key_positions_S, far_BNd, far_BTN, ctx)
        # the value was the rotated key: turn its rope channels back by the query's own position
        o_BTHd = apply_rope_tail(o_BTHd, cos_TP[:, None], -sin_TP[:, None])
        grouped_BTGO = self.o_a_proj(o_BTHd.reshape(B, T, self.o_a_proj.groups, -1))
        return self.o_b_proj(grouped_BTGO.flatten(2))

    def _queries(self, q_latent_BTQ: torch.Tensor, cos_TP: torch.Tensor, sin_TP: torch.Tensor) -> torch.Tensor:
        B, T, _ = q_latent_BTQ.shape
        q_BTHd = self.q_b_proj(q_latent_BTQ).view(B, T, self.n_heads, self.head_dim)
        q_BTHd = F.rms_norm(q_BTHd.float(), (self.head_dim,), None, self.eps).to(q_BTHd.dtype)  # no scale
        return apply_rope_tail(q_BTHd, cos_TP[:, None], sin_TP[:, None])

    def _attend_blocks(
        self,
        q_BTHd: torch.Tensor,
        keys_BSd: torch.Tensor,
        key_positions_S: torch.Tensor,
        far_BNd: torch.Tensor | None,
        far_BTN: torch.Tensor | None,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        """The attention output [B, T, H, d], block of queries after block (see ``_query_blocks``)."""
        positions_T, docs_BT = ctx.positions_T, ctx.document_ids_BT
        blocks = []
        for a, b, lo, hi in self._query_blocks(q_BTHd.shape[1], keys_BSd.shape[1], chunked=ctx.cache is None):
            docs = None if docs_BT is None else (docs_BT[:, a:b], docs_BT[:, lo:hi])
            near_BtS = self._window_mask(positions_T[a:b], key_positions_S[lo:hi], docs)
            far_BtN = None if far_BTN is None else far_BTN[:, a:b]
            blocks.append(self._attend(q_BTHd[:, a:b], keys_BSd[:, lo:hi], near_BtS, far_BNd, far_BtN))
        return torch.cat(blocks, dim=1)

    def _query_blocks(self, T: int, S: int, chunked: bool) -> list[tuple[int, int, int, int]]:
        """(first query, end, first key, end) per block of queries. Training (``chunked``: the keys
        are the T tokens themselves) cuts the queries into blocks of ``query_block``, each reading
        only the keys of its window, so the logits hold T·(block + window + entries) values instead
        of T·(T + entries). Decoding: one block over every kept key."""
        if not chunked or T <= self.query_block:
            return [(0, T, 0, S)]
        C = self.query_block
        return [(a, min(a + C, T), max(0, a - self.window + 1), min(a + C, T)) for a in range(0, T, C)]

    def _window_mask(
        self, positions_T: torch.Tensor, key_positions_S: torch.Tensor, docs: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """[B or 1, T, S]: keys at most ``window - 1`` positions back, never ahead, same document
        (``docs``: the queries' and the keys' document ids)."""
        gap_TS = positions_T[:, None] - key_positions_S[None, :]
        near_1TS = ((gap_TS >= 0) & (gap_TS < self.window))[None]
        if docs is None:
            return near_1TS
        query_docs_BT, key_docs_BS = docs
        return near_1TS & (query_docs_BT[:, :, None] == key_docs_BS[:, None, :])

    def _compressed(
        self,
        x_BTD: torch.Tensor,
        q_latent_BTQ: torch.Tensor,
        cos_TP: torch.Tensor,
        sin_TP: torch.Tensor,
        inv_freq_P: torch.Tensor,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The compressed entries [B, N, d] and which of them each query reads [B, T, N]."""
        if self.compressor is None:
            return None, None
        cache, positions_T = ctx.cache, ctx.positions_T
        # entry positions count from the first token without a cache (training), from 0 with one
        origin = positions_T[:1] * 0 if cache is not None else positions_T[:1]
        entries_BNd = self.compressor.entries(x_BTD, inv_freq_P, None if cache is None else cache.compressor, origin)
        readable_BTN = self._readable(entries_BNd.shape[1], positions_T - origin, x_BTD.shape[0], ctx.document_ids_BT)
        if self.indexer is not None:
            readable_BTN = self.indexer.select(
                x_BTD,
                q_latent_BTQ,
                cos_TP,
                sin_TP,
                readable_BTN,
                inv_freq_P,
                None if cache is None else cache.indexer,
                origin,
            )
        return entries_BNd, readable_BTN

    def _readable(self, N: int, offsets_T: torch.Tensor, B: int, docs_BT: torch.Tensor | None) -> torch.Tensor:
        """Entry w is readable at offset t once its window is complete, ``(w+1)·m <= t+1``, and (packed
        documents) when its first source token lies in the query's document."""
        assert self.compressor is not None
        m = self.compressor.rate
        w_N = torch.arange(N, device=offsets_T.device)
        readable_BTN = ((w_N[None, :] + 1) * m <= offsets_T[:, None] + 1)[None].expand(B, -1, -1)
        if docs_BT is None or N == 0:
            return readable_BTN
        back = m if self.compressor.overlap else 0  # CSA entry w also pools window w-1
        first_N = (w_N * m - back).clamp(min=0)
        source_docs_BN = docs_BT[:, first_N]
        return readable_BTN & (docs_BT[:, :, None] == source_docs_BN[:, None, :])

    def _attend(
        self,
        q_BTHd: torch.Tensor,
        keys_BSd: torch.Tensor,
        near_BTS: torch.Tensor,
        far_BNd: torch.Tensor | None,
        far_BTN: torch.Tensor | None,
    ) -> torch.Tensor:
        """One softmax over window keys, readable entries and the sink; the key is also the value."""
        scale = self.head_dim**-0.5
        logits = [
            torch.einsum("bthd,bsd->bhts", q_BTHd, keys_BSd)
            .float()
            .mul(scale)
            .masked_fill(~near_BTS[:, None], float("-inf"))
        ]
        values = [keys_BSd]
        if far_BNd is not None and far_BTN is not None:
            logits.append(
                torch.einsum("bthd,bnd->bhtn", q_BTHd, far_BNd)
                .float()
                .mul(scale)
                .masked_fill(~far_BTN[:, None], float("-inf"))
            )
            values.append(far_BNd)
        B, T, H, _ = q_BTHd.shape
        width = sum(part.shape[-1] for part in logits)
        if self.sinks is not None:
            logits.append(self.sinks.float().view(1, H, 1, 1).expand(B, H, T, 1))
        probs_BHTK = torch.cat(logits, dim=-1).softmax(dim=-1)[..., :width].to(q_BTHd.dtype)
        return torch.einsum("bhtk,bkd->bthd", probs_BHTK, torch.cat(values, dim=1))


def _flop_terms(config: ModelConfig, options: PluginOptions, seq_len: int) -> tuple[int, int]:
    """Forward FLOPs of one causal sequence: (the attention over window keys and entries, CSA's
    indexer scoring every completed entry)."""
    assert isinstance(options, V4AttentionOptions)
    m = options.compress_rate()
    attended_pairs = causal_pair_count(seq_len, cap=options.sliding_window)
    index_flops = 0
    if m is not None:
        csa = options.layer_type == "compressed_sparse_attention"
        attended_pairs += causal_pair_count(seq_len, stride=m, cap=options.index_topk if csa else None)
        if csa:
            index_flops = (
                2 * causal_pair_count(seq_len, stride=m) * options.index_n_heads * (options.index_head_dim + 1)
            )
    return 2 * attended_pairs * config.n_heads * 2 * options.head_dim, index_flops


def _rope_head_dim(hf: dict[str, Any], head_dim: int) -> int:
    if hf.get("qk_rope_head_dim"):
        return int(hf["qk_rope_head_dim"])
    factor = hf.get("partial_rotary_factor") or 64 / 512
    return int(head_dim * factor)


def _rope_options_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    params = hf.get("rope_parameters") or {}
    main = params.get("main") if isinstance(params.get("main"), dict) else {}
    compress = params.get("compress") if isinstance(params.get("compress"), dict) else {}
    options: dict[str, Any] = {
        "rope_theta": float(main.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "compress_rope_theta": float(compress.get("rope_theta", hf.get("compress_rope_theta", 160000.0))),
    }
    if compress.get("rope_type") == "yarn":
        options.update(
            compress_rope_factor=float(compress["factor"]),
            compress_original_seq_len=int(compress["original_max_position_embeddings"]),
            compress_beta_fast=float(compress.get("beta_fast") or 32.0),
            compress_beta_slow=float(compress.get("beta_slow") or 1.0),
        )
    return options
