"""Checkpoint families are plugins: a third-party family converts HF folders, parts own their names.

The third-party family here is Mixtral, written the way an outside package would write it (a
distribution registering an ``HFFamily`` in ``moeframe.hf_family``, naming only the core's own
baseline parts): transformers' MixtralForCausalLM is the numerical reference, and its own
``save_pretrained`` writes the checkpoints. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers  # noqa: E402  (the numerical reference; pinned in requirements.txt)
from safetensors.torch import load_file

from moeframe.cli import main
from moeframe.config import ConfigError
from moeframe.convert import from_hf, to_hf
from moeframe.model.decoder import build_decoder
from moeframe.testing import check_hf_family_contract, tiny_config

from .test_registry import fake_plugins  # noqa: F401  (the fixture)

MIXTRAL_FAMILY = """
import re
from moeframe import registry
from moeframe.config import ConfigError, ModelConfig, resolve_model_config
from moeframe.convert.family import HFFamily, HFTensor

_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn": "self_attn",
          "ffn": "block_sparse_moe"}
_LEGACY = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}  # Mixtral's released expert names


class MixtralFamily(HFFamily):
    display_name = "Mixtral"
    model_type = "mixtral"

    def config_from_hf(self, hf, path, mtp):
        params = hf.get("rope_parameters") or {}
        attention = {"name": "mha", **registry.load("attention", "mha").options_from_hf(self.name, hf)}
        return ModelConfig(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], first_k_dense=0,
            n_heads=hf["num_attention_heads"], dense_ffn_dim=hf["intermediate_size"],
            moe_ffn_dim=hf["intermediate_size"], n_routed_experts=hf["num_local_experts"],
            n_activated_experts=hf["num_experts_per_tok"], n_shared_experts=0, norm_eps=hf["rms_norm_eps"],
            max_seq_len=hf["max_position_embeddings"], rope_theta=float(params.get("rope_theta", 1e6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attention=attention,
            router={"name": "topk", "norm_topk_prob": True, "aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001))})

    def config_to_hf(self, config, mtp):
        plan = resolve_model_config(config)
        if plan.router.name != "topk" or not plan.router.options.norm_topk_prob:
            raise ConfigError("Mixtral routes by softmax top-k with renormalised weights (router topk, norm_topk_prob true)")
        if config.first_k_dense or config.n_shared_experts or config.mtp_depth or config.n_expert_groups != 1:
            raise ConfigError("Mixtral has no dense layers, shared experts, expert groups or MTP")
        attention = plan.attention.cls.hf_config(self.name, config, plan.attention.options)
        if set(attention) != {"num_key_value_heads", "attention_bias"} or attention["attention_bias"]:
            raise ConfigError("Mixtral needs grouped-query attention without biases (attention mha)")
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": config.vocab_size,
                "hidden_size": config.dim, "intermediate_size": config.moe_ffn_dim, "num_hidden_layers": config.n_layers,
                "num_attention_heads": config.n_heads, "num_key_value_heads": attention["num_key_value_heads"],
                "num_local_experts": config.n_routed_experts, "num_experts_per_tok": config.n_activated_experts,
                "router_aux_loss_coef": plan.router.options.aux_loss_coef, "rms_norm_eps": config.norm_eps,
                "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": config.tie_embeddings,
                "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"}}

    def module_prefix(self, module, config):
        if module == "norm":
            return "model.norm"
        m = re.fullmatch(r"layers\\.(\\d+)\\.([a-z_]+)(\\..+)?", module)
        if m is None or m.group(2) not in _BLOCK:
            return None
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}{m.group(3) or ''}"

    def tensor_key(self, prefix, declared):
        if prefix.endswith(".experts"):
            e, proj, leaf = declared.split(".")
            declared = f"{e}.{_LEGACY[proj]}.{leaf}"
        return f"{prefix}.{declared}"

    def core_tensor(self, key, config):
        names = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight"}
        return HFTensor(names[key], quantizable=False) if key in names else None
"""

TINY_MIXTRAL = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=64,
)


@pytest.fixture
def mixtral_family(fake_plugins):  # noqa: F811
    fake_plugins(
        "moeframe-mixtral-family",
        {"moeframe.hf_family": {"mixtral": "moeframe_mixtral_family:MixtralFamily"}},
        MIXTRAL_FAMILY,
    )
    return fake_plugins


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_third_party_family_imports_and_exports_transformers_mixtral(tmp_path: Path, mixtral_family) -> None:
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**TINY_MIXTRAL)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf", progress=False).eval()
    assert ours.config.attention == {"name": "mha", "n_kv_heads": 2, "qkv_bias": False}
    ids = torch.randint(0, TINY_MIXTRAL["vocab_size"], (2, 16))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max().item() <= 1e-5
    to_hf(ours, tmp_path / "back", dtype=torch.float32, progress=False)  # the one family this model fits
    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert set(original) == set(back)
    for key, value in original.items():
        assert torch.equal(back[key], value), key
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "mixtral"
    reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)


def test_third_party_family_passes_the_family_contract(mixtral_family) -> None:
    config = tiny_config(
        first_k_dense=0,
        n_shared_experts=0,
        attention={"name": "mha", "n_kv_heads": 2},
        router={"name": "topk", "norm_topk_prob": True},
    )
    folder = check_hf_family_contract(config, family="mixtral")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "mixtral"


MLA_COPY = '''
from moeframe_mla.attention import MultiHeadLatentAttention

class FastMLA(MultiHeadLatentAttention):
    """A third-party MLA kernel: same tensors, so it inherits MLA's HF names and config fields."""
'''

SMALL_MLA = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8}


def test_third_party_attention_exports_to_deepseek_by_its_declared_names(fake_plugins) -> None:  # noqa: F811
    fake_plugins("moeframe-fast-mla", {"moeframe.attention": {"fast_mla": "moeframe_fast_mla:FastMLA"}}, MLA_COPY)
    config = tiny_config(attention={"name": "fast_mla", **SMALL_MLA}, router={"name": "aux_free"}, mtp_depth=1)
    folder = check_hf_family_contract(config)  # DeepSeek-V3 is the one installed family it fits
    assert json.loads((folder / "config.json").read_text())["kv_lora_rank"] == 16


NAMELESS = """
from moeframe.model.attention import MultiHeadAttention

class Nameless(MultiHeadAttention):
    @classmethod
    def hf_tensor_names(cls, family):
        return None  # what every API-1 plugin declares
"""


@pytest.mark.bad_input
def test_a_part_without_names_fails_before_writing(
    tmp_path: Path, mixtral_family, capsys: pytest.CaptureFixture[str]
) -> None:
    mixtral_family("moeframe-nameless", {"moeframe.attention": {"nameless": "moeframe_nameless:Nameless"}}, NAMELESS)
    config = tiny_config(
        first_k_dense=0,
        n_shared_experts=0,
        attention={"name": "nameless"},
        router={"name": "topk", "norm_topk_prob": True},
    )
    decoder = build_decoder(config)
    with pytest.raises(
        ConfigError,
        match=r"Nameless \(at layers\.0\.attn\) declares no HF tensor names.*"
        r"implement its hf_tensor_names\(\)",
    ):
        to_hf(decoder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial-*"))


@pytest.mark.bad_input
def test_a_model_without_a_family_names_each_familys_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moeframe.convert.hf import save_moeframe

    save_moeframe(build_decoder(tiny_config()), tmp_path / "mf")  # mha + topk: not DeepSeek-shaped
    assert main(["convert", str(tmp_path / "mf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no form in any installed HF checkpoint family" in err and "deepseek_v3: " in err
    assert "attention plugin 'mha' declares" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial-*"))


@pytest.mark.bad_input
def test_unknown_model_type_lists_the_installed_families(tmp_path: Path, mixtral_family) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError) as err:
        from_hf(tmp_path, progress=False)
    message = str(err.value)
    assert "model_type 'llama' is not a DeepSeek-V3/V2 / DeepSeek-V3.2 / DeepSeek-V4 / Mixtral checkpoint" in message
    assert (
        "deepseek_v2, deepseek_v3, deepseek_v32, deepseek_v4, mixtral" in message and "'moeframe.hf_family'" in message
    )


CLASHING = '''
from moeframe_mixtral_family import MixtralFamily

class ClashingFamily(MixtralFamily):
    """Puts both norms of a block at one HF path: two tensors, one name."""

    def module_prefix(self, module, config):
        return super().module_prefix(module.replace("ffn_norm", "attn_norm"), config)
'''


@pytest.mark.bad_input
def test_two_tensors_with_one_hf_name_are_refused(tmp_path: Path, mixtral_family) -> None:
    mixtral_family(
        "moeframe-clashing", {"moeframe.hf_family": {"clashing": "moeframe_clashing:ClashingFamily"}}, CLASHING
    )
    config = tiny_config(first_k_dense=0, n_shared_experts=0, router={"name": "topk", "norm_topk_prob": True})
    with pytest.raises(
        ConfigError,
        match=r"maps both 'layers\.0\.attn_norm\.weight' and 'layers\.0\.ffn_norm\.weight' "
        r"to the HF tensor 'model\.layers\.0\.input_layernorm\.weight'",
    ):
        to_hf(build_decoder(config), tmp_path / "out", progress=False, family="clashing")
    assert not (tmp_path / "out").exists()
