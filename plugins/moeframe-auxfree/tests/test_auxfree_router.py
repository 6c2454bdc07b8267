"""Router ``aux_free``: parity with HF transformers' DeepSeek-V3 router, config-time errors, the
sequence-wise balance loss on a hand-worked example, and the fp32/checkpoint contract of the bias."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from moeframe import registry
from moeframe.config import ConfigError, ModelConfig, resolve_model_config
from moeframe.model.context import ForwardContext
from moeframe.model.decoder import build_decoder
from moeframe.testing import check_router_contract
from moeframe_auxfree import AuxFreeOptions, AuxFreeRouter, sequence_balance_loss


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(
        vocab_size=64,
        dim=16,
        n_layers=2,
        first_k_dense=1,
        n_heads=2,
        dense_ffn_dim=32,
        moe_ffn_dim=8,
        n_routed_experts=8,
        n_activated_experts=2,
        n_expert_groups=1,
        n_limited_groups=1,
        max_seq_len=64,
        router={"name": "aux_free"},
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def test_registered_through_the_entry_point():
    assert registry.load("router", "aux_free") is AuxFreeRouter
    assert registry.resolve("router", "aux_free").distribution == "moeframe-auxfree"


# -- moeframe's router contract (moeframe.testing) -------------------------------------------------
@pytest.mark.parametrize(
    "changes,weights_sum_to",
    [
        ({}, 1.0),  # normalised top-k weights by default (V3)
        ({"router": {"name": "aux_free", "norm_topk_prob": False}}, None),
        (
            {
                "n_routed_experts": 16,
                "n_activated_experts": 4,
                "n_expert_groups": 4,
                "n_limited_groups": 2,
                "route_scale": 2.5,
                "router": {"name": "aux_free", "seq_aux_loss_coef": 0.001},
            },
            2.5,
        ),
    ],
    ids=["default", "unnormalised", "grouped-scaled-seqloss"],
)
def test_router_contract(changes, weights_sum_to):
    check_router_contract(tiny_config(**changes), weights_sum_to=weights_sum_to)


# -- parity with HF transformers ------------------------------------------------------------------
PARITY_CASES = [
    # experts, top-k, groups, groups kept, route_scale, normalise
    (8, 2, 1, 1, 1.0, True),
    (16, 4, 4, 2, 2.5, True),
    (16, 3, 8, 3, 1.5, False),
    (32, 8, 8, 4, 2.5, True),  # V3's 8 groups / 4 kept / top-8, at 1/8 of the experts
]


def _pair(E: int, k: int, G: int, kept: int, scale: float, normalise: bool, D: int = 24):
    cfg = tiny_config(
        dim=D,
        n_routed_experts=E,
        n_activated_experts=k,
        n_expert_groups=G,
        n_limited_groups=kept,
        route_scale=scale,
        router={"name": "aux_free", "norm_topk_prob": normalise},
    )
    plan = resolve_model_config(cfg)
    ours = AuxFreeRouter(cfg, plan.router.options)
    hf = DeepseekV3TopkRouter(
        DeepseekV3Config(
            hidden_size=D,
            n_routed_experts=E,
            num_experts_per_tok=k,
            n_group=G,
            topk_group=kept,
            routed_scaling_factor=scale,
            norm_topk_prob=normalise,
        )
    )
    with torch.no_grad():
        ours.weight.normal_(0.0, 0.5)
        ours.e_score_correction_bias.uniform_(-0.3, 0.3)  # large enough to change many choices
        hf.weight.copy_(ours.weight)
        hf.e_score_correction_bias.copy_(ours.e_score_correction_bias)
    return ours, hf


def _sorted_choice(indices_TK: torch.Tensor, weights_TK: torch.Tensor):
    order = indices_TK.argsort(dim=-1)  # HF returns the k experts unsorted
    return indices_TK.gather(1, order), weights_TK.gather(1, order)


@pytest.mark.parametrize("E,k,G,kept,scale,normalise", PARITY_CASES)
def test_matches_hf_deepseek_v3_router(E, k, G, kept, scale, normalise):
    torch.manual_seed(E + k + G)
    ours, hf = _pair(E, k, G, kept, scale, normalise)
    x_TD = torch.randn(96, 24)
    out = ours.eval()(x_TD)
    _, hf_weights, hf_indices = hf(x_TD)
    idx, w = _sorted_choice(out.indices_TK, out.weights_TK)
    hf_idx, hf_w = _sorted_choice(hf_indices, hf_weights)
    assert torch.equal(idx, hf_idx)
    assert out.weights_TK.dtype == torch.float32
    assert (w - hf_w).abs().max() <= 1e-6
    assert torch.equal(out.tokens_per_expert_E, torch.bincount(hf_indices.flatten(), minlength=E))


def test_parity_cases_exercise_the_bias_and_the_groups():
    """The parity above would not notice a router that ignores the bias or the groups unless
    they change the choice: check that on the same data they do."""
    torch.manual_seed(4 + 4 + 16)
    ours, _ = _pair(16, 4, 4, 2, 2.5, True)
    x_TD = torch.randn(96, 24)
    biased = ours.eval()(x_TD).indices_TK.sort(dim=-1).values
    with torch.no_grad():
        ours.e_score_correction_bias.zero_()
    unbiased = ours(x_TD).indices_TK.sort(dim=-1).values
    assert (biased != unbiased).any(dim=-1).float().mean() > 0.2
    ungrouped = ours.n_groups
    ours.n_groups = 1
    assert (ours(x_TD).indices_TK.sort(dim=-1).values != unbiased).any()
    ours.n_groups = ungrouped


# -- config-time errors -----------------------------------------------------------------------------
def test_groups_must_divide_the_experts():
    with pytest.raises(ConfigError, match="n_expert_groups=3 must divide model.n_routed_experts=8"):
        resolve_model_config(tiny_config(n_expert_groups=3))
    with pytest.raises(ValueError, match="n_expert_groups=3 must divide"):  # the plugin's own check
        AuxFreeOptions().validate(tiny_config(n_expert_groups=3))


def test_a_group_needs_two_experts_for_the_top2_group_score():
    with pytest.raises(
        ConfigError, match=r"model.router: model.n_expert_groups=8 leaves 1 expert per group.*at most 4 groups"
    ):
        resolve_model_config(tiny_config(n_expert_groups=8, n_limited_groups=4))


def test_top_k_must_fit_in_the_kept_groups():
    with pytest.raises(ConfigError, match="n_activated_experts=5 exceeds the experts reachable"):
        resolve_model_config(tiny_config(n_activated_experts=5, n_expert_groups=4, n_limited_groups=2))
    with pytest.raises(
        ValueError, match=r"n_activated_experts=5 exceeds the 4 experts reachable.*raise model.n_limited_groups"
    ):
        AuxFreeOptions().validate(tiny_config(n_activated_experts=5, n_expert_groups=4, n_limited_groups=2))


@pytest.mark.parametrize(
    "options,message",
    [
        ({"bias_update_speed": -0.1}, "bias_update_speed"),
        ({"seq_aux_loss_coef": -1}, "seq_aux_loss_coef"),
        ({"bias_update_schedule": [[100, 0.0], [50, 0.001]]}, "strictly increasing"),
        ({"bias_update_schedule": [[10.5, 0.0]]}, "whole number"),
        ({"bias_update_schedule": [[10, -1]]}, "gamma >= 0"),
        ({"bias_update_schedule": [10]}, "entries must be"),
        ({"gamma": 0.1}, "has no option 'gamma'"),
    ],
)
def test_bad_options_fail_at_config_time_naming_the_field(options, message):
    with pytest.raises(ConfigError, match=message):
        resolve_model_config(tiny_config(router={"name": "aux_free", **options}))


def test_gamma_schedule_is_piecewise_constant_from_each_step():
    options = AuxFreeOptions(bias_update_speed=0.001, bias_update_schedule=[[3, 0.0005], [6, 0.0]])
    assert [options.gamma_at(s) for s in range(8)] == [0.001] * 3 + [0.0005] * 3 + [0.0] * 2


# -- sequence-wise balance loss ---------------------------------------------------------------------
# Two sequences of 2 tokens, 2 experts, top-1. Normalised scores s/Σs and choices:
#   seq 0: [0.6, 0.2] -> [0.75, 0.25] picks 0; [0.3, 0.5] -> [0.375, 0.625] picks 1
#          P = [0.5625, 0.4375], f = 2/(1·2)·[1, 1] = [1, 1]            -> Σ f·P = 1.0
#   seq 1: [0.9, 0.1] -> [0.9, 0.1] picks 0;      [0.4, 0.1] -> [0.8, 0.2] picks 0
#          P = [0.85, 0.15], f = [2, 0]                                  -> Σ f·P = 1.7
#   mean over the sequences: 1.35. As ONE sequence of 4 tokens: P = [0.70625, 0.29375],
#   f = 2/(1·4)·[3, 1] = [1.5, 0.5] -> 1.20625 (so the sequence structure matters).
SCORES_TE = torch.tensor([[0.6, 0.2], [0.3, 0.5], [0.9, 0.1], [0.4, 0.1]])
CHOICES_TK = torch.tensor([[0], [1], [0], [0]])


def test_sequence_balance_loss_hand_worked():
    assert math.isclose(float(sequence_balance_loss(SCORES_TE, CHOICES_TK, seq_len=2)), 1.35, rel_tol=1e-6)
    assert math.isclose(float(sequence_balance_loss(SCORES_TE, CHOICES_TK, seq_len=4)), 1.20625, rel_tol=1e-6)


def _router_with_scores(alpha: float) -> tuple[AuxFreeRouter, torch.Tensor]:
    """A router whose sigmoid affinities for 4 one-hot tokens are exactly SCORES_TE."""
    cfg = tiny_config(
        dim=4,
        n_heads=1,
        n_routed_experts=2,
        n_activated_experts=1,
        route_scale=1.0,
        router={"name": "aux_free", "seq_aux_loss_coef": alpha},
    )
    router = AuxFreeRouter(cfg, resolve_model_config(cfg).router.options)
    with torch.no_grad():
        router.weight.copy_(torch.logit(SCORES_TE.double()).float().T)  # logit(s) of token t in column t
    return router, torch.eye(4)


def sequences_of(seq_len: int) -> ForwardContext:
    """The forward context of sequences of ``seq_len`` tokens (what the MoE layer passes)."""
    return ForwardContext(torch.arange(seq_len))


def test_router_applies_alpha_per_sequence_in_training_only():
    router, x_TD = _router_with_scores(alpha=0.01)
    out = router.train()(x_TD, sequences_of(2))
    assert torch.equal(out.indices_TK, CHOICES_TK)
    assert math.isclose(float(out.aux_loss), 0.0135, rel_tol=1e-5)
    out.aux_loss.backward()  # P carries the gradient to the gate weight; the bias gets none
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert router.eval()(x_TD, sequences_of(2)).aux_loss is None
    router, x_TD = _router_with_scores(alpha=0.0)
    assert router.train()(x_TD, sequences_of(2)).aux_loss is None


def test_without_seq_len_the_batch_is_one_sequence_and_it_says_so():
    router, x_TD = _router_with_scores(alpha=0.01)
    with pytest.warns(UserWarning, match="did not pass seq_len"):
        out = router.train()(x_TD)
    assert math.isclose(float(out.aux_loss), 0.01 * 1.20625, rel_tol=1e-5)


def test_seq_len_must_divide_the_tokens():
    router, x_TD = _router_with_scores(alpha=0.01)
    with pytest.raises(ValueError, match="seq_len=3 does not divide the 4 routed tokens"):
        router.train()(x_TD, sequences_of(3))


def test_moe_layer_passes_the_sequence_structure():
    """Through the real decoder: B sequences of T tokens reach the router as a context with
    seq_len=T (the sequence-wise loss needs it)."""
    torch.manual_seed(0)
    decoder = build_decoder(tiny_config(router={"name": "aux_free", "seq_aux_loss_coef": 1.0}))
    seen: list = []
    gate = decoder.layers[1].ffn.gate
    gate.register_forward_hook(lambda m, args, kwargs, out: seen.append(args[1].seq_len), with_kwargs=True)
    decoder.train()(torch.randint(0, 64, (3, 10)))
    assert seen == [10]


# -- the bias: a buffer, fp32 under any cast, in checkpoints under the HF name -----------------------------
def test_bias_is_an_fp32_buffer_outside_the_optimizer_with_the_hf_name():
    decoder = build_decoder(tiny_config(n_layers=3))
    names = [n for n, _ in decoder.named_buffers() if n.endswith("e_score_correction_bias")]
    assert names == ["layers.1.ffn.gate.e_score_correction_bias", "layers.2.ffn.gate.e_score_correction_bias"]
    assert all(n in decoder.state_dict() for n in names)
    assert not any(n.endswith("e_score_correction_bias") for n, _ in decoder.named_parameters())


def test_bias_stays_fp32_and_exact_under_lightning_bf16_true():
    decoder = build_decoder(tiny_config())
    gate = decoder.layers[1].ffn.gate
    with torch.no_grad():
        gate.e_score_correction_bias.fill_(0.501)  # not representable in bf16 (0.5 and 0.50390625)
    decoder = HalfPrecision("bf16-true").convert_module(decoder)
    assert next(decoder.layers[1].ffn.experts.parameters()).dtype == torch.bfloat16  # the cast happened
    assert gate.e_score_correction_bias.dtype == torch.float32
    assert torch.all(gate.e_score_correction_bias == torch.tensor(0.501))
    gate.update_after_step(torch.tensor([9, 1, 5, 5, 5, 5, 5, 5]))  # mean 5: expert 0 over, expert 1 under
    b, step = torch.tensor(0.501), torch.tensor(0.001)  # fp32 arithmetic, as in the buffer
    assert torch.equal(gate.e_score_correction_bias[:2], torch.stack([b - step, b + step]))
    assert torch.all(gate.e_score_correction_bias[2:] == b)
    out = gate(torch.randn(6, 16, dtype=torch.bfloat16))
    assert out.weights_TK.dtype == torch.float32


def test_bias_and_schedule_position_round_trip_through_a_state_dict():
    decoder = build_decoder(tiny_config())
    gate = decoder.layers[1].ffn.gate
    gate.update_after_step(torch.tensor([0, 2, 2, 2, 2, 2, 2, 4]))
    restored = build_decoder(tiny_config())
    restored.load_state_dict(decoder.state_dict())
    assert torch.equal(restored.layers[1].ffn.gate.e_score_correction_bias, gate.e_score_correction_bias)
    assert int(restored.layers[1].ffn.gate.num_bias_updates) == 1
    assert float(gate.e_score_correction_bias.abs().sum()) > 0
