"""``moeframe.model.recompute``: the recompute in backward is marked through checkpoint's public
``context_fn`` (it replaced a private autograd-engine query), and what counts or times the forward
skips it."""

from __future__ import annotations

import itertools

import torch

from moeframe.config import ModelConfig
from moeframe.model.decoder import build_decoder
from moeframe.model.recompute import activation_checkpoint, is_recomputing
from moeframe.training.throughput import _ForwardBreakdown


def test_only_the_recompute_in_backward_is_marked() -> None:
    seen: list[bool] = []

    def block(x: torch.Tensor) -> torch.Tensor:
        seen.append(is_recomputing())
        return x.sin()

    x = torch.ones(3, requires_grad=True)
    y = activation_checkpoint(block, x)
    (y.sum() + x.cos().sum()).backward()  # a backward outside any checkpoint runs too
    assert seen == [False, True]  # the forward, then the recompute inside backward
    assert not is_recomputing()


def test_nested_and_early_stopped_recomputes_leave_no_mark() -> None:
    inner_seen: list[bool] = []

    def inner(x: torch.Tensor) -> torch.Tensor:
        inner_seen.append(is_recomputing())
        return x.exp()

    def outer(x: torch.Tensor) -> torch.Tensor:
        y = activation_checkpoint(inner, x.sin())
        # torch stops the recompute once backward has what it needs: the lines below are skipped
        return y * 2 + x.tanh()

    x = torch.ones(3, requires_grad=True)
    activation_checkpoint(outer, x).sum().backward()
    assert inner_seen[0] is False and all(inner_seen[1:]) and len(inner_seen) >= 2
    assert not is_recomputing()  # the mark is off again after an early-stopped recompute


class _Ticks:
    """A clock that advances one second per reading: every timed interval counts."""

    def __init__(self) -> None:
        self.ticks = itertools.count()

    def now(self) -> float:
        return float(next(self.ticks))


def test_the_phase_timers_and_expert_counts_skip_the_recompute() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        dim=32,
        n_layers=2,
        first_k_dense=1,
        n_heads=2,
        dense_ffn_dim=64,
        moe_ffn_dim=16,
        n_routed_experts=4,
        n_activated_experts=2,
        n_shared_experts=1,
    )
    model = build_decoder(cfg)
    model.configure_runtime("full")  # backward re-runs every block's forward
    breakdown = _ForwardBreakdown(model, _Ticks())  # type: ignore[arg-type]
    out = model(torch.randint(0, 64, (1, 8)))
    after_forward = dict(breakdown.totals)
    counts = [m.tokens_per_expert.clone() for _, m in model.moe_layers()]
    out.logits.float().sum().backward()
    breakdown.remove()
    assert {"forward_attention", "forward_router", "forward_shared_experts"} <= set(after_forward)
    assert breakdown.totals == after_forward  # the recompute ran the hooked modules, untimed
    assert all(torch.equal(m.tokens_per_expert, c) for (_, m), c in zip(model.moe_layers(), counts))
