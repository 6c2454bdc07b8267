"""The DeepSeek-V3.2 checkpoint family: the family contract, the FP8 block format, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from moeframe.convert import from_hf, to_hf
from moeframe.plugin import ConfigError, build_decoder, registry
from moeframe.testing import check_hf_family_contract, tiny_config
from moeframe_dsa.hf_family import DeepSeekV32Family

DSA: dict[str, Any] = dict(
    name="dsa",
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    index_n_heads=4,
    index_head_dim=16,
    index_topk=5,
)


def test_family_contract_round_trips_the_indexer() -> None:
    config = tiny_config(
        attention={**DSA, "rope_factor": 4.0, "original_seq_len": 16},
        router={"name": "aux_free"},
        n_expert_groups=2,
        n_limited_groups=1,
        mtp_depth=1,
    )
    folder = check_hf_family_contract(config, seq_len=12)  # 12 tokens > k: the round trip is checked sparse
    hf = json.loads((folder / "config.json").read_text())
    assert registry.load("hf_family", "deepseek_v32") is DeepSeekV32Family
    assert hf["model_type"] == "deepseek_v32" and hf["architectures"] == ["DeepseekV32ForCausalLM"]
    assert (hf["index_n_heads"], hf["index_head_dim"], hf["index_topk"]) == (4, 16, 5) and "rope_interleave" not in hf
    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
        assert "model.layers.1.self_attn.indexer.k_norm.bias" in f.keys()


def test_fp8_export_keeps_the_head_weights_fp32_and_comes_back(tmp_path: Path) -> None:
    config = tiny_config(dim=256, attention=DSA)  # 256 wide: two 128-blocks per row
    torch.manual_seed(0)
    decoder = build_decoder(config).eval()
    to_hf(decoder, tmp_path / "fp8", fp8=True, progress=False)
    with safe_open(str(next((tmp_path / "fp8").glob("*.safetensors"))), "pt") as f:
        wk = "model.layers.0.self_attn.indexer.wk.weight"
        assert f.get_tensor(wk).dtype == torch.float8_e4m3fn and f.get_tensor(f"{wk}_scale_inv").shape == (1, 2)
        assert f.get_tensor("model.layers.0.self_attn.indexer.weights_proj.weight").dtype == torch.float32
    back = from_hf(tmp_path / "fp8", progress=False).eval()
    a, b = decoder.layers[0].attn.indexer.wk.weight, back.layers[0].attn.indexer.wk.weight
    assert (a - b).abs().max() <= a.abs().max() / 16  # E4M3 rounding per block
    assert torch.equal(
        decoder.layers[0].attn.indexer.weights_proj.weight, back.layers[0].attn.indexer.weights_proj.weight
    )


@pytest.mark.bad_input
def test_dsa_has_no_v3_form_and_mla_no_v32_form(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="export to family 'deepseek_v32'"):
        to_hf(build_decoder(tiny_config(attention=DSA)), tmp_path / "v3", family="deepseek_v3", progress=False)
    mla = {k: v for k, v in DSA.items() if not k.startswith("index")} | {"name": "mla"}
    with pytest.raises(ConfigError, match="need attention dsa in every layer"):
        to_hf(build_decoder(tiny_config(attention=mla)), tmp_path / "v32", family="deepseek_v32", progress=False)
