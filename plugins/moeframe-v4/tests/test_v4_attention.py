"""Attention ``v4`` against HF transformers' DeepseekV4Attention, per layer type; its cache; its config.

HF modules are built from a tiny ``DeepseekV4Config`` with random weights (nothing is downloaded)
and copied into ours through ``HF_TENSOR_NAMES``, the mapping the checkpoint family uses. The
shapes make every path matter: 23 tokens against a window of 6, a CSA rate of 4 (5 entries, of
which the indexer keeps 2 per query) and an HCA rate of 8 (2 entries), YaRN on the compress rotary.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DeepseekV4Config, DynamicCache
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Attention, DeepseekV4RotaryEmbedding

from moeframe.plugin import ConfigError, ForwardContext, registry, resolve_model_config
from moeframe.testing import (
    check_attention_shapes_and_dtypes,
    check_cache_matches_full,
    check_causal,
    check_document_masking,
    check_greedy_generation_matches_recompute,
    check_meta_build,
    check_state_dict_round_trip,
    tiny_config,
)
from moeframe_v4.attention import HF_TENSOR_NAMES, LAYER_TYPES, V4Attention
from moeframe_v4.attn_rope import RopeSetting

DIM, HEADS, HEAD_DIM, ROPE, Q_LORA, WINDOW, CSA, HCA = 32, 4, 16, 8, 12, 6, 4, 8
# 8 indexer heads: with fewer, entries that every head scores below zero often tie at exactly 0,
# where HF's topk picks arbitrarily and ours keeps the earlier entry (see the ties test)
INDEX = dict(index_n_heads=8, index_head_dim=12, index_topk=2)
THETA, COMPRESS_THETA = 500.0, 2000.0  # small thetas: the slow pairs turn visibly within 23 positions
YARN = dict(factor=4.0, original_max_position_embeddings=8, beta_fast=4.0, beta_slow=1.0)
T = 23
OPTIONS: dict[str, Any] = dict(
    name="v4",
    head_dim=HEAD_DIM,
    rope_head_dim=ROPE,
    q_lora_rank=Q_LORA,
    sliding_window=WINDOW,
    compress_rate_csa=CSA,
    compress_rate_hca=HCA,
    o_groups=2,
    o_lora_rank=6,
    rope_theta=THETA,
    compress_rope_theta=COMPRESS_THETA,
    compress_rope_factor=YARN["factor"],
    compress_original_seq_len=YARN["original_max_position_embeddings"],
    compress_beta_fast=YARN["beta_fast"],
    compress_beta_slow=YARN["beta_slow"],
    **INDEX,
)


def _hf_config(layer_type: str) -> DeepseekV4Config:
    hf = DeepseekV4Config(
        vocab_size=64,
        hidden_size=DIM,
        num_attention_heads=HEADS,
        head_dim=HEAD_DIM,
        q_lora_rank=Q_LORA,
        num_hidden_layers=1,
        layer_types=[layer_type],
        mlp_layer_types=["moe"],
        partial_rotary_factor=ROPE / HEAD_DIM,
        sliding_window=WINDOW,
        compress_rates={"compressed_sparse_attention": CSA, "heavily_compressed_attention": HCA},
        o_groups=2,
        o_lora_rank=6,
        rope_theta=THETA,
        compress_rope_theta=COMPRESS_THETA,
        rope_parameters={"rope_type": "yarn", **YARN},
        max_position_embeddings=32,
        rms_norm_eps=1e-6,
        **INDEX,
    )
    hf._attn_implementation = "eager"
    return hf


def _ours(layer_type: str, **changes: Any) -> V4Attention:
    cfg = tiny_config(dim=DIM, n_heads=HEADS, attention={**OPTIONS, "layer_type": layer_type, **changes})
    plan = resolve_model_config(cfg)
    return V4Attention(plan.config, plan.attention.options, layer_id=0).eval()


def _pair(layer_type: str) -> tuple[DeepseekV4Attention, V4Attention, DeepseekV4Config]:
    hf_cfg = _hf_config(layer_type)
    torch.manual_seed(0)
    hf = DeepseekV4Attention(hf_cfg, layer_idx=0).eval()
    for p in hf.parameters():  # norm scales, sinks and position biases too, so a missing one shows
        torch.nn.init.normal_(p, std=0.3)
    ours = _ours(layer_type)
    hf_state = hf.state_dict()
    ours.load_state_dict({k: hf_state[HF_TENSOR_NAMES[k]] for k in ours.state_dict()}, strict=True)
    assert len(hf_state) == len(ours.state_dict()), sorted(
        set(hf_state) - {HF_TENSOR_NAMES[k] for k in ours.state_dict()}
    )
    return hf, ours, hf_cfg


def _hf_forward(hf: DeepseekV4Attention, hf_cfg: DeepseekV4Config, x_BTD: torch.Tensor) -> torch.Tensor:
    B, T_ = x_BTD.shape[:2]
    positions_BT = torch.arange(T_)[None].expand(B, -1)
    rotary = DeepseekV4RotaryEmbedding(hf_cfg)
    embeddings = {kind: rotary(x_BTD, positions_BT, layer_type=kind) for kind in ("main", "compress")}
    mask = create_sliding_window_causal_mask(
        config=hf_cfg, inputs_embeds=x_BTD, attention_mask=None, cache=None, position_ids=positions_BT
    )
    assert isinstance(mask, torch.Tensor), "the eager mask must be a tensor (else HF drops the compressor's mask)"
    with torch.no_grad():
        return hf(x_BTD, embeddings, positions_BT, mask)[0]


def _ours_forward(ours: V4Attention, x_BTD: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ours(x_BTD, ForwardContext(torch.arange(x_BTD.shape[1])))


def test_registered_through_the_entry_point() -> None:
    assert registry.load("attention", "v4") is V4Attention
    assert registry.resolve("attention", "v4").distribution == "moeframe-v4"


@pytest.mark.parametrize("query_block", [512, 5], ids=["one-block", "blocks-of-5"])
@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_matches_hf_deepseek_v4_attention(layer_type: str, query_block: int) -> None:
    """Also with the training forward cut into query blocks shorter than the window (5 < 6)."""
    hf, ours, hf_cfg = _pair(layer_type)
    ours.query_block = query_block
    torch.manual_seed(1)
    x = torch.randn(2, T, DIM)
    ref = _hf_forward(hf, hf_cfg, x)
    assert (_ours_forward(ours, x) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    ("layer_type", "change"),
    [
        ("compressed_sparse_attention", "indexer reads every entry"),
        ("compressed_sparse_attention", "no compressed entries"),
        ("heavily_compressed_attention", "no compressed entries"),
        ("sliding_attention", "no sink"),
        ("sliding_attention", "window one larger"),
        ("heavily_compressed_attention", "main rotary"),
        ("compressed_sparse_attention", "compress rotary without YaRN"),
    ],
)
def test_every_path_moves_the_output(layer_type: str, change: str) -> None:
    """Each part the parity covers changes the output by far more than the tolerance, so the parity
    above could not pass with that part missing or wrong."""
    hf, ours, hf_cfg = _pair(layer_type)
    x = torch.randn(2, T, DIM)
    ref = _hf_forward(hf, hf_cfg, x)
    if change == "indexer reads every entry":
        ours.indexer.topk = T
    elif change == "no compressed entries":
        ours.compressor, ours.indexer = None, None
    elif change == "no sink":
        ours.sinks = None
    elif change == "window one larger":
        ours.window += 1
    elif change == "main rotary":
        ours.rope_setting = _ours("sliding_attention").rope_setting
    else:
        ours.rope_setting = RopeSetting(COMPRESS_THETA)
    assert (_ours_forward(ours, x) - ref).abs().max().item() > 1e-3


PIECES = [(0, 7), (7, 8), (8, 9), (9, 10), (10, 19), (19, 20), (20, 21), (21, 23)]


def _hf_decode(hf: DeepseekV4Attention, hf_cfg: DeepseekV4Config, x_BTD: torch.Tensor) -> torch.Tensor:
    """HF's own cached decoding over the same pieces (its cache layer of the layer type)."""
    cache, rotary, outputs = DynamicCache(config=hf_cfg), DeepseekV4RotaryEmbedding(hf_cfg), []
    for start, end in PIECES:
        x_piece, positions_BT = x_BTD[:, start:end], torch.arange(start, end)[None].expand(x_BTD.shape[0], -1)
        embeddings = {kind: rotary(x_piece, positions_BT, layer_type=kind) for kind in ("main", "compress")}
        mask = create_sliding_window_causal_mask(
            config=hf_cfg, inputs_embeds=x_piece, attention_mask=None, cache=cache, position_ids=positions_BT
        )
        with torch.no_grad():
            outputs.append(hf(x_piece, embeddings, positions_BT, mask, cache=cache)[0])
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_decoding_with_the_cache_equals_the_full_forward(layer_type: str) -> None:
    """A prefill, single tokens, a chunk that completes several windows at once, single tokens again:
    the unfinished windows, the CSA overlap across calls and the sliding keys all cross call edges.
    Equal to our full forward, and to HF's cached decoding over the same pieces."""
    hf, ours, hf_cfg = _pair(layer_type)
    x = torch.randn(2, T, DIM)
    full = _ours_forward(ours, x)
    cache = ours.new_cache(2, T, x.device, x.dtype)
    pieces = []
    for start, end in PIECES:
        with torch.no_grad():
            pieces.append(ours(x[:, start:end], ForwardContext(torch.arange(start, end), cache=cache)))
    assert cache.length == T
    decoded = torch.cat(pieces, dim=1)
    torch.testing.assert_close(decoded, full, rtol=0, atol=1e-5)
    assert (decoded - _hf_decode(hf, hf_cfg, x)).abs().max().item() <= 1e-4


def test_indexer_ties_are_broken_the_same_way_while_decoding() -> None:
    """Entries that every indexer head scores below zero tie at exactly 0 (ReLU). Here all do (no
    indexer query), so the top-k is decided by tie-breaking alone: decoding picks what the full
    forward picks (the earlier entries)."""
    ours = _ours("compressed_sparse_attention")
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.3)
        ours.indexer.q_b_proj.weight.zero_()
    x = torch.randn(2, T, DIM)
    full = _ours_forward(ours, x)
    cache = ours.new_cache(2, T, x.device, x.dtype)
    with torch.no_grad():
        decoded = torch.cat([ours(x[:, s:e], ForwardContext(torch.arange(s, e), cache=cache)) for s, e in PIECES], 1)
    torch.testing.assert_close(decoded, full, rtol=0, atol=1e-5)


def _three_types(**changes: Any) -> Any:
    """A 3-layer decoder with one layer of each type, chosen per layer as a config does."""
    small = {**OPTIONS, "sliding_window": 4, "compress_rate_csa": 2, "compress_rate_hca": 4, "index_topk": 2}
    layers = [{"first": i, "last": i, "attention": {"layer_type": t}} for i, t in enumerate(LAYER_TYPES)]
    return tiny_config(dim=DIM, n_heads=HEADS, n_layers=3, attention=small, layers=layers, **changes)


def test_the_decoder_contract_with_all_three_layer_types() -> None:
    """Built from a model config with per-layer ``layer_type``: causal, document-masked, cached
    decoding and greedy generation as the core expects of every attention plugin. (Not the
    bytes-per-token check: a sliding window's cache does not grow with the tokens.)"""
    config = _three_types()
    decoder = check_meta_build(config)
    kinds = [type(block.attn.compressor).__name__ if block.attn.compressor else None for block in decoder.layers]
    assert kinds == [None, "Compressor", "Compressor"] and decoder.layers[1].attn.indexer is not None
    check_attention_shapes_and_dtypes(config)
    check_causal(config)
    check_document_masking(config, seq_len=16)
    check_state_dict_round_trip(config)
    check_cache_matches_full(config, seq_len=14, prefill=5)
    check_greedy_generation_matches_recompute(config, prompt_len=5, steps=9)


def test_packed_documents_do_not_leak_through_compressed_entries() -> None:
    """Rewriting the first document leaves the second unchanged in every layer type, although
    the second starts mid-window (its first compressed windows pool tokens of both)."""
    for layer_type in LAYER_TYPES:
        ours = _ours(layer_type, query_block=4)  # blocks that straddle the documents' edge too
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_(0.0, 0.3)
        x = torch.randn(1, T, DIM)
        changed = x.clone()
        changed[:, :10] += 1.0
        docs = torch.tensor([[0] * 10 + [1] * (T - 10)])
        with torch.no_grad():
            base = ours(x, ForwardContext(torch.arange(T), document_ids_BT=docs))
            after = ours(changed, ForwardContext(torch.arange(T), document_ids_BT=docs))
        torch.testing.assert_close(after[:, 10:], base[:, 10:], rtol=0, atol=1e-6)
        assert not torch.allclose(after[:, :10], base[:, :10])


def test_kv_cache_values_per_token_counts_window_and_entries() -> None:
    """V4-Flash at 1M tokens: the window is negligible, CSA stores (512 + 128)/4, HCA 512/128."""
    per_type = {}
    for layer_type in LAYER_TYPES:
        cfg = tiny_config(dim=4096, n_heads=64, max_seq_len=1 << 20, attention={"name": "v4", "layer_type": layer_type})
        plan = resolve_model_config(cfg)
        per_type[layer_type] = V4Attention.kv_cache_values_per_token(plan.config, plan.attention.options)
    assert per_type == {
        "sliding_attention": 1,
        "compressed_sparse_attention": 1 + (512 + 128) // 4,
        "heavily_compressed_attention": 1 + 512 // 128,
    }


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"layer_type": "full_attention"}, ["option 'layer_type' must be", "sliding_attention"]),
        ({"o_groups": 3}, ["o_groups=3 must divide model.n_heads * head_dim = 64"]),
        ({"rope_head_dim": 7}, ["rope_head_dim=7 must be a positive even number"]),
        ({"index_head_dim": 4}, ["index_head_dim=4 must be >= rope_head_dim=8"]),
        ({"compress_original_seq_len": None}, ["compress_rope_factor=4.0 needs compress_original_seq_len"]),
        ({"sliding_window": 0}, ["sliding_window=0 must be > 0"]),
    ],
    ids=lambda v: str(v)[:30],
)
def test_inconsistent_options_are_rejected_at_config_time(changes: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_model_config(tiny_config(dim=DIM, n_heads=HEADS, attention={**OPTIONS, **changes}))
    message = str(err.value)
    assert message.startswith("model.attention:"), message
    for fragment in fragments:
        assert fragment in message, message


def test_selective_recompute_gives_the_same_gradients() -> None:
    """Recomputing the queries in backward (``activation_checkpointing: selective``) changes no
    gradient, and the checkpoint really holds the queries' inputs instead of their outputs."""
    grads, saved = [], []
    for recompute in (False, True):
        ours = _ours("compressed_sparse_attention")
        torch.manual_seed(2)
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_(0.0, 0.3)
        ours.set_selective_recompute(recompute)
        x = torch.randn(2, T, DIM, requires_grad=True)
        numels: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: numels.append(t.numel()) or t, lambda t: t):
            y = ours(x, ForwardContext(torch.arange(T)))
        y.square().sum().backward()
        grads.append([x.grad] + [p.grad for p in ours.parameters()])
        saved.append(sum(numels))
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-6)
    assert saved[1] < saved[0] - 2 * T * HEADS * HEAD_DIM, saved  # at least the rotated queries are not kept


def test_hf_config_fields_round_trip_through_transformers() -> None:
    """The fields ``hf_config`` writes build the same DeepseekV4Config attention as the parity's
    config, and ``options_from_hf`` reads transformers' saved form back to the same options."""
    cfg = tiny_config(dim=DIM, n_heads=HEADS, attention={**OPTIONS, "layer_type": "compressed_sparse_attention"})
    plan = resolve_model_config(cfg)
    fields = V4Attention.hf_config("deepseek_v4", plan.config, plan.attention.options)
    written = DeepseekV4Config(
        vocab_size=64,
        hidden_size=DIM,
        num_attention_heads=HEADS,
        num_hidden_layers=1,
        layer_types=["compressed_sparse_attention"],
        mlp_layer_types=["moe"],
        max_position_embeddings=32,
        **fields,
    )
    reference = _hf_config("compressed_sparse_attention")
    for key in (
        "head_dim",
        "q_lora_rank",
        "sliding_window",
        "compress_rates",
        "index_n_heads",
        "index_head_dim",
        "index_topk",
        "o_groups",
        "o_lora_rank",
        "qk_rope_head_dim",
        "num_key_value_heads",
        "rope_parameters",
    ):
        assert getattr(written, key) == getattr(reference, key), key
    read = V4Attention.options_from_hf("deepseek_v4", written.to_dict())
    expected = {k: v for k, v in OPTIONS.items() if k != "name"}
    assert {k: read[k] for k in expected} == expected and set(read) == set(expected)


def test_query_blocks_keep_fewer_values_for_backward_and_the_same_gradients() -> None:
    """Sliding layers read 6 keys per query: blocks of 4 queries keep far fewer logits for backward
    than one block of 23 (23·23 per head), with the same gradients."""
    grads, saved = [], []
    for block in (512, 4):
        ours = _ours("sliding_attention", query_block=block)
        torch.manual_seed(3)
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_(0.0, 0.3)
        x = torch.randn(2, T, DIM, requires_grad=True)
        numels: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: numels.append(t.numel()) or t, lambda t: t):
            y = ours(x, ForwardContext(torch.arange(T)))
        y.square().sum().backward()
        grads.append([x.grad] + [p.grad for p in ours.parameters()])
        saved.append(sum(numels))
    for whole, blocked in zip(*grads):
        torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)
    assert saved[1] < saved[0] - 2 * HEADS * T * T, saved  # at least one [B, H, T, T] logits tensor fewer


@pytest.mark.bad_input
def test_a_model_without_sinks_is_refused_on_hf_export() -> None:
    cfg = tiny_config(dim=DIM, n_heads=HEADS, attention={**OPTIONS, "attention_sink": False})
    plan = resolve_model_config(cfg)
    with pytest.raises(ConfigError, match="attention_sink: false has no HF form"):
        V4Attention.hf_config("deepseek_v4", plan.config, plan.attention.options)
