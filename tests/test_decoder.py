"""Decoder assembly, the MoE hot path and the baseline plugins."""

from __future__ import annotations

import pytest
import torch

from moeframe.model.decoder import build_decoder, count_parameters
from moeframe.model.experts import GroupedExperts, GroupedOptions, grouped_mm_supported, pad_expert_groups
from moeframe.model.moe import MoE
from moeframe.testing import check_causal, check_meta_build, naive_experts, tiny_config


def test_output_shapes_and_aux_loss() -> None:
    cfg = tiny_config()
    out = build_decoder(cfg)(torch.randint(0, cfg.vocab_size, (3, 10)))
    assert out.logits.shape == (3, 10, cfg.vocab_size)
    assert out.aux_loss.ndim == 0 and out.aux_loss > 0  # topk router's balance loss is on
    assert set(out.aux_losses) == {"layer1"}  # layer 0 is dense


@pytest.mark.parametrize("attention", [{"name": "mha"}, {"name": "mha", "n_kv_heads": 2}])
def test_causality(attention: dict) -> None:
    check_causal(tiny_config(attention=attention))


def test_document_mask_isolates_documents() -> None:
    cfg = tiny_config()
    torch.manual_seed(0)
    decoder = build_decoder(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    docs = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        base = decoder(ids, docs).logits
        changed = ids.clone()
        changed[0, :5] = (changed[0, :5] + 3) % cfg.vocab_size  # rewrite document 0 entirely
        after = decoder(changed, docs).logits
        unmasked = decoder(changed).logits
    torch.testing.assert_close(after[0, 5:], base[0, 5:], rtol=0, atol=1e-5)
    assert not torch.allclose(unmasked[0, 5:], base[0, 5:])  # without the mask it would leak


def test_init_is_deterministic_under_a_seed() -> None:
    cfg = tiny_config()
    torch.manual_seed(7)
    a = build_decoder(cfg).state_dict()
    torch.manual_seed(7)
    b = build_decoder(cfg).state_dict()
    torch.manual_seed(8)
    c = build_decoder(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.1.ffn.experts.w1"], c["layers.1.ffn.experts.w1"])
    w = a["layers.1.attn.wq.weight"]
    assert abs(w.std().item() - cfg.init_std) < 0.2 * cfg.init_std  # N(0, init_std)


def test_meta_build_allocates_nothing_and_matches() -> None:
    meta = check_meta_build(tiny_config())
    assert count_parameters(meta) == count_parameters(build_decoder(tiny_config()))


def test_huge_config_builds_on_meta_without_memory() -> None:
    cfg = tiny_config(
        vocab_size=129280,
        dim=7168,
        n_layers=61,
        first_k_dense=3,
        n_heads=128,
        dense_ffn_dim=18432,
        moe_ffn_dim=2048,
        n_routed_experts=256,
        n_activated_experts=8,
        n_expert_groups=8,
        n_limited_groups=4,
    )
    meta = build_decoder(cfg, device="meta")
    # hand count: embedding + head, per layer 4 D^2 attention (MHA) + 2 norms, FFNs, final norm
    D, V, E, Fe, Fd = 7168, 129280, 256, 2048, 18432
    per_layer_common = 4 * D * D + 2 * D
    dense = 3 * D * Fd
    moe = E * D + E * 3 * D * Fe + 3 * D * Fe  # gate + routed + 1 shared
    expected = 2 * V * D + 61 * per_layer_common + 3 * dense + 58 * moe + D
    assert count_parameters(meta) == expected


def _random_routing(T: int, E: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if T > 4:
        indices[:4] = torch.arange(K)  # expert 0..K-1 busier; some experts may get nothing
    weights = torch.rand(T, K, generator=g)
    return weights, indices


@pytest.mark.parametrize(
    ("dtype", "use_grouped_mm", "dim", "tol", "fast"),
    [
        (torch.float32, True, 32, 1e-5, True),  # grouped_mm fast path
        (torch.float32, False, 32, 1e-5, False),  # forced per-expert fallback
        (torch.float32, True, 30, 1e-5, False),  # rows not 16-byte aligned: automatic fallback
        (torch.bfloat16, True, 32, 3e-2, True),  # CPU bf16: groups padded to 32 rows (default)
        (torch.bfloat16, False, 32, 3e-2, False),  # padded groups through the per-expert loop
        (torch.bfloat16, None, 32, 3e-2, True),  # padding off (cpu_bf16_group_multiple: 0)
    ],
)
def test_grouped_experts_match_naive_loop_forward_and_backward(dtype, use_grouped_mm, dim, tol, fast) -> None:
    cfg = tiny_config(dim=dim, n_heads=2)
    E, F_, T, K = 8, 16, 37, 2
    torch.manual_seed(0)
    options = GroupedOptions(cpu_bf16_group_multiple=0) if use_grouped_mm is None else GroupedOptions(use_grouped_mm)
    use_grouped_mm = options.use_grouped_mm
    experts = GroupedExperts(cfg, options, E, dim, F_).to(dtype)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(T, dim, dtype=dtype, requires_grad=True)
    weights, indices = _random_routing(T, E, K, seed=1)
    weights.requires_grad_(True)
    assert (use_grouped_mm and grouped_mm_supported(x, experts.w1) and grouped_mm_supported(x, experts.w2)) == fast

    out = experts(x, weights, indices)
    grad = torch.randn_like(out)
    out.backward(grad)
    fast = [x.grad, weights.grad] + [p.grad for p in experts.parameters()]

    refs = [t.detach().clone().requires_grad_(True) for t in (experts.w1, experts.w2, experts.w3, x, weights)]
    ref_out = naive_experts(refs[0], refs[1], refs[2], refs[3], refs[4], indices)
    ref_out.backward(grad)
    slow = [refs[3].grad, refs[4].grad, refs[0].grad, refs[1].grad, refs[2].grad]

    torch.testing.assert_close(out.float(), ref_out.float(), rtol=tol, atol=tol)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_pad_expert_groups_places_rows_and_pads_with_zeros() -> None:
    counts = torch.tensor([3, 0, 32, 33, 1])
    x = torch.randn(int(counts.sum()), 4)
    x_pad, padded, offs, slot = pad_expert_groups(x, counts, 32)
    assert padded.tolist() == [32, 0, 32, 64, 32] and offs.tolist() == [32, 32, 64, 128, 160]
    assert x_pad.shape == (160, 4) and torch.equal(x_pad[slot], x)
    # expert e's rows start at its padded start, in order, and every other row is zero
    starts = [0, 32, 32, 64, 128]
    expected_slots = [s + i for s, n in zip(starts, counts.tolist()) for i in range(n)]
    assert slot.tolist() == expected_slots
    pad_rows = torch.ones(160, dtype=torch.bool)
    pad_rows[slot] = False
    assert torch.equal(x_pad[pad_rows], torch.zeros(int(pad_rows.sum()), 4))


@pytest.mark.parametrize("multiple", [32, 0])
def test_cpu_bf16_expert_gemms_see_whole_multiples_of_rows(multiple: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU in bf16 each expert's group reaches the grouped GEMM rounded up to the multiple
    (oneDNN then meets few shapes); ``cpu_bf16_group_multiple: 0`` hands the raw groups over."""
    import torch.nn.functional as F

    seen: list[torch.Tensor] = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda x, w, offs=None, **kw: seen.append(offs) or real(x, w, offs=offs, **kw))
    torch.manual_seed(0)
    E, D, F_, T, K = 8, 32, 16, 37, 2
    experts = GroupedExperts(tiny_config(dim=D, n_heads=2), GroupedOptions(cpu_bf16_group_multiple=multiple), E, D, F_)
    experts.bfloat16()
    weights, indices = _random_routing(T, E, K, seed=1)
    experts(torch.randn(T, D, dtype=torch.bfloat16), weights, indices)
    counts = torch.bincount(indices.flatten(), minlength=E)
    sizes = [torch.diff(o.long(), prepend=o.new_zeros(1).long()) for o in seen]
    assert len(sizes) == 3  # w1, w3, w2
    if multiple:
        assert all(
            bool((s % multiple == 0).all()) and torch.equal(s // multiple, (counts + multiple - 1) // multiple)
            for s in sizes
        )
    else:
        assert all(torch.equal(s, counts) for s in sizes)


def test_moe_counts_routed_tokens() -> None:
    cfg = tiny_config()
    decoder = build_decoder(cfg)
    decoder(torch.randint(0, cfg.vocab_size, (2, 5)))
    moe = decoder.layers[1].ffn
    assert isinstance(moe, MoE)
    assert moe.tokens_per_expert.sum().item() == 2 * 5 * cfg.n_activated_experts


def test_high_precision_modules_are_declared() -> None:
    keep = build_decoder(tiny_config()).high_precision_modules()
    assert {"embed", "head", "layers.1.ffn.gate", "norm", "layers.0.attn_norm"} <= set(keep)


def test_tiny_model_overfits_one_batch() -> None:
    torch.manual_seed(0)
    cfg = tiny_config(dim=64, n_heads=4, dense_ffn_dim=128, moe_ffn_dim=32, init_std=0.02)
    decoder = build_decoder(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 33))
    opt = torch.optim.AdamW(decoder.parameters(), lr=1e-2, betas=(0.9, 0.95))
    losses = []
    for _ in range(150):
        out = decoder(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        (loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"
