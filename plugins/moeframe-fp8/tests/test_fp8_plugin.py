"""The ``fp8`` plugin: what it converts (by name), what it refuses (with the module named), and a
real single-device ``moeframe fit`` with statistics and BF16 moments."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from moeframe import registry
from moeframe.cli import main
from moeframe.convert.hf import load_moeframe
from moeframe.model.decoder import build_decoder
from moeframe.plugin import ForwardContext
from moeframe.testing import TINY_RUN_FLAGS, check_precision_contract, tiny_config
from moeframe_fp8 import (
    FP8ConfigError,
    FP8GroupedGemm,
    FP8Linear,
    FP8Precision,
    FP8Recipe,
    FP8SelectionError,
    convert_to_fp8,
)

REPO = Path(__file__).resolve().parents[3]

# tiny_config: layer 0 dense (SwiGLU), layer 1 MoE (router gate, 8 stacked experts, 1 shared expert)
EXPECTED_DEFAULT = sorted(
    [f"layers.{i}.attn.{p}" for i in (0, 1) for p in ("wq", "wk", "wv", "wo")]
    + [f"layers.0.ffn.{p}" for p in ("w1", "w2", "w3")]
    + [f"layers.1.ffn.shared_experts.{p}" for p in ("w1", "w2", "w3")]
)


def converted_names(model: nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, FP8Linear))


def fp8_experts(model: nn.Module) -> list[str]:
    """Names of the stacked-experts modules whose projections run through an FP8GroupedGemm."""
    return sorted(n for n, m in model.named_modules() if isinstance(getattr(m, "grouped_gemm", None), FP8GroupedGemm))


def test_registered_as_precision_fp8() -> None:
    assert registry.load("precision", "fp8") is FP8Precision


def test_default_selection_is_every_linear_except_the_high_precision_ones() -> None:
    decoder = build_decoder(tiny_config())
    FP8Precision(backend="emulated").convert_module(decoder)
    assert converted_names(decoder) == EXPECTED_DEFAULT
    assert fp8_experts(decoder) == ["layers.1.ffn.experts"]  # the routed experts too, as in V3
    assert type(decoder.head) is nn.Linear and type(decoder.embed) is nn.Embedding
    assert not isinstance(decoder.layers[1].ffn.gate, FP8Linear)


def test_precision_contract_of_the_core() -> None:
    """moeframe's own check: converts exactly what it claims (the Linears and the routed experts'
    grouped_gemm hook), high-precision modules untouched and bit-identical, finite logits under the plugin's forward context, gradients everywhere."""
    claimed = EXPECTED_DEFAULT + ["layers.1.ffn.experts"]
    converted = check_precision_contract("fp8", claims=lambda name, module: name in claimed)
    assert converted == sorted(claimed)


def test_patterns_select_and_exclude() -> None:
    decoder = build_decoder(tiny_config())
    convert_to_fp8(decoder, FP8Recipe(), modules=["layers.1"], exclude=["*.wo"])
    assert converted_names(decoder) == sorted(
        ["layers.1.attn.wq", "layers.1.attn.wk", "layers.1.attn.wv"]
        + [f"layers.1.ffn.shared_experts.{p}" for p in ("w1", "w2", "w3")]
    )
    assert fp8_experts(decoder) == ["layers.1.ffn.experts"]
    hook = decoder.layers[1].ffn.experts.grouped_gemm
    # converting again (a second fit, validate after fit) changes nothing
    convert_to_fp8(decoder, FP8Recipe(), modules=["layers.1"], exclude=["*.wo"])
    assert len(converted_names(decoder)) == 6 and decoder.layers[1].ffn.experts.grouped_gemm is hook


def test_experts_alone_and_experts_excluded() -> None:
    decoder = build_decoder(tiny_config())
    convert_to_fp8(decoder, FP8Recipe(), modules=["*.experts"])
    assert converted_names(decoder) == [] and fp8_experts(decoder) == ["layers.1.ffn.experts"]
    decoder = build_decoder(tiny_config())
    convert_to_fp8(decoder, FP8Recipe(), exclude=["*.experts"])
    assert converted_names(decoder) == EXPECTED_DEFAULT and fp8_experts(decoder) == []


@pytest.mark.parametrize(
    "modules, exclude, message",
    [
        (
            ["layers.*.atn.*"],
            [],
            r"modules pattern 'layers\.\*\.atn\.\*' matches no module; names look like: layers\.0\.attn\.wq",
        ),
        (["head"], [], r"module 'head' is declared high precision by the model"),
        (["layers.1.ffn.gate"], [], r"matches layers\.1\.ffn\.gate \(\w+\) but no module that may run in FP8"),
        (["layers.0.attn_norm"], [], r"matches layers\.0\.attn_norm \(\w+\) but no module that may run in FP8"),
        (None, ["layers.*.mlp"], r"exclude pattern 'layers\.\*\.mlp' matches no module"),
    ],
)
def test_selections_that_cannot_mean_what_was_written(modules, exclude, message: str) -> None:
    with pytest.raises(FP8SelectionError, match=message):
        convert_to_fp8(build_decoder(tiny_config()), FP8Recipe(), modules=modules, exclude=exclude)


@pytest.mark.bad_input
def test_unsupported_weight_dtype_names_the_module() -> None:
    decoder = build_decoder(tiny_config())
    decoder.layers[0].attn.wk.double()
    with pytest.raises(FP8ConfigError, match=r"module 'layers\.0\.attn\.wk' has a torch\.float64 weight.*exclude"):
        convert_to_fp8(decoder, FP8Recipe())
    decoder = build_decoder(tiny_config())
    decoder.layers[1].ffn.experts.double()
    with pytest.raises(
        FP8ConfigError,
        match=r"experts 'layers\.1\.ffn\.experts' need float32/bfloat16/float16 stacked "
        r"weights.*w1 is torch\.float64.*exclude: \['layers\.1\.ffn\.experts'\]",
    ):
        convert_to_fp8(decoder, FP8Recipe())


@pytest.mark.bad_input
def test_experts_owned_by_another_plugin_are_refused() -> None:
    decoder = build_decoder(tiny_config())
    decoder.layers[1].ffn.experts.grouped_gemm = lambda name, x, w, offs: x
    with pytest.raises(FP8SelectionError, match=r"experts 'layers\.1\.ffn\.experts' already run their projections"):
        convert_to_fp8(decoder, FP8Recipe())


def test_a_model_without_linears_warns() -> None:
    with pytest.warns(UserWarning, match="fp8: no module was converted in Sequential"):
        FP8Precision().convert_module(nn.Sequential(nn.Embedding(4, 4), nn.LayerNorm(4)))


def test_backends() -> None:
    plugin = FP8Precision(backend="hopper")
    with pytest.raises(
        FP8ConfigError, match=r"fp8 backend 'hopper' cannot run: .*(CUDA|scaled_mm).*Use backend 'emulated'"
    ):
        plugin.convert_module(build_decoder(tiny_config()))
    decoder = build_decoder(tiny_config())
    FP8Precision(backend="auto").convert_module(decoder)  # no H100/H200 here: auto means emulated
    assert decoder.layers[0].attn.wq.recipe.backend == "emulated"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scale_format": "e8m0"}, "scale_format must be one of"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"stats_every_n_steps": -1}, "stats_every_n_steps must be an integer >= 0"),
        ({"modules": "layers.*"}, "modules must be a list"),
        ({"modules": []}, "modules=\\[\\] converts nothing"),
    ],
)
def test_bad_options_fail_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(FP8ConfigError, match=message):
        FP8Precision(**kwargs)


def test_cli_unknown_plugin_name_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["fit", "-c", str(REPO / "configs/pretrain/tiny.yaml"), "--trainer.plugins", "fp9", "--print_config"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown trainer.plugins entry 'fp9'. Did you mean 'fp8'?" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_moeframe_fit_single_device_with_stats_and_bf16_moments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``moeframe fit`` with ``plugins: {class_path: fp8, init_args: ...}``: trains, logs per-layer
    FP8 statistics through the CSV logger, and the checkpointed Adam moments are BF16."""
    monkeypatch.setenv("MOEFRAME_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "run"
    rc = main(
        [
            "fit",
            "-c",
            str(REPO / "configs/pretrain/tiny.yaml"),
            "--trainer.plugins",
            "{class_path: fp8, init_args: {stats_every_n_steps: 2, bf16_moments: true}}",
            "--trainer.max_steps",
            "3",
            "--trainer.default_root_dir",
            str(root),
            *TINY_RUN_FLAGS,
        ]
    )
    assert rc == 0
    with open(root / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    stats = {int(r["step"]): r for r in rows if r.get("fp8/decoder.layers.0.attn.wq/x_amax")}
    assert sorted(stats) == [0, 2]  # every 2 optimizer steps
    row = stats[0]
    linears = [
        (layer, kind)
        for layer in ("decoder.layers.0.attn.wq", "decoder.layers.3.ffn.shared_experts.w2")
        for kind in ("x", "w", "dy")
    ]
    experts = [("decoder.layers.3.ffn.experts", f"{p}.{kind}") for p in ("w1", "w2", "w3") for kind in ("x", "w", "dy")]
    for layer, kind in linears + experts:
        amax = float(row[f"fp8/{layer}/{kind}_amax"])
        assert amax > 0
        assert float(row[f"fp8/{layer}/{kind}_scale_max"]) == pytest.approx(max(amax, 1e-4) / 448, rel=1e-6)
        assert 0 <= float(row[f"fp8/{layer}/{kind}_underflow"]) < 0.5
        assert float(row[f"fp8/{layer}/{kind}_overflow"]) == 0.0
    assert not any(k.startswith("fp8/decoder.head") for k in row)
    ckpt = torch.load(root / "logs" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    moments = [s[k] for s in ckpt["optimizer_states"][0]["state"].values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)
    # FP8Linear keeps nn.Linear's names: the checkpoint loads into a plain decoder (strict)
    decoder = load_moeframe(root / "logs" / "version_0" / "checkpoints" / "last.ckpt")
    assert not any(isinstance(m, FP8Linear) for m in decoder.modules())


def test_routers_decide_in_fp32_inside_the_fp8_forward_context() -> None:
    """The plugin runs the forward under bf16 autocast outside the FP8 GEMMs; the router (declared
    high precision, so not converted) must still route exactly as in fp32."""
    config = tiny_config(
        n_routed_experts=64,
        n_activated_experts=8,
        n_expert_groups=8,
        n_limited_groups=4,
        dim=64,
        router={"name": "aux_free"},
    )
    torch.manual_seed(0)
    decoder = build_decoder(config)
    plugin = FP8Precision()
    plugin.convert_module(decoder)
    router = decoder.layers[1].ffn.gate
    torch.nn.init.normal_(router.weight, std=0.02)
    x_TD = torch.randn(2048, config.dim).bfloat16().float()
    ctx = ForwardContext(torch.arange(2048), layer_id=1)  # one sequence of 2048 tokens
    with torch.no_grad():
        fp32 = router(x_TD, ctx)
        with plugin.forward_context():
            mixed = router(x_TD, ctx)
    assert mixed.weights_TK.dtype == torch.float32
    assert torch.equal(mixed.indices_TK, fp32.indices_TK) and torch.equal(mixed.weights_TK, fp32.weights_TK)
