"""Attention ``dsa`` declares its attention FLOPs: the indexer over every visible token, MLA over
the top-k only. Expected figures are counted by hand, position by position, from the definition."""

from __future__ import annotations

from typing import Any

import pytest

from moeframe.plugin import resolve_model_config
from moeframe.testing import tiny_config
from moeframe_dsa import DeepSeekSparseAttention

H, NOPE, ROPE, V, G, I, K = 4, 8, 4, 6, 4, 8, 5  # heads, MLA dims, indexer heads and width, top-k
DSA: dict[str, Any] = dict(
    name="dsa",
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=NOPE,
    qk_rope_head_dim=ROPE,
    v_head_dim=V,
    index_n_heads=G,
    index_head_dim=I,
    index_topk=K,
)


def hand_count(T: int, topk: int | None) -> tuple[float, float]:
    """(forward, backward) FLOPs per token. Forward, at position t: the indexer scores t + 1 tokens
    (G dot products of width I, then a G-term weighted sum); MLA scores and sums min(topk, t + 1)
    keys per head. Backward: twice the forward of MLA and of the indexer over those attended keys."""
    forward = backward = 0
    for t in range(T):
        attended = t + 1 if topk is None else min(topk, t + 1)
        forward += 2 * (t + 1) * G * (I + 1) + 2 * attended * H * ((NOPE + ROPE) + V)
        backward += 2 * 2 * attended * (G * (I + 1) + H * ((NOPE + ROPE) + V))
    return forward / T, backward / T


def declared(mode: str, T: int) -> tuple[float, float]:
    plan = resolve_model_config(tiny_config(n_heads=H, attention={**DSA, "mode": mode}))
    args = (plan.config, plan.attention.options, T)
    return (
        DeepSeekSparseAttention.attention_flops_per_token(*args),
        DeepSeekSparseAttention.attention_backward_flops_per_token(*args),
    )


@pytest.mark.parametrize("T", [3, 5, 40])  # below, at and well past the top-k
def test_sparse_counts_indexer_over_context_and_attention_over_topk(T: int) -> None:
    assert declared("sparse", T) == pytest.approx(hand_count(T, K), rel=1e-12)


def test_dense_warmup_attends_to_every_token() -> None:
    forward, backward = declared("dense_warmup", 40)
    assert (forward, backward) == pytest.approx(hand_count(40, None), rel=1e-12)
    assert backward == pytest.approx(2 * forward, rel=1e-12)  # everything learns in the warm-up
    assert sum(declared("sparse", 40)) < forward + backward
