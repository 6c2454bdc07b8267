"""Multi-head Latent Attention (MLA), the attention of DeepSeek-V2/V3, registered as attention ``mla``.

Why MLA. Generating text is bound by memory traffic, not arithmetic: every new token reads the
whole KV cache. Plain multi-head attention caches H·(d_k + d_v) values per token and layer:
128·(192 + 128) = 40,960 for DeepSeek-V3. MLA instead projects the token down to one small latent
``c_kv`` (``kv_lora_rank`` = 512 values) from which a per-head up-projection (``wkv_b``) recovers
every head's key and value. Queries go through a low-rank bottleneck too (``q_lora_rank``), which
saves activation memory in training (V2-Lite has none: a plain query projection).

Why decoupled RoPE. RoPE rotates keys by their position. Applied to the expanded key
``W_uk·c_kv``, the rotation would sit between the query and ``W_uk`` and forbid the folding
below. So position lives in a separate small slice: a rotated ``q_pe`` per head and ONE rotated
``k_pe`` shared by all heads (``qk_rope_head_dim`` = 64), concatenated to the position-free part:
``score = q_nope·k_nope + q_pe·k_pe``.

Why absorption. ``q_nope·(W_uk c) = (W_ukᵀ q_nope)·c``: fold ``W_uk`` into the query and score it
directly against the cached latent. Likewise ``Σ_s p_s·(W_uv c_s) = W_uv (Σ_s p_s c_s)``: average
the latents and expand once per query. The cache then holds only ``RMSNorm(c_kv)`` and the rotated
``k_pe``: 512 + 64 = 576 values per token and layer for V3 (71× less), and a decode step is one
attention with a single shared key "head" of width 576. Training does not absorb: when T queries
meet T keys at once, per-head keys of width 192 are cheaper than scoring over a 576-wide latent.

Paths of ``forward``:
- no cache (training, evaluation): expand per-head keys and values, then
  ``scaled_dot_product_attention``, causal or with the packed-document mask;
- with a cache (generation): ``decode: absorbed`` (default) as above; ``decode: expanded`` keeps
  the same latent cache but re-expands keys and values of every cached token at each step (what HF
  transformers does; the benchmark's point of comparison).

Checkpoint names (the official DeepSeek reference's, kept 1:1 → HF transformers ``self_attn.*``):
``wq_a`` → ``q_a_proj``, ``q_norm`` → ``q_a_layernorm``, ``wq_b`` → ``q_b_proj``, ``wq`` →
``q_proj`` (no q_lora), ``wkv_a`` → ``kv_a_proj_with_mqa``, ``kv_norm`` → ``kv_a_layernorm``,
``wkv_b`` → ``kv_b_proj``, ``wo`` → ``o_proj`` (see ``HF_PARAM_NAMES``). The two inner norms are
RMSNorm (``moeframe.model.norm.RMSNorm`` with ``model.norm_eps``) as in every released checkpoint.

Shapes: B batch, T new tokens, S cached tokens (incl. the new ones), D model width, H heads,
Q q_lora_rank, C kv_lora_rank, d qk_nope_head_dim, R qk_rope_head_dim, v v_head_dim,
L = C + R (a cached latent row), N = T·H query rows of the absorbed attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moeframe.plugin import (
    AttentionBase,
    AttentionCache,
    ForwardContext,
    PluginOptions,
    RMSNorm,
    as_context,
    cached_causal_mask,
    document_mask,
    parse_options,
)
from moeframe_mla.rope import (
    YaRN,
    hf_rope_parameters,
    rope_cos_sin,
    rope_inv_freq,
    rotate,
    yarn_cos_sin_scale,
    yarn_mscale,
)

if TYPE_CHECKING:
    from moeframe.plugin import ModelConfig

__all__ = [
    "HF_PARAM_NAMES",
    "LatentCache",
    "MLAOptions",
    "MultiHeadLatentAttention",
    "kv_cache_bytes_per_token",
    "kv_cache_values_per_token",
    "per_head_kv_values_per_token",
    "softmax_scale",
]

# our parameter name -> HF transformers' DeepseekV3Attention name (the converter maps 1:1)
HF_PARAM_NAMES: dict[str, str] = {
    "wq_a": "q_a_proj",
    "q_norm": "q_a_layernorm",
    "wq_b": "q_b_proj",
    "wq": "q_proj",
    "wkv_a": "kv_a_proj_with_mqa",
    "kv_norm": "kv_a_layernorm",
    "wkv_b": "kv_b_proj",
    "wo": "o_proj",
}


@dataclass
class MLAOptions(PluginOptions):
    """MLA dimensions (defaults: DeepSeek-V3) and RoPE/YaRN settings.

    ``q_lora_rank``: null for a plain query projection (V2-Lite). ``rope_theta``: null uses
    ``model.rope_theta``. YaRN is on when ``rope_factor`` > 1 and then needs ``original_seq_len``
    (HF: ``rope_scaling.factor``, ``original_max_position_embeddings``). ``rope_interleave``:
    adjacent-pair rotation as in the official weights (false: rotate-half). ``decode``: how the
    generation path attends over the cache (both cache the same 576 values).
    """

    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float | None = None
    rope_factor: float = 1.0
    original_seq_len: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    rope_interleave: bool = True
    decode: Literal["absorbed", "expanded"] = "absorbed"

    def validate(self, config: ModelConfig) -> None:
        _require(
            self.q_lora_rank is None or self.q_lora_rank > 0,
            f"q_lora_rank={self.q_lora_rank} must be > 0, or null for a plain query projection",
        )
        _require(self.kv_lora_rank > 0, f"kv_lora_rank={self.kv_lora_rank} must be > 0 (the latent width)")
        _require(
            self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
            f"qk_rope_head_dim={self.qk_rope_head_dim} must be a positive even number (RoPE rotates channel pairs)",
        )
        _require(
            self.qk_nope_head_dim > 0,
            f"qk_nope_head_dim={self.qk_nope_head_dim} must be > 0: the rope part "
            f"(qk_rope_head_dim={self.qk_rope_head_dim}) must be smaller than the query/key head "
            f"dim qk_nope_head_dim + qk_rope_head_dim = {self.qk_nope_head_dim + self.qk_rope_head_dim}",
        )
        _require(self.v_head_dim > 0, f"v_head_dim={self.v_head_dim} must be > 0")
        _require(self.rope_theta is None or self.rope_theta > 0, f"rope_theta={self.rope_theta} must be > 0")
        self._validate_yarn(config)

    def _validate_yarn(self, config: ModelConfig) -> None:
        _require(
            self.rope_factor >= 1, f"rope_factor={self.rope_factor} must be >= 1 (1 = no YaRN; >1 extends the context)"
        )
        if self.rope_factor == 1:
            return
        _require(
            self.original_seq_len is not None and self.original_seq_len > 0,
            f"rope_factor={self.rope_factor} needs original_seq_len (the training context "
            f"length YaRN extends, e.g. 4096 for DeepSeek-V3), got {self.original_seq_len}",
        )
        _require(
            self.beta_fast > self.beta_slow > 0,
            f"YaRN needs beta_fast > beta_slow > 0, got beta_fast={self.beta_fast}, beta_slow={self.beta_slow}",
        )
        _require(
            self.mscale >= 0 and self.mscale_all_dim >= 0,
            f"mscale={self.mscale} and mscale_all_dim={self.mscale_all_dim} must be >= 0",
        )

    def yarn(self) -> YaRN | None:
        if self.rope_factor == 1:
            return None
        assert self.original_seq_len is not None  # validate() guarantees it
        return YaRN(
            self.rope_factor, self.original_seq_len, self.beta_fast, self.beta_slow, self.mscale, self.mscale_all_dim
        )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def softmax_scale(options: MLAOptions) -> float:
    """``(d + R)^-0.5``, times ``mscale(mscale_all_dim)²`` under YaRN (0.135234 for V3 at 40×)."""
    scale = (options.qk_nope_head_dim + options.qk_rope_head_dim) ** -0.5
    if options.rope_factor > 1 and options.mscale_all_dim:
        scale *= yarn_mscale(options.rope_factor, options.mscale_all_dim) ** 2
    return scale


class LatentCache(AttentionCache):
    """Per token one row of L = C + R values: ``RMSNorm(c_kv)`` then the rotated ``k_pe``.

    One row per token (not two tensors) so that the absorbed attention uses a row as its key and
    the row's first C values as its value, both views: no copy of the cache per step.
    """

    def __init__(
        self, batch_size: int, kv_lora_rank: int, rope_dim: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__(batch_size, max_len)
        self.kv_lora_rank = kv_lora_rank
        self.latent_BSL = torch.zeros(batch_size, max_len, kv_lora_rank + rope_dim, device=device, dtype=dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.latent_BSL]

    def append(self, c_kv_BTC: torch.Tensor, k_pe_BTR: torch.Tensor) -> torch.Tensor:
        """Store the new tokens; return the view of every cached row [B, S, L]."""
        start, end = self.reserve(c_kv_BTC.shape[1])
        self.latent_BSL[:, start:end, : self.kv_lora_rank] = c_kv_BTC
        self.latent_BSL[:, start:end, self.kv_lora_rank :] = k_pe_BTR
        return self.latent_BSL[:, :end]


class MultiHeadLatentAttention(AttentionBase):
    """MLA with the parameter names of DeepSeek's reference code (see the module docstring)."""

    Options = MLAOptions
    plugin_api = "2"  # the moeframe plugin API this class is written against

    def __init__(self, config: ModelConfig, options: MLAOptions, layer_id: int) -> None:
        super().__init__(config, options, layer_id)
        self.n_heads = config.n_heads
        self.q_lora_rank = options.q_lora_rank
        self.kv_lora_rank = options.kv_lora_rank
        self.qk_nope_head_dim = options.qk_nope_head_dim
        self.qk_rope_head_dim = options.qk_rope_head_dim
        self.v_head_dim = options.v_head_dim
        self.qk_head_dim = options.qk_nope_head_dim + options.qk_rope_head_dim
        self.rope_theta = options.rope_theta or config.rope_theta
        self.yarn = options.yarn()
        self.rope_scale = yarn_cos_sin_scale(self.yarn)
        self.softmax_scale = softmax_scale(options)
        self.interleaved = options.rope_interleave
        self.decode = options.decode
        H = config.n_heads
        if options.q_lora_rank is None:
            self.wq = nn.Linear(config.dim, H * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(config.dim, options.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(options.q_lora_rank, config.norm_eps)
            self.wq_b = nn.Linear(options.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(config.dim, options.kv_lora_rank + options.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(options.kv_lora_rank, config.norm_eps)
        self.wkv_b = nn.Linear(options.kv_lora_rank, H * (options.qk_nope_head_dim + options.v_head_dim), bias=False)
        self.wo = nn.Linear(H * options.v_head_dim, config.dim, bias=False)
        # fast path (see _expand_kv); False runs the unpadded reference
        self.pad_values_for_flash = True
        # selective activation checkpointing (set_selective_recompute): recompute the query and
        # key/value up-projections (wq_b, wkv_b) in backward instead of keeping their per-head outputs
        self.recompute_up_projections = False

    def set_selective_recompute(self, enabled: bool) -> None:
        self.recompute_up_projections = enabled

    # -- cache contract -------------------------------------------------------------------------
    @classmethod
    def kv_cache_values_per_token(cls, config: ModelConfig, options: MLAOptions) -> int:
        return options.kv_lora_rank + options.qk_rope_head_dim

    def new_cache(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> LatentCache:
        return LatentCache(batch_size, self.kv_lora_rank, self.qk_rope_head_dim, max_len, device, dtype)

    # -- HF form (the checkpoint families read these; see moeframe.model.hfnames) ---------------
    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        return {f"{ours}.weight": f"{theirs}.weight" for ours, theirs in HF_PARAM_NAMES.items()}

    @classmethod
    def hf_config(cls, family: str, config: ModelConfig, options: PluginOptions) -> dict[str, Any]:
        assert isinstance(options, MLAOptions)
        rope: dict[str, Any] = {"rope_theta": options.rope_theta or config.rope_theta, "rope_type": "default"}
        if options.rope_factor != 1.0:
            rope.update(
                rope_type="yarn",
                factor=options.rope_factor,
                original_max_position_embeddings=options.original_seq_len,
                beta_fast=options.beta_fast,
                beta_slow=options.beta_slow,
                mscale=options.mscale,
                mscale_all_dim=options.mscale_all_dim,
            )
        return {
            "num_key_value_heads": config.n_heads,
            "kv_lora_rank": options.kv_lora_rank,
            "q_lora_rank": options.q_lora_rank,
            "qk_rope_head_dim": options.qk_rope_head_dim,
            "v_head_dim": options.v_head_dim,
            "qk_nope_head_dim": options.qk_nope_head_dim,
            "rope_parameters": rope,
            "rope_interleave": options.rope_interleave,
            "attention_bias": False,
        }

    @classmethod
    def options_from_hf(cls, family: str, hf: dict[str, Any]) -> dict[str, Any]:
        options: dict[str, Any] = {
            "q_lora_rank": hf.get("q_lora_rank"),
            "kv_lora_rank": hf["kv_lora_rank"],
            "qk_nope_head_dim": hf["qk_nope_head_dim"],
            "qk_rope_head_dim": hf["qk_rope_head_dim"],
            "v_head_dim": hf["v_head_dim"],
            "rope_interleave": bool(hf.get("rope_interleave", True)),
        }
        _, scaling = hf_rope_parameters(hf)
        if scaling and scaling.get("rope_type", scaling.get("type")) == "yarn":
            options.update(
                rope_factor=float(scaling["factor"]), original_seq_len=int(scaling["original_max_position_embeddings"])
            )
            options.update(
                {
                    k: float(scaling[k])
                    for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")
                    if scaling.get(k) is not None
                }
            )
        return options

    # -- projections ----------------------------------------------------------------------------
    def _rope(self, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq_P = rope_inv_freq(self.qk_rope_head_dim, self.rope_theta, self.yarn, positions_T.device)
        return rope_cos_sin(positions_T, inv_freq_P, self.rope_scale)

    def _query(
        self, x_BTD: torch.Tensor, cos_TP: torch.Tensor, sin_TP: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head position-free part q_nope [B,T,H,d] and rotated q_pe [B,T,H,R]."""
        B, T, _ = x_BTD.shape
        if self.q_lora_rank is None:
            q = self.wq(x_BTD)
        elif self.recompute_up_projections and torch.is_grad_enabled():
            # selective checkpointing keeps the q_lora_rank-wide latent, not the H·(d+R)-wide query
            q = checkpoint(self._query_up, self.wq_a(x_BTD), use_reentrant=False)
        else:
            q = self._query_up(self.wq_a(x_BTD))
        q_nope_BTHd, q_pe_BTHR = q.view(B, T, self.n_heads, self.qk_head_dim).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1
        )
        return q_nope_BTHd, rotate(q_pe_BTHR, cos_TP, sin_TP, self.interleaved)

    def _query_up(self, c_q_BTQ: torch.Tensor) -> torch.Tensor:
        return self.wq_b(self.q_norm(c_q_BTQ))

    def _latent(
        self, x_BTD: torch.Tensor, cos_TP: torch.Tensor, sin_TP: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised latent c_kv [B,T,C] and the shared rotated rope key k_pe [B,T,R]."""
        c_kv_BTC, k_pe_BTR = self.wkv_a(x_BTD).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe_BTR = rotate(k_pe_BTR[:, :, None], cos_TP, sin_TP, self.interleaved)[:, :, 0]
        return self.kv_norm(c_kv_BTC), k_pe_BTR

    # -- attention ------------------------------------------------------------------------------
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
        cos_TP, sin_TP = self._rope(ctx.positions_T)
        q_nope_BTHd, q_pe_BTHR = self._query(x_BTD, cos_TP, sin_TP)
        c_kv_BTC, k_pe_BTR = self._latent(x_BTD, cos_TP, sin_TP)
        if cache is None:
            mask = None if document_ids_BT is None else document_mask(document_ids_BT)
            o_BTHv = self._attend_expanded(q_nope_BTHd, q_pe_BTHR, c_kv_BTC, k_pe_BTR, mask, causal=mask is None)
        else:
            if document_ids_BT is not None:
                raise ValueError("packed documents (document_ids_BT) cannot be decoded with a cache")
            assert isinstance(cache, LatentCache), f"mla got a {type(cache).__name__}, not its own LatentCache"
            start = cache.length
            latent_BSL = cache.append(c_kv_BTC, k_pe_BTR)
            # a single new token sees every cached one: no mask needed
            mask_TS = None if T == 1 else cached_causal_mask(start, T, x_BTD.device)
            if self.decode == "absorbed":
                o_BTHv = self._attend_absorbed(q_nope_BTHd, q_pe_BTHR, latent_BSL, mask_TS)
            else:
                c_kv_BSC, k_pe_BSR = latent_BSL.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
                o_BTHv = self._attend_expanded(q_nope_BTHd, q_pe_BTHR, c_kv_BSC, k_pe_BSR, mask_TS, causal=False)
        return self.wo(o_BTHv.reshape(B, T, self.n_heads * self.v_head_dim))

    def _attend_expanded(
        self,
        q_nope_BTHd: torch.Tensor,
        q_pe_BTHR: torch.Tensor,
        c_kv_BSC: torch.Tensor,
        k_pe_BSR: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        """Per-head keys [k_nope, k_pe] and values from the latent, then SDPA. Returns [B,T,H,v]."""
        if self.recompute_up_projections and torch.is_grad_enabled():
            k_BSHK, v_BSHX = checkpoint(self._expand_kv, c_kv_BSC, k_pe_BSR, use_reentrant=False)
        else:
            k_BSHK, v_BSHX = self._expand_kv(c_kv_BSC, k_pe_BSR)
        q_BTHK = torch.cat((q_nope_BTHd, q_pe_BTHR), dim=-1)
        o_BHTX = F.scaled_dot_product_attention(
            q_BTHK.transpose(1, 2),
            k_BSHK.transpose(1, 2),
            v_BSHX.transpose(1, 2),
            attn_mask=mask,
            is_causal=causal,
            scale=self.softmax_scale,
        )
        return o_BHTX.transpose(1, 2)[..., : self.v_head_dim]

    def _expand_kv(self, c_kv_BSC: torch.Tensor, k_pe_BSR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys [B,S,H,d+R] and values [B,S,H,X] up-projected from the latent.

        X = v unless ``pad_values_for_flash``: then values are zero-padded to the key width d+R
        when narrower (V3: 128 -> 192). SDPA's flash kernels (CPU and CUDA) need one head width for
        queries, keys and values and otherwise fall back to the math kernel, which materialises
        the whole [T, S] score matrix, masked half included (2-4x slower here); the zero columns
        add nothing to the output, which is sliced back to v."""
        B, S, _ = c_kv_BSC.shape
        H = self.n_heads
        kv_BSHX = self.wkv_b(c_kv_BSC).view(B, S, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope_BSHd, v_BSHv = kv_BSHX.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_BSHK = torch.cat((k_nope_BSHd, k_pe_BSR[:, :, None].expand(-1, -1, H, -1)), dim=-1)
        if self.pad_values_for_flash and self.v_head_dim < self.qk_head_dim:
            v_BSHv = F.pad(v_BSHv, (0, self.qk_head_dim - self.v_head_dim))
        return k_BSHK, v_BSHv

    def _attend_absorbed(
        self, q_nope_BTHd: torch.Tensor, q_pe_BTHR: torch.Tensor, latent_BSL: torch.Tensor, mask_TS: torch.Tensor | None
    ) -> torch.Tensor:
        """Score the queries against the cached latent rows directly. Returns [B,T,H,v]."""
        B, T, H, _ = q_nope_BTHd.shape
        C = self.kv_lora_rank
        wkv_b_HXC = self.wkv_b.weight.view(H, self.qk_nope_head_dim + self.v_head_dim, C)
        w_uk_HdC, w_uv_HvC = wkv_b_HXC.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        # fold the key up-projection into the query: q_nope·(W_uk c) = (W_ukᵀ q_nope)·c
        q_lat_BTHC = torch.einsum("bthd,hdc->bthc", q_nope_BTHd, w_uk_HdC)
        q_BTHL = torch.cat((q_lat_BTHC, q_pe_BTHR), dim=-1)
        # every head shares the one latent key/value "head": stack the T·H query rows against it
        q_B1NL = q_BTHL.reshape(B, 1, T * H, C + self.qk_rope_head_dim)
        mask_NS = None if mask_TS is None else mask_TS.repeat_interleave(H, dim=0)
        o_B1NC = F.scaled_dot_product_attention(
            q_B1NL, latent_BSL[:, None], latent_BSL[:, None, :, :C], attn_mask=mask_NS, scale=self.softmax_scale
        )
        # fold the value up-projection after the weighted sum: Σ p·(W_uv c) = W_uv (Σ p·c)
        return torch.einsum("bthc,hvc->bthv", o_B1NC.view(B, T, H, C), w_uv_HvC)


def _options(config: ModelConfig) -> MLAOptions:
    """The validated MLA options of a model config whose attention is ``mla``."""
    spec = dict(config.attention)
    if spec.get("name") != "mla":
        raise ValueError(f"model.attention is {spec.get('name')!r}, not 'mla'")
    options = parse_options("attention", "mla", MLAOptions, {k: v for k, v in spec.items() if k != "name"})
    assert isinstance(options, MLAOptions)
    options.validate(config)
    return options


def kv_cache_values_per_token(config: ModelConfig) -> int:
    """Values the absorbed cache holds per token and layer: kv_lora_rank + qk_rope_head_dim."""
    return MultiHeadLatentAttention.kv_cache_values_per_token(config, _options(config))


def per_head_kv_values_per_token(config: ModelConfig) -> int:
    """What a plain per-head K/V cache of the same model would hold: H·(d + R + v) per token and layer."""
    o = _options(config)
    return config.n_heads * (o.qk_nope_head_dim + o.qk_rope_head_dim + o.v_head_dim)


def kv_cache_bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes the absorbed cache of the whole model (all layers) holds per token."""
    return config.n_layers * kv_cache_values_per_token(config) * dtype.itemsize
