"""Attention ``v4`` declares its attention FLOPs per layer type: the window, the compressed entries
completed so far, and CSA's indexer. Expected figures are counted by hand, position by position."""

from __future__ import annotations

import pytest

from moeframe.plugin import resolve_model_config
from moeframe.testing import tiny_config
from moeframe_v4.attention import LAYER_TYPES, V4Attention

H, D, WINDOW, CSA_RATE, HCA_RATE, G, I, TOPK = 4, 16, 8, 4, 16, 4, 8, 3
T = 100  # past the window, with more completed CSA entries (25) than the top-k


def hand_count(layer_type: str) -> tuple[float, float]:
    """(forward, backward) FLOPs per token. Each key or entry read costs a score and a value product
    of width D per head (the key is the value), backward twice that; CSA's indexer scores every
    completed entry (G dot products of width I, then a G-term weighted sum) and the attention reads
    TOPK of them; the indexer only selects, so it has no backward."""
    forward = backward = 0
    for t in range(T):
        read = min(WINDOW, t + 1)
        if layer_type == "heavily_compressed_attention":
            read += (t + 1) // HCA_RATE
        if layer_type == "compressed_sparse_attention":
            entries = (t + 1) // CSA_RATE
            read += min(TOPK, entries)
            forward += 2 * entries * G * (I + 1)
        forward += 2 * read * H * 2 * D
        backward += 2 * 2 * read * H * 2 * D
    return forward / T, backward / T


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_declared_flops_match_hand_count(layer_type: str) -> None:
    attention = dict(
        name="v4",
        layer_type=layer_type,
        head_dim=D,
        rope_head_dim=8,
        q_lora_rank=16,
        sliding_window=WINDOW,
        compress_rate_csa=CSA_RATE,
        compress_rate_hca=HCA_RATE,
        index_n_heads=G,
        index_head_dim=I,
        index_topk=TOPK,
        o_groups=2,
        o_lora_rank=16,
    )
    plan = resolve_model_config(tiny_config(n_heads=H, max_seq_len=128, attention=attention))
    args = (plan.config, plan.attention.options, T)
    declared = V4Attention.attention_flops_per_token(*args), V4Attention.attention_backward_flops_per_token(*args)
    assert declared == pytest.approx(hand_count(layer_type), rel=1e-12)
    assert declared[0] < 2 * H * 2 * D * T / 2  # far less than full causal attention at this length
