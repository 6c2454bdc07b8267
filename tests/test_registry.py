"""The plugin registry: discovery, laziness and every error it promises.

Two set-ups: (1) fake distributions, i.e. ``.dist-info`` metadata written to a temp folder and
served through a monkeypatched ``importlib.metadata.entry_points``; (2) a real throwaway plugin
package pip-installed into a temp directory at test time.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moeframe import registry
from moeframe.config import ModelConfig, resolve_model_config
from moeframe.model.decoder import build_decoder

from .conftest import clean_env


def _fake_dist(root: Path, name: str, entry_points: dict[str, dict[str, str]]) -> md.Distribution:
    info = root / f"{name}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return md.PathDistribution(info)


@pytest.fixture
def fake_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install fake distributions on top of the real ones; returns a function adding one."""
    dists: list[md.Distribution] = []
    real_entry_points = md.entry_points
    monkeypatch.syspath_prepend(str(tmp_path))

    def entry_points(group: str) -> md.EntryPoints:
        fake = [ep for d in dists for ep in d.entry_points if ep.group == group]
        return md.EntryPoints(list(real_entry_points(group=group)) + fake)

    monkeypatch.setattr(md, "entry_points", entry_points)
    registry.clear_cache()

    def add(name: str, entry_points: dict[str, dict[str, str]], module_source: str | None = None) -> None:
        dists.append(_fake_dist(tmp_path / "meta", name, entry_points))
        if module_source is not None:
            (tmp_path / f"{name.replace('-', '_')}.py").write_text(textwrap.dedent(module_source))
        registry.clear_cache()

    yield add
    registry.clear_cache()


def test_builtin_plugins_come_through_entry_points() -> None:
    registry.clear_cache()
    names = {(i.kind, i.name): i for i in registry.all_plugins()}
    for key in [("attention", "mha"), ("router", "topk"), ("experts", "grouped"), ("norm", "rmsnorm")]:
        assert names[key].distribution == "moeframe"


def test_unknown_name_lists_names_suggests_and_names_group() -> None:
    with pytest.raises(registry.PluginError) as err:
        registry.load("router", "topkk")
    msg = str(err.value)
    assert "Did you mean 'topk'?" in msg and "Available router plugins: " in msg
    assert "'moeframe.router'" in msg


def test_same_name_from_two_distributions_names_both(fake_plugins) -> None:
    fake_plugins("clash-a", {"moeframe.norm": {"mynorm": "clash_a:Norm"}})
    fake_plugins("clash-b", {"moeframe.norm": {"mynorm": "clash_b:Norm"}})
    with pytest.raises(registry.PluginError) as err:
        registry.load("norm", "mynorm")
    assert "clash-a 1.2.3" in str(err.value) and "clash-b 1.2.3" in str(err.value)
    # the clash does not affect other names
    assert registry.load("norm", "rmsnorm").__name__ == "RMSNorm"


def test_wrong_base_type_names_the_distribution(fake_plugins) -> None:
    fake_plugins("notanorm", {"moeframe.norm": {"bad": "notanorm:Thing"}}, "class Thing:\n    pass\n")
    with pytest.raises(registry.PluginError) as err:
        registry.load("norm", "bad")
    msg = str(err.value)
    assert "notanorm 1.2.3" in msg and "not a subclass of moeframe.model.base.NormBase" in msg


def test_broken_import_is_reported_and_isolated(fake_plugins) -> None:
    fake_plugins(
        "brokenpkg", {"moeframe.attention": {"broken": "brokenpkg:Attn"}}, "raise RuntimeError('kaboom at import')\n"
    )
    # discovery and listing read metadata only: the broken module is never imported
    assert "broken" in registry.available("attention")
    assert any(i.name == "broken" for i in registry.all_plugins())
    with pytest.raises(registry.PluginError) as err:
        registry.load("attention", "broken")
    assert "brokenpkg 1.2.3" in str(err.value) and "kaboom at import" in str(err.value)
    # a run that does not use it is unaffected
    resolve_model_config(ModelConfig())


def test_listing_does_not_import(fake_plugins) -> None:
    fake_plugins("lazypkg", {"moeframe.norm": {"lazy": "lazypkg_never_imported:Norm"}})
    registry.available("norm")
    assert "lazypkg_never_imported" not in sys.modules


def test_strategy_plugins_register_lazily_into_lightning(fake_plugins) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry

    fake_plugins(
        "stratpkg",
        {"moeframe.strategy": {"one_cpu": "stratpkg:OneCPU"}},
        """
        from lightning.pytorch.strategies import SingleDeviceStrategy
        import torch
        class OneCPU(SingleDeviceStrategy):
            def __init__(self, **kwargs):
                super().__init__(device=torch.device("cpu"), **kwargs)
    """,
    )
    try:
        assert "one_cpu" in registry.register_lightning_strategies()
        assert "stratpkg" not in sys.modules  # registered, not imported
        trainer = Trainer(strategy="one_cpu", accelerator="cpu", logger=False, enable_checkpointing=False)
        assert isinstance(trainer.strategy, SingleDeviceStrategy)
        assert type(trainer.strategy).__name__ == "OneCPU"
    finally:
        StrategyRegistry.remove("one_cpu")


PLUGIN_PYPROJECT = """
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "moeframe-throwaway-norm"
version = "0.0.7"

[project.entry-points."moeframe.norm"]
scalednorm = "throwaway_norm:ScaledNorm"
"""

PLUGIN_MODULE = """
from dataclasses import dataclass
import torch
from torch import nn
from moeframe.model.base import NormBase, PluginOptions

@dataclass
class ScaledNormOptions(PluginOptions):
    scale: float = 2.0

class ScaledNorm(NormBase):
    Options = ScaledNormOptions
    def __init__(self, dim, eps, options):
        super().__init__(dim, eps, options)
        self.scale, self.eps = options.scale, eps
        self.weight = nn.Parameter(torch.ones(dim))
    def forward(self, x):
        return self.scale * self.weight * x / x.abs().mean(-1, keepdim=True).clamp_min(self.eps)
"""


@pytest.mark.slow
def test_real_plugin_package_installed_into_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    (src / "throwaway_norm").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (src / "throwaway_norm" / "__init__.py").write_text(PLUGIN_MODULE)
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(src),
        ],
        check=True,
        timeout=300,
        env=clean_env(),
    )
    # a fresh process sees it through its metadata: `moeframe plugins --json`
    listing = subprocess.run(
        [sys.executable, "-m", "moeframe.cli", "plugins", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(PYTHONPATH=str(target)),
        check=True,
    )
    found = [p for p in json.loads(listing.stdout) if p["name"] == "scalednorm"]
    assert found == [
        {
            "kind": "norm",
            "name": "scalednorm",
            "value": "throwaway_norm:ScaledNorm",
            "distribution": "moeframe-throwaway-norm",
            "version": "0.0.7",
        }
    ]
    # and in this process, a config selects it by name, with its typed options
    monkeypatch.syspath_prepend(str(target))
    registry.clear_cache()
    try:
        cfg = ModelConfig(n_layers=2, norm={"name": "scalednorm", "scale": 3.0})
        decoder = build_decoder(cfg)
        assert type(decoder.norm).__name__ == "ScaledNorm" and decoder.norm.scale == 3.0
        assert decoder(torch.randint(0, cfg.vocab_size, (1, 8))).logits.shape == (1, 8, cfg.vocab_size)
    finally:
        registry.clear_cache()
