"""The public plugin surface (``moeframe.plugin``) and the hooks declared on the plugin bases.

- the import scan: first-party plugins and ``examples/`` import nothing from moeframe but
  ``moeframe.plugin`` (and their tests ``moeframe.testing``, the contract checks);
- everything the surface promises is there, and the API-1 import paths still work;
- declared hooks instead of probing and patching: selective recompute, the experts' grouped-GEMM
  seam, the per-module phase timer, the router's balance state; API-1 attributes still honoured
  once with a warning.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import moeframe.plugin as plugin
from moeframe import registry
from moeframe.testing import tiny_config

from .conftest import REPO

ALLOWED = {"moeframe.plugin"}
ALLOWED_IN_TESTS = ALLOWED | {"moeframe.testing"}


def moeframe_imports(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a moeframe module in ``source`` (``from moeframe
    import registry`` counts as ``moeframe.registry``; relative imports are the package's own)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "moeframe"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "moeframe":
                found += [(node.lineno, f"moeframe.{a.name}") for a in node.names]
            elif node.module.split(".")[0] == "moeframe":
                found.append((node.lineno, node.module))
    return found


def plugin_sources() -> list[Path]:
    files = [*REPO.glob("plugins/*/src/**/*.py"), *REPO.glob("examples/**/*.py")]
    return sorted(f for f in files if "build" not in f.parts and ".venv" not in f.parts)


def test_the_scan_sees_every_kind_of_moeframe_import() -> None:
    source = (
        "import moeframe\nimport moeframe.config as c\nfrom moeframe import registry\n"
        "from moeframe.model.base import AttentionBase\nfrom moeframe.plugin import RouterBase\n"
        "from moeframe_mla import rope\nfrom . import sibling\nimport torch\n"
        "def f():\n    from moeframe.training.balance import moe_layers\n"
    )
    assert sorted(moeframe_imports(source)) == [
        (1, "moeframe"),
        (2, "moeframe.config"),
        (3, "moeframe.registry"),
        (4, "moeframe.model.base"),
        (5, "moeframe.plugin"),
        (10, "moeframe.training.balance"),
    ]


def test_first_party_plugins_and_examples_import_only_the_plugin_surface() -> None:
    files = plugin_sources()
    # every first-party plugin package and the example are scanned, not an empty glob
    assert {f.relative_to(REPO).parts[1] for f in files} >= {
        "moeframe-mla",
        "moeframe-auxfree",
        "moeframe-fp8",
        "moeframe-parallel",
        "moeframe-v4",
        "third_party_plugin",
    }
    bad = []
    for f in files:
        allowed = ALLOWED_IN_TESTS if "tests" in f.relative_to(REPO).parts else ALLOWED
        bad += [
            f"{f.relative_to(REPO)}:{line}: {module}"
            for line, module in moeframe_imports(f.read_text())
            if module not in allowed
        ]
    assert not bad, "plugins must import only moeframe.plugin (tests also moeframe.testing):\n" + "\n".join(bad)


def test_the_surface_offers_everything_it_lists() -> None:
    missing = [name for name in plugin.__all__ if not hasattr(plugin, name)]
    assert not missing
    assert plugin.PLUGIN_API_VERSION == int(registry.PLUGIN_API)
    with pytest.raises(AttributeError, match="the plugin API offers: .*AttentionBase"):
        plugin.no_such_helper  # noqa: B018


def test_api1_import_paths_still_work_and_are_the_same_objects() -> None:
    from moeframe.model.attention import cached_causal_mask, document_mask
    from moeframe.model.base import AttentionBase, ExpertsBase, PluginOptions, parse_options
    from moeframe.model.router import count_per_expert, limit_to_groups
    from moeframe.training.balance import moe_layers
    from moeframe.training.reliability import partial_name, replace_folder

    assert (AttentionBase, ExpertsBase, PluginOptions, parse_options) == (
        plugin.AttentionBase,
        plugin.ExpertsBase,
        plugin.PluginOptions,
        plugin.parse_options,
    )
    assert (document_mask, cached_causal_mask, count_per_expert, limit_to_groups, moe_layers) == (
        plugin.document_mask,
        plugin.cached_causal_mask,
        plugin.count_per_expert,
        plugin.limit_to_groups,
        plugin.moe_layers,
    )
    assert (partial_name, replace_folder) == (plugin.partial_name, plugin.replace_folder)


# -- declared hooks ---------------------------------------------------------------------------------


def test_selective_checkpointing_reaches_plugins_through_the_declared_method() -> None:
    decoder = plugin.build_decoder(
        tiny_config(
            attention={
                "name": "mla",
                "q_lora_rank": 16,
                "kv_lora_rank": 16,
                "qk_nope_head_dim": 8,
                "qk_rope_head_dim": 8,
                "v_head_dim": 8,
            }
        )
    )
    moe_experts = [m.experts for _, m in plugin.moe_layers(decoder)]
    decoder.configure_runtime("selective")
    assert all(b.attn.recompute_up_projections for b in decoder.blocks())
    assert moe_experts and all(e.recompute for e in moe_experts)
    decoder.configure_runtime("full")  # full recomputes the whole block: nothing selective inside
    assert not any(b.attn.recompute_up_projections for b in decoder.blocks())
    assert not any(e.recompute for e in moe_experts)


class _API1Attention(plugin.MultiHeadAttention):
    """Written against plugin API 1: declares selective recompute by an attribute the core probed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recompute_up_projections = False


def test_an_api1_recompute_attribute_is_still_set_with_one_warning() -> None:
    config = tiny_config()
    options = plugin.resolve_model_config(config).attention.options
    first, second = _API1Attention(config, options, 0), _API1Attention(config, options, 1)
    with pytest.warns(plugin.PluginDeprecationWarning, match="override AttentionBase.set_selective_recompute"):
        first.set_selective_recompute(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per class, not per layer or per call
        second.set_selective_recompute(True)
        first.set_selective_recompute(False)
    assert second.recompute_up_projections and not first.recompute_up_projections
    plain = plugin.MultiHeadAttention(config, options, 0)
    plain.set_selective_recompute(True)  # a plugin with nothing to recompute: a no-op
    assert "recompute_up_projections" not in vars(plain)


def _grouped_experts(E: int = 4, D: int = 16, F: int = 32) -> plugin.GroupedExperts:
    config = tiny_config()
    experts = plugin.GroupedExperts(config, plugin.resolve_model_config(config).experts.options, E, D, F)
    torch.manual_seed(0)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.1)
    return experts


def _routing(T: int = 10, E: int = 4, K: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x_TD = torch.randn(T, 16)
    indices_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    return x_TD, torch.rand(T, K), indices_TK


def test_the_grouped_gemm_seam_runs_every_projection_through_the_installed_gemm() -> None:
    experts = _grouped_experts()
    x_TD, weights_TK, indices_TK = _routing()
    expected = experts(x_TD, weights_TK, indices_TK)
    calls = []

    def gemm(name: str, x_NI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        calls.append((name, w_EOI is getattr(experts, name)))
        ends = offs_E.tolist()
        starts = [0] + ends[:-1]
        return torch.cat([x_NI[a:b] @ w_EOI[e].T for e, (a, b) in enumerate(zip(starts, ends))])

    assert experts.has_grouped_gemm_seam()
    experts.set_grouped_gemm(gemm)
    torch.testing.assert_close(experts(x_TD, weights_TK, indices_TK), expected)
    assert calls == [("w1", True), ("w3", True), ("w2", True)]
    experts.set_grouped_gemm(None)
    experts(x_TD, weights_TK, indices_TK)
    assert len(calls) == 3


class _LoopExperts(plugin.ExpertsBase):
    """An experts plugin that runs its own GEMMs and declares no seam."""

    def __init__(self, num_experts: int, dim: int) -> None:
        nn.Module.__init__(self)
        self.w = nn.Parameter(torch.ones(num_experts, dim, dim))

    def forward(self, x_TD, weights_TK, indices_TK):
        return x_TD


class _API1SeamExperts(_LoopExperts):
    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__(num_experts, dim)
        self.grouped_gemm = None  # plugin API 1 declared the seam by this attribute


def test_the_seam_is_declared_not_probed() -> None:
    plain = _LoopExperts(2, 4)
    assert not plain.has_grouped_gemm_seam()
    with pytest.raises(TypeError, match="has no grouped-GEMM seam: set grouped_gemm_seam = True"):
        plain.set_grouped_gemm(lambda *a: a[1])
    with pytest.warns(plugin.PluginDeprecationWarning, match="'grouped_gemm' is plugin API 1"):
        assert _API1SeamExperts(2, 4).has_grouped_gemm_seam()


def test_fp8_takes_over_experts_that_declare_the_seam_only() -> None:
    from moeframe_fp8.convert import is_stacked_experts

    assert is_stacked_experts(_grouped_experts())
    assert not is_stacked_experts(_LoopExperts(2, 4))
    assert not is_stacked_experts(nn.Linear(4, 4))


def test_the_phase_timer_belongs_to_one_experts_module() -> None:
    timed, other = _grouped_experts(), _grouped_experts()
    x_TD, weights_TK, indices_TK = _routing()
    marks: list[str | None] = []
    timed.set_phase_timer(marks.append)
    other(x_TD, weights_TK, indices_TK)
    assert marks == []  # another layer's (or model's) forward does not report to this timer
    timed(x_TD, weights_TK, indices_TK)
    assert marks == ["moe_dispatch", "moe_experts", "moe_dispatch", None]
    timed.set_phase_timer(None)
    timed(x_TD, weights_TK, indices_TK)
    assert len(marks) == 4


def test_routers_declare_their_balance_state() -> None:
    decoder = plugin.build_decoder(tiny_config(router={"name": "aux_free"}))
    for _, moe in plugin.moe_layers(decoder):
        state = moe.gate.balance_state()
        assert list(state) == ["bias"] and state["bias"] is moe.gate.e_score_correction_bias
    topk = plugin.build_decoder(tiny_config())
    assert all(m.gate.balance_state() == {} for _, m in plugin.moe_layers(topk))
