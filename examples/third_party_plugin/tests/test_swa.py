"""Attention ``swa``: moeframe's attention contract (through the registry, as a run builds it),
the window against a naive reference, parity with ``mha`` when the window covers everything,
and the bounded cache."""

from __future__ import annotations

import math

import pytest
import torch

from moeframe.plugin import (
    ConfigError,
    ForwardContext,
    apply_rope,
    build_decoder,
    registry,
    resolve_model_config,
    rope_cos_sin,
)
from moeframe.testing import (
    check_attention_contract,
    check_cache_matches_full,
    check_greedy_generation_matches_recompute,
    tiny_config,
)
from moeframe_swa import SlidingWindowAttention


def swa_config(window: int, **attention):
    return tiny_config(attention={"name": "swa", "window": window, **attention})


def test_selected_by_name_through_the_entry_point() -> None:
    assert registry.load("attention", "swa") is SlidingWindowAttention
    assert registry.resolve("attention", "swa").distribution == "moeframe-swa"


def test_attention_contract() -> None:
    # a window longer than every test sequence: the full contract, cache size included
    check_attention_contract(swa_config(16, n_kv_heads=2))


def test_attention_contract_when_the_window_slides() -> None:
    # window 3 < sequence 12: the ring buffer wraps while decoding. The cache holds 3 tokens, not
    # 9, so the contract's per-token size check does not apply (see test_cache_stops_growing)
    config = swa_config(3, n_kv_heads=2)
    check_attention_contract(config, cache=False)
    check_cache_matches_full(config, seq_len=12, prefill=5)
    check_cache_matches_full(config, seq_len=12, prefill=1)
    check_greedy_generation_matches_recompute(config)


def naive_window_attention(q, k, v, window):
    """One query at a time, softmax over the keys inside its window: [H, T, d] each."""
    H, T, d = q.shape
    out = torch.zeros_like(q)
    for t in range(T):
        lo = max(0, t - window + 1)
        scores = q[:, t : t + 1] @ k[:, lo : t + 1].transpose(-1, -2) / math.sqrt(d)
        out[:, t] = (scores.softmax(-1) @ v[:, lo : t + 1])[:, 0]
    return out


def test_training_path_matches_a_naive_window() -> None:
    config = swa_config(4)
    torch.manual_seed(0)
    attn = SlidingWindowAttention(config, resolve_model_config(config).attention.options, 0)
    x = torch.randn(1, 10, config.dim)
    positions = torch.arange(10)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.2)
        q, k, v = (w(x).view(1, 10, 4, 8).transpose(1, 2)[0] for w in (attn.wq, attn.wk, attn.wv))
        cos, sin = rope_cos_sin(positions, 8, config.rope_theta, x.dtype)
        ref = naive_window_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, window=4)
        expected = attn.wo(ref.transpose(0, 1).reshape(1, 10, 32))
        torch.testing.assert_close(attn(x, ForwardContext(positions)), expected, rtol=1e-5, atol=1e-5)


def test_a_window_covering_the_sequence_is_exactly_mha() -> None:
    """Same parameter names as mha: an mha checkpoint loads, and gives the same logits."""
    torch.manual_seed(0)
    mha = build_decoder(tiny_config(attention={"name": "mha", "n_kv_heads": 2})).eval()
    swa = build_decoder(swa_config(32, n_kv_heads=2)).eval()
    swa.load_state_dict(mha.state_dict(), strict=True)
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(swa(ids).logits, mha(ids).logits, rtol=0, atol=1e-6)
        short = build_decoder(swa_config(5, n_kv_heads=2)).eval()
        short.load_state_dict(mha.state_dict())
        assert not torch.allclose(short(ids).logits[:, 5:], mha(ids).logits[:, 5:])  # the window bites


def test_cache_stops_growing_at_the_window() -> None:
    config = swa_config(4)
    decoder = build_decoder(config).eval()
    cache = decoder.new_cache(2, 40)
    per_token_bytes = 2 * 4 * 8 * 4  # K and V, 4 heads of 8, fp32
    with torch.no_grad():
        decoder(torch.randint(0, 64, (2, 3)), cache=cache)
        for _ in range(30):
            decoder(torch.randint(0, 64, (2, 1)), cache=cache)
    assert cache.length == 33
    assert cache.nbytes() == config.n_layers * 2 * 4 * per_token_bytes  # 4 tokens held, not 33


def test_bad_window_is_refused_at_config_time() -> None:
    with pytest.raises(ConfigError, match="window must be at least 1 token"):
        resolve_model_config(swa_config(0))
    with pytest.raises(ConfigError, match="has no option 'windw'"):
        resolve_model_config(tiny_config(attention={"name": "swa", "windw": 8}))


def test_attention_flops_count_the_window_only() -> None:
    """Per token over 20 positions with a window of 3: min(3, t + 1) keys, a score and a value
    product of head_dim per head each, counted by hand."""
    plan = resolve_model_config(swa_config(3, n_kv_heads=2))
    H, d = plan.config.n_heads, plan.config.head_dim
    by_hand = sum(2 * min(3, t + 1) * H * 2 * d for t in range(20)) / 20
    assert SlidingWindowAttention.attention_flops_per_token(plan.config, plan.attention.options, 20) == by_hand
