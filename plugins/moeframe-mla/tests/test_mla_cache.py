"""Attention ``mla``: the moeframe attention contract, the absorbed latent cache against the
training path, and the cache's size (measured on its tensors against hand-computed figures)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moeframe.config import ModelConfig, resolve_model_config
from moeframe.model.decoder import build_decoder, kv_cache_bytes_per_token
from moeframe.testing import check_attention_contract, check_cache_nbytes, tiny_config
from moeframe_mla import (
    LatentCache,
    MultiHeadLatentAttention,
    kv_cache_values_per_token,
    per_head_kv_values_per_token,
)
from moeframe_mla import (
    kv_cache_bytes_per_token as mla_cache_bytes_per_token,
)

TINY_MLA: dict[str, Any] = dict(
    name="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6
)
V3_MLA: dict[str, Any] = dict(
    name="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128
)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"q_lora_rank": None},
        {"rope_factor": 4.0, "original_seq_len": 16},
        {"decode": "expanded", "rope_interleave": False},
    ],
    ids=["q-lora", "no-q-lora", "yarn", "expanded-rotate-half"],
)
def test_attention_contract(changes: dict[str, Any]) -> None:
    check_attention_contract(tiny_config(attention={**TINY_MLA, **changes}))


def _module(decode: str) -> MultiHeadLatentAttention:
    cfg = tiny_config(attention={**TINY_MLA, "decode": decode, "rope_factor": 2.0, "original_seq_len": 8})
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(cfg, resolve_model_config(cfg).attention.options, 0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return attn.eval()


@pytest.mark.parametrize("decode", ["absorbed", "expanded"])
def test_incremental_decoding_equals_the_training_path(decode: str) -> None:
    """A whole sequence, token by token through the cache, gives the training-path output."""
    attn = _module(decode)
    B, T = 2, 15
    x = torch.randn(B, T, 32)
    cache = attn.new_cache(B, T, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        full = attn(x, torch.arange(T))
        steps = [attn(x[:, t : t + 1], torch.tensor([t]), cache=cache) for t in range(T)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5
    assert cache.length == T


def test_absorbed_prefill_then_steps_and_the_cache_content() -> None:
    """A prefill of several tokens into a non-empty cache is masked causally, and the cache holds
    exactly RMSNorm(c_kv) and the rotated k_pe of each token."""
    attn = _module("absorbed")
    x = torch.randn(1, 10, 32)
    cache = attn.new_cache(1, 10, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        full = attn(x, torch.arange(10))
        parts = [
            attn(x[:, :3], torch.arange(3), cache=cache),
            attn(x[:, 3:7], torch.arange(3, 7), cache=cache),
            attn(x[:, 7:], torch.arange(7, 10), cache=cache),
        ]
        c_kv, k_pe = attn._latent(x, *attn._rope(torch.arange(10)))
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5
    assert isinstance(cache, LatentCache) and cache.latent_BSL.shape == (1, 10, 16 + 4)
    torch.testing.assert_close(cache.latent_BSL, torch.cat((c_kv, k_pe), dim=-1), rtol=0, atol=1e-6)
    # the cached latent is normalised: RMS 1 before the (random) norm scale
    rms = (cache.latent_BSL[..., :16] / attn.kv_norm.weight).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-4, atol=1e-4)


def test_cache_bytes_match_the_hand_count() -> None:
    # 2 layers x batch 2 x 9 tokens x (kv_lora 16 + rope 4) values x 2 bytes (bf16)
    assert check_cache_nbytes(tiny_config(attention=TINY_MLA), num_tokens=9, batch_size=2) == 2 * 2 * 9 * 20 * 2
    # core mha of the same model: 2 x (4 heads x 8) values per token
    assert check_cache_nbytes(tiny_config(), num_tokens=9, batch_size=2) == 2 * 2 * 9 * 64 * 2


def test_v3_cache_is_576_values_instead_of_40960() -> None:
    cfg = ModelConfig(
        vocab_size=129280,
        dim=7168,
        n_layers=61,
        first_k_dense=3,
        n_heads=128,
        attention=V3_MLA,
        n_routed_experts=256,
        n_activated_experts=8,
        n_expert_groups=8,
        n_limited_groups=4,
    )
    assert kv_cache_values_per_token(cfg) == 512 + 64 == 576
    assert per_head_kv_values_per_token(cfg) == 128 * (128 + 64 + 128) == 40_960
    assert mla_cache_bytes_per_token(cfg) == kv_cache_bytes_per_token(cfg) == 61 * 576 * 2  # bf16, all layers
    v3 = build_decoder(cfg, device="meta")  # the class method agrees with the built module
    assert v3.layers[0].attn.kv_cache_values_per_token(cfg, resolve_model_config(cfg).attention.options) == 576


def test_bf16_absorbed_decoding_stays_close_to_fp32() -> None:
    """The cache takes the model's dtype; bf16 decoding differs from fp32 by bf16 rounding only."""
    cfg = tiny_config(attention=TINY_MLA)
    torch.manual_seed(0)
    decoder = build_decoder(cfg).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)  # logits of order 1, so the tolerance below means something
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        full = decoder(ids).logits
        decoder = decoder.to(torch.bfloat16)
        cache = decoder.new_cache(1, 12)
        assert cache.layers[0].latent_BSL.dtype == torch.bfloat16
        steps = torch.cat([decoder(ids[:, t : t + 1], cache=cache).logits for t in range(12)], dim=1)
    assert steps.dtype == torch.bfloat16 and full.abs().max() > 0.5
    torch.testing.assert_close(steps.float(), full, rtol=0, atol=0.05)
