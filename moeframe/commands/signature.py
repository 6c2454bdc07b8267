"""Parsers built from typed function signatures (jsonargparse), one behaviour for every command.

A command is a plain function: its parameters are the flags (``seq_len: int = 4096`` is
``--seq_len``), parameters without a default are positional, its docstring's ``Args:`` section is
the help. ``run_function(fn, argv, prog)`` parses ``argv`` against ``fn``'s signature and calls it.
What every command then shares:

- the flag spellings of the hand-written parsers before them keep working: ``--seq-len`` for
  ``--seq_len`` (one ``CommandDeprecationWarning`` per spelling; jsonargparse names flags after
  the Python parameters) and each command's short forms (``-o``, ``-c``);
- an unknown or mistyped flag, a missing positional, a value of the wrong type: one line with a
  did-you-mean among the function's parameters, raised as ``ConfigError`` (exit status 2 at the
  command boundary), never argparse's usage block;
- ``--help`` from the signature and the docstring.
"""

from __future__ import annotations

import difflib
import inspect
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from moeframe.errors import ConfigError


class CommandDeprecationWarning(FutureWarning):
    """A command-line spelling that still works but will go; the message names the new one."""


_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _params(function: Callable[..., Any], skip: Sequence[str]) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(function).parameters.values() if p.name not in skip]


def option_names(function: Callable[..., Any], skip: Sequence[str] = ()) -> dict[str, str]:
    """``--flag`` -> parameter name, for the parameters that are flags (keyword-only or with a default)."""
    return {f"--{p.name}": p.name for p in _params(function, skip) if not _is_positional(p)}


def _is_positional(p: inspect.Parameter) -> bool:
    return p.kind is not p.KEYWORD_ONLY and p.default is p.empty


def positional_names(function: Callable[..., Any], skip: Sequence[str] = ()) -> list[str]:
    return [p.name for p in _params(function, skip) if _is_positional(p)]


def _is_list(annotation: Any) -> bool:
    return getattr(annotation, "__origin__", annotation) is list or str(annotation).startswith(("list", "List"))


def usage_line(function: Callable[..., Any], prog: str, skip: Sequence[str] = ()) -> str:
    words = []
    for p in _params(function, skip):
        if _is_positional(p):
            words.append(f"{p.name.upper()} [{p.name.upper()} ...]" if _is_list(p.annotation) else p.name.upper())
        elif p.default is p.empty:
            words.append(f"--{p.name} {p.name.upper()}")
    return " ".join([prog, *words, "[options]"])


def build_parser(function: Callable[..., Any], prog: str, skip: Sequence[str] = ()) -> Any:
    """The jsonargparse parser of ``function``: parameters without a default are positional
    (a ``list`` one takes the rest of the positional words), keyword-only ones are flags."""
    from jsonargparse import ArgumentParser

    description = (inspect.getdoc(function) or "").split("\n\n")[0]
    parser = ArgumentParser(
        prog=prog,
        description=description,
        usage=usage_line(function, prog, skip),
        exit_on_error=False,
        allow_abbrev=False,
    )
    parser.add_function_arguments(function, as_group=False, as_positional=True, skip=set(skip))
    return parser


def normalised_argv(
    function: Callable[..., Any], argv: Sequence[str], prog: str, short: Mapping[str, str], skip: Sequence[str] = ()
) -> list[str]:
    """``argv`` as ``function``'s parser reads it: short forms expanded; dashed spellings
    (``--seq-len``) as the parameter's flag (``--seq_len``, warning once per spelling); a bool flag
    without a value (``--json``) set to true; the words of a ``list`` positional as one list."""
    params = {p.name: p for p in _params(function, skip)}
    options, words, positional = option_names(function, skip), [], []
    args = list(argv)
    while args:
        flag, eq, value = args.pop(0).partition("=")
        flag = short.get(flag, flag)
        if flag.startswith("--") and "-" in flag[2:] and (new := "--" + flag[2:].replace("-", "_")) in options:
            warnings.warn(
                f"{flag} is now spelled {new}; the old spelling will be removed in a later release",
                CommandDeprecationWarning,
                stacklevel=4,
            )
            flag = new
        if flag in ("-h", "--help"):
            words.append(flag)
            continue
        if flag not in options:
            if flag.startswith("-") and flag != "-":  # before the parser, which would take a prefix as the flag
                raise ConfigError(unknown_option_line(flag, function, prog, skip))
            positional.append(flag + eq + value)
            continue
        if params[options[flag]].annotation in (bool, "bool"):
            if not eq and args and args[0].lower() in _BOOL_WORDS:
                eq, value = "=", args.pop(0)
            words.append(f"{flag}={value if eq else 'true'}")
        else:
            words += [flag + eq + value] if eq or not args else [flag, args.pop(0)]
    return words + _positional_words(function, positional, skip)


def _positional_words(function: Callable[..., Any], given: list[str], skip: Sequence[str]) -> list[str]:
    """The positional words, with those of a ``list`` parameter as one JSON list."""
    import json

    out: list[str] = []
    for p in (p for p in _params(function, skip) if _is_positional(p)):
        if _is_list(p.annotation):
            if given:
                out.append(json.dumps(given))
            given = []
        elif given:
            out.append(given.pop(0))
    return out + given  # extra words: the parser reports them


def unknown_option_line(flag: str, function: Callable[..., Any], prog: str, skip: Sequence[str] = ()) -> str:
    options = list(option_names(function, skip))
    close = difflib.get_close_matches("--" + flag.lstrip("-").replace("-", "_"), options, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]}?" if close else ""
    return f"unknown option {flag} of {prog}.{hint} Accepted: {', '.join(options) or 'none'}; see {prog} --help"


def parse_error_line(message: str, function: Callable[..., Any], prog: str, skip: Sequence[str] = ()) -> str:
    """One line for a jsonargparse error on ``function``'s command line, with a did-you-mean."""
    options = list(option_names(function, skip))
    message = re.sub(r"Expected a <class '(\w+)'>", r"expected \1", " ".join(message.split()))
    unknown = re.search(r"unrecognized arguments: (\S+)", message, re.I)
    if unknown and unknown.group(1).startswith("-"):
        return unknown_option_line(unknown.group(1).split("=")[0], function, prog, skip)
    if unknown:
        return f"unexpected argument {unknown.group(1)!r}; usage: {usage_line(function, prog, skip)} (see --help)"
    key = re.search(r'[Kk]ey "([\w.]+)": (.*)', message)
    if key:
        flag = f"--{key.group(1)}" if f"--{key.group(1)}" in options else key.group(1).upper()
        return f"{flag}: {key.group(2)}; give a value of that type (see {prog} --help)"
    if "required" in message.lower():
        return f"{message}; usage: {usage_line(function, prog, skip)} (see --help)"
    return f"{message}; see {prog} --help"


def parse_function_args(
    function: Callable[..., Any],
    argv: Sequence[str],
    prog: str,
    short: Mapping[str, str] | None = None,
    skip: Sequence[str] = (),
) -> dict[str, Any]:
    """The keyword arguments ``argv`` gives ``function`` (``--help`` prints and exits 0)."""
    from jsonargparse import ArgumentError

    parser = build_parser(function, prog, skip)
    args = normalised_argv(function, argv, prog, short or {}, skip)
    try:
        namespace = parser.parse_args(args)
    except ArgumentError as exc:
        raise ConfigError(parse_error_line(str(exc), function, prog, skip)) from None
    params = inspect.signature(function).parameters
    return {k: v for k, v in namespace.as_dict().items() if k in params and k not in skip}


def run_function(
    function: Callable[..., int],
    argv: Sequence[str],
    prog: str,
    short: Mapping[str, str] | None = None,
    **fixed: Any,
) -> int:
    """Parse ``argv`` against ``function`` and call it; ``fixed`` are arguments that are not flags."""
    return function(**parse_function_args(function, argv, prog, short, skip=tuple(fixed)), **fixed)
