"""Typed options of a plugin: the ``PluginOptions`` base every plugin's options subclass, parsed
from a config's plain values with errors that name the plugin and the field (``parse_options``),
and written back as plain values (``options_as_config``). The config layer: below the model, so
``moeframe.config`` validates options without importing any model code."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moeframe.config import ModelConfig

__all__ = ["PluginOptions", "describe_type", "options_as_config", "parse_options"]


@dataclass
class PluginOptions:
    """Base of every plugin's options; plugins subclass it with their own typed fields."""

    def validate(self, config: ModelConfig) -> None:
        """Cross-check options against the model config; raise ValueError naming the fix."""


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (str, bool):
        return isinstance(value, annotation)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    return True  # richer types are checked by the plugin's own validate()


_TYPE_WORDS: dict[Any, str] = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "a string",
    type(None): "null",
}


def describe_type(annotation: Any) -> str:
    """An option's type as words a config author reads: ``true or false``, ``a whole number or
    null``, ``one of 'absorbed', 'expanded'`` (used in errors and ``moeframe plugins show``)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        words = [describe_type(a) for a in typing.get_args(annotation) if a is not type(None)]
        nullable = type(None) in typing.get_args(annotation)
        return " or ".join(words + (["null"] if nullable else []))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        return "a list"
    return _TYPE_WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _yaml_value(value: Any) -> str:
    """A value as it reads in YAML (``true``, ``null``, ``'maybe'``), for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else repr(value)


def _unknown_option(kind: str, name: str, key: str, fields: list[str]) -> str:
    close = difflib.get_close_matches(key, fields, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    valid = ", ".join(fields) or "(this plugin takes no options)"
    return f"{kind} plugin {name!r} has no option {key!r}.{hint} Its options are: {valid}"


def parse_options(kind: str, name: str, cls: type[PluginOptions], values: dict[str, Any]) -> PluginOptions:
    """Build ``cls`` from a config mapping, rejecting unknown fields (with a did-you-mean) and
    wrong primitive types (as a sentence: ``option 'x' must be true or false, got 'maybe'``)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(_unknown_option(kind, name, key, list(fields)))
        if not _type_ok(value, hints[key]):
            raise ValueError(
                f"{kind} plugin {name!r}: option {key!r} must be {describe_type(hints[key])}, got {_yaml_value(value)}"
            )
    missing = [
        f.name
        for f in fields.values()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values
    ]
    if missing:
        raise ValueError(f"{kind} plugin {name!r} needs option(s): {', '.join(missing)}")
    # ints are accepted where floats are expected; store them as floats
    coerced = {k: float(v) if hints[k] is float else v for k, v in values.items()}
    return cls(**coerced)


def options_as_config(options: PluginOptions) -> dict[str, Any]:
    """Every option of a parsed ``Options``, defaults included, as plain config values: what a
    run's ``config.yaml`` records so that it reproduces the run whatever later defaults become."""
    return {f.name: _plain(getattr(options, f.name)) for f in dataclasses.fields(options)}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    return value
