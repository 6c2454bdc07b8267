"""Contract checks for plugin authors, first- or third-party: call them from your own tests.

Each check builds the plugin through the registry exactly as a run would and raises
AssertionError with a readable message when a contract is broken.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from moeframe.config import ModelConfig
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
