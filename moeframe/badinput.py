"""One-line messages for bad command-line input: YAML syntax errors with file:line:column, and
unknown options with a did-you-mean from the signature of the class they were given to.

Torch-free, so the CLI can use it on its error path without importing more than it did.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Optional

__all__ = ["config_files", "explain_parse_error", "yaml_syntax_error"]


def yaml_syntax_error(path: str | Path) -> Optional[str]:
    """``file:line:column: YAML syntax error: ...`` when ``path`` is not valid YAML, else None."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError:
        return None  # a missing file is the parser's own (clear) error
    try:
        yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        context = f" ({exc.context})" if exc.context else ""
        return f"{where}: YAML syntax error: {exc.problem}{context}"
    except yaml.YAMLError as exc:
        return f"{path}: YAML syntax error: {str(exc).splitlines()[0]}"
    return None


def config_files(argv: list[str]) -> list[str]:
    """The files given with ``-c``/``--config`` on a command line."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


# -- unknown options -----------------------------------------------------------------------------
_UNKNOWN = [
    re.compile(r"Group '(?P<group>[\w.]+)' does not accept option '(?P<key>[\w.]+)'"),
    re.compile(r"does not accept option '(?P<key>[\w.]+)'"),
    re.compile(r"unrecognized arguments: --(?P<key>[\w.]+)"),
    re.compile(r"Option '(?P<key>[\w.]+)' is not accepted"),
]
_CLASS_PATH = re.compile(r"class_path '(?P<cls>[\w.]+)'")
_SECTION = re.compile(r'Parser key "(?P<section>\w+)"')


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _options(target: Any) -> dict[str, Any]:
    """Option name -> annotation for a class (its ``__init__``) or a dataclass type."""
    if dataclasses.is_dataclass(target):
        hints = typing.get_type_hints(target) if isinstance(target, type) else {}
        return {f.name: hints.get(f.name) for f in dataclasses.fields(target)}
    try:
        signature = inspect.signature(target.__init__ if isinstance(target, type) else target)
        hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    except (TypeError, ValueError, NameError):
        return {}
    return {n: hints.get(n) for n, p in signature.parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _suggest(target: Any, key: str) -> Optional[str]:
    """The closest valid dotted option to ``key`` under ``target``."""
    parts, prefix = key.split("."), []
    for i, part in enumerate(parts):
        options = _options(target)
        if not options:
            return None
        if part not in options:
            close = difflib.get_close_matches(part, list(options), n=1, cutoff=0.5)
            return ".".join(prefix + [close[0]]) if close else None
        prefix.append(part)
        target = options[part]
        if i < len(parts) - 1 and not (dataclasses.is_dataclass(target) or isinstance(target, type)):
            return None
    return None


def explain_parse_error(message: str) -> Optional[str]:
    """One line for a jsonargparse error about an unknown option (None when it is not one)."""
    match = next((m for m in (p.search(message) for p in _UNKNOWN) if m), None)
    if match is None:
        return None
    key = match.group("key")
    if match.groupdict().get("group"):
        key = f"{match.group('group')}.{key}"
    cls_match, section_match = _CLASS_PATH.search(message), _SECTION.search(message)
    if cls_match:
        target, section = _import(cls_match.group("cls")), section_match.group("section") if section_match else None
    else:  # a top-level key such as trainer.max_stepz
        section, _, key = key.partition(".") if "." in key else ("", "", key)
        target = _import("lightning.pytorch.Trainer") if section == "trainer" else None
    where = f"{section}." if section else ""
    if target is not None and section in ("model", "data"):
        where = f"{section}.init_args."
    suggestion = _suggest(target, key) if target is not None else None
    hint = f" Did you mean {where}{suggestion}?" if suggestion else ""
    owner = f" of {target.__name__}" if target is not None and hasattr(target, "__name__") else ""
    return f"unknown option {where}{key}{owner}.{hint} (jsonargparse: {match.group(0)}; run with --help to see the accepted options)"
