"""Contract checks for plugin authors, first- or third-party: call them from your own tests.

Each check builds the plugin through the registry exactly as a run would and raises
AssertionError with a readable message when a contract is broken.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from moeframe.config import ModelConfig, resolve_model_config
from moeframe.model.decoder import Decoder, build_decoder


def naive_experts(
    w1_EFD: torch.Tensor, w2_EDF: torch.Tensor, w3_EFD: torch.Tensor,
    x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor,
) -> torch.Tensor:
    """The textbook MoE, one (token, expert) pair at a time: the reference for experts plugins."""
    out_TD = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(indices_TK.shape[1]):
            e = int(indices_TK[t, k])
            h_F = F.silu(w1_EFD[e] @ x_TD[t]) * (w3_EFD[e] @ x_TD[t])
            out_TD[t] = out_TD[t] + weights_TK[t, k].to(x_TD.dtype) * (w2_EDF[e] @ h_F)
    return out_TD


def check_causal(config: ModelConfig, seq_len: int = 12, seed: int = 0) -> None:
    """Changing token t must never change the logits at positions before t."""
    torch.manual_seed(seed)
    decoder = build_decoder(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, seq_len))
    with torch.no_grad():
        base = decoder(ids).logits
        for t in range(seq_len):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 1) % config.vocab_size
            logits = decoder(changed).logits
            torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-5,
                                       msg=lambda m: f"token {t} leaked into earlier positions: {m}")
            assert not torch.allclose(logits[:, t:], base[:, t:]), f"changing token {t} changed nothing after it"


def check_meta_build(config: ModelConfig) -> Decoder:
    """The model builds on the meta device with no storage and materialises to the same shapes."""
    meta = build_decoder(config, device="meta")
    assert all(p.is_meta for p in meta.parameters()), "some parameter was allocated on a meta build"
    real = build_decoder(config)
    assert [(n, p.shape) for n, p in meta.named_parameters()] == [(n, p.shape) for n, p in real.named_parameters()]
    return meta


def tiny_config(**changes: Any) -> ModelConfig:
    """A CPU-sized config for contract checks (2 layers: one dense, one MoE)."""
    base = ModelConfig(vocab_size=64, dim=32, n_layers=2, first_k_dense=1, n_heads=4, dense_ffn_dim=64,
                       moe_ffn_dim=16, n_routed_experts=8, n_activated_experts=2, n_shared_experts=1,
                       max_seq_len=64)
    return dataclasses.replace(base, **changes)


# -- attention plugins ------------------------------------------------------------------------
# The checks below build a whole decoder through the registry, as a run would, and re-draw its
# matrices with a large std: at the default init (0.006) attention is nearly uniform, so a wrong
# position or a stale cache entry would hardly move the logits and slip through.

_CHECK_STD = 0.08


def _checked_decoder(config: ModelConfig, seed: int) -> Decoder:
    torch.manual_seed(seed)
    decoder = build_decoder(config).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, _CHECK_STD)
    return decoder


def check_attention_shapes_and_dtypes(config: ModelConfig, seq_len: int = 10) -> None:
    """The attention maps [B, T, D] to [B, T, D] in fp32 and in bf16 (output dtype = input dtype)."""
    decoder = _checked_decoder(config, seed=0)
    attn = decoder.layers[0].attn
    x = torch.randn(3, seq_len, config.dim)
    with torch.no_grad():
        y = attn(x, torch.arange(seq_len))
        assert y.shape == x.shape and y.dtype == torch.float32, f"attention gave {y.shape} {y.dtype} for {x.shape}"
        attn_bf16 = attn.to(torch.bfloat16)
        y16 = attn_bf16(x.to(torch.bfloat16), torch.arange(seq_len))
    assert y16.dtype == torch.bfloat16, f"bf16 input gave a {y16.dtype} output"
    assert torch.isfinite(y16).all(), "bf16 attention produced non-finite values"
    torch.testing.assert_close(y16.float(), y, rtol=0.1, atol=0.1,
                               msg=lambda m: f"bf16 attention is far from fp32: {m}")


def check_document_masking(config: ModelConfig, seq_len: int = 12) -> None:
    """Rewriting one packed document never changes the logits of the next one."""
    decoder = _checked_decoder(config, seed=0)
    ids = torch.randint(0, config.vocab_size, (1, seq_len))
    cut = seq_len // 2
    docs = torch.tensor([[0] * cut + [1] * (seq_len - cut)])
    changed = ids.clone()
    changed[0, :cut] = (changed[0, :cut] + 3) % config.vocab_size
    with torch.no_grad():
        base, after, unmasked = decoder(ids, docs).logits, decoder(changed, docs).logits, decoder(changed).logits
    torch.testing.assert_close(after[0, cut:], base[0, cut:], rtol=0, atol=1e-5,
                               msg=lambda m: f"a token attended across a document boundary: {m}")
    assert not torch.allclose(unmasked[0, cut:], base[0, cut:]), "without document ids the documents should mix"


def check_state_dict_round_trip(config: ModelConfig, seq_len: int = 8) -> None:
    """A state dict saved from one model and loaded into another reproduces its outputs exactly."""
    a, b = _checked_decoder(config, seed=0), _checked_decoder(config, seed=1)
    ids = torch.randint(0, config.vocab_size, (2, seq_len))
    b.load_state_dict(a.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits), "loading a state dict did not reproduce the model"


def check_cache_matches_full(config: ModelConfig, seq_len: int = 12, prefill: int = 5, atol: float = 1e-5) -> None:
    """Decoding with the KV cache (a prefill of ``prefill`` tokens, then one token per step)
    gives the logits of the full-sequence forward, and the cache counts the tokens it holds."""
    decoder = _checked_decoder(config, seed=0)
    ids = torch.randint(0, config.vocab_size, (2, seq_len))
    with torch.no_grad():
        full = decoder(ids).logits
        cache = decoder.new_cache(2, seq_len)
        steps = [decoder(ids[:, :prefill], cache=cache).logits]
        steps += [decoder(ids[:, t:t + 1], cache=cache).logits for t in range(prefill, seq_len)]
    assert cache.length == seq_len, f"the cache holds {cache.length} tokens after {seq_len}"
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=atol,
                               msg=lambda m: f"cached decoding differs from the full forward: {m}")


def check_cache_nbytes(config: ModelConfig, num_tokens: int = 9, batch_size: int = 2,
                       dtype: torch.dtype = torch.bfloat16) -> int:
    """The bytes a full cache really holds equal the plugin's declared values per token
    (``kv_cache_values_per_token``) × layers × tokens × batch × element size. Returns the bytes."""
    decoder = _checked_decoder(config, seed=0).to(dtype)
    attention = decoder.layers[0].attn
    options = resolve_model_config(config).attention.options
    per_token = type(attention).kv_cache_values_per_token(config, options)
    cache = decoder.new_cache(batch_size, num_tokens)
    with torch.no_grad():
        decoder(torch.randint(0, config.vocab_size, (batch_size, num_tokens)), cache=cache)
    expected = config.n_layers * batch_size * num_tokens * per_token * dtype.itemsize
    assert cache.nbytes() == expected, f"cache holds {cache.nbytes()} bytes, declared {expected}"
    return cache.nbytes()


def check_greedy_generation_matches_recompute(config: ModelConfig, prompt_len: int = 5, steps: int = 8) -> list[int]:
    """Greedy generation with the cache picks the same tokens as recomputing the whole prefix."""
    from moeframe.generate import generate_ids

    decoder = _checked_decoder(config, seed=0)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len))
    cached = [int(t) for t in generate_ids(decoder, prompt, steps, use_cache=True)]
    recomputed = [int(t) for t in generate_ids(decoder, prompt, steps, use_cache=False)]
    assert cached == recomputed, f"greedy with cache {cached} != recomputing the prefix {recomputed}"
    return cached


def check_attention_contract(config: ModelConfig, cache: bool = True) -> None:
    """Every check an attention plugin must pass: meta build, shapes and dtypes, causality,
    document masking, state-dict round trip and, unless ``cache=False`` (a plugin without
    ``new_cache``), cached decoding: logits, measured cache bytes, greedy generation."""
    check_meta_build(config)
    check_attention_shapes_and_dtypes(config)
    check_causal(config)
    check_document_masking(config)
    check_state_dict_round_trip(config)
    if cache:
        check_cache_matches_full(config)
        check_cache_nbytes(config)
        check_greedy_generation_matches_recompute(config)
