"""Plugins own their names: the core names no first-party plugin, and what it needs to know about
strategies and precisions (which layout a strategy runs, what a precision keeps per parameter) it
reads from the plugins' declarations, so a third-party strategy or precision is treated the same.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

from moeframe.cli import main
from moeframe.inspect import inspect_model
from moeframe.layout import ParallelLayout, strategy_for
from moeframe.testing import tiny_config

from .test_registry import fake_plugins  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parents[1]

# Where a first-party plugin's name legitimately appears as a string in the core, and why. Names
# in docstrings and comments are documentation and are not scanned.
ALLOWED = {
    ("moeframe/convert/hf.py", "fp8"): "HF's quantization_config value quant_method: fp8 (a file format)",
    ("moeframe/inspect.py", "ep"): "the expert-parallel degree's key in inspect's JSON report",
    ("moeframe/pipeline_estimate.py", "ep"): "the expert-parallel degree's key in inspect's JSON report",
    ("moeframe/pipeline_estimate.py", "pp"): "the pipeline-parallel degree's key in inspect's JSON report",
    ("moeframe/training/throughput.py", "fp8"): "FP8 as a number format: the tensor cores' FP8 peak FLOP/s",
}


def _first_party() -> tuple[set[str], set[str]]:
    """(entry-point names, importable packages) of the distributions under plugins/."""
    names, packages = set(), set()
    for pyproject in REPO.glob("plugins/*/pyproject.toml"):
        project = tomllib.loads(pyproject.read_text())["project"]
        for group, entry_points in project.get("entry-points", {}).items():
            if group.startswith("moeframe."):
                names |= set(entry_points)
        packages |= {p.name for p in (pyproject.parent / "src").iterdir() if p.is_dir() and p.name.isidentifier()}
    return names, packages


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            found.add(id(body[0].value))
    return found


def _core_mentions(names: set[str], packages: set[str], root: Path = REPO) -> list[str]:
    """Every string (outside docstrings) and import of moeframe/ that names a first-party plugin."""
    words = names | packages | {p.replace("_", "-") for p in packages}
    pattern = re.compile(
        r"(?<![\w-])(" + "|".join(map(re.escape, sorted(words, key=len, reverse=True))) + r")(?![\w-])"
    )
    found = []
    for file in sorted((root / "moeframe").rglob("*.py")):
        rel = file.relative_to(root).as_posix()
        tree = ast.parse(file.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{rel}:{node.lineno}: imports {m}" for m in modules if m.split(".")[0] in packages]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                found += [
                    f"{rel}:{node.lineno}: {m.group(1)!r} in {node.value[:70]!r}"
                    for m in pattern.finditer(node.value)
                    if (rel, m.group(1)) not in ALLOWED
                ]
    return found


def test_the_core_names_no_first_party_plugin() -> None:
    names, packages = _first_party()
    assert {"mla", "aux_free", "fp8", "zero3_offload", "ep2_ddp", "deepseek_v3"} <= names  # the scan sees them
    assert _core_mentions(names, packages) == []


def test_the_scan_finds_a_plugin_name_in_the_core(tmp_path: Path) -> None:
    """The scan itself works: a core file that names ``mla`` or imports a plugin is reported."""
    names, packages = _first_party()
    core = tmp_path / "moeframe"
    core.mkdir()
    (core / "bad.py").write_text(
        '"""Docstrings may name mla."""\nimport moeframe_mla\n\n'
        'def f(cfg):\n    return cfg.attention["name"] == "mla"\n'
    )
    assert _core_mentions(names, packages, root=tmp_path) == [
        "moeframe/bad.py:2: imports moeframe_mla",
        "moeframe/bad.py:5: 'mla' in 'mla'",
    ]


def test_first_party_strategies_describe_the_layouts_inspect_names() -> None:
    assert strategy_for(ParallelLayout(world_size=4, ep=2)) == "ep2_ddp"  # a preset beats ep with ep_size=2
    assert strategy_for(ParallelLayout(world_size=8, ep=4)) == "ep (ep_size=4)"
    assert strategy_for(ParallelLayout(world_size=4, zero=3, offload_parameters=True)) == "zero3_offload"
    assert strategy_for(ParallelLayout(world_size=4, ep=2, zero=1)) is None  # no installed strategy runs it


def test_each_layout_description_is_its_strategys_own() -> None:
    """The Lightning-free layout descriptions (``moeframe.strategy_layout``) that ``inspect`` reads
    are base classes of the strategies registered under the same names, so they cannot disagree."""
    from moeframe import registry
    from moeframe.layout import _layout_descriptions

    described = _layout_descriptions()
    assert set(described) == set(registry.available("strategy"))  # every first-party strategy
    for name, description in described.items():
        assert issubclass(registry.load("strategy", name), description), name


ZERO_EP = '''
from lightning.pytorch.strategies import DDPStrategy
from moeframe.layout import DescribesLayout


class ZeroEPStrategy(DDPStrategy, DescribesLayout):
    """A third-party strategy composing ZeRO-1 with expert parallelism."""

    @classmethod
    def runs_layout(cls, layout):
        return {"ep_size": layout.ep} if layout.ep > 1 and layout.zero == 1 else None
'''


def test_a_third_party_strategy_is_named_for_the_layout_it_declares(fake_plugins) -> None:  # noqa: F811
    fake_plugins("moeframe-zero-ep", {"moeframe.strategy": {"zero1_ep": "moeframe_zero_ep:ZeroEPStrategy"}}, ZERO_EP)
    layout = inspect_model(tiny_config(), "t", zero=1, dp=4, ep=2).layout
    assert layout["strategy"] == "zero1_ep (ep_size=2)"


HALF_PRECISION = '''
from lightning.pytorch.plugins.precision import Precision
from moeframe.layout import DescribesMemory, TrainingBytes


class HalfStatePrecision(DescribesMemory, Precision):
    @classmethod
    def training_bytes(cls):
        return TrainingBytes(weights=2, master=2, moment=1)


class SilentPrecision(Precision):
    """Declares nothing about its memory."""
'''


def test_inspect_takes_precisions_and_their_bytes_from_the_registry(fake_plugins, capsys) -> None:  # noqa: F811
    fake_plugins(
        "moeframe-half-state",
        {"moeframe.precision": {"half_state": "moeframe_half_state:HalfStatePrecision"}},
        HALF_PRECISION,
    )
    cfg = tiny_config()
    bf16 = inspect_model(cfg, "t", zero=0, precision="bf16").memory_per_gpu_gib
    half = inspect_model(cfg, "t", zero=0, precision="half_state").memory_per_gpu_gib
    assert half["weights"] == pytest.approx(bf16["weights"])  # 2 bytes each
    assert half["optimizer"] == pytest.approx(bf16["optimizer"] * (2 + 2 * 1) / (4 + 2 * 4))
    assert main(["inspect", str(REPO / "configs/model/tiny.yaml"), "--precision", "half_state"]) == 0
    assert "half_state: weights" in capsys.readouterr().out


@pytest.mark.bad_input
def test_a_precision_that_declares_no_bytes_is_one_clear_line(fake_plugins, capsys) -> None:  # noqa: F811
    fake_plugins("moeframe-silent", {"moeframe.precision": {"silent": "moeframe_half_state:SilentPrecision"}}, None)
    fake_plugins("moeframe-half-state", {}, HALF_PRECISION)  # the module only
    assert main(["inspect", str(REPO / "configs/model/tiny.yaml"), "--precision", "silent"]) == 2
    err = capsys.readouterr().err
    assert "precision plugin 'silent' does not describe its memory" in err and err.count("\n") == 1, err
