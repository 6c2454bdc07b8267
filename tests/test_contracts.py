"""moeframe.testing's contract checks: the built-in plugins pass them (first-party plugins use
exactly these checks), and each check catches the mistake it exists for. Broken plugins are
real installed distributions: a ``.dist-info`` folder with ``entry_points.txt`` and a module, in
a folder put on ``sys.path``, found by the registry like any installed package."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import HalfPrecision, Precision
from torch import nn

from moeframe import registry
from moeframe.testing import (
    check_attention_contract,
    check_experts_contract,
    check_norm_contract,
    check_precision_contract,
    check_router_contract,
    tiny_config,
)


# -- the built-in plugins ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes,weights_sum_to",
    [
        ({}, None),
        ({"router": {"name": "topk", "norm_topk_prob": True}, "route_scale": 2.5}, 2.5),
        ({"router": {"name": "topk", "aux_loss_coef": 0.0}, "n_expert_groups": 4, "n_limited_groups": 2}, None),
    ],
    ids=["softmax", "normalised-scaled", "group-limited"],
)
def test_topk_router_contract(changes: dict, weights_sum_to: float | None) -> None:
    check_router_contract(tiny_config(**changes), weights_sum_to=weights_sum_to)


@pytest.mark.parametrize(
    "experts,dtype",
    [
        ({"name": "grouped"}, torch.float32),
        ({"name": "grouped", "use_grouped_mm": False}, torch.float32),
        ({"name": "grouped"}, torch.bfloat16),
    ],
    ids=["grouped_mm", "loop-fallback", "bf16"],
)
def test_grouped_experts_contract(experts: dict, dtype: torch.dtype) -> None:
    check_experts_contract(tiny_config(experts=experts), dtype=dtype)


def test_rmsnorm_contract() -> None:
    check_norm_contract(tiny_config())


# -- precision: a weight-only bf16 plugin written here, and Lightning's bf16-true ------------
class _BF16WeightLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class _WeightOnlyBF16(Precision):
    """Stores linear weights in bf16; ``skip_high_precision=False`` is the bug the check catches."""

    def __init__(self, skip_high_precision: bool = True) -> None:
        self.skip_high_precision = skip_high_precision

    def convert_module(self, module: nn.Module) -> nn.Module:
        keep = module.high_precision_modules() if self.skip_high_precision else []
        for name in [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]:
            if any(name == k or name.startswith(k + ".") for k in keep):
                continue
            parent, _, child = name.rpartition(".")
            owner = module.get_submodule(parent)
            setattr(owner, child, _BF16WeightLinear(getattr(owner, child)))
        return module


def _claims_linears_outside(keep: list[str]) -> Callable[[str, nn.Module], bool]:
    return lambda name, m: isinstance(m, nn.Linear) and not any(name == k or name.startswith(k + ".") for k in keep)


HIGH = ["embed", "head"]  # the Linear among the tiny decoder's high-precision modules is the head


def test_precision_contract_passes_a_plugin_that_keeps_its_word() -> None:
    converted = check_precision_contract(_WeightOnlyBF16(), claims=_claims_linears_outside(HIGH))
    assert "layers.0.attn.wq" in converted and "head" not in converted
    assert "layers.1.ffn.shared_experts.w1" in converted


def test_precision_contract_catches_converting_the_head() -> None:
    with pytest.raises(AssertionError, match=r"keeps in high precision.*\['head'\]"):
        check_precision_contract(_WeightOnlyBF16(skip_high_precision=False))


def test_precision_contract_catches_bf16_true_casting_norms_and_routers() -> None:
    with pytest.raises(AssertionError, match=r"keeps in high precision.*'embed'.*'layers.1.ffn.gate'"):
        check_precision_contract(HalfPrecision("bf16-true"))


def test_precision_contract_catches_a_wrong_claim() -> None:
    with pytest.raises(AssertionError, match=r"claimed but not converted \['head'\]"):
        check_precision_contract(_WeightOnlyBF16(), claims=lambda name, m: isinstance(m, nn.Linear))


# -- every check catches a broken plugin --------------------------------------------------------
BROKEN = '''
import torch
import torch.nn.functional as F
from torch import nn
from moeframe.model.attention import MultiHeadAttention
from moeframe.model.base import NormBase, RouterOutput
from moeframe.model.experts import GroupedExperts
from moeframe.model.router import TopKRouter


class PeekingAttention(MultiHeadAttention):
    """Looks one token ahead: not causal."""
    def forward(self, x_BTD, positions_T, document_ids_BT=None, cache=None):
        return super().forward(x_BTD.roll(-1, dims=1), positions_T, document_ids_BT, cache)


class UncountedRouter(TopKRouter):
    """Reports no routed tokens: balancing would never see the load."""
    def forward(self, x_TD):
        out = super().forward(x_TD)
        out.tokens_per_expert_E = torch.zeros_like(out.tokens_per_expert_E)
        return out


class TwiceRouter(TopKRouter):
    """Sends every token to its best expert K times."""
    def forward(self, x_TD):
        out = super().forward(x_TD)
        out.indices_TK = out.indices_TK[:, :1].expand_as(out.indices_TK).contiguous()
        out.tokens_per_expert_E = torch.bincount(out.indices_TK.flatten(), minlength=out.tokens_per_expert_E.numel())
        return out


class BF16GateRouter(TopKRouter):
    """Casts to fp32 but leaves autocast on: under bf16-mixed its gate runs in bf16."""
    def forward(self, x_TD):
        scores_TE = F.linear(x_TD.float(), self.weight.float()).softmax(dim=-1)
        top_TK = scores_TE.topk(self.top_k, dim=-1)
        counts_E = torch.bincount(top_TK.indices.flatten(), minlength=scores_TE.shape[1])
        return RouterOutput(top_TK.values * self.route_scale, top_TK.indices, counts_E)


class UnweightedExperts(GroupedExperts):
    """Forgets the gate weights when a batch has more than one token."""
    def forward(self, x_TD, weights_TK, indices_TK):
        return super().forward(x_TD, torch.ones_like(weights_TK) if x_TD.shape[0] > 1 else weights_TK, indices_TK)


class ScaleNorm(NormBase):
    """Only a learned scale: does not normalise."""
    def __init__(self, dim, eps, options):
        super().__init__(dim, eps, options)
        self.weight = nn.Parameter(torch.ones(dim))
    def forward(self, x):
        return x * self.weight.to(x.dtype)
'''


@pytest.fixture(scope="module")
def broken_plugins(tmp_path_factory: pytest.TempPathFactory):
    """A distribution ``broken-plugins 0.0.1`` installed into a folder on sys.path."""
    site = tmp_path_factory.mktemp("site")
    info = site / "broken_plugins-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugins\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent("""\
        [moeframe.attention]
        peeking = broken_plugins:PeekingAttention
        [moeframe.router]
        uncounted = broken_plugins:UncountedRouter
        twice = broken_plugins:TwiceRouter
        bf16gate = broken_plugins:BF16GateRouter
        [moeframe.experts]
        unweighted = broken_plugins:UnweightedExperts
        [moeframe.norm]
        scalenorm = broken_plugins:ScaleNorm
        """)
    )
    (site / "broken_plugins.py").write_text(BROKEN)
    sys.path.insert(0, str(site))
    registry.clear_cache()
    yield
    sys.path.remove(str(site))
    sys.modules.pop("broken_plugins", None)
    registry.clear_cache()


@pytest.mark.parametrize(
    "check,changes,message",
    [
        (check_attention_contract, {"attention": {"name": "peeking"}}, "leaked into earlier positions"),
        (
            check_router_contract,
            {"router": {"name": "uncounted"}},
            "tokens_per_expert_E .* != the counts of indices_TK",
        ),
        (check_router_contract, {"router": {"name": "twice"}}, "chose an expert twice"),
        (
            check_router_contract,
            {"router": {"name": "bf16gate"}},
            "under bf16 autocast (the gate weights are torch.bfloat16|.*chose other experts|the gate weights differ)",
        ),
        (check_experts_contract, {"experts": {"name": "unweighted"}}, "batched output != the per-pair loop"),
        (check_norm_contract, {"norm": {"name": "scalenorm"}}, "does not normalise"),
    ],
    ids=[
        "attention-not-causal",
        "router-uncounted",
        "router-duplicates",
        "router-bf16-gate",
        "experts-unweighted",
        "norm-scale-only",
    ],
)
def test_each_check_catches_its_broken_plugin(broken_plugins, check, changes: dict, message: str) -> None:
    assert registry.resolve(next(iter(changes)), next(iter(changes.values()))["name"]).distribution == "broken-plugins"
    with pytest.raises(AssertionError, match=message):
        check(tiny_config(**changes))


def test_strategy_contract_refuses_a_name_that_is_not_a_moeframe_strategy_plugin() -> None:
    from moeframe.testing import check_strategy_contract

    # Lightning's own ddp trains, but it is not a plugin: the contract is about registration first
    with pytest.raises(AssertionError, match=r"'ddp' is not a registered moeframe strategy plugin"):
        check_strategy_contract("ddp")
