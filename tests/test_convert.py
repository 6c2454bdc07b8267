"""HF DeepSeek checkpoints in and out: logit parity with transformers, round trips, FP8, bad input.

Every checkpoint here is created by the test with transformers' own ``save_pretrained`` from a
tiny random config: nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers  # noqa: E402  (the numerical reference; pinned in requirements.txt)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moeframe.cli import main
from moeframe.config import ConfigError
from moeframe.convert import from_hf, load_moeframe, to_hf

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    max_position_embeddings=64,
    num_nextn_predict_layers=0,
    n_group=1,
    topk_group=1,
)


def _hf_v3(folder: Path, seed: int = 0, **changes: object) -> transformers.DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(**{**TINY, **changes})
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.2)  # a trained router's bias is not zero
    model.save_pretrained(folder)
    return model


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize(
    "changes",
    [
        dict(q_lora_rank=16, n_group=2, topk_group=1),
        dict(q_lora_rank=None, n_group=1, topk_group=1),
        dict(q_lora_rank=16, n_group=4, topk_group=2, first_k_dense_replace=2, num_experts_per_tok=3),
        dict(
            q_lora_rank=16,
            n_group=1,
            topk_group=1,
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
    ids=["qlora-groups", "no-qlora", "groups4-dense2", "yarn"],
)
def test_logits_match_transformers(tmp_path: Path, changes: dict) -> None:
    hf = _hf_v3(tmp_path / "hf", **changes)
    ours = from_hf(tmp_path / "hf", progress=False).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 24))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_v2_lite_shape_imports(tmp_path: Path) -> None:
    torch.manual_seed(1)
    cfg = transformers.DeepseekV2Config(
        **{**TINY, "q_lora_rank": None, "n_shared_experts": 2, "n_group": 1, "topk_group": 1}
    )
    hf = transformers.DeepseekV2ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf", progress=False).eval()
    assert ours.config.router["name"] == "topk" and ours.config.attention["q_lora_rank"] is None
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max().item() <= 1e-4


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    _hf_v3(tmp_path / "hf", q_lora_rank=16, n_group=2, topk_group=1)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "mf")]) == 0
    assert main(["convert", str(tmp_path / "mf"), str(tmp_path / "back"), "--dtype", "float32"]) == 0
    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert set(original) == set(back)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    # and transformers loads the export
    reloaded = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    assert reloaded.config.n_group == 2


def _reference_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block quantisation written from the format description, independently of moeframe."""
    rows, cols = w.shape
    nr, nc = -(-rows // 128), -(-cols // 128)
    scale = torch.empty(nr, nc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            block = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float()
            s = max(block.abs().max().item(), 1e-4) / 448.0
            scale[i, j] = s
            q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (block / s).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_checkpoint_imports_within_rounding(tmp_path: Path) -> None:
    # widths above 128 that are not multiples of it: ragged edge blocks
    _hf_v3(tmp_path / "hf", hidden_size=160, intermediate_size=200, moe_intermediate_size=136, q_lora_rank=16)
    fp8_dir = tmp_path / "fp8"
    shutil.copytree(tmp_path / "hf", fp8_dir)
    tensors = _tensors(fp8_dir)
    quantised: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if value.dim() == 2 and not any(s in key for s in ("embed_tokens", "lm_head", "mlp.gate.weight", "norm")):
            quantised[key], quantised[f"{key}_scale_inv"] = _reference_fp8(value)
        else:
            quantised[key] = value
    for f in fp8_dir.glob("*.safetensors"):
        f.unlink()
    save_file(quantised, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    (fp8_dir / "config.json").write_text(json.dumps(config))

    ours = from_hf(fp8_dir, progress=False).eval()
    w = ours.layers[1].ffn.experts.w1[3]
    ref = tensors["model.layers.1.mlp.experts.3.gate_proj.weight"]
    # E4M3 keeps 3 mantissa bits: every element within 1/16 of its block's amax (plus subnormals)
    assert (w - ref).abs().max() <= ref.abs().max() / 16
    assert not torch.equal(w, ref)  # it really went through FP8
    # the same FP8 weights dequantised by the test itself and loaded into transformers give the
    # same logits: moeframe's dequantisation (block scales, ragged edges) is exact
    dequantised = {
        k: (
            v.float()
            * quantised[f"{k}_scale_inv"]
            .repeat_interleave(128, 0)[: v.shape[0]]
            .repeat_interleave(128, 1)[:, : v.shape[1]]
        )
        if v.dtype == torch.float8_e4m3fn
        else v
        for k, v in quantised.items()
        if not k.endswith("_scale_inv")
    }
    deq_dir = tmp_path / "dequantised"
    deq_dir.mkdir()
    shutil.copy(tmp_path / "hf" / "config.json", deq_dir / "config.json")
    save_file(dequantised, str(deq_dir / "model.safetensors"), metadata={"format": "pt"})
    fp8_ref = transformers.DeepseekV3ForCausalLM.from_pretrained(deq_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    with torch.no_grad():
        fp8_ref_logits, fp8_logits = fp8_ref(ids).logits, ours(ids).logits
    assert (fp8_logits - fp8_ref_logits).abs().max() <= 1e-5
    # and FP8 stays close to the full-precision model (random tiny weights: a loose bound)
    full = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = full(ids).logits
    assert (fp8_logits - ref_logits).norm() / ref_logits.norm() < 0.15


def test_fp8_export_has_the_released_layout(tmp_path: Path) -> None:
    _hf_v3(tmp_path / "hf", hidden_size=160, q_lora_rank=16)
    decoder = from_hf(tmp_path / "hf", progress=False)
    to_hf(decoder, tmp_path / "fp8", fp8=True, progress=False)
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    with safe_open(str(next((tmp_path / "fp8").glob("*.safetensors"))), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.kv_b_proj.weight")
        s = f.get_tensor("model.layers.0.self_attn.kv_b_proj.weight_scale_inv")
        assert w.dtype == torch.float8_e4m3fn and s.shape == (1, 1)
        assert f.get_tensor("model.layers.0.mlp.gate_proj.weight_scale_inv").shape == (1, 2)  # 64 x 160
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
    # and it comes back within FP8 rounding
    again = from_hf(tmp_path / "fp8", progress=False)
    a, b = decoder.layers[0].attn.wkv_b.weight, again.layers[0].attn.wkv_b.weight
    assert (a - b).abs().max() <= a.abs().max() / 16


def _quantised_like_the_release(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every 2-D projection as E4M3 + its ``weight_scale_inv``; embedding, head, gate, norms kept."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if value.dim() == 2 and not any(s in key for s in ("embed_tokens", "lm_head", "mlp.gate.weight", "norm")):
            out[key], out[f"{key}_scale_inv"] = _reference_fp8(value)
        else:
            out[key] = value
    return out


def _write_hf_shards(folder: Path, config: dict, shards: list[dict[str, torch.Tensor]]) -> None:
    """An HF checkpoint folder as transformers writes one: numbered shards and an index."""
    folder.mkdir()
    n, weight_map = len(shards), {}
    for i, tensors in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))


def _fp8_single_and_spread(tmp_path: Path) -> tuple[Path, Path, dict[str, int]]:
    """The same FP8 checkpoint twice: one shard, and three shards whose scales lie before, after
    and in their weight's shard (the released V3 checkpoint has scales across shard boundaries)."""
    _hf_v3(tmp_path / "hf", q_lora_rank=16, n_group=2, topk_group=1)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    quantised = _quantised_like_the_release(_tensors(tmp_path / "hf"))
    single = tmp_path / "single"
    single.mkdir()
    save_file(quantised, str(single / "model.safetensors"), metadata={"format": "pt"})
    (single / "config.json").write_text(json.dumps(config))
    shards: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    placement = {"before": 0, "after": 0, "same": 0}
    weights = sorted(k for k in quantised if not k.endswith("_scale_inv"))
    for i, key in enumerate(weights):
        home = i % 3
        shards[home][key] = quantised[key]
        if f"{key}_scale_inv" in quantised:
            where = (home + i // 3) % 3  # walks every offset: the scale before, after or beside its weight
            shards[where][f"{key}_scale_inv"] = quantised[f"{key}_scale_inv"]
            placement["same" if where == home else "before" if where < home else "after"] += 1
    _write_hf_shards(tmp_path / "spread", config, shards)
    return single, tmp_path / "spread", placement


def test_fp8_scales_are_found_in_other_shards_through_the_index(tmp_path: Path) -> None:
    single, spread, placement = _fp8_single_and_spread(tmp_path)
    assert min(placement.values()) >= 3, placement  # every relation really occurs
    one, many = from_hf(single, progress=False).state_dict(), from_hf(spread, progress=False).state_dict()
    assert set(one) == set(many)
    for key, value in one.items():
        assert torch.equal(many[key], value), key
    # and the folder converts through the command as well (same lookup)
    assert main(["convert", str(spread), str(tmp_path / "mf")]) == 0
    # without an index the shards' own headers say where each scale is
    (spread / "model.safetensors.index.json").unlink()
    unindexed = from_hf(spread, progress=False).state_dict()
    assert all(torch.equal(unindexed[key], value) for key, value in one.items())


@pytest.mark.bad_input
def test_fp8_scale_missing_from_every_shard_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, spread, _ = _fp8_single_and_spread(tmp_path)
    index = json.loads((spread / "model.safetensors.index.json").read_text())
    lost = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    shard = spread / index["weight_map"].pop(lost)
    tensors = load_file(str(shard))
    del tensors[lost]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (spread / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ConfigError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight .*is FP8 but .*_scale_inv is in no shard"
    ):
        from_hf(spread, progress=False)
    capsys.readouterr()
    assert main(["convert", str(spread), str(tmp_path / "mf")]) == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if lost in line]) == 1 and "Traceback" not in err
    assert not (tmp_path / "mf").exists()


def test_fp8_export_keeps_the_mtp_projection_and_head_copy_in_bf16(tmp_path: Path) -> None:
    """The released checkpoint stores layer 61's ``eh_proj`` (and its ``shared_head.head`` copy)
    in BF16 with no scale, while the MTP block's attention and experts are FP8."""
    import yaml

    from moeframe.config import ModelConfig
    from moeframe.model.decoder import build_decoder

    cfg = ModelConfig(**yaml.safe_load((Path(__file__).parents[1] / "configs" / "model" / "tiny-v3.yaml").read_text()))
    torch.manual_seed(0)
    decoder = build_decoder(cfg)
    to_hf(decoder, tmp_path / "fp8", fp8=True, progress=False)
    mtp = f"model.layers.{cfg.n_layers}"
    keys: dict[str, torch.dtype] = {}
    for file in (tmp_path / "fp8").glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            keys.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    assert keys[f"{mtp}.eh_proj.weight"] == "BF16" and f"{mtp}.eh_proj.weight_scale_inv" not in keys
    assert keys[f"{mtp}.shared_head.head.weight"] == "BF16" and f"{mtp}.shared_head.head.weight_scale_inv" not in keys
    assert (
        keys[f"{mtp}.self_attn.kv_b_proj.weight"] == "F8_E4M3" and f"{mtp}.self_attn.kv_b_proj.weight_scale_inv" in keys
    )
    assert keys[f"{mtp}.mlp.experts.0.down_proj.weight"] == "F8_E4M3"
    again = from_hf(tmp_path / "fp8", progress=False)
    torch.testing.assert_close(again.mtp[0].eh_proj.weight, decoder.mtp[0].eh_proj.weight.to(torch.bfloat16).float())


def test_lightning_checkpoint_exports(tmp_path: Path) -> None:
    """A checkpoint of a PretrainModule (what `moeframe fit` writes) converts to HF."""
    from moeframe.training.pretrain import PretrainModule

    _hf_v3(tmp_path / "hf", q_lora_rank=16)
    decoder = from_hf(tmp_path / "hf", progress=False)
    module = PretrainModule(decoder.config)
    module.decoder = decoder
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": decoder.config}}, tmp_path / "m.ckpt")
    assert torch.equal(load_moeframe(tmp_path / "m.ckpt").layers[1].ffn.experts.w2, decoder.layers[1].ffn.experts.w2)
    assert main(["convert", str(tmp_path / "m.ckpt"), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    assert torch.equal(
        _tensors(tmp_path / "out")["model.layers.1.mlp.experts.5.down_proj.weight"],
        _tensors(tmp_path / "hf")["model.layers.1.mlp.experts.5.down_proj.weight"],
    )


def _bad(tmp_path: Path, capsys: pytest.CaptureFixture[str], src: Path, fragment: str) -> None:
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial-*"))


def test_bad_checkpoints_fail_clearly_and_leave_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = tmp_path / "hf"
    _hf_v3(hf, q_lora_rank=16)
    # not a DeepSeek checkpoint
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    # the message lists every installed family (V3/V2, V3.2, V4, ... as plugins add them)
    _bad(tmp_path, capsys, other, "model_type 'llama' is not a DeepSeek-V3/V2 / DeepSeek-V3.2 / ")
    # a missing shard
    sharded = tmp_path / "sharded"
    shutil.copytree(hf, sharded)
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps(
            {"weight_map": {"model.norm.weight": "model.safetensors", "lm_head.weight": "model-00002.safetensors"}}
        )
    )
    _bad(tmp_path, capsys, sharded, "shard model-00002.safetensors is listed")
    # a shape mismatch
    wrong = tmp_path / "wrong"
    shutil.copytree(hf, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["moe_intermediate_size"] = 24
    (wrong / "config.json").write_text(json.dumps(cfg))
    _bad(tmp_path, capsys, wrong, "mlp.experts.0.down_proj.weight has shape (32, 16), the config expects (32, 24)")
    # an unknown quantisation
    quant = tmp_path / "quant"
    shutil.copytree(hf, quant)
    cfg = json.loads((quant / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quant / "config.json").write_text(json.dumps(cfg))
    _bad(tmp_path, capsys, quant, "unsupported quantization_config")


@pytest.mark.bad_input
def test_a_checkpoint_with_a_misshapen_tensor_names_it(tmp_path: Path) -> None:
    """A weight whose shape differs from the config stored with it: convert, generate and
    fine-tuning from it each say which tensor, in one line (our own comparison, not torch's message)."""
    from moeframe.errors import CheckpointError
    from moeframe.generate import load_decoder
    from moeframe.testing import tiny_config
    from moeframe.training.finetune import FinetuneModule
    from moeframe.training.pretrain import PretrainModule

    config = tiny_config()
    module = PretrainModule(config)
    module.configure_model()
    state = module.state_dict()
    width = state["decoder.norm.weight"].shape[0]
    state["decoder.norm.weight"] = torch.ones(width + 1)
    torch.save({"state_dict": state, "hyper_parameters": {"config": config}}, tmp_path / "m.ckpt")
    wanted = f"norm.weight ({width + 1},) vs ({width},)"
    for load in (load_moeframe, load_decoder):
        with pytest.raises(CheckpointError, match="do not match the model config") as info:
            load(tmp_path / "m.ckpt")
        assert wanted in str(info.value) and "\n" not in str(info.value)
    finetune = FinetuneModule(init_from=str(tmp_path / "m.ckpt"), config=config)
    with pytest.raises(CheckpointError, match="do not match the model config") as info:
        finetune.configure_model()
    assert wanted in str(info.value) and "\n" not in str(info.value)
