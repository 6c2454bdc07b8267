"""One-line messages for bad input, shared by every command.

* YAML syntax errors with file:line:column, in a ``-c`` config or in a file it pulls in;
* unknown options with a did-you-mean from the signature of the class they were given to;
* readers for the files users hand us (YAML, JSON) and a check of output locations, raising
  ``ConfigError`` with the path and the fix before any compute is spent;
* ``user_error_line``: the error-translation layer at the command boundary. It turns the
  exception types that bad input produces (a missing or unwritable path, a YAML or JSON syntax
  error, a ConfigError wrapped by the argument parser) into one line; anything else is a bug and
  keeps its traceback.

Torch-free, so the CLI can use it on its error path without importing more than it did.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import importlib
import inspect
import json
import os
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moeframe.errors import ConfigError

__all__ = [
    "check_output_path",
    "config_files",
    "config_problem",
    "explain_parse_error",
    "load_json_file",
    "load_yaml_file",
    "read_text_file",
    "user_error_line",
    "yaml_syntax_error",
]


def yaml_syntax_error(path: str | Path) -> str | None:
    """``file:line:column: YAML syntax error: ...`` when ``path`` is not valid YAML, else None."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None  # a missing file is reported by config_problem
    return _yaml_text_error(text, path)


def _yaml_text_error(text: str, path: str | Path) -> str | None:
    import yaml

    try:
        yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return _yaml_error_line(exc, path)
    return None


def _yaml_error_line(exc: Exception, path: str | Path) -> str:
    import yaml

    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        context = f" ({exc.context})" if exc.context else ""
        return f"{where}: YAML syntax error: {exc.problem}{context}; fix the file"
    return f"{path}: YAML syntax error: {str(exc).splitlines()[0]}; fix the file"


# -- reading the files users give ------------------------------------------------------------------
_OS_HINTS = {
    errno.ENOENT: "does not exist; check the path",
    errno.EACCES: "cannot be accessed (permission denied); fix its permissions or choose another path",
    errno.EPERM: "cannot be accessed (operation not permitted); fix its permissions or choose another path",
    errno.EISDIR: "is a folder where a file is expected; give the file's path",
    errno.ENOTDIR: "cannot be used: a part of the path is a file, not a folder; choose another path",
    errno.EEXIST: "already exists (a file is in the way); choose another path or remove it",
    errno.EROFS: "is on a read-only file system; choose a writable location",
    errno.ENAMETOOLONG: "is too long a name; choose a shorter path",
}


def os_error_line(exc: OSError) -> str | None:
    """One line for an OSError that bad input causes (None for others, e.g. a full disk)."""
    hint = _OS_HINTS.get(exc.errno) if exc.errno is not None else None
    if hint is None and isinstance(exc, FileNotFoundError):
        hint = _OS_HINTS[errno.ENOENT]
    if hint is None:
        return None
    if exc.filename is None:  # e.g. Lightning's "Checkpoint file not found: PATH"
        return f"{exc}; check the path"
    return f"{exc.filename} {hint}"


def read_text_file(path: str | Path, role: str) -> str:
    """The text of a file the user named as ``role``; a missing, unreadable or non-UTF-8 file is a
    ConfigError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{role} {os_error_line(exc) or f'{path} cannot be read ({exc.strerror})'}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{role} {path} is not UTF-8 text (byte {exc.start}); give a text file") from None


def load_yaml_file(path: str | Path, role: str) -> Any:
    import yaml

    text = read_text_file(path, role)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{role}: {_yaml_error_line(exc, path)}") from None


def load_json_file(path: str | Path, role: str, expect: type | None = dict) -> Any:
    """Parsed JSON of ``path`` (of type ``expect`` when given), else a ConfigError naming the file,
    the line and the column."""
    text = read_text_file(path, role)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{role} {path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}); fix the file or write it again"
        ) from None
    if expect is not None and not isinstance(value, expect):
        raise ConfigError(
            f"{role} {path} holds a JSON {type(value).__name__}, expected a JSON "
            f"{'object' if expect is dict else expect.__name__}; is this the right file?"
        )
    return value


def check_output_path(path: str | Path, role: str, folder: bool) -> None:
    """Fail before any compute when ``path`` cannot be created: a file (or a folder, for a file
    output) in the way, a file among its parents, or a parent that cannot be written."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind = "a file" if folder else "a folder"
        raise ConfigError(
            f"{role} {path} is {kind}, not the {'folder' if folder else 'file'} to write; choose another path"
        )
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{role} {path} cannot be created: {parent} is a file, not a folder; choose another path")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{role} {path} cannot be written: {target} is not writable; fix its permissions or choose another path"
        )


# -- the config files of a run, and the files they include ---------------------------------------
def _file_problem(path: Path, role: str) -> str | None:
    """Why a config file cannot be used (missing, a folder, unreadable, bad YAML), else None."""
    try:
        text = read_text_file(path, role)
    except ConfigError as exc:
        return str(exc)
    problem = _yaml_text_error(text, path)
    return f"{role}: {problem}" if problem else None


def _includes(doc: Any, base: Path, where: str = "") -> Iterator[tuple[str, Path]]:
    """(option, path) of every file a config pulls in: a ``config`` key given as a file name."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            name = f"{where}.{key}" if where else str(key)
            if key == "config" and isinstance(value, str) and value.endswith((".yaml", ".yml", ".json")):
                # relative to the config (jsonargparse's rule for a nested config), or to the
                # working directory (a path option such as DeepSpeed's config file)
                yield name, base / value if (base / value).exists() or not Path(value).exists() else Path(value)
            else:
                yield from _includes(value, base, name)
    elif isinstance(doc, list):
        for value in doc:
            yield from _includes(value, base, where)


def config_problem(argv: list[str]) -> str | None:
    """One line about the first ``-c`` config, or file it pulls in (``model.init_args.config:
    model.yaml``, relative to the config; or ``--model.init_args.config FILE``), that is missing,
    unreadable or not valid YAML. Checked before the argument parser, whose own messages run over
    many lines and name ``<unicode string>`` instead of the file."""
    import yaml

    for file in config_files(argv):
        if (problem := _file_problem(Path(file), "config file")) is not None:
            return problem
        doc = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
        for option, included in _includes(doc, Path(file).parent):
            if (problem := _file_problem(included, f"{option} (in {file})")) is not None:
                return problem
    for i, arg in enumerate(argv[:-1]):
        value = argv[i + 1]
        if arg.startswith("--") and arg.endswith(".config") and value.endswith((".yaml", ".yml", ".json")):
            if (problem := _file_problem(Path(value), arg)) is not None:
                return problem
    return None


# -- the command boundary ------------------------------------------------------------------------
def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def user_error_line(exc: BaseException) -> str | None:
    """One line for an exception that bad input causes, looking through the exceptions that
    wrap it (the argument parser re-raises what a class raised while it was instantiated);
    None for anything else: a bug keeps its traceback."""
    import yaml

    for e in _chain(exc):
        if isinstance(e, ConfigError):
            return str(e)
        if isinstance(e, OSError) and (line := os_error_line(e)) is not None:
            return line
        if isinstance(e, yaml.YAMLError):
            return _yaml_error_line(e, getattr(getattr(e, "problem_mark", None), "name", "a YAML file"))
        if isinstance(e, json.JSONDecodeError):
            return f"a JSON input is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix the file"
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
    return {
        n: hints.get(n)
        for n, p in signature.parameters.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def _suggest(target: Any, key: str) -> str | None:
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


def explain_parse_error(message: str) -> str | None:
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
