"""Attention ``dsa`` against transformers' DeepseekV32ForCausalLM, through the real HF import.

Each test builds a tiny random V3.2 model with transformers (nothing is downloaded), saves it with
``save_pretrained``, imports it with ``moeframe.convert.from_hf`` (the ``deepseek_v32`` family of
this package) and compares logits. Contexts longer than ``index_topk`` make the selection matter;
a control shows the logits then differ from dense attention by far more than the tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from moeframe.convert import from_hf
from moeframe.plugin import registry
from moeframe_dsa import DeepSeekSparseAttention

TINY: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    max_position_embeddings=64,
    num_nextn_predict_layers=0,
    n_group=1,
    topk_group=1,
    index_n_heads=8,
    index_head_dim=8,
    index_topk=6,
)


def _hf_v32(folder: Path, seed: int = 0, **changes: Any) -> transformers.DeepseekV32ForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV32Config(**{**TINY, **changes})
    cfg._attn_implementation = "eager"
    model = transformers.DeepseekV32ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".indexer." in name or "e_score_correction_bias" in name:
                p.normal_(0, 0.3)  # a trained indexer (and router bias): random, so a wrong layout shows
    model.save_pretrained(folder)
    return model


def test_registered_through_the_entry_points() -> None:
    assert registry.load("attention", "dsa") is DeepSeekSparseAttention
    assert registry.resolve("attention", "dsa").distribution == "moeframe-dsa"
    assert registry.resolve("hf_family", "deepseek_v32").distribution == "moeframe-dsa"


@pytest.mark.parametrize(
    "changes",
    [
        dict(),
        dict(index_topk=3, index_n_heads=4, index_head_dim=12),
        dict(
            index_topk=9,
            qk_rope_head_dim=8,
            index_head_dim=8,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        ),
    ],
    ids=["k6", "k3-wide-index-heads", "k9-yarn-rope-is-whole-index-head"],
)
def test_logits_match_transformers(tmp_path: Path, changes: dict[str, Any]) -> None:
    hf = _hf_v32(tmp_path / "hf", **changes)
    ours = from_hf(tmp_path / "hf", progress=False).eval()
    assert isinstance(ours.layers[0].attn, DeepSeekSparseAttention)
    ids = torch.randint(0, TINY["vocab_size"], (2, 24))  # 24 tokens > index_topk: the selection matters
    with torch.no_grad():
        ref = hf(ids).logits
        diff = (ref - ours(ids).logits).abs().max().item()
        for block in ours.layers:  # control: the same model with dense attention
            block.attn.index_topk = 10_000
        dense = (ref - ours(ids).logits).abs().max().item()
    assert diff <= 1e-4
    assert dense > 1e-2


def test_decoding_with_the_cache_equals_no_cache(tmp_path: Path) -> None:
    """Prefill then token by token through the indexed latent cache (index keys cached too)."""
    _hf_v32(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf", progress=False).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 20))
    with torch.no_grad():
        full = ours(ids).logits
        cache = ours.new_cache(2, 20)
        steps = [ours(ids[:, :7], cache=cache).logits] + [
            ours(ids[:, t : t + 1], cache=cache).logits for t in range(7, 20)
        ]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5
    assert cache.layers[0].length == 20 and cache.layers[0].index_keys_BSI.shape == (2, 20, TINY["index_head_dim"])


def test_warmup_target_is_the_dense_attention_summed_over_heads(tmp_path: Path) -> None:
    """The KL target against transformers' own per-head attention weights (dense: k >= context)."""
    hf = _hf_v32(tmp_path / "hf", index_topk=64)
    ours = from_hf(tmp_path / "hf", progress=False).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    seen: dict[str, Any] = {}
    ours.layers[1].attn.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], ctx=args[1]))
    with torch.no_grad():
        weights_BHTS = hf(ids, output_attentions=True).attentions[1]
        ours(ids)
        attn: DeepSeekSparseAttention = ours.layers[1].attn
        cos, sin = attn._rope(seen["ctx"].positions_T)
        q_nope, q_pe, _ = attn._queries(seen["x"], cos, sin)
        latent = torch.cat(attn._latent(seen["x"], cos, sin), dim=-1)
        target = attn._dense_distribution(q_nope, q_pe, latent, attn._visible(2, 10, 0, 10, None, ids.device))
    reference = weights_BHTS.sum(1) / weights_BHTS.sum((1, 3))[..., None]  # summed over heads, L1-normalised
    assert (target - reference).abs().max().item() <= 1e-5
