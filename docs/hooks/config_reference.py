"""MkDocs hook: the configuration reference page, generated from the typed configs at build time.

Nothing on that page is written by hand: fields, types and defaults come from the dataclasses
(``ModelConfig``, ``OptimConfig``, every installed first-party plugin's ``Options``) and the
constructor signatures of the LightningModules and DataModules; the explanations come from the
comments beside the fields and from the docstrings. Change those and the page follows.

``render()`` is importable on its own (tests check that it covers every field).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

import yaml

# the same reading of option docs as `moeframe plugins show` (comments beside fields, docstrings)
from moeframe.optiondocs import arg_docs as _arg_docs
from moeframe.optiondocs import docstring_fields, field_comments
from moeframe.optiondocs import own_doc as _own_doc

PAGE = "reference/config.md"


def _yaml(value: Any) -> str:
    """A value as it is written in a YAML config."""
    if isinstance(value, tuple):
        value = list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return f"{type(value).__name__}() (see below)"
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    except yaml.representer.RepresenterError:
        return repr(value)
    return text[:-4].strip() if text.endswith("\n...") or text.endswith(" ...") else text.removesuffix("...").strip()


def _cell(text: str) -> str:
    return text.replace("|", " or ").replace("\n", " ").strip()


def _dataclass_table(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    comments = {**docstring_fields(_own_doc(cls)), **field_comments(cls)}
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = _yaml(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = _yaml(f.default_factory())
        else:
            default = "(required)"
        type_name = _cell(_type_name(hints.get(f.name, f.type)))
        rows.append(f"| `{f.name}` | {type_name} | `{_cell(default)}` | {_cell(comments.get(f.name, ''))} |")
    return rows


def _type_name(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    if not isinstance(annotation, str) and typing.get_origin(annotation) is not None:
        text = str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def _signature_table(cls: type) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    docs = {**_arg_docs(cls), **_arg_docs(cls.__init__)}
    hints = typing.get_type_hints(cls.__init__)
    rows = ["| argument | type | default | meaning |", "|---|---|---|---|"]
    for name, p in params.items():
        if name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = "(required)" if p.default is inspect.Parameter.empty else _yaml(p.default)
        rows.append(
            f"| `{name}` | {_cell(_type_name(hints.get(name, p.annotation)))} | `{_cell(default)}` | "
            f"{_cell(docs.get(name, ''))} |"
        )
    return rows


def _first_paragraph(text: str) -> str:
    return text.strip().split("\n\n")[0].replace("\n", " ") if text else ""


def _plugin_description(cls: type) -> str:
    own = _own_doc(cls)
    if own:
        return _first_paragraph(own)
    module = inspect.getmodule(cls)
    return _first_paragraph(inspect.getdoc(module) or "") if module else ""


def _first_party(distribution: str) -> bool:
    # the core and its first-party plugin distributions; a user's own installed plugins are theirs to document
    return distribution == "moeframe" or distribution.startswith("moeframe-")


def _plugin_sections() -> list[str]:
    from moeframe import registry

    out = [
        "## Plugins",
        "",
        "Every installed first-party plugin, by kind. A model config selects one per model-part kind with "
        "its entry-point name and that plugin's options in one mapping, e.g. `attention: {name: mha, "
        "n_kv_heads: 2}`; an unknown option or a wrong type fails before anything is built.",
        "",
    ]
    for kind, spec in registry.KINDS.items():
        out += [f"### {kind}", "", f"Entry-point group `{spec.group}`.", ""]
        names = {n: infos for n, infos in registry.available(kind).items() if _first_party(infos[0].distribution)}
        if not names:
            out += ["(no first-party plugin of this kind is installed)", ""]
        for name, infos in sorted(names.items()):
            info = infos[0]
            cls = registry.load(kind, name)
            out += [
                f"#### `{name}`",
                "",
                f"`{info.value}` from **{info.distribution} {info.version}**, plugin API "
                f"{registry.declared_plugin_api(cls)}.",
                "",
                _plugin_description(cls),
                "",
            ]
            options = getattr(cls, "Options", None)
            if kind in ("attention", "router", "experts", "norm", "residual") and options is not None:
                doc = _own_doc(options)
                if doc:
                    out += [doc.replace("\n", " "), ""]
                if dataclasses.fields(options):
                    out += _dataclass_table(options) + [""]
                else:
                    out += ["No options.", ""]
                out += [f"Select it: `{kind}: {{name: {name}}}`.", ""]
            elif kind == "strategy":
                out += [f"Select it: `--trainer.strategy {name}` (or `trainer.strategy: {name}`).", ""]
            elif kind == "precision":
                out += _signature_table(cls) + [""]
    return out


def render() -> str:
    """The whole reference page as Markdown."""
    from moeframe.config import ModelConfig, OptimConfig
    from moeframe.data.sft import SFTDataModule
    from moeframe.data.shards import PretrainDataModule
    from moeframe.training.finetune import FinetuneModule
    from moeframe.training.pretrain import PretrainModule

    out = [
        "# Configuration reference",
        "",
        "Generated from the code when the site is built (`docs/hooks/config_reference.py`): the fields, "
        "types and defaults are the dataclasses' and signatures' own, the explanations their comments "
        "and docstrings. To change this page, change the code.",
        "",
        "A run config (`moeframe fit -c RUN.yaml`) has the sections `model` (a LightningModule: "
        "`class_path` + `init_args`), `data` (a LightningDataModule, the same way), `trainer` (Lightning's "
        "Trainer arguments) and `seed_everything`; `model.init_args.config` is a model config, inline or "
        "a path to a YAML file relative to the run config. Print any resolved config with "
        "`moeframe fit -c RUN.yaml --print_config`.",
        "",
    ]
    for title, cls in (
        ("Model config: `moeframe.config.ModelConfig`", ModelConfig),
        ("Optimizer: `moeframe.config.OptimConfig`", OptimConfig),
    ):
        out += [f"## {title}", "", _own_doc(cls), ""] + _dataclass_table(cls) + [""]
    out += ["## Training modules (`model:` section)", ""]
    for cls in (PretrainModule, FinetuneModule):
        out += [f"### `{cls.__module__}.{cls.__qualname__}`", "", _first_paragraph(_own_doc(cls)), ""]
        out += _signature_table(cls) + [""]
    out += ["## Data modules (`data:` section)", ""]
    for cls in (PretrainDataModule, SFTDataModule):
        out += [f"### `{cls.__module__}.{cls.__qualname__}`", "", _first_paragraph(_own_doc(cls)), ""]
        out += _signature_table(cls) + [""]
    nested = _nested_dataclasses(
        (PretrainModule, FinetuneModule, PretrainDataModule, SFTDataModule), exclude=(ModelConfig, OptimConfig)
    )
    if nested:
        out += [
            "## Nested option groups",
            "",
            "Dataclass-typed arguments of the modules above, written as a mapping under the argument's name.",
            "",
        ]
        for cls in nested:
            out += [f"### `{cls.__name__}` (`{cls.__module__}`)", "", _own_doc(cls), ""] + _dataclass_table(cls) + [""]
    out += _plugin_sections()
    return "\n".join(out) + "\n"


def _nested_dataclasses(owners: tuple[type, ...], exclude: tuple[type, ...]) -> list[type]:
    found: list[type] = []
    for owner in owners:
        for hint in typing.get_type_hints(owner.__init__).values():
            candidates = [hint, *typing.get_args(hint)]
            for c in candidates:
                if isinstance(c, type) and dataclasses.is_dataclass(c) and c not in exclude and c not in found:
                    found.append(c)
    return found


def on_files(files: Any, config: Any) -> Any:
    """MkDocs event: add the generated page to the site (it never exists in docs/)."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files
