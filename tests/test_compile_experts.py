"""``compile: block`` over every experts kind of the core: no graph break, eager's numbers.

A graph break inside a block splits its compiled graph and runs the rest eagerly (slower, and on
the MoE hot path it hides the dispatch from the compiler). Each case builds a one-MoE-layer
decoder, counts graph breaks of the MoE block with ``torch._dynamo.explain`` (forward) and then
compiles the block with ``fullgraph=True`` (any break is an error) through ``aot_eager``, which
traces forward AND backward as inductor does without its C++ compile time; the compiled loss and
every gradient must equal eager's within float rounding. bfloat16 exercises the CPU's static-size
expert-group padding (``pad_expert_groups_static``), which used to be left out of the compiled
path because its size depended on the routing. The FP8 experts' case lives with the fp8 plugin's
tests; the EP experts (moeframe-parallel) still break the graph (variable all-to-all splits).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeframe.compat import capture_scalar_outputs
from moeframe.config import ModelConfig
from moeframe.model.context import ForwardContext
from moeframe.model.decoder import Decoder, build_decoder
from moeframe.model.experts import GroupedExperts, pad_expert_groups, pad_expert_groups_static
from moeframe.model.lora import LoRAGroupedExperts, LoRAOptions, apply_lora

# 2 layers: a dense first block, then one MoE block (the one that is checked)
TINY = dict(
    vocab_size=64,
    dim=32,
    n_layers=2,
    n_heads=2,
    dense_ffn_dim=64,
    moe_ffn_dim=16,
    n_routed_experts=4,
    n_activated_experts=2,
    n_expert_groups=1,
    n_limited_groups=1,
    first_k_dense=1,
)


def _model(kind: str, dtype: torch.dtype) -> Decoder:
    torch.manual_seed(0)
    model = build_decoder(ModelConfig(**TINY))
    if kind.startswith("lora"):
        # rank 8: bf16 rows of 16 bytes, grouped_mm runs; rank 4: the per-expert loop
        apply_lora(model, LoRAOptions(rank=4 if kind == "lora_rank4" else 8, attention=False))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapters count in the check
                torch.nn.init.normal_(p, std=0.1)
    return model.to(dtype)


def _loss_and_grads(model: Decoder, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(ids)
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), ids.flatten()) + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [
    pytest.param(kind, dtype, id=f"{kind}-{name}")
    for kind in ("grouped", "lora")
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
] + [pytest.param("lora_rank4", torch.bfloat16, id="lora_rank4-bf16")]


@pytest.mark.slow
@pytest.mark.parametrize("kind, dtype", CASES)
def test_moe_block_compiles_without_graph_breaks_and_matches_eager(kind: str, dtype: torch.dtype) -> None:
    torch._dynamo.reset()
    eager, compiled = _model(kind, dtype), _model(kind, dtype)
    experts = compiled.layers[1].ffn.experts
    assert isinstance(experts, LoRAGroupedExperts if kind.startswith("lora") else GroupedExperts)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    block = compiled.layers[1]
    ctx = ForwardContext(torch.arange(24), ids, layer_id=1)
    x = torch.randn(2, 24, TINY["dim"], dtype=dtype)
    with capture_scalar_outputs():  # as Block.compile traces
        explanation = torch._dynamo.explain(block)(x, ctx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    for b in compiled.blocks():
        b.compile(fullgraph=True, backend="aot_eager")
    loss0, grads0 = _loss_and_grads(eager, ids)
    loss1, grads1 = _loss_and_grads(compiled, ids)
    # aot_eager runs the same kernels; only decompositions may round differently (bf16: 2^-8)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss1, loss0, rtol=tol, atol=tol)
    assert grads1.keys() == grads0.keys() and grads0
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name].float(), g.float(), rtol=tol, atol=tol, msg=name)
    torch._dynamo.reset()


def test_static_padding_places_rows_as_the_exact_padding_does() -> None:
    """Same slots and offsets as ``pad_expert_groups``; the buffer's size follows from N, E and the
    multiple only, and every row outside the slots is zero."""
    counts = torch.tensor([3, 0, 32, 33, 1])
    expert_N = torch.repeat_interleave(torch.arange(5), counts)
    x = torch.randn(int(counts.sum()), 4)
    x_exact, _, offs_exact, slot_exact = pad_expert_groups(x, counts, 32)
    x_MD, offs, slot = pad_expert_groups_static(x, expert_N, counts, 32)
    assert x_MD.shape == (69 + 5 * 31, 4)  # N + E·(m-1) whatever the routing
    assert torch.equal(offs, offs_exact) and torch.equal(slot, slot_exact)
    assert torch.equal(x_MD[: x_exact.shape[0]], x_exact) and not x_MD[x_exact.shape[0] :].any()


def test_the_float32_grouped_mm_op_hands_back_weight_gradients_in_the_weights_layout() -> None:
    """The experts pass their [E, O, I] weights transposed to ``moeframe::grouped_mm`` (the op
    ``compile: block`` uses in float32). Its weight gradient must come back in that transposed
    layout: a gradient in another layout is copied into the parameter's at every step (measured: 3
    copies of every expert weight per step, ~5% of a compiled float32 step). Values: equal to the
    per-expert products."""
    from moeframe.model.experts import grouped_mm_op

    torch.manual_seed(0)
    x_NI = torch.randn(40, 16, requires_grad=True)
    w_EOI = torch.randn(3, 8, 16, requires_grad=True)
    counts = [10, 0, 30]
    offs_E = torch.tensor(counts).cumsum(0).to(torch.int32)
    w_EIO = w_EOI.transpose(-2, -1)
    seen: list[torch.Tensor] = []
    w_EIO.register_hook(seen.append)
    y_NO = grouped_mm_op(x_NI, w_EIO, offs_E)
    g_NO = torch.randn_like(y_NO)
    y_NO.backward(g_NO)
    assert seen[0].stride() == w_EIO.stride()  # no copy into the parameter's layout needed
    expected = torch.stack([xe.T @ ge for xe, ge in zip(torch.split(x_NI.detach(), counts), torch.split(g_NO, counts))])
    torch.testing.assert_close(seen[0], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w_EOI.grad, expected.transpose(-2, -1), rtol=1e-6, atol=1e-6)
