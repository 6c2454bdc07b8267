"""The DeepSeek-V3/V2 checkpoint family passes the contract a third-party family runs.

Parity with transformers' own checkpoints is in the core's tests/test_convert.py; here the family
and the parts it converts (mla, aux_free, topk, grouped, rmsnorm, the dense FFN) are checked
through ``moeframe.testing.check_hf_family_contract``.
"""

from __future__ import annotations

import json

import pytest

from moeframe import registry
from moeframe.testing import check_hf_family_contract, tiny_config
from moeframe_mla.hf_family import DeepSeekFamily

SMALL_MLA = {
    "name": "mla",
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
}


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_registered_for_both_model_types(model_type: str) -> None:
    assert registry.load("hf_family", model_type) is DeepSeekFamily
    assert registry.resolve("hf_family", model_type).distribution == "moeframe-mla"


@pytest.mark.parametrize(
    "router",
    [{"name": "aux_free"}, {"name": "topk", "norm_topk_prob": True, "aux_loss_coef": 0.003}],
    ids=["v3-aux_free", "v2-topk"],
)
def test_family_contract(router: dict) -> None:
    config = tiny_config(
        attention={**SMALL_MLA, "rope_factor": 4.0, "original_seq_len": 16},
        router=router,
        n_expert_groups=2,
        n_limited_groups=1,
        mtp_depth=1,
    )
    folder = check_hf_family_contract(config)
    hf = json.loads((folder / "config.json").read_text())
    assert hf["model_type"] == "deepseek_v3" and hf["rope_parameters"]["rope_type"] == "yarn"
    assert hf["scoring_func"] == ("sigmoid" if router["name"] == "aux_free" else "softmax")
