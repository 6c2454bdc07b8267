"""The core's layers depend one way: registry <- config <- model <- training (<- commands/cli).

A module may import from its own layer and the layers below it, never from a layer above; every
import counts, module-level or inside a function (a function-local import that goes up is a
cycle waiting for the first caller), except those under ``if TYPE_CHECKING:`` (never executed).
Modules outside the four layers (errors, compat, data, convert, ...) are not ranked here;
training -> cli is the command layer's rule (tested with it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

LAYERS = {
    "moeframe.registry": 1,
    "moeframe.config": 2,
    "moeframe.options": 2,
    "moeframe.schedules": 2,
    "moeframe.model": 3,
    "moeframe.training": 4,
    "moeframe.cli": 5,
    "moeframe.commands": 5,
}
NAMES = {1: "registry", 2: "config", 3: "model", 4: "training", 5: "commands/cli"}


def layer(module: str) -> int:
    """The layer of a dotted module name (0: not ranked)."""
    for prefix, rank in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return 0


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every executed import in the file, function-local ones too;
    ``from moeframe import registry`` counts as ``moeframe.registry``."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_only(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name.startswith("moeframe")]


def violations() -> list[str]:
    found = []
    for path in sorted((REPO / "moeframe").rglob("*.py")):
        importer = _module_name(path)
        rank = layer(importer)
        if not rank or rank >= 4:  # training -> commands/cli: the command layer's own test
            continue
        for line, name in imports(path):
            if layer(name) > rank:
                found.append(f"{path.relative_to(REPO)}:{line} ({NAMES[rank]}) imports {name} ({NAMES[layer(name)]})")
    return found


def test_core_layers_depend_one_way() -> None:
    assert not violations(), "\n".join(violations())


def test_a_function_local_import_upwards_is_found(tmp_path: Path) -> None:
    module = tmp_path / "probe.py"
    module.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from moeframe.model import base\n"
        "def f():\n    from moeframe.training.schedules import piecewise\n"
    )
    assert imports(module) == [(5, "moeframe.training.schedules.piecewise")]
    assert layer("moeframe.training.schedules.piecewise") == 4 and layer("moeframe.config") == 2


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("moeframe.registry", ("moeframe.config", "moeframe.model", "moeframe.training")),
        ("moeframe.config", ("moeframe.model", "moeframe.training")),
        ("moeframe.model.decoder", ("moeframe.training",)),
    ],
)
def test_importing_a_layer_loads_nothing_above_it(module: str, forbidden: tuple[str, ...]) -> None:
    code = f"import sys, {module}\nprint(sorted(m for m in sys.modules if m.startswith({forbidden!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
