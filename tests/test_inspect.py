"""`moeframe inspect`: counts checked against hand arithmetic, on the meta device."""

from __future__ import annotations

import json

import pytest

from moeframe.cli import main
from moeframe.inspect import inspect_model
from moeframe.testing import tiny_config

from .conftest import REPO


def test_tiny_preset_counts_by_hand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(REPO / "configs/model/tiny.yaml"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    D, V, E, F, Fd, L, moe_layers = 128, 512, 8, 128, 512, 4, 3
    expected = {
        "embedding": V * D,
        "head": V * D,
        "attention": L * 4 * D * D,
        "dense_ffn": 3 * D * Fd,
        "routed_experts": moe_layers * E * 3 * D * F,
        "shared_experts": moe_layers * 3 * D * F,
        "router": moe_layers * E * D,
        "norms": (2 * L + 1) * D,
        "mtp": 0,
        "residual": 0,  # the default pre-norm residual has no parameters
    }
    assert r["parameters"] == expected
    assert r["total"] == sum(expected.values())
    # top-2 of 8: 6/8 of every MoE layer's routed experts are idle for a given token
    assert r["activated"] == r["total"] - moe_layers * (E - 2) * 3 * D * F
    assert r["activated_without_embedding"] == r["activated"] - V * D


def test_flops_and_kv_cache_formulas() -> None:
    cfg = tiny_config(n_layers=2, first_k_dense=1, vocab_size=64, dim=32, n_heads=4)
    r = inspect_model(cfg, "t", seq_len=100)
    matmul = r.activated - r.parameters["embedding"] - (2 * 2 + 1) * 32  # minus norm scales
    attention_core = 2 * 6 * 4 * (8 + 8) * 100 // 2
    assert r.training_flops_per_token == 6 * matmul + attention_core
    assert r.naive_kv_cache_bytes_per_token == 2 * 4 * (8 + 8) * 2  # layers * heads * (k + v) * bf16


def test_memory_estimate_shards_as_zero_and_ep_say() -> None:
    cfg = tiny_config()
    full = inspect_model(cfg, "t", zero=0, dp=4, ep=1).memory_per_gpu_gib
    z1 = inspect_model(cfg, "t", zero=1, dp=4, ep=1).memory_per_gpu_gib
    z3 = inspect_model(cfg, "t", zero=3, dp=4, ep=1).memory_per_gpu_gib
    assert z1["optimizer"] == pytest.approx(full["optimizer"] / 4) and z1["weights"] == full["weights"]
    assert z3["weights"] == pytest.approx(full["weights"] / 4) and z3["gradients"] == pytest.approx(
        full["gradients"] / 4
    )


def test_bad_layout_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(REPO / "configs/model/tiny.yaml"), "--dp", "4", "--ep", "3"]) == 2
    err = capsys.readouterr().err
    assert "ep_size=3 does not divide the world size 4" in err and err.count("\n") == 1, err
    assert main(["inspect", str(REPO / "configs/model/tiny.yaml"), "--zero", "4"]) == 2
    assert "ZeRO stage must be 1, 2 or 3, got 4" in capsys.readouterr().err


@pytest.mark.bad_input
def test_an_abbreviated_option_is_not_taken_for_the_full_one(capsys: pytest.CaptureFixture[str]) -> None:
    """``--ze 2`` is not ``--zero 2``: argparse's prefix matching is off in every moeframe command."""
    assert main(["inspect", str(REPO / "configs/model/tiny.yaml"), "--ze", "2"]) == 2
    assert "unknown option --ze of moeframe inspect. Did you mean --zero?" in capsys.readouterr().err


@pytest.mark.parametrize(("dp", "ep", "zero"), [(6, 4, 1), (4, 3, 0), (8, 16, 0), (4, 2, 5)])
def test_inspect_rejects_exactly_what_the_strategies_reject(dp: int, ep: int, zero: int) -> None:
    """One rule, one message: inspect and the parallel plugin's strategies share the validation."""
    from moeframe_parallel.deepspeed_presets import check_zero_settings
    from moeframe_parallel.expert_parallel import check_ep_size

    cfg = tiny_config()
    with pytest.raises(ValueError) as from_inspect:
        inspect_model(cfg, "t", zero=zero, dp=dp, ep=ep)
    with pytest.raises(ValueError) as from_strategy:
        check_ep_size(ep, dp, cfg.n_routed_experts)
        check_zero_settings(zero, False, "cpu", "cpu", None)
    assert str(from_inspect.value) == str(from_strategy.value)


def test_layout_section_counts_experts_per_rank() -> None:
    cfg = tiny_config()
    lay = inspect_model(cfg, "t", zero=0, dp=4, ep=2).layout
    assert lay["experts_per_rank_per_layer"] == cfg.n_routed_experts // 2 and lay["expert_dp"] == 2
    one = inspect_model(cfg, "t", zero=0, dp=4, ep=1).layout
    assert lay["routed_expert_params_per_rank"] * 2 == one["routed_expert_params_per_rank"]
    assert lay["strategy"] == "ep2_ddp" and one["strategy"] == "ddp"
    assert inspect_model(cfg, "t", zero=3, dp=4, ep=1).layout["strategy"] == "zero3"


@pytest.mark.parametrize(
    ("preset", "total", "activated", "activated_no_embedding"),
    [
        # figures counted by HF transformers on the meta device (../shared/V3-REFERENCE.md §1)
        ("v3-671b", 671_026_404_352, 37_552_282_624, 36_625_603_584),
        ("v2-lite", 15_706_484_224, None, 2_451_435_008),
    ],
)
def test_released_shapes_match_transformers_counts(
    preset: str, total: int, activated: int | None, activated_no_embedding: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(REPO / "configs" / "model" / f"{preset}.yaml"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["total"] == total
    assert r["activated_without_embedding"] == activated_no_embedding
    if activated is not None:
        assert r["activated"] == activated


def test_v3_kv_cache_is_the_absorbed_latent(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(REPO / "configs/model/v3-671b.yaml"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kv_cache_bytes_per_token"] == 61 * (512 + 64) * 2  # latent + rope key, bf16
    assert r["naive_kv_cache_bytes_per_token"] == 61 * 128 * ((128 + 64) + 128) * 2  # 40,960 values/layer


@pytest.mark.parametrize("preset", sorted((REPO / "configs" / "model").glob("*.yaml")), ids=lambda p: p.name)
def test_every_model_preset_inspects(preset, capsys: pytest.CaptureFixture[str]) -> None:
    """Plain YAML readers see the presets as the CLI does (e.g. 14.3e+12 is a number, not a string)."""
    assert main(["inspect", str(preset), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] > 0


def test_training_step_reports_model_flops_for_the_throughput_monitor() -> None:
    import torch

    from moeframe.training.pretrain import PretrainModule

    cfg = tiny_config()
    module = PretrainModule(cfg)
    module.configure_model()
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    module.training_step({"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, 0)
    assert module.flops_per_batch == 3 * 16 * inspect_model(cfg, "t", seq_len=16).training_flops_per_token


def test_causal_pair_count_matches_counting_each_query() -> None:
    from moeframe.plugin import causal_pair_count

    for T, stride, cap in [(0, 1, None), (1, 1, None), (37, 1, None), (37, 1, 5), (37, 4, None), (37, 4, 3), (8, 4, 9)]:
        by_query = sum(min((t + 1) // stride, T if cap is None else cap) for t in range(T))
        assert causal_pair_count(T, stride, cap) == by_query, (T, stride, cap)


def _inspect_json(preset: str, seq_len: int, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["inspect", str(REPO / "configs/model" / preset), "--seq_len", str(seq_len), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_mla_keeps_the_full_causal_attention_count(capsys: pytest.CaptureFixture[str]) -> None:
    """MLA declares no attention FLOPs: the core's 6·H·(d_qk + d_v)·T/2 per layer. The matrix part
    does not depend on T, so two lengths differ by the attention core alone."""
    L, H, qk, v = 4, 4, 32 + 16, 32  # configs/model/tiny-mla.yaml
    short, long = (_inspect_json("tiny-mla.yaml", T, capsys)["training_flops_per_token"] for T in (100, 900))
    assert long - short == L * 6 * H * (qk + v) * (900 - 100) // 2


def test_dsa_preset_reports_its_sparse_attention_count(capsys: pytest.CaptureFixture[str]) -> None:
    """tiny-v32 (4 DSA layers, top-64), counted by hand per position: forward, the indexer over
    every visible token and MLA over the top-k; backward, twice the forward of both over the top-k
    only (the indexer learns from the selected tokens). Below MLA's full-causal count at T = 1024."""
    L, H, qk, v, G, Idx, K = 4, 4, 32 + 16, 32, 4, 32, 64  # configs/model/tiny-v32.yaml

    def training_per_token(T: int) -> float:
        flops = 0
        for t in range(T):
            seen, attended = t + 1, min(K, t + 1)
            flops += 2 * seen * G * (Idx + 1) + 2 * attended * H * (qk + v)  # forward
            flops += 2 * 2 * attended * (G * (Idx + 1) + H * (qk + v))  # backward
        return flops / T

    short, long = (_inspect_json("tiny-v32.yaml", T, capsys)["training_flops_per_token"] for T in (64, 1024))
    expected = L * (training_per_token(1024) - training_per_token(64))
    assert long - short == pytest.approx(expected, abs=2 * L)  # each layer's figure is rounded
    full_causal = L * 6 * H * (qk + v) * (1024 - 64) // 2
    assert long - short < full_causal
    assert main(["inspect", str(REPO / "configs/model/tiny-v32.yaml"), "--seq_len", "1024"]) == 0
    assert f"training FLOPs/token (T=1024)  {long:.4g}" in capsys.readouterr().out


def test_v4_preset_counts_each_layer_by_its_own_type(capsys: pytest.CaptureFixture[str]) -> None:
    """tiny-v4: layer 0 sliding, 1 and 3 CSA, 2 HCA (per-layer options). By hand per position:
    window keys + completed entries (CSA: top-16 of them, its indexer scoring all, forward only),
    a score and a value product of head_dim per head each, backward twice the attention."""
    H, d, W, CSA, HCA, G, Idx, K = 4, 32, 64, 4, 16, 4, 16, 16  # configs/model/tiny-v4.yaml
    types = ["sliding", "csa", "hca", "csa"]

    def training_per_token(kind: str, T: int) -> float:
        flops = 0
        for t in range(T):
            read = min(W, t + 1) + {"sliding": 0, "csa": min(K, (t + 1) // CSA), "hca": (t + 1) // HCA}[kind]
            flops += 3 * 2 * read * H * 2 * d + (2 * ((t + 1) // CSA) * G * (Idx + 1) if kind == "csa" else 0)
        return flops / T

    short, long = (_inspect_json("tiny-v4.yaml", T, capsys)["training_flops_per_token"] for T in (64, 1024))
    expected = sum(training_per_token(k, 1024) - training_per_token(k, 64) for k in types)
    assert long - short == pytest.approx(expected, abs=2 * len(types))
