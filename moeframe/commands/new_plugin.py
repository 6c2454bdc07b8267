"""``moeframe new-plugin KIND NAME [-o DIR]``: write a plugin package that works as generated.

The skeleton is a complete, installable distribution: a ``pyproject.toml`` declaring the entry
point ``NAME`` in the kind's group, a ``src/`` package whose plugin subclasses the kind's base
class, declares the plugin API it targets and already does something sensible (a working
minimal implementation, not a stub that raises), tests that call the kind's contract check from
:mod:`moeframe.testing`, and a README. ``pip install`` it and ``python -m pytest`` passes; then
the author changes the implementation and keeps the tests green.

The files come from ``templates/plugin/`` beside this module: ``KIND.py`` is a real plugin module
(importable, and imported by the tests) written for the plugin name ``template_name``;
``check_KIND.py`` its tests; ``*.template`` the package metadata (``string.Template``). Rendering
renames ``template_name`` (and the class, distribution and module names derived from it).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from string import Template

from moeframe import __version__, registry
from moeframe.commands.signature import run_function
from moeframe.errors import ConfigError

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
TEMPLATE_NAME = "template_name"  # the plugin name the template files are written for

# The class-name suffix of each kind.
_SUFFIX = {
    "attention": "Attention",
    "router": "Router",
    "experts": "Experts",
    "norm": "Norm",
    "residual": "Residual",
    "precision": "Precision",
    "strategy": "Strategy",
    "hf_family": "Family",
}

_CHECKS = {
    "attention": "check_attention_contract",
    "router": "check_router_contract",
    "experts": "check_experts_contract",
    "norm": "check_norm_contract",
    "residual": "check_residual_contract",
    "precision": "check_precision_contract",
    "strategy": "check_strategy_contract",
    "hf_family": "check_hf_family_contract",
}

_USAGE = {
    "attention": "Select it in a model config: `attention: {name: $name}`.\n",
    "router": "Select it in a model config: `router: {name: $name, temperature: 1.0}`.\n",
    "experts": "Select it in a model config: `experts: {name: $name}`.\n",
    "norm": "Select it in a model config: `norm: {name: $name}`.\n",
    "residual": "Select it in a model config: `residual: {name: $name}` (or for some layers in `layers`).\n",
    "precision": "It is a Lightning `Precision`: select it by name, `moeframe fit -c run.yaml --trainer.plugins $name`.\n",
    "strategy": "Select it on the command line: `moeframe fit -c run.yaml --trainer.strategy $name`.\n",
    "hf_family": "`moeframe convert` reads folders whose config.json has `model_type: $name`; export with `--family $name`.\n",
}


def template_text(file: str) -> str:
    """A file of ``templates/plugin`` (package data, also inside a wheel)."""
    return resources.files("moeframe.commands.templates.plugin").joinpath(file).read_text(encoding="utf-8")


def class_name(name: str, kind: str) -> str:
    camel = "".join(part.capitalize() for part in name.split("_") if part)
    suffix = _SUFFIX[kind]
    return camel if camel.lower().endswith(suffix.lower()) else camel + suffix


def _dist_name(name: str) -> str:
    return f"moeframe-{name.replace('_', '-')}"


def _check_name(kind: str, name: str) -> None:
    if kind not in registry.KINDS:
        raise ConfigError(f"unknown plugin kind {kind!r}; the kinds are: {', '.join(registry.KINDS)}")
    if not _NAME.match(name):
        raise ConfigError(
            f"plugin name {name!r} must be lowercase letters, digits and underscores, starting with a "
            f"letter: it is the entry-point name configs use and the module moeframe_{name}"
        )
    taken = registry.available(kind).get(name)
    if taken:
        raise ConfigError(
            f"{kind} plugin {name!r} is already provided by {taken[0].distribution} {taken[0].version}; "
            "two distributions claiming one name are refused at load time: choose another name"
        )


def _renamed(text: str, kind: str, name: str) -> str:
    """A template Python file with the template's names replaced by the plugin's: the distribution,
    then the class (whose name includes the plugin name), then the plugin name itself (which is
    also part of the module name ``moeframe_template_name``)."""
    text = text.replace(_dist_name(TEMPLATE_NAME), _dist_name(name))
    text = text.replace(class_name(TEMPLATE_NAME, kind), class_name(name, kind))
    return text.replace(TEMPLATE_NAME, name)


def render(kind: str, name: str) -> dict[str, str]:
    """The files of the package for ``kind``/``name``: relative path -> text."""
    _check_name(kind, name)
    module = f"moeframe_{name}"
    values = {
        "name": name,
        "kind": kind,
        "cls": class_name(name, kind),
        "module": module,
        "dist": _dist_name(name),
        "group": registry.KINDS[kind].group,
        "api": registry.PLUGIN_API,
        "check": _CHECKS[kind],
        "moeframe_version": __version__,
    }
    values["usage"] = Template(_USAGE[kind]).substitute(values)
    return {
        "pyproject.toml": Template(template_text("pyproject.toml.template")).substitute(values),
        "README.md": Template(template_text("README.md.template")).substitute(values),
        f"src/{module}/__init__.py": f'"""moeframe {kind} plugin {name!r}."""\n',
        f"src/{module}/plugin.py": _renamed(template_text(f"{kind}.py"), kind, name),
        f"tests/test_{name}.py": _renamed(template_text(f"check_{kind}.py"), kind, name),
    }


def write_package(kind: str, name: str, out_dir: Path) -> list[Path]:
    """Write the package for ``kind``/``name`` into ``out_dir`` (new or empty); return the files."""
    files = render(kind, name)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} already exists and is not empty; choose another folder with -o")
    written = []
    for rel, text in files.items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def new_plugin(kind: str, name: str, out: Path | None = None) -> int:
    """Write a plugin package skeleton (pyproject with the entry point, a working minimal plugin,
    tests calling moeframe.testing, README) that passes its own tests as generated.

    Args:
        kind: plugin kind (attention, router, experts, norm, residual, precision, strategy, hf_family)
        name: the plugin's name: what configs select (lowercase, digits, underscores)
        out: package folder to create (default: ./moeframe-NAME)
    """
    out = Path(out) if out is not None else Path(_dist_name(name))
    written = write_package(kind, name, out)
    for path in written:
        print(f"wrote {path}")
    print(f"\nnext: pip install -e '{out}[test]' && python -m pytest {out}")
    return 0


def command(argv: list[str]) -> int:
    return run_function(new_plugin, argv, "moeframe new-plugin", short={"-o": "--out"})
