"""Routing is decided in fp32 under autocast (``bf16-mixed``, the FP8 plugin).

``torch.autocast`` re-casts ``F.linear``'s inputs to bf16 even after ``.float()``; a gate that
does not switch autocast off makes its logits, affinities and weights bf16, and near-tied tokens
choose other experts (benchmarks/routing_precision.py measures how many).
"""

from __future__ import annotations

import pytest
import torch

from moeframe.config import ModelConfig, resolve_model_config
from moeframe.model.router import gate_logits_fp32

# V3's group-limited routing at 1/4 of its experts: 64 experts in 8 groups, 4 kept, top-8
V3_SHAPED = dict(
    vocab_size=300,
    dim=256,
    n_layers=2,
    first_k_dense=1,
    n_heads=2,
    dense_ffn_dim=64,
    moe_ffn_dim=16,
    n_routed_experts=64,
    n_activated_experts=8,
    n_expert_groups=8,
    n_limited_groups=4,
    route_scale=2.5,
    max_seq_len=64,
)


def _router(router: dict) -> torch.nn.Module:
    cfg = ModelConfig(**V3_SHAPED, router=router)
    plan = resolve_model_config(cfg)
    torch.manual_seed(0)
    module = plan.router.cls(cfg, plan.router.options).eval()
    torch.nn.init.normal_(module.weight, std=0.02)
    return module


@pytest.mark.parametrize(
    "router", [{"name": "topk", "norm_topk_prob": True}, {"name": "aux_free"}], ids=["topk", "aux_free"]
)
def test_routing_under_bf16_autocast_equals_fp32(router: dict) -> None:
    gate = _router(router)
    x_TD = torch.randn(4096, V3_SHAPED["dim"]).bfloat16().float()  # what a bf16 norm hands over
    with torch.no_grad():
        fp32 = gate(x_TD)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = gate(x_TD)
            logits_TE = gate_logits_fp32(x_TD, gate.weight)
    assert logits_TE.dtype == torch.float32
    assert mixed.weights_TK.dtype == torch.float32
    assert torch.equal(mixed.indices_TK, fp32.indices_TK)
    assert torch.equal(mixed.weights_TK, fp32.weights_TK)


def test_gate_on_the_meta_device_has_no_autocast_to_switch_off() -> None:
    """``moeframe inspect`` builds on the meta device, where torch.autocast cannot be entered."""
    out = gate_logits_fp32(torch.empty(3, 8, device="meta"), torch.empty(4, 8, device="meta"))
    assert out.shape == (3, 4) and out.dtype == torch.float32


def test_routing_under_lightning_bf16_mixed_equals_fp32() -> None:
    """What ``trainer.precision: bf16-mixed`` wraps every forward in."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    gate = _router({"name": "aux_free"})
    x_TD = torch.randn(2048, V3_SHAPED["dim"]).bfloat16().float()
    with torch.no_grad():
        fp32 = gate(x_TD)
        with MixedPrecision("bf16-mixed", "cpu").forward_context():
            mixed = gate(x_TD)
    assert mixed.weights_TK.dtype == torch.float32
    assert torch.equal(mixed.indices_TK, fp32.indices_TK) and torch.equal(mixed.weights_TK, fp32.weights_TK)
