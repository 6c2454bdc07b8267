"""The V4 routers, hyper-connections and clamped experts against transformers' DeepSeek-V4 modules
(weights copied, same inputs, float32), plus their moeframe-side behaviour (a decoder with them
trains, decodes with a cache as without, the hash table is fixed per token)."""

from __future__ import annotations

import pytest
import torch

from moeframe.plugin import ForwardContext, ModelConfig, build_decoder, registry

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4  # noqa: E402
from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config  # noqa: E402

D, E, K, V = 32, 8, 2, 64


def hf_config(**kw: object) -> DeepseekV4Config:
    base = dict(
        vocab_size=V,
        hidden_size=D,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        head_dim=16,
        q_lora_rank=16,
        n_routed_experts=E,
        num_experts_per_tok=K,
        hc_mult=3,
        routed_scaling_factor=1.5,
        swiglu_limit=0.05,
        o_groups=2,
        o_lora_rank=8,
    )
    base.update(kw)
    return DeepseekV4Config(**base)


def model_config(**kw: object) -> ModelConfig:
    base = dict(
        vocab_size=V,
        dim=D,
        n_layers=2,
        first_k_dense=0,
        n_heads=2,
        moe_ffn_dim=16,
        n_routed_experts=E,
        n_activated_experts=K,
        n_shared_experts=1,
        route_scale=1.5,
        init_std=0.02,
        router={"name": "v4_gate"},
        experts={"name": "v4_swiglu", "swiglu_limit": 0.05},
        residual={"name": "hyper", "hc_mult": 3},
    )
    base.update(kw)
    return ModelConfig(**base)


def test_hyper_connection_block_and_head_match_transformers() -> None:
    torch.manual_seed(0)
    cfg = hf_config()
    attn_hc, ffn_hc, head = (
        hf_v4.DeepseekV4HyperConnection(cfg),
        hf_v4.DeepseekV4HyperConnection(cfg),
        hf_v4.DeepseekV4HyperHead(cfg),
    )
    for m in (attn_hc, ffn_hc, head):
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.5)
    mine = registry.load("residual", "hyper")(model_config(), registry.load("residual", "hyper").Options(hc_mult=3), 1)
    with torch.no_grad():
        for ours, theirs in ((mine.attn_hc, attn_hc), (mine.ffn_hc, ffn_hc)):
            ours.fn.copy_(theirs.fn), ours.base.copy_(theirs.base), ours.scale.copy_(theirs.scale)
        (
            mine.head.hc_fn.copy_(head.hc_fn),
            mine.head.hc_base.copy_(head.hc_base),
            mine.head.hc_scale.copy_(head.hc_scale),
        )
    lin_a, lin_f = torch.nn.Linear(D, D), torch.nn.Linear(D, D)
    h = torch.randn(2, 5, 3, D)
    ctx = ForwardContext(torch.arange(5))
    # the reference block (DeepseekV4DecoderLayer.forward with the two sublayers as plain maps)
    post, comb, x = attn_hc(h)
    ref = post.unsqueeze(-1) * lin_a(x).unsqueeze(-2) + comb.transpose(-1, -2) @ h
    post, comb, x = ffn_hc(ref)
    ref = post.unsqueeze(-1) * lin_f(x).unsqueeze(-2) + comb.transpose(-1, -2) @ ref
    out = mine(h, lin_a, lin_f, ctx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.reduce(out, ctx), head(ref), rtol=1e-5, atol=1e-5)
    # expand: the embedding copied into every stream
    e = torch.randn(2, 5, D)
    assert torch.equal(mine.expand(e, ctx), e.unsqueeze(2).expand(-1, -1, 3, -1))


def _copy_router(mine: torch.nn.Module, theirs: torch.nn.Module) -> None:
    with torch.no_grad():
        torch.nn.init.normal_(theirs.weight, std=0.5)
        mine.weight.copy_(theirs.weight)


@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid"])
def test_gate_router_matches_transformers(score_func: str) -> None:
    torch.manual_seed(1)
    theirs = hf_v4.DeepseekV4TopKRouter(hf_config(scoring_func=score_func))
    cls = registry.load("router", "v4_gate")
    mine = cls(model_config(), cls.Options(score_func=score_func), 0)
    _copy_router(mine, theirs)
    with torch.no_grad():
        bias = torch.randn(E) * 0.3
        theirs.e_score_correction_bias.copy_(bias), mine.bias.copy_(bias)
    x = torch.randn(12, D)
    _, w_ref, i_ref = theirs(x)
    out = mine(x, ForwardContext(torch.arange(12)))
    order_ref, order = i_ref.argsort(-1), out.indices_TK.argsort(-1)  # HF leaves the top-k unsorted
    assert torch.equal(i_ref.gather(1, order_ref), out.indices_TK.gather(1, order))
    torch.testing.assert_close(out.weights_TK.gather(1, order), w_ref.gather(1, order_ref))
    assert out.tokens_per_expert_E.sum() == 12 * K


def test_gate_router_bias_stays_fp32_and_takes_small_updates_when_the_model_is_cast_to_bf16() -> None:
    cls = registry.load("router", "v4_gate")
    router = torch.nn.Sequential(cls(model_config(), cls.Options(bias_update_speed=1e-3), 0)).to(torch.bfloat16)[0]
    assert router.weight.dtype == torch.bfloat16 and router.bias.dtype == torch.float32
    router.bias.fill_(0.5)  # bf16 steps by 2**-8 near 0.5: a 1e-3 update would round away there
    load_E = torch.zeros(E)
    load_E[0] = 4 * E  # expert 0 overloaded: its bias falls, the others rise
    router.update_after_step(load_E)
    assert router.bias[0].item() == pytest.approx(0.5 - 1e-3, abs=1e-7)
    assert router.bias[1].item() == pytest.approx(0.5 + 1e-3, abs=1e-7)


def test_hash_router_matches_transformers_and_routes_by_token_id() -> None:
    torch.manual_seed(2)
    theirs = hf_v4.DeepseekV4HashRouter(hf_config())
    cls = registry.load("router", "v4_hash")
    mine = cls(model_config(), cls.Options(), 3)
    mine.init_weights(0.02)
    table = mine.tid2eid.clone()
    assert all(len(set(row.tolist())) == K for row in table), "each token needs K distinct experts"
    _copy_router(mine, theirs)
    with torch.no_grad():
        theirs.tid2eid.copy_(table)
    ids = torch.randint(0, V, (2, 6))
    x = torch.randn(12, D)
    _, w_ref, i_ref = theirs(x, ids)
    out = mine(x, ForwardContext(torch.arange(6), token_ids_BT=ids))
    assert torch.equal(out.indices_TK, i_ref) and torch.equal(out.indices_TK, table[ids.flatten()])
    torch.testing.assert_close(out.weights_TK, w_ref)
    # the table depends on the layer (seed + layer id), and is redrawn identically
    other = cls(model_config(), cls.Options(), 4)
    other.init_weights(0.02)
    assert not torch.equal(other.tid2eid, table)
    mine.init_weights(0.02)
    assert torch.equal(mine.tid2eid, table)
    with pytest.raises(ValueError, match="token_ids_BT"):
        mine(x, ForwardContext(torch.arange(6)))


def test_clamped_experts_and_shared_expert_match_transformers() -> None:
    torch.manual_seed(3)
    cfg = hf_config()
    experts, shared = hf_v4.DeepseekV4Experts(cfg), hf_v4.DeepseekV4MLP(cfg)
    decoder = build_decoder(model_config(attention={"name": "mha"}))
    moe = decoder.layers[0].ffn
    with torch.no_grad():
        torch.nn.init.normal_(experts.gate_up_proj, std=0.3), torch.nn.init.normal_(experts.down_proj, std=0.3)
        F = experts.intermediate_dim
        moe.experts.w1.copy_(experts.gate_up_proj[:, :F]), moe.experts.w3.copy_(experts.gate_up_proj[:, F:])
        moe.experts.w2.copy_(experts.down_proj)
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            getattr(shared, theirs).weight.normal_(std=0.3)
            getattr(moe.shared_experts, ours).weight.copy_(getattr(shared, theirs).weight)
    x = torch.randn(10, D)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(10)])
    w = torch.rand(10, K)
    ref = experts(x, idx, w)
    torch.testing.assert_close(moe.experts(x, w, idx, ForwardContext(torch.arange(10))), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moe.shared_experts(x), shared(x), rtol=1e-5, atol=1e-6)
    # the limit (0.05 here) really clips: without it the outputs differ
    assert (x @ moe.experts.w1[0].T).abs().max() > 0.05
    moe.experts.limit = 1e9
    assert not torch.allclose(moe.experts(x, w, idx, ForwardContext(torch.arange(10))), ref, atol=1e-4)


def test_a_decoder_of_v4_parts_decodes_with_a_cache_as_without() -> None:
    torch.manual_seed(4)
    cfg = model_config(attention={"name": "mha"}, layers=[{"first": 0, "last": 0, "router": {"name": "v4_hash"}}])
    decoder = build_decoder(cfg).eval()
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        full = decoder(ids).logits
        cache = decoder.new_cache(2, 16)
        steps = [decoder(ids[:, :5], cache=cache).logits] + [
            decoder(ids[:, t : t + 1], cache=cache).logits for t in range(5, 9)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_decoder_of_v4_parts_trains_and_the_gate_bias_balances() -> None:
    torch.manual_seed(5)
    cfg = model_config(
        attention={"name": "mha"}, mtp_depth=1, layers=[{"first": 0, "last": 0, "router": {"name": "v4_hash"}}]
    )
    decoder = build_decoder(cfg)
    opt = torch.optim.AdamW(decoder.parameters(), lr=1e-2)
    ids = torch.randint(0, V, (4, 16))
    losses = []
    for _ in range(5):
        out = decoder(ids[:, :-1], mtp=True)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        loss = loss + sum(
            torch.nn.functional.cross_entropy(m.flatten(0, 1), ids[:, 2 + k :].flatten())
            for k, m in enumerate(out.mtp_logits)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    gate = decoder.layers[1].ffn.gate
    counts = torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 30.0])
    gate.update_after_step(counts)
    assert gate.bias[0] < 0 < gate.bias[1] and gate.bias[7] < 0  # over-loaded experts pushed down


@pytest.mark.bad_input
def test_the_v4_family_refuses_a_model_it_cannot_record_and_bad_options_fail_at_config_time(tmp_path) -> None:
    from moeframe.convert.hf import to_hf
    from moeframe.plugin import ConfigError, resolve_model_config

    decoder = build_decoder(model_config(attention={"name": "mha"}))
    with pytest.raises(ConfigError, match="need attention v4 in every layer; layer 0 uses 'mha'"):
        to_hf(decoder, tmp_path / "out", family="deepseek_v4", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="hc_mult must be >= 1"):
        resolve_model_config(model_config(residual={"name": "hyper", "hc_mult": 0}))
    with pytest.raises(ConfigError, match="score_func"):
        resolve_model_config(model_config(router={"name": "v4_gate", "score_func": "softmax"}))
