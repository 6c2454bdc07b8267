"""What a plugin's options are, for people: name, type in words, default and explanation.

Read from the plugin's own code, so an installed third-party plugin is described exactly like a
first-party one: the ``Options`` dataclass gives names, types and defaults; the explanation of a
field is the comment on its line (or the comment lines just above it), else the ``field``:
explanation entry of the class docstring (``"``n_kv_heads``: key/value heads ..."``).
Used by ``moeframe plugins show KIND NAME`` and by the docs' configuration reference.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any

from moeframe.model.base import describe_type

__all__ = ["OptionDoc", "arg_docs", "constructor_docs", "docstring_fields", "field_comments", "option_docs", "own_doc"]

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")
_COMMENT_LINE = re.compile(r"^\s+#\s?(.*)$")
REQUIRED = object()  # the default of an option without one


@dataclass(frozen=True)
class OptionDoc:
    name: str
    type_words: str  # "a whole number or null"
    default: Any  # REQUIRED when the option has no default
    doc: str


def own_doc(cls: type) -> str:
    """A class's own docstring (dataclasses invent one from the signature: not that)."""
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return inspect.cleandoc(doc)


def field_comments(cls: type) -> dict[str, str]:
    """The comment on a field's line, or the comment lines just above it, per field name."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in lines[1:]:
        comment = _COMMENT_LINE.match(line)
        if comment:
            above.append(comment.group(1))
            continue
        match = _FIELD_LINE.match(line)
        if match and not line.strip().startswith(("def ", "return", "@")):
            text = match.group(2) or " ".join(above)
            if text:
                comments[match.group(1)] = text
        above = []
    return comments


def docstring_fields(doc: str) -> dict[str, str]:
    """``field``: explanation pairs of a docstring written as "``a``: ...; ``b``: ..."."""
    text = " ".join(doc.split())
    pattern = re.compile(r"``(\w+)``:\s*(.*?)(?=\s*``\w+``:|$)")
    return {m.group(1): m.group(2).rstrip(" ;") for m in pattern.finditer(text)}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


def option_docs(options_cls: type) -> list[OptionDoc]:
    """Every option of a plugin's ``Options`` dataclass, in declaration order."""
    hints = typing.get_type_hints(options_cls)
    docs = {**docstring_fields(own_doc(options_cls)), **field_comments(options_cls)}
    return [
        OptionDoc(f.name, describe_type(hints.get(f.name, f.type)), _default(f), docs.get(f.name, ""))
        for f in dataclasses.fields(options_cls)
    ]


def arg_docs(obj: Any) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Args:`` docstring section."""
    doc = inspect.getdoc(obj) or ""
    docs: dict[str, str] = {}
    current = None
    for line in doc.splitlines():
        match = re.match(r"^\s*(\w+)(?: \([^)]*\))?: (.*)$", line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2)
        elif current and line.startswith(" " * 8) and line.strip():
            docs[current] += " " + line.strip()
        elif not line.strip():
            current = None
    return docs


def constructor_docs(cls: type) -> list[OptionDoc]:
    """A Lightning strategy's or precision plugin's options: its constructor arguments."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation naming something the plugin imports only for type checking
        hints = {}
    docs = {**arg_docs(cls), **arg_docs(cls.__init__)}
    out = []
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        words = describe_type(hints[name]) if name in hints else ""
        default = REQUIRED if p.default is inspect.Parameter.empty else p.default
        out.append(OptionDoc(name, words, default, docs.get(name, "")))
    return out
