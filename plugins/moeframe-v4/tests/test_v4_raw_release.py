"""DeepSeek's own V4 folders (as published for download): bare tensor names, older config fields.

The test writes such a folder itself from a tiny transformers model: ``save_pretrained`` gives
transformers' form (a root ``model.`` module), and the release's names are written here from the
release's naming, independently of moeframe's code: no root module, the embedding ``embed``, the
streams' final collapse ``hc_head_fn``/``_base``/``_scale``; names below a layer are the same in
both. Its config.json carries the release's fields instead of the ones transformers writes:
``compress_ratios`` (0 = sliding window, 4 = CSA, 128 = HCA, per layer), ``num_hash_layers``,
``qk_rope_head_dim`` and a YaRN ``rope_scaling``. Importing both folders must give the same model
(every tensor, the config, the logits), equal to transformers' own reading of either folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeframe.convert.hf import from_hf, to_hf
from moeframe.plugin import ConfigError, ModelConfig, build_decoder

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

V = 64
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
RATIO = {SLIDING: 0, CSA: 4, HCA: 128}  # the release's per-layer compress ratios
LAYER_TYPES = [SLIDING, CSA, HCA, CSA]
YARN = {"factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0}
MODERN_FIELDS = ("layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor", "rope_parameters")


def hf_model() -> DeepseekV4ForCausalLM:
    """Tiny V4 in transformers' own fields; biases, sinks, router tables random (nothing trivial)."""
    cfg = DeepseekV4Config(
        vocab_size=V,
        hidden_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=2,
        head_dim=16,
        q_lora_rank=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        o_groups=2,
        o_lora_rank=8,
        index_n_heads=8,  # no score ties in the indexer (see test_v4_model)
        index_head_dim=16,
        index_topk=2,
        partial_rotary_factor=0.5,
        layer_types=LAYER_TYPES,
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        compress_rates={CSA: 4, HCA: 128},
        rope_parameters={"rope_type": "yarn", **YARN},  # V4 applies it to the compressed layers
        max_position_embeddings=128,
        hc_mult=2,
    )
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (p.dim() == 1 and not name.endswith(("norm.weight", "layernorm.weight"))) or "position_bias" in name:
                p.normal_(std=0.3)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(4)[:2] for _ in range(V)]))
            elif name.endswith("e_score_correction_bias"):
                b.normal_(std=0.1)
    return model


def release_name(hf_key: str) -> str:
    """transformers' saved name -> the name in DeepSeek's released folders."""
    if hf_key == "model.embed_tokens.weight":
        return "embed.weight"
    if hf_key.startswith("model.hc_head.hc_"):
        return "hc_head_" + hf_key.removeprefix("model.hc_head.hc_")
    return hf_key.removeprefix("model.")  # model.norm, model.layers.N.*; head.weight has no root


def release_config(hf: dict) -> dict:
    """transformers' config.json written with the release's older fields."""
    raw = {k: v for k, v in hf.items() if k not in MODERN_FIELDS}
    raw["compress_ratios"] = [RATIO[t] for t in hf["layer_types"]]
    raw["num_hash_layers"] = hf["mlp_layer_types"].count("hash_moe")
    raw["qk_rope_head_dim"] = 8  # head_dim 16 x partial_rotary_factor 0.5
    raw["rope_scaling"] = {"type": "yarn", **YARN}
    return raw


def write_release_folder(src: Path, out: Path) -> None:
    tensors = load_file(str(next(src.glob("*.safetensors"))))
    out.mkdir()
    save_file({release_name(k): v for k, v in tensors.items()}, str(out / "model.safetensors"))
    hf = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(release_config(hf)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[DeepseekV4ForCausalLM, Path, Path]:
    root = tmp_path_factory.mktemp("v4raw")
    ref = hf_model()
    ref.save_pretrained(root / "hf")
    write_release_folder(root / "hf", root / "release")
    return ref, root / "hf", root / "release"


def test_a_released_v4_folder_imports_as_the_transformers_folder_does(folders: tuple) -> None:
    ref, hf_folder, release = folders
    keys = set(load_file(str(release / "model.safetensors")))
    assert {"embed.weight", "head.weight", "norm.weight", "hc_head_fn", "layers.0.hc_attn_fn"} <= keys
    assert {"layers.1.attn.wq_a.weight", "layers.2.ffn.experts.3.w1.weight", "layers.0.ffn.gate.tid2eid"} <= keys
    assert not any(k.startswith("model.") for k in keys)
    assert "layer_types" not in json.loads((release / "config.json").read_text())
    named, bare = from_hf(hf_folder, progress=False).eval(), from_hf(release, progress=False).eval()
    assert bare.config == named.config  # the folded fields: layer types, hash layers, rope dim, YaRN
    assert bare.config.attention["compress_rope_factor"] == YARN["factor"]
    a, b = named.state_dict(), bare.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    ids = torch.randint(0, V, (2, 26), generator=torch.Generator().manual_seed(1))
    theirs = DeepseekV4ForCausalLM.from_pretrained(release, dtype=torch.float32).eval()  # transformers reads it too
    with torch.no_grad():
        logits = bare(ids).logits
        torch.testing.assert_close(logits, named(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(logits, ref(ids).logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(theirs(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
    assert logits.abs().max() > 0.05


def test_a_released_folder_with_its_mtp_layer_imports_with_it(tmp_path: Path) -> None:
    """The release's MTP names (``mtp.0.e_proj``, ``mtp.0.attn.wq_a``, ...) have no root module in
    either form; beside the bare roots they are read as they stand."""
    config = ModelConfig(
        vocab_size=V,
        dim=32,
        n_layers=2,
        first_k_dense=0,
        n_heads=2,
        moe_ffn_dim=16,
        n_routed_experts=4,
        n_activated_experts=2,
        mtp_depth=1,
        max_seq_len=64,
        attention={
            "name": "v4",
            "head_dim": 16,
            "rope_head_dim": 8,
            "q_lora_rank": 16,
            "sliding_window": 8,
            "compress_rate_csa": 4,
            "index_n_heads": 2,
            "index_head_dim": 16,
            "index_topk": 2,
            "o_groups": 2,
            "o_lora_rank": 8,
        },
        router={"name": "v4_gate"},
        experts={"name": "v4_swiglu"},
        residual={"name": "hyper", "hc_mult": 2, "mtp_streams": True},
        layers=[
            {"first": 0, "last": 0, "router": {"name": "v4_hash"}},
            {"first": 1, "last": 1, "attention": {"layer_type": CSA}},
        ],
    )
    torch.manual_seed(2)
    ours = build_decoder(config).eval()
    named = to_hf(ours, tmp_path / "hf", dtype=torch.float32, progress=False)
    tensors = {k: v for shard in named.glob("*.safetensors") for k, v in load_file(str(shard)).items()}
    (tmp_path / "release").mkdir()
    save_file({release_name(k): v for k, v in tensors.items()}, str(tmp_path / "release" / "model.safetensors"))
    shutil.copy(named / "config.json", tmp_path / "release" / "config.json")
    assert {"embed.weight", "mtp.0.e_proj.weight", "mtp.0.norm.weight", "mtp.0.hc_head_fn", "norm.weight"} <= set(
        release_name(k) for k in tensors
    )
    back = from_hf(tmp_path / "release", progress=False).eval()
    assert back.config.mtp_depth == 1
    ids = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mtp=True).mtp_logits[0], ours(ids, mtp=True).mtp_logits[0], rtol=0, atol=0)
        torch.testing.assert_close(back(ids).logits, ours(ids).logits, rtol=0, atol=0)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "damage, message",
    [
        ("names", r"follow neither DeepSeek's released V4 names .* nor transformers'"),
        ("ratio", r"cannot read the fields compress_ratios.*compress_ratios take 0, 4 or 128"),
    ],
)
def test_a_v4_folder_in_neither_naming_is_one_clear_line(
    folders: tuple, tmp_path: Path, damage: str, message: str
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(folders[2], bad)
    if damage == "names":  # e.g. a folder saved from some other wrapper: every name under "backbone."
        tensors = load_file(str(bad / "model.safetensors"))
        save_file({f"backbone.{k}": v for k, v in tensors.items()}, str(bad / "model.safetensors"))
    else:
        hf = json.loads((bad / "config.json").read_text())
        hf["compress_ratios"][1] = 2
        (bad / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=message) as err:
        from_hf(bad, progress=False)
    assert "\n" not in str(err.value)
