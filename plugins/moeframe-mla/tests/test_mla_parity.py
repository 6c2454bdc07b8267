"""Attention ``mla`` against HF transformers' DeepseekV3Attention: same weights, same numbers.

HF modules are built from a ``DeepseekV3Config`` with random weights (nothing is downloaded) and
copied into ours through ``HF_PARAM_NAMES``, the mapping the checkpoint converter uses.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

from moeframe import registry
from moeframe.config import ModelConfig, resolve_model_config
from moeframe.testing import tiny_config
from moeframe_mla import HF_PARAM_NAMES, MultiHeadLatentAttention

DIM, HEADS, KV_LORA, NOPE, ROPE, V = 32, 4, 16, 8, 16, 6
THETA = 500.0  # small theta: the slow rope pairs turn visibly within a few positions
YARN = {
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 0.9,
    "mscale_all_dim": 0.7,
}  # unequal mscales: cos/sin AND softmax are rescaled


def _configs(q_lora: int | None, yarn: bool, interleave: bool = True) -> tuple[DeepseekV3Config, ModelConfig]:
    rope: dict[str, Any] = (
        {"rope_type": "yarn", "rope_theta": THETA, **YARN} if yarn else {"rope_type": "default", "rope_theta": THETA}
    )
    hf = DeepseekV3Config(
        hidden_size=DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        q_lora_rank=q_lora,
        kv_lora_rank=KV_LORA,
        qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE,
        v_head_dim=V,
        rope_parameters=rope,
        rope_interleave=interleave,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
    )
    hf._attn_implementation = "eager"
    options: dict[str, Any] = dict(
        name="mla",
        q_lora_rank=q_lora,
        kv_lora_rank=KV_LORA,
        qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE,
        v_head_dim=V,
        rope_theta=THETA,
        rope_interleave=interleave,
    )
    if yarn:
        options.update(
            rope_factor=YARN["factor"],
            original_seq_len=YARN["original_max_position_embeddings"],
            beta_fast=YARN["beta_fast"],
            beta_slow=YARN["beta_slow"],
            mscale=YARN["mscale"],
            mscale_all_dim=YARN["mscale_all_dim"],
        )
    return hf, tiny_config(dim=DIM, n_heads=HEADS, rope_theta=10000.0, attention=options)


def _pair(
    q_lora: int | None, yarn: bool, interleave: bool = True
) -> tuple[DeepseekV3Attention, MultiHeadLatentAttention, DeepseekV3Config]:
    hf_cfg, cfg = _configs(q_lora, yarn, interleave)
    torch.manual_seed(0)
    hf = DeepseekV3Attention(hf_cfg, layer_idx=0).eval()
    for p in hf.parameters():  # norm scales too, so a swapped or missing norm shows
        torch.nn.init.normal_(p, std=0.3)
    plan = resolve_model_config(cfg)
    ours = MultiHeadLatentAttention(cfg, plan.attention.options, layer_id=0).eval()
    hf_state = hf.state_dict()
    ours.load_state_dict(
        {k: hf_state[f"{HF_PARAM_NAMES[k.split('.')[0]]}.{k.split('.', 1)[1]}"] for k in ours.state_dict()}, strict=True
    )
    return hf, ours, hf_cfg


def _hf_forward(
    hf: DeepseekV3Attention, hf_cfg: DeepseekV3Config, x_BTD: torch.Tensor, positions_T: torch.Tensor
) -> torch.Tensor:
    B, T, _ = x_BTD.shape
    cos, sin = DeepseekV3RotaryEmbedding(hf_cfg)(x_BTD, positions_T[None].expand(B, -1))
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        return hf(x_BTD, (cos, sin), causal)[0]


def test_registered_through_the_entry_point() -> None:
    assert registry.load("attention", "mla") is MultiHeadLatentAttention
    assert registry.resolve("attention", "mla").distribution == "moeframe-mla"


@pytest.mark.parametrize(
    ("q_lora", "yarn", "interleave"),
    [
        (None, False, True),  # V2-Lite style: plain query projection
        (12, False, True),  # V3 style: low-rank query
        (12, True, True),  # YaRN on
        (None, True, False),  # rotate-half pairing (permuted checkpoints)
    ],
    ids=["no-q-lora", "q-lora", "q-lora-yarn", "rotate-half-yarn"],
)
def test_matches_hf_deepseek_v3_attention(q_lora: int | None, yarn: bool, interleave: bool) -> None:
    hf, ours, hf_cfg = _pair(q_lora, yarn, interleave)
    torch.manual_seed(1)
    x = torch.randn(2, 11, DIM)
    positions = torch.arange(11) + 23  # beyond original_seq_len: YaRN's interpolated pairs matter
    ref = _hf_forward(hf, hf_cfg, x, positions)
    with torch.no_grad():
        out = ours(x, positions)
    assert (out - ref).abs().max().item() <= 1e-5
    assert ours.softmax_scale == pytest.approx(hf.scaling, rel=1e-12)


def test_the_parity_is_sensitive_to_pairing_and_yarn() -> None:
    """The references differ from a wrong convention by far more than the tolerance."""
    hf, ours, hf_cfg = _pair(12, yarn=True)
    x = torch.randn(2, 11, DIM)
    positions = torch.arange(11) + 23
    ref = _hf_forward(hf, hf_cfg, x, positions)
    with torch.no_grad():
        ours.interleaved = False  # checkpoint weights read with the other pairing
        wrong_pairing = ours(x, positions)
        ours.interleaved, ours.yarn, ours.rope_scale = True, None, 1.0  # YaRN frequencies ignored
        no_yarn = ours(x, positions)
    assert (wrong_pairing - ref).abs().max().item() > 1e-2
    assert (no_yarn - ref).abs().max().item() > 1e-2


def test_v3_softmax_scale_with_yarn() -> None:
    """DeepSeek-V3 at 40× YaRN: (128+64)^-0.5 · (0.1·ln 40 + 1)² = 0.135234 (V3-REFERENCE §2)."""
    v3 = {
        "name": "mla",
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "rope_factor": 40.0,
        "original_seq_len": 4096,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    cfg = ModelConfig(dim=7168, n_heads=128, attention=v3, max_seq_len=163840)
    with torch.device("meta"):
        attn = MultiHeadLatentAttention(cfg, resolve_model_config(cfg).attention.options, 0)
    assert attn.softmax_scale == pytest.approx(0.135234, abs=5e-7)
    assert attn.rope_scale == 1.0
    assert attn.wkv_b.weight.shape == (128 * 256, 512) and attn.wkv_a.weight.shape == (576, 7168)
