"""DeepSeek-V4's released checkpoint format: FP4 routed experts and the MTP layer.

FP4: the test quantises known weights itself, with a reference written here from the format's
definition (E2M1 values from their sign/exponent/mantissa bits, element 2j in the low nibble of
byte j, one power-of-two UE8M0 scale per 32 inputs of a row; the other matrices FP8 with UE8M0
scales named ``.scale``), writes the folder as the release does, imports it and requires every
tensor to come back exactly as the reference dequantises it.

MTP: transformers has no V4 MTP, so the release's equations are written here once more, on the
module's own parameters: each of the previous block's n streams is normalised and projected on
its own (``h_proj``), the projected embedding of the token ahead (``e_proj``) is added to every
stream, the MTP block runs on the streams, its own ``hc_head`` collapses them, then its norm and
the shared head; the next depth again takes the streams.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeframe.convert.hf import from_hf, to_hf
from moeframe.plugin import ConfigError, ForwardContext, ModelConfig, build_decoder
from moeframe.testing import check_residual_contract, check_residual_mtp, tiny_config

V, D = 64, 64
EXPERT_WEIGHT = re.compile(r"\.experts\.\d+\.w[123]\.weight$")


def model_config(**kw: object) -> ModelConfig:
    """Two V4 layers (sliding window + hash router, heavily compressed + gated router), 3 streams."""
    base = dict(
        vocab_size=V,
        dim=D,
        n_layers=2,
        first_k_dense=0,
        n_heads=2,
        moe_ffn_dim=32,  # FP4 scales cover 32 inputs: w2's input is this
        n_routed_experts=4,
        n_activated_experts=2,
        n_shared_experts=1,
        route_scale=1.5,
        max_seq_len=64,
        attention={
            "name": "v4",
            "head_dim": 16,
            "rope_head_dim": 8,
            "q_lora_rank": 16,
            "sliding_window": 8,
            "compress_rate_csa": 2,
            "compress_rate_hca": 4,
            "index_n_heads": 2,
            "index_head_dim": 16,
            "index_topk": 2,
            "o_groups": 2,
            "o_lora_rank": 8,
        },
        router={"name": "v4_gate"},
        experts={"name": "v4_swiglu", "swiglu_limit": 10.0},
        residual={"name": "hyper", "hc_mult": 3, "mtp_streams": True},
        layers=[
            {"first": 0, "last": 0, "router": {"name": "v4_hash"}},
            {"first": 1, "last": 1, "attention": {"layer_type": "heavily_compressed_attention"}},
        ],
    )
    base.update(kw)
    return ModelConfig(**base)


def randomised(decoder: torch.nn.Module) -> torch.nn.Module:
    """Hyper-connection bases and scales, norms: random, so that no mixing is trivially uniform."""
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if p.dim() == 1:
                p.normal_(mean=1.0 if name.endswith("norm.weight") else 0.0, std=0.3)
    return decoder.eval()


# -- the reference of the FP4 and FP8 formats, from their definitions -----------------------------
def e2m1(code: int) -> float:
    """Sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; exponent 0 is subnormal."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 1
    magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
    return sign * magnitude


E2M1_TABLE = torch.tensor([e2m1(c) for c in range(16)])


def fp4_quantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (int8 [out, in/2], float8_e8m0fnu [out, in/32]): the nearest E2M1 value of
    w / 2^ceil(log2(amax/6)) per block of 32 inputs."""
    rows, cols = w.shape
    blocks = w.float().reshape(rows, cols // 32, 32)
    scale = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(-1).clamp_min(2.0**-30) / 6.0)))
    codes = ((blocks / scale[..., None]).unsqueeze(-1) - E2M1_TABLE).abs().argmin(-1).reshape(rows, cols)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, scale.to(torch.float8_e8m0fnu)


def fp4_dequantise(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    byte = packed.view(torch.uint8).long()
    codes = torch.empty(byte.shape[0], 2 * byte.shape[1], dtype=torch.long)
    codes[:, 0::2], codes[:, 1::2] = byte & 0xF, byte >> 4
    return E2M1_TABLE[codes] * scale.float().repeat_interleave(32, dim=1)


def fp8_quantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One 128x128 block (these weights are smaller): (e4m3, UE8M0 scale [1, 1], dequantised)."""
    assert max(w.shape) <= 128
    scale = torch.exp2(torch.ceil(torch.log2(w.abs().amax() / 448.0))).reshape(1, 1)
    q = (w / scale).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu), q.float() * scale


def release_folder(src: Path, out: Path) -> dict[str, torch.Tensor]:
    """``src`` (an fp32 V4 folder) written as the release stores it: routed experts FP4, the
    attention's query down-projections FP8, scales as ``<module>.scale``. Returns what every
    tensor dequantises to (the reference)."""
    tensors = load_file(str(next(src.glob("*.safetensors"))))
    stored, expected = {}, {}
    for key, w in tensors.items():
        stem = key[: -len("weight")]
        if EXPERT_WEIGHT.search(key):
            stored[key], stored[stem + "scale"] = fp4_quantise(w)
            expected[key] = fp4_dequantise(stored[key], stored[stem + "scale"])
        elif key.endswith(".attn.wq_a.weight"):
            stored[key], stored[stem + "scale"], expected[key] = fp8_quantise(w)
        else:
            stored[key] = expected[key] = w
    out.mkdir()
    save_file(stored, str(out / "model.safetensors"))
    hf = json.loads((src / "config.json").read_text())
    hf["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "scale_fmt": "ue8m0",
    }
    hf["expert_dtype"] = "fp4"  # V4 writes it beside the quantization_config
    (out / "config.json").write_text(json.dumps(hf))
    return expected


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the release-format folder, what its tensors dequantise to, the fp32 weights it came from)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("fp4")
    plain = to_hf(build_decoder(model_config(mtp_depth=0)), root / "fp32", dtype=torch.float32, progress=False)
    expected = release_folder(plain, root / "release")
    return root / "release", expected, load_file(str(next(plain.glob("*.safetensors"))))


def test_fp4_experts_and_ue8m0_fp8_weights_import_exactly(release: tuple, tmp_path: Path) -> None:
    folder, expected, plain = release
    imported = from_hf(folder, progress=False)
    back = load_file(
        str(next(to_hf(imported, tmp_path / "out", dtype=torch.float32, progress=False).glob("*.safetensors")))
    )
    assert set(back) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(back[key], value.to(back[key].dtype), rtol=0, atol=0, msg=key)
    experts = [k for k in expected if EXPERT_WEIGHT.search(k)]
    assert len(experts) == 2 * 4 * 3  # every routed expert of both layers went through FP4
    # a real quantisation, not the identity: at most 8 magnitudes per block of 32, and changed values
    block = expected[experts[0]].reshape(-1, 32)
    assert max(row.abs().unique().numel() for row in block) <= 8
    assert all((expected[k] - plain[k]).abs().max() > 0 for k in experts)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "damage, message",
    [
        ("scale_grid", r"needs a scale of shape .* this FP4 layout is not understood"),
        ("no_scale", r"packed FP4\?.*holds no scale for it"),
        ("expert_dtype", r"unsupported quantization_config"),
        ("e5m2", r"float8_e5m2, a format moeframe does not understand"),
    ],
)
def test_an_fp4_folder_moeframe_does_not_understand_is_one_clear_line(
    release: tuple, tmp_path: Path, damage: str, message: str
) -> None:
    folder = release[0]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    scale = next(k for k in tensors if k.endswith(".experts.0.w1.scale"))
    if damage == "scale_grid":
        tensors[scale] = tensors[scale][:, :1].contiguous()
    elif damage == "no_scale":
        del tensors[scale]
    elif damage == "e5m2":
        key = next(k for k in tensors if k.endswith(".shared_experts.w1.weight"))
        tensors[key] = tensors[key].to(torch.float8_e5m2)
    else:
        hf = json.loads((bad / "config.json").read_text())
        hf["quantization_config"]["expert_dtype"] = "int4"
        (bad / "config.json").write_text(json.dumps(hf))
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ConfigError, match=message) as err:
        from_hf(bad, progress=False)
    assert "\n" not in str(err.value)


# -- MTP in the release's form --------------------------------------------------------------------
def rms(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def hc_head(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The release's collapse: per-stream weights sigmoid(fn · rms(flat) · scale + base) + eps."""
    weights = torch.sigmoid(rms(streams.flatten(-2)) @ fn.T * scale + base) + 1e-6
    return (weights.unsqueeze(-1) * streams).sum(-2)


def reference_mtp_logits(decoder: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    ctx = decoder.context(ids)
    emb, h = decoder.begin(ctx)
    streams = decoder.run_layers(h, ctx, 0, len(decoder.layers), {})  # [B, T, n, D], not collapsed
    T, out = ids.shape[1], []
    for k, module in enumerate(decoder.mtp, start=1):
        e_proj, h_proj = module.eh_proj.weight[:, :D], module.eh_proj.weight[:, D:]
        ahead = rms(emb[:, k:], module.enorm.weight) @ e_proj.T  # [B, T-k, D]
        x = ahead.unsqueeze(2) + rms(streams[:, : T - k], module.hnorm.weight) @ h_proj.T  # every stream
        block_ctx: ForwardContext = ctx.shifted(k).for_layer(module.block.layer_id)
        streams, _ = module.block(x, block_ctx)
        head = module.block.residual.head
        collapsed = hc_head(streams, head.hc_fn, head.hc_base, head.hc_scale)
        out.append(rms(collapsed, module.norm.weight) @ decoder.head.weight.T)
    return out


def test_mtp_on_the_streams_follows_the_release_equations() -> None:
    torch.manual_seed(1)
    decoder = randomised(build_decoder(model_config(mtp_depth=2, init_std=0.1)))  # a block output that matters
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = decoder(ids, mtp=True).mtp_logits
        expected = reference_mtp_logits(decoder, ids)
        collapsed = randomised(
            build_decoder(model_config(mtp_depth=2, init_std=0.1, residual={"name": "hyper", "hc_mult": 3}))
        )
        collapsed.load_state_dict(decoder.state_dict())
        old_form = collapsed(ids, mtp=True).mtp_logits
    assert [g.shape for g in got] == [(2, 11, V), (2, 10, V)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
    assert (old_form[0] - got[0]).abs().max() > 1e-2  # the stream form is a different computation


def test_v4_export_and_import_carry_the_mtp_layer_by_the_release_names(tmp_path: Path) -> None:
    torch.manual_seed(3)
    ours = randomised(build_decoder(model_config(mtp_depth=1)))
    folder = to_hf(ours, tmp_path / "hf", dtype=torch.float32, progress=False)
    keys = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    mtp_keys = {k for k in keys if k.startswith("mtp.0.")}
    release_names = ["e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight", "hc_head_fn"]
    assert {f"mtp.0.{n}" for n in release_names} | {"mtp.0.hc_attn_fn", "mtp.0.attn.wq_a.weight"} <= mtp_keys
    assert not any("eh_proj" in k for k in keys)
    stored = load_file(str(folder / keys["mtp.0.e_proj.weight"]))
    torch.testing.assert_close(stored["mtp.0.e_proj.weight"], ours.mtp[0].eh_proj.weight[:, :D], rtol=0, atol=0)
    back = from_hf(folder, progress=False).eval()
    assert back.config.mtp_depth == 1 and back.config.residual["mtp_streams"] is True
    ids = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mtp=True).mtp_logits[0], ours(ids, mtp=True).mtp_logits[0], rtol=0, atol=0)
        without = from_hf(folder, progress=False, mtp=False).eval()
        assert without.config.mtp_depth == 0
        torch.testing.assert_close(without(ids).logits, ours(ids).logits, rtol=0, atol=0)


def test_a_collapsed_state_mtp_keeps_its_own_names_and_form_through_export_and_import(tmp_path: Path) -> None:
    """Models (and folders) from before ``mtp_streams``: MTP on the collapsed state, ``eh_proj``."""
    torch.manual_seed(5)
    ours = randomised(build_decoder(model_config(mtp_depth=1, residual={"name": "hyper", "hc_mult": 3})))
    folder = to_hf(ours, tmp_path / "hf", dtype=torch.float32, progress=False)
    keys = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "mtp.0.eh_proj.weight" in keys and "mtp.0.e_proj.weight" not in keys
    back = from_hf(folder, progress=False).eval()
    assert back.config.residual["mtp_streams"] is False
    ids = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mtp=True).mtp_logits[0], ours(ids, mtp=True).mtp_logits[0], rtol=0, atol=0)


def test_hyper_passes_the_residual_contract_and_its_mtp_checks_in_either_form() -> None:
    config = tiny_config(first_k_dense=0, residual={"name": "hyper", "hc_mult": 2, "mtp_streams": True})
    check_residual_contract(config)  # with the MTP checks, in the stream form
    check_residual_mtp(dataclasses.replace(config, residual={"name": "hyper", "hc_mult": 2}))
