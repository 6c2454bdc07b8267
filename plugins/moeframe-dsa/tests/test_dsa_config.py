"""Attention ``dsa``: the attention contract, per-layer choice, cache size, and bad input at config time."""

from __future__ import annotations

from typing import Any

import pytest

from moeframe.plugin import ConfigError, ModelConfig, build_decoder, resolve_model_config
from moeframe.testing import check_attention_contract, check_cache_nbytes, tiny_config
from moeframe_dsa import DeepSeekSparseAttention

TINY_DSA: dict[str, Any] = dict(
    name="dsa",
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
    index_n_heads=4,
    index_head_dim=8,
    index_topk=5,
)


@pytest.mark.parametrize("changes", [{}, {"mode": "dense_warmup", "decode": "expanded"}], ids=["sparse", "warmup"])
def test_attention_contract(changes: dict[str, Any]) -> None:
    # 12-token sequences with k = 5: the contract's causality, masking and cache checks run sparse
    check_attention_contract(tiny_config(attention={**TINY_DSA, **changes}))


def test_per_layer_choice_and_cache_bytes() -> None:
    """DSA in the last layer only; its cache holds the index keys beside MLA's latent row."""
    mla = {k: v for k, v in TINY_DSA.items() if not k.startswith("index")} | {"name": "mla"}
    cfg = tiny_config(attention=mla, layers=[{"first": 1, "last": 1, "attention": TINY_DSA}])
    decoder = build_decoder(cfg)
    assert [type(b.attn).__name__ for b in decoder.layers] == ["MultiHeadLatentAttention", "DeepSeekSparseAttention"]
    # layer 0: 16 + 4 latent values; layer 1: 16 + 4 + 8 index-key values; 2 x 9 tokens, bf16
    assert check_cache_nbytes(tiny_config(attention=TINY_DSA), num_tokens=9, batch_size=2) == 2 * 2 * 9 * 28 * 2
    v32 = ModelConfig(
        dim=7168,
        n_heads=128,
        max_seq_len=163840,
        attention={
            "name": "dsa",
            "q_lora_rank": 1536,
            "kv_lora_rank": 512,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
        },
    )  # the V3.2-Exp release: 576 latent + 128 index-key values
    assert DeepSeekSparseAttention.kv_cache_values_per_token(v32, resolve_model_config(v32).attention.options) == 704


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"index_topk": 65}, "index_topk=65 must be in 1..max_seq_len=64"),
        ({"q_lora_rank": None}, "needs MLA with a query latent"),
        ({"kv_lora_rank": 0}, "kv_lora_rank=0 must be > 0"),
        ({"index_head_dim": 2}, "index_head_dim=2 must be >= qk_rope_head_dim=4"),
        ({"index_n_heads": 0}, "index_n_heads=0"),
        ({"mode": "warmup"}, "mode"),
    ],
    ids=[
        "topk-over-context",
        "no-query-latent",
        "no-latent",
        "rope-wider-than-index-head",
        "no-index-heads",
        "bad-mode",
    ],
)
def test_bad_options_fail_at_config_time(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises((ConfigError, ValueError)) as info:
        resolve_model_config(tiny_config(attention={**TINY_DSA, **changes}))
    message = str(info.value)
    assert fragment in message and "\n" not in message


@pytest.mark.bad_input
def test_the_command_line_says_it_in_one_line_with_status_2(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from moeframe.cli import main

    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump({"max_seq_len": 1024, "attention": {**TINY_DSA, "index_topk": 4096}}))
    assert main(["inspect", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "index_topk=4096 must be in 1..max_seq_len=1024" in err and len(err.splitlines()) == 1
