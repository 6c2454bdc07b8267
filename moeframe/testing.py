"""Contract checks for plugin authors, first- or third-party: call them from your own tests.

One entry point per plugin kind; each builds the plugin through the registry exactly as a run
would and raises AssertionError with a readable message when a contract is broken:

- attention: :func:`check_attention_contract` (meta build, shapes and dtypes, causality,
  document masking, state-dict round trip, KV cache);
- router: :func:`check_router_contract` (shapes, indices in range, weights, balance statistics,
  determinism, gradients, state dict);
- experts: :func:`check_experts_contract` (parity with a naive per-pair loop, forward and backward);
- norm: :func:`check_norm_contract`;
- residual: :func:`check_residual_contract` (shapes, each sublayer once, per token, gradients,
  state dict, cached decoding, multi-token prediction through its MTP hooks);
- precision: :func:`check_precision_contract` (converts only what it claims, gradients flow);
- strategy: :func:`check_strategy_contract` (registers, trains 2 steps on 2 CPU processes);
- HF checkpoint family, or a part's HF names in a family: :func:`check_hf_family_contract`
  (export, import, every tensor and the logits come back exactly).

:func:`tiny_config` gives the CPU-sized model config they are meant to run on. Plugins of plugin
API 1 and 2 are both checked, each called with its own signatures (``moeframe.model.compat``).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.config import ModelConfig, resolve_model_config
from moeframe.model.base import ExpertsBase
from moeframe.model.compat import call_attention, call_experts, call_norm, call_router
from moeframe.model.context import ForwardContext
from moeframe.model.decoder import Decoder, build_decoder

# The flags of a short CPU test run of `moeframe fit -c configs/pretrain/tiny.yaml`: no validation,
# a metrics row every step, no progress bar, 32-token sequences in batches of 4, a 300 KB corpus.
TINY_RUN_FLAGS: tuple[str, ...] = (
    "--trainer.limit_val_batches",
    "0",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--data.init_args.seq_len",
    "32",
    "--data.init_args.batch_size",
    "4",
    "--data.init_args.max_bytes",
    "300000",
)


def naive_experts(
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    indices_TK: torch.Tensor,
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
            torch.testing.assert_close(
                logits[:, :t],
                base[:, :t],
                rtol=0,
                atol=1e-5,
                msg=lambda m: f"token {t} leaked into earlier positions: {m}",
            )
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
    base = ModelConfig(
        vocab_size=64,
        dim=32,
        n_layers=2,
        first_k_dense=1,
        n_heads=4,
        dense_ffn_dim=64,
        moe_ffn_dim=16,
        n_routed_experts=8,
        n_activated_experts=2,
        n_shared_experts=1,
        max_seq_len=64,
    )
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


def _context(config: ModelConfig, batch_size: int, seq_len: int, layer_id: int | None, seed: int = 0) -> ForwardContext:
    """A training-forward context for ``batch_size`` sequences of random token ids."""
    g = torch.Generator().manual_seed(seed)
    ids_BT = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=g)
    return ForwardContext(torch.arange(seq_len), ids_BT, layer_id=layer_id)


def check_attention_shapes_and_dtypes(config: ModelConfig, seq_len: int = 10) -> None:
    """The attention maps [B, T, D] to [B, T, D] in fp32 and in bf16 (output dtype = input dtype)."""
    decoder = _checked_decoder(config, seed=0)
    attn = decoder.layers[0].attn
    x = torch.randn(3, seq_len, config.dim)
    ctx = _context(config, 3, seq_len, layer_id=0)
    with torch.no_grad():
        y = call_attention(attn, x, ctx)
        assert y.shape == x.shape and y.dtype == torch.float32, f"attention gave {y.shape} {y.dtype} for {x.shape}"
        attn_bf16 = attn.to(torch.bfloat16)
        y16 = call_attention(attn_bf16, x.to(torch.bfloat16), ctx)
    assert y16.dtype == torch.bfloat16, f"bf16 input gave a {y16.dtype} output"
    assert torch.isfinite(y16).all(), "bf16 attention produced non-finite values"
    torch.testing.assert_close(
        y16.float(), y, rtol=0.1, atol=0.1, msg=lambda m: f"bf16 attention is far from fp32: {m}"
    )


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
    torch.testing.assert_close(
        after[0, cut:],
        base[0, cut:],
        rtol=0,
        atol=1e-5,
        msg=lambda m: f"a token attended across a document boundary: {m}",
    )
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
        steps += [decoder(ids[:, t : t + 1], cache=cache).logits for t in range(prefill, seq_len)]
    assert cache.length == seq_len, f"the cache holds {cache.length} tokens after {seq_len}"
    torch.testing.assert_close(
        torch.cat(steps, dim=1),
        full,
        rtol=0,
        atol=atol,
        msg=lambda m: f"cached decoding differs from the full forward: {m}",
    )


def check_cache_nbytes(
    config: ModelConfig, num_tokens: int = 9, batch_size: int = 2, dtype: torch.dtype = torch.bfloat16
) -> int:
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


# -- router plugins ---------------------------------------------------------------------------


def _moe_layer(decoder: Decoder) -> Any:
    from moeframe.model.moe import MoE

    layer = decoder.layers[decoder.config.first_k_dense].ffn
    assert isinstance(layer, MoE), "the contract config needs at least one MoE layer (first_k_dense < n_layers)"
    return layer


def _route(router: Any, x_TD: torch.Tensor, seq_len: int, config: ModelConfig | None = None) -> Any:
    """Call a router the way the MoE layer does: with the context of B = T/seq_len sequences of
    random token ids (the same ids for the same call shape, so routing by id is deterministic)."""
    vocab = config.vocab_size if config is not None else 2
    layer_id = config.first_k_dense if config is not None else None
    ctx = _context(ModelConfig(vocab_size=vocab), x_TD.shape[0] // seq_len, seq_len, layer_id)
    return call_router(router, x_TD, ctx)


def _check_routes_in_fp32_under_autocast(
    router: Any, x_TD: torch.Tensor, seq_len: int, fp32: Any, name: str, config: ModelConfig | None = None
) -> None:
    """Under bf16 autocast (``bf16-mixed``, the FP8 plugin) the router must decide exactly as in
    fp32: autocast re-casts ``F.linear``'s inputs to bf16 even after ``.float()``, so a gate that
    does not switch autocast off (``moeframe.model.router.gate_logits_fp32``) routes in bf16."""
    with torch.autocast(x_TD.device.type, dtype=torch.bfloat16):
        mixed = _route(router, x_TD, seq_len, config)  # the token ids `fp32` was routed with
    assert mixed.weights_TK.dtype == torch.float32, (
        f"{name}: under bf16 autocast the gate weights are {mixed.weights_TK.dtype}, expected fp32 (disable autocast around the gate)"
    )
    changed = (mixed.indices_TK.sort(dim=-1).values != fp32.indices_TK.sort(dim=-1).values).any(dim=-1)
    assert not changed.any(), (
        f"{name}: under bf16 autocast {int(changed.sum())} of {changed.numel()} tokens chose other "
        "experts than in fp32: route in fp32 (disable autocast around the gate projection)"
    )
    diff = (mixed.weights_TK - fp32.weights_TK).abs().max().item()
    assert diff <= 1e-6 * max(1.0, float(fp32.weights_TK.abs().max())), (
        f"{name}: under bf16 autocast the gate weights differ from fp32 by {diff:.2e}: the gate ran in bf16"
    )


def check_router_contract(
    config: ModelConfig, num_sequences: int = 4, seq_len: int = 12, weights_sum_to: float | None = None
) -> None:
    """Every check a router plugin must pass, on the router the registry builds for ``config``.

    - shapes and dtypes: ``weights_TK`` fp32 [T, K] (also for bf16 input), ``indices_TK``
      integer [T, K], ``tokens_per_expert_E`` [E];
    - fp32 routing under bf16 autocast: the same experts and gate weights as without autocast;
    - indices in range: every index in ``[0, E)``, each token's K experts distinct;
    - weights: finite, in ``[0, route_scale]``; with ``weights_sum_to`` (e.g. ``route_scale`` for
      a router that normalises its top-k weights) each token's weights sum to it;
    - balance statistics exposed: ``tokens_per_expert_E`` is the count of each expert in
      ``indices_TK`` (what balancing callbacks and metrics read); ``aux_loss`` is None or a
      finite scalar; ``update_after_step`` accepts the counts;
    - determinism: the same input routes the same way twice (eval mode);
    - gradients: in training mode the gate weights (plus the balance loss) reach the router's
      trainable parameters;
    - state dict: a router loaded from another's state dict routes identically (buffers such as
      a balancing bias included).
    """
    E, K = config.n_routed_experts, config.n_activated_experts
    num_tokens = num_sequences * seq_len
    decoder = _checked_decoder(config, seed=0)
    router = _moe_layer(decoder).gate
    x_TD = torch.randn(num_tokens, config.dim)

    out = _route(router.eval(), x_TD, seq_len, config)
    name = type(router).__qualname__
    assert out.weights_TK.shape == (num_tokens, K), (
        f"{name}: weights_TK is {tuple(out.weights_TK.shape)}, expected {(num_tokens, K)}"
    )
    assert out.indices_TK.shape == (num_tokens, K), (
        f"{name}: indices_TK is {tuple(out.indices_TK.shape)}, expected {(num_tokens, K)}"
    )
    assert out.weights_TK.dtype == torch.float32, f"{name}: gate weights must be fp32, got {out.weights_TK.dtype}"
    assert not out.indices_TK.is_floating_point(), f"{name}: indices_TK must be integers, got {out.indices_TK.dtype}"
    assert int(out.indices_TK.min()) >= 0 and int(out.indices_TK.max()) < E, (
        f"{name}: expert indices outside [0, {E}): {out.indices_TK.min().item()}..{out.indices_TK.max().item()}"
    )
    distinct = torch.tensor([len(set(row.tolist())) == K for row in out.indices_TK])
    assert distinct.all(), (
        f"{name}: token {int((~distinct).nonzero()[0])} chose an expert twice: {out.indices_TK[~distinct][0].tolist()}"
    )
    w = out.weights_TK
    assert torch.isfinite(w).all() and (w >= 0).all(), f"{name}: gate weights must be finite and >= 0"
    assert (w <= config.route_scale * (1 + 1e-6)).all(), (
        f"{name}: a gate weight {w.max().item():.4f} exceeds route_scale={config.route_scale}"
    )
    if weights_sum_to is not None:
        torch.testing.assert_close(
            w.sum(-1),
            torch.full((num_tokens,), float(weights_sum_to)),
            rtol=0,
            atol=1e-5,
            msg=lambda m: f"{name}: each token's gate weights must sum to {weights_sum_to}: {m}",
        )

    counts_E = torch.bincount(out.indices_TK.flatten().long(), minlength=E)
    assert tuple(out.tokens_per_expert_E.shape) == (E,), f"{name}: tokens_per_expert_E must have shape ({E},)"
    assert torch.equal(out.tokens_per_expert_E.long(), counts_E), (
        f"{name}: tokens_per_expert_E {out.tokens_per_expert_E.tolist()} != the counts of indices_TK {counts_E.tolist()}"
    )

    again = _route(router, x_TD.clone(), seq_len, config)
    assert torch.equal(again.indices_TK, out.indices_TK) and torch.equal(again.weights_TK, out.weights_TK), (
        f"{name}: the same input routed differently twice (eval mode must be deterministic)"
    )

    low = _route(router, x_TD.to(torch.bfloat16), seq_len, config)
    assert low.weights_TK.dtype == torch.float32, (
        f"{name}: bf16 input gave {low.weights_TK.dtype} gate weights, expected fp32"
    )
    assert int(low.indices_TK.min()) >= 0 and int(low.indices_TK.max()) < E, (
        f"{name}: bf16 input gave indices out of range"
    )
    _check_routes_in_fp32_under_autocast(router, x_TD, seq_len, out, name, config)

    trained = _route(router.train(), x_TD, seq_len, config)
    if trained.aux_loss is not None:
        assert trained.aux_loss.dim() == 0 and torch.isfinite(trained.aux_loss), (
            f"{name}: aux_loss must be a finite scalar, got {trained.aux_loss}"
        )
    trainable = [(n, p) for n, p in router.named_parameters() if p.requires_grad]
    if trainable:
        loss = trained.weights_TK.sum() + (trained.aux_loss if trained.aux_loss is not None else 0.0)
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable), (
            f"{name}: no gradient reached the router's parameters {[n for n, _ in trainable]} from the gate weights"
        )
    router.update_after_step(counts_E)  # what ExpertBalance calls once per optimizer step

    other = _moe_layer(_checked_decoder(config, seed=1)).gate.eval()
    other.load_state_dict(router.state_dict(), strict=True)
    a, b = _route(router.eval(), x_TD, seq_len, config), _route(other, x_TD, seq_len, config)
    assert torch.equal(a.indices_TK, b.indices_TK) and torch.equal(a.weights_TK, b.weights_TK), (
        f"{name}: a router loaded from another's state dict routes differently (is some state not in the state dict?)"
    )


# -- experts plugins --------------------------------------------------------------------------


def _routing_with_an_idle_expert(T: int, E: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random distinct experts per token that never use expert E-1 (the empty-group path) and
    send the first tokens to the same experts (uneven groups)."""
    g = torch.Generator().manual_seed(seed)
    indices_TK = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)])
    indices_TK[: min(4, T)] = torch.arange(K)
    return torch.rand(T, K, generator=g), indices_TK


def check_experts_contract(
    config: ModelConfig, num_tokens: int = 29, dtype: torch.dtype = torch.float32, tol: float | None = None
) -> None:
    """An experts plugin matches a naive loop over (token, expert) pairs, forward and backward.

    The plugin built by the registry for ``config`` runs once on a batch (uneven groups, one
    expert idle), then once per (token, chosen expert) pair with weight 1, summed by hand with
    the gate weights: outputs and the gradients of the input, the gate weights and every
    parameter must agree. When the plugin stores SwiGLU experts as stacked ``w1`` [E, F, D],
    ``w2`` [E, D, F], ``w3`` [E, F, D] (the checkpoint layout), the outputs must also equal the
    textbook SwiGLU MoE (:func:`naive_experts`). ``tol`` defaults to 1e-5 (fp32) / 3e-2 (bf16).
    """
    tol = tol if tol is not None else (1e-5 if dtype == torch.float32 else 3e-2)
    E, K, D = config.n_routed_experts, config.n_activated_experts, config.dim
    assert E > K, "the experts contract needs more experts than top-k (one expert is left idle)"
    torch.manual_seed(0)
    experts = _moe_layer(build_decoder(config)).experts.to(dtype)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.2)
    name = type(experts).__qualname__
    x_TD = torch.randn(num_tokens, D, dtype=dtype, requires_grad=True)
    weights_TK, indices_TK = _routing_with_an_idle_expert(num_tokens, E, K, seed=1)
    weights_TK.requires_grad_(True)
    ctx = _context(config, 1, num_tokens, layer_id=config.first_k_dense)
    y_TD = call_experts(experts, x_TD, weights_TK, indices_TK, ctx)
    assert y_TD.shape == x_TD.shape and y_TD.dtype == dtype, (
        f"{name}: output {tuple(y_TD.shape)} {y_TD.dtype} for input {tuple(x_TD.shape)} {dtype}"
    )
    grad_TD = torch.randn_like(y_TD)
    batched = torch.autograd.grad(y_TD, [x_TD, weights_TK, *experts.parameters()], grad_TD, allow_unused=True)

    rows = []
    for t in range(num_tokens):
        row_ctx = dataclasses.replace(
            ctx, positions_T=ctx.positions_T[t : t + 1], token_ids_BT=ctx.token_ids_BT[:, t : t + 1]
        )
        pairs = [
            weights_TK[t, k].to(dtype)
            * call_experts(experts, x_TD[t : t + 1], torch.ones(1, 1), indices_TK[t, k].view(1, 1), row_ctx)[0]
            for k in range(K)
        ]
        rows.append(torch.stack(pairs).sum(0))
    loop_TD = torch.stack(rows)
    looped = torch.autograd.grad(loop_TD, [x_TD, weights_TK, *experts.parameters()], grad_TD, allow_unused=True)

    torch.testing.assert_close(
        y_TD.float(),
        loop_TD.float(),
        rtol=tol,
        atol=tol,
        msg=lambda m: f"{name}: batched output != the per-pair loop: {m}",
    )
    labels = ["input", "gate weights"] + [n for n, _ in experts.named_parameters()]
    for label, a, b in zip(labels, batched, looped):
        assert (a is None) == (b is None), f"{name}: the gradient of {label} exists in only one of the two paths"
        if a is not None:
            torch.testing.assert_close(
                a.float(),
                b.float(),
                rtol=tol,
                atol=tol,
                msg=lambda m, label=label: f"{name}: gradient of {label} differs from the per-pair loop: {m}",
            )
    stacked = {n: getattr(experts, n, None) for n in ("w1", "w2", "w3")}
    Fh = stacked["w1"].shape[1] if isinstance(stacked["w1"], torch.Tensor) and stacked["w1"].dim() == 3 else None
    if (
        Fh
        and all(isinstance(w, torch.Tensor) for w in stacked.values())
        and [tuple(w.shape) for w in stacked.values()] == [(E, Fh, D), (E, D, Fh), (E, Fh, D)]
    ):
        with torch.no_grad():
            ref_TD = naive_experts(stacked["w1"], stacked["w2"], stacked["w3"], x_TD, weights_TK, indices_TK)
        torch.testing.assert_close(
            y_TD.detach().float(),
            ref_TD.float(),
            rtol=tol,
            atol=tol,
            msg=lambda m: f"{name}: output != the textbook SwiGLU MoE: {m}",
        )


# -- norm plugins -----------------------------------------------------------------------------


def check_norm_contract(config: ModelConfig) -> None:
    """Every check a norm plugin must pass, on the final norm the registry builds for ``config``:
    meta build; shape kept; output dtype = input dtype (bf16 input to the fp32 module, as under
    low precision, where norms stay high precision) and close to fp32; it normalises (scaling a
    vector by a positive constant does not change the output); each position independently (the
    norm is over the last dimension only); gradients reach the input and the parameters; and a
    state-dict round trip reproduces it."""
    check_meta_build(config)
    torch.manual_seed(0)
    norm = build_decoder(config).norm
    name = type(norm).__qualname__

    def run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return call_norm(module, x, None)  # as the final norm is called: no block, no context

    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.3 * torch.randn_like(p))  # away from the identity init, so the scale matters
    x_BTD = 3.0 * torch.randn(2, 5, config.dim) + 0.5
    y_BTD = run(norm, x_BTD)
    assert y_BTD.shape == x_BTD.shape and y_BTD.dtype == x_BTD.dtype, f"{name}: gave {tuple(y_BTD.shape)} {y_BTD.dtype}"
    with torch.no_grad():
        y16 = run(norm, x_BTD.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16, f"{name}: bf16 input gave a {y16.dtype} output"
    torch.testing.assert_close(
        y16.float(), y_BTD.detach(), rtol=0.05, atol=0.05, msg=lambda m: f"{name}: bf16 output far from fp32: {m}"
    )
    with torch.no_grad():
        torch.testing.assert_close(
            run(norm, 7.0 * x_BTD),
            y_BTD,
            rtol=1e-4,
            atol=1e-4,
            msg=lambda m: f"{name}: output changes with the input's scale, so it does not normalise: {m}",
        )
        changed = x_BTD.clone()
        changed[0, 2] = torch.randn(config.dim)
        after = run(norm, changed)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 2] = False
    assert torch.equal(after[mask], y_BTD.detach()[mask]), f"{name}: changing one position changed others"
    assert not torch.allclose(after[0, 2], y_BTD[0, 2]), f"{name}: changing a position did not change its output"
    x = x_BTD.clone().requires_grad_(True)
    run(norm, x).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, (
        f"{name}: no gradient reached the input"
    )
    for pname, p in norm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient reached parameter {pname}"
    torch.manual_seed(1)
    other = build_decoder(config).norm
    other.load_state_dict(norm.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(run(other, x_BTD), run(norm, x_BTD)), f"{name}: a state-dict round trip changed the output"


# -- residual plugins -------------------------------------------------------------------------


def check_residual_contract(config: ModelConfig, seq_len: int = 10) -> None:
    """Every check a residual plugin must pass, on the residuals the registry builds for ``config``.

    Through the blocks' residuals alone (expand on the first, every block, reduce on the last, as
    the decoder does), with stand-in sublayers: each block calls its ``attention`` and ``ffn``
    exactly once with a [B, T, D] input (MoE balance counts and losses depend on it); the result is
    [B, T, D] in the input's dtype; the stream is per token (changing one position changes no other
    position's output); gradients reach the input and every residual parameter. Then the whole
    model: meta build, causality, state-dict round trip and cached decoding = the full forward.
    """
    check_meta_build(config)
    decoder = _checked_decoder(config, seed=0)
    blocks = list(decoder.layers)
    name = type(blocks[0].residual).__qualname__
    B, D = 2, config.dim
    g = torch.Generator().manual_seed(3)
    w_attn_DD, w_ffn_DD = 0.3 * torch.randn(D, D, generator=g), 0.3 * torch.randn(D, D, generator=g)
    calls: list[str] = []

    def sublayer(label: str, w_DD: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x_BTD: torch.Tensor) -> torch.Tensor:
            assert tuple(x_BTD.shape) == (B, seq_len, D), (
                f"{name}: the {label} sublayer got {tuple(x_BTD.shape)}, expected {(B, seq_len, D)}"
            )
            calls.append(label)
            return torch.tanh(x_BTD @ w_DD.to(x_BTD.dtype))

        return run

    def stream(x_BTD: torch.Tensor) -> torch.Tensor:
        ctx = _context(config, B, seq_len, layer_id=0)
        h = blocks[0].residual.expand(x_BTD, ctx)
        for block in blocks:
            calls.clear()
            h = block.residual(
                h, sublayer("attention", w_attn_DD), sublayer("ffn", w_ffn_DD), ctx.for_layer(block.layer_id)
            )
            assert sorted(calls) == ["attention", "ffn"], (
                f"{name}: a block must call attention and ffn once each, called {calls}"
            )
        return blocks[-1].residual.reduce(h, ctx.for_layer(blocks[-1].layer_id))

    x_BTD = torch.randn(B, seq_len, D, requires_grad=True)
    y_BTD = stream(x_BTD)
    assert y_BTD.shape == x_BTD.shape and y_BTD.dtype == x_BTD.dtype, (
        f"{name}: expand -> blocks -> reduce gave {tuple(y_BTD.shape)} {y_BTD.dtype} for {tuple(x_BTD.shape)} {x_BTD.dtype}"
    )
    with torch.no_grad():
        changed = x_BTD.detach().clone()
        changed[0, 3] += 1.0
        after = stream(changed)
    mask = torch.ones(B, seq_len, dtype=torch.bool)
    mask[0, 3] = False
    assert torch.equal(after[mask], y_BTD.detach()[mask]), (
        f"{name}: changing one position changed others (mixing along T)"
    )
    y_BTD.pow(2).sum().backward()
    assert x_BTD.grad is not None and x_BTD.grad.abs().sum() > 0, f"{name}: no gradient reached the input"
    for block in blocks:
        for pname, p in block.residual.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, (
                    f"{name}: no gradient reached parameter {pname} of layer {block.layer_id}"
                )
    check_causal(config)
    check_state_dict_round_trip(config)
    check_cache_matches_full(config)
    check_residual_mtp(config, seq_len)


def check_residual_mtp(config: ModelConfig, seq_len: int = 10, depth: int = 2) -> None:
    """Multi-token prediction through the residual's MTP hooks (``mtp_carry``, ``mtp_input``), on
    ``config`` with ``depth`` MTP blocks: depth k gives logits [B, T - k, V], finite; a depth's
    logits at position i do not depend on tokens after i + k; gradients reach each depth's
    projection and its block's residual parameters (some of them: a mixing of identical streams
    may rightly get none)."""
    config = dataclasses.replace(config, mtp_depth=depth)
    decoder = _checked_decoder(config, seed=1)
    B, V = 2, config.vocab_size
    ids = torch.randint(0, V, (B, seq_len), generator=torch.Generator().manual_seed(5))
    logits = decoder(ids, mtp=True).mtp_logits
    name = type(decoder.mtp[0].block.residual).__qualname__
    shapes = [tuple(t.shape) for t in logits]
    assert shapes == [(B, seq_len - k, V) for k in range(1, depth + 1)], f"{name}: MTP logits of shapes {shapes}"
    assert all(torch.isfinite(t).all() for t in logits), f"{name}: MTP logits are not finite"
    with torch.no_grad():
        later = ids.clone()
        later[:, -1] = (later[:, -1] + 1) % V  # only the last token changes
        again = decoder(later, mtp=True).mtp_logits
    for k, (a, b) in enumerate(zip(logits, again), start=1):
        torch.testing.assert_close(
            b[:, : seq_len - 1 - k],
            a[:, : seq_len - 1 - k].detach(),
            rtol=0,
            atol=1e-5,
            msg=lambda m, k=k: f"{name}: MTP depth {k} at a position saw a token more than {k} ahead of it: {m}",
        )
    sum(t.float().pow(2).mean() for t in logits).backward()
    for k, module in enumerate(decoder.mtp, start=1):
        grad = module.eh_proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"{name}: no gradient reached MTP depth {k}'s eh_proj"
        grads = [p.grad for p in module.block.residual.parameters() if p.requires_grad]
        assert not grads or any(g is not None and g.abs().sum() > 0 for g in grads), (
            f"{name}: no gradient reached MTP depth {k}'s residual parameters"
        )


# -- HF checkpoint families and the parts' HF names -------------------------------------------


def check_hf_family_contract(config: ModelConfig, family: str | None = None, seq_len: int = 8) -> Path:
    """A model of ``config`` (its weights and buffers randomised, so a swapped name shows)
    exported to an HF folder of ``family`` (default: the one installed family it fits) in fp32
    and imported back: the folder's ``config.json`` names a ``model_type`` whose family reads it;
    every tensor HF checkpoints carry comes back bit for bit; the logits are equal. Checks a family
    adapter, and a part plugin's ``hf_tensor_names``/``hf_config``/``options_from_hf`` in a family.
    Returns the exported folder (a temporary directory) for further checks."""
    import json

    from moeframe.convert.family import family_for_export
    from moeframe.convert.hf import from_hf, tensor_map, to_hf

    torch.manual_seed(0)
    decoder = build_decoder(config).eval()
    with torch.no_grad():
        for t in decoder.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.1)
    chosen = family_for_export(config, family)
    folder = Path(tempfile.mkdtemp(prefix="moeframe-hf-family-")) / "hf"
    to_hf(decoder, folder, dtype=torch.float32, progress=False, family=family)
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    back = from_hf(folder, progress=False).eval()
    carried = {k for k, names in tensor_map(decoder, chosen).items() if names}
    mine, theirs = decoder.state_dict(), back.state_dict()
    for key in sorted(carried):
        assert key in theirs and torch.equal(mine[key], theirs[key]), (
            f"HF family {chosen.name!r} (model_type {model_type!r}): tensor {key} did not come back unchanged"
        )
    ids_BT = torch.randint(0, config.vocab_size, (2, seq_len))
    with torch.no_grad():
        assert torch.equal(decoder(ids_BT).logits, back(ids_BT).logits), (
            f"HF family {chosen.name!r}: the imported model computes different logits (an option the "
            "parts' hf_config/options_from_hf do not carry, or the family's config fields)"
        )
    return folder


# -- precision plugins ------------------------------------------------------------------------


def _module_signature(model: nn.Module) -> dict[str, tuple[type, dict[str, tuple[torch.dtype, type]], type]]:
    """Per module name: its type, its own parameters' dtypes and tensor classes, and the type of its
    ``grouped_gemm`` hook (stacked experts whose projections a precision plugin took over)."""
    return {
        name: (
            type(m),
            {p_name: (p.dtype, type(p.data)) for p_name, p in m.named_parameters(recurse=False)},
            type(m.grouped_gemm if isinstance(m, ExpertsBase) else None),
        )
        for name, m in model.named_modules()
    }


def check_precision_contract(
    plugin: Any,
    config: ModelConfig | None = None,
    claims: Callable[[str, nn.Module], bool] | None = None,
    seq_len: int = 16,
) -> list[str]:
    """A precision plugin converts only what it claims, never the modules the model keeps in
    high precision, and gradients still flow. Returns the names of the converted modules.

    ``plugin``: a Lightning ``Precision`` instance, or the name of a registered
    ``moeframe.precision`` plugin (built with no arguments). ``config``: the model to convert
    (default :func:`tiny_config`). ``claims(name, module)``: which modules of the unconverted
    decoder the plugin says it converts (e.g. ``lambda n, m: isinstance(m, nn.Linear)`` outside
    the high-precision ones); when given, the converted set must equal the claimed set exactly.

    A module counts as converted when ``plugin.convert_module`` replaced it (another type, or
    gone), changed the dtype or tensor class of one of its own parameters, or installed a
    ``grouped_gemm`` hook in it (routed experts, see ``moeframe.model.experts``). The checks:
    at least one module is converted; none of ``Decoder.high_precision_modules()`` (embedding,
    head, routers, norms) nor anything inside them is converted, and their parameters keep their
    exact values; the converted model's forward, run under ``plugin.forward_context()``, gives
    finite logits; and a backward pass from the loss gives every trainable parameter a finite
    gradient, non-zero on the parameters of converted modules.
    """
    if isinstance(plugin, str):
        from moeframe import registry

        plugin = registry.load("precision", plugin)()
    config = config or tiny_config()
    label = type(plugin).__qualname__
    torch.manual_seed(0)
    decoder = build_decoder(config)
    keep = decoder.high_precision_modules()
    before_modules = dict(decoder.named_modules())
    before = _module_signature(decoder)
    kept_values = {f"{k}.{n}": p.detach().clone() for k in keep for n, p in before_modules[k].named_parameters()}
    claimed = None if claims is None else sorted(n for n, m in before_modules.items() if n and claims(n, m))

    model = plugin.convert_module(decoder)
    assert isinstance(model, nn.Module), f"{label}.convert_module returned {type(model).__name__}, not a module"
    after = _module_signature(model)
    converted = sorted(n for n, sig in before.items() if n and after.get(n) != sig)
    assert converted, f"{label}: convert_module converted nothing"
    inside = [n for n in converted if any(n == k or n.startswith(k + ".") for k in keep)]
    assert not inside, (
        f"{label} converted modules the model keeps in high precision (Decoder.high_precision_modules): "
        f"{inside}; skip them in convert_module"
    )
    params_after = dict(model.named_parameters())
    for key, value in kept_values.items():
        assert (
            key in params_after
            and params_after[key].dtype == value.dtype
            and torch.equal(params_after[key].detach(), value)
        ), f"{label} changed the high-precision parameter {key}"
    if claimed is not None:
        extra, missing = sorted(set(converted) - set(claimed)), sorted(set(claimed) - set(converted))
        assert not extra and not missing, (
            f"{label} converts other modules than it claims: "
            f"converted but not claimed {extra}, claimed but not converted {missing}"
        )

    ids = torch.randint(0, config.vocab_size, (2, seq_len + 1))
    with plugin.forward_context():
        out = model(ids[:, :-1])
    assert torch.isfinite(out.logits.float()).all(), f"{label}: the converted model gave non-finite logits"
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss.float()
    loss.backward()
    modules_after = dict(model.named_modules())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"{label}: no gradient reached {name}"
        assert torch.isfinite(p.grad.float()).all(), f"{label}: non-finite gradient in {name}"
    for name in converted:
        module = modules_after.get(name)
        own = [] if module is None else [p for p in module.parameters(recurse=False) if p.requires_grad]
        assert all(p.grad.float().abs().sum() > 0 for p in own), f"{label}: a zero gradient in converted module {name}"
    return converted


# -- strategy plugins -------------------------------------------------------------------------


@dataclasses.dataclass
class StrategyRun:
    """What :func:`check_strategy_contract` observed: the run folder, the training loss per
    optimizer step (from ``metrics.csv``) and the last checkpoint."""

    root: Path
    losses: dict[int, float]
    checkpoint: Path
    output: str


def _contract_run_config(strategy: str, devices: int, max_steps: int, root: Path) -> dict[str, Any]:
    model = dataclasses.asdict(tiny_config(dim=32, n_layers=3, max_seq_len=64, vocab_size=260))
    return {
        "seed_everything": 1234,
        "model": {
            "class_path": "moeframe.training.pretrain.PretrainModule",
            "init_args": {"config": model, "optim": {"lr": 1e-3, "warmup_steps": 1}},
        },
        "data": {
            "class_path": "moeframe.data.shards.PretrainDataModule",
            "init_args": {"seq_len": 32, "batch_size": 4, "max_bytes": 200_000},
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "strategy": strategy,
            "max_steps": max_steps,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(root),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
            ],
        },
    }


def _subprocess_env(extra: dict[str, str] | None) -> dict[str, str]:
    # cluster variables would make Lightning join a job that is not there
    cluster = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in cluster}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    # the run starts in another folder: relative PYTHONPATH entries must keep pointing where they did
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    return env


def check_strategy_contract(
    name: str,
    devices: int = 2,
    max_steps: int = 2,
    root: str | Path | None = None,
    run_config: str | Path | None = None,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> StrategyRun:
    """A strategy plugin registers under ``name`` and trains ``max_steps`` optimizer steps on
    ``devices`` CPU processes through the real command line.

    Checks that ``name`` is a registered ``moeframe.strategy`` plugin, that moeframe puts it into
    Lightning's StrategyRegistry (so ``--trainer.strategy NAME`` works), then runs
    ``python -m moeframe.cli fit`` in a subprocess (cluster variables removed, ``env`` added)
    with a tiny MoE on the embedded corpus (or ``run_config``, a run YAML of yours, plus
    ``args`` overrides), and checks the exit status, a finite training loss at every step
    ``0..max_steps-1`` and a ``last.ckpt``. ``root`` is the run folder (default: a new temporary
    folder). Returns a :class:`StrategyRun`.
    """
    import yaml
    from lightning.pytorch.strategies import StrategyRegistry

    from moeframe import registry

    assert name in registry.available("strategy"), (
        f"{name!r} is not a registered moeframe strategy plugin (entry-point group 'moeframe.strategy'); "
        f"registered: {sorted(registry.available('strategy'))}"
    )
    assert name in registry.register_lightning_strategies() and name in StrategyRegistry, (
        f"strategy {name!r} did not register into Lightning's StrategyRegistry"
    )
    registry.load("strategy", name)  # imports, checks the base class and the plugin API
    root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix=f"moeframe-{name}-"))
    root.mkdir(parents=True, exist_ok=True)
    if run_config is None:
        run_config = root / "contract.yaml"
        run_config.write_text(yaml.safe_dump(_contract_run_config(name, devices, max_steps, root), sort_keys=False))
    cmd = [
        sys.executable,
        "-m",
        "moeframe.cli",
        "fit",
        "-c",
        str(run_config),
        "--trainer.strategy",
        name,
        "--trainer.devices",
        str(devices),
        "--trainer.max_steps",
        str(max_steps),
        "--trainer.default_root_dir",
        str(root),
        *args,
    ]
    proc = subprocess.run(cmd, env=_subprocess_env(env), cwd=root, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"strategy {name!r}: `moeframe fit` exited with {proc.returncode}:\n{output[-4000:]}"
    versions = sorted((root / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    assert versions, f"strategy {name!r}: the run wrote no logs under {root / 'logs'}"
    with open(versions[-1] / "metrics.csv") as f:
        losses = {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}
    assert sorted(losses) == list(range(max_steps)), f"strategy {name!r}: losses logged at steps {sorted(losses)}"
    assert all(math.isfinite(v) for v in losses.values()), f"strategy {name!r}: non-finite loss {losses}"
    checkpoint = versions[-1] / "checkpoints" / "last.ckpt"
    assert checkpoint.exists(), f"strategy {name!r}: no last.ckpt written"
    return StrategyRun(root, losses, checkpoint, output)
