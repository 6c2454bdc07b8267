"""The command front-ends' old import paths, kept for one release with one FutureWarning each.

Before the command layer (``moeframe.commands``), each command's front-end was a function in its
library module (``moeframe.convert.hf.convert_command(argv)``, ``moeframe.scaffold``, the parser
helpers in ``moeframe.cli``). Scripts that call them keep working: each old name resolves, through
its module's ``__getattr__``, to a wrapper that warns once (what to call instead) and runs the
command through :func:`moeframe.commands.main.main` as ``moeframe COMMAND ARGV`` would.

This module sits outside the core's layers on purpose: the library modules reach the command
layer only through it, only when an old name is asked for, and only until the names go.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
from collections.abc import Callable
from typing import Any, TextIO

# old module -> {old function name: command it ran}
COMMAND_FUNCTIONS: dict[str, dict[str, str]] = {
    "moeframe.convert.hf": {"convert_command": "convert"},
    "moeframe.inspect": {"inspect_command": "inspect"},
    "moeframe.data.prepare": {"prepare_command": "prepare"},
    "moeframe.generate": {"generate_command": "generate"},
    "moeframe.training.esft": {"esft_select_command": "esft-select"},
    "moeframe.scaffold": {"new_plugin_command": "new-plugin"},
    "moeframe.cli": {"plugins_command": "plugins"},
}
# names moeframe.cli exported that moved to moeframe.commands.train unchanged
MOVED_FROM_CLI = (
    "default_loggers",
    "claim_default_log_version",
    "check_strategy_name",
    "resolve_precision_plugin",
    "resolve_plugin_args",
    "no_abbrev_parser_class",
)


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} is deprecated and will be removed in a future release; use {new}", FutureWarning, stacklevel=3
    )


def _command_function(module: str, name: str, command: str) -> Callable[..., int]:
    @functools.wraps(_command_function)
    def run(argv: list[str], out: TextIO | None = None) -> int:
        _warn(f"{module}.{name}(argv)", f"moeframe.cli.main([{command!r}, *argv]) (the `moeframe {command}` command)")
        from moeframe.commands.main import main

        with contextlib.redirect_stdout(out) if out is not None else contextlib.nullcontext():
            return main([command, *argv])

    run.__name__ = run.__qualname__ = name
    run.__doc__ = f"Deprecated: runs `moeframe {command} ARGV`; use moeframe.cli.main([{command!r}, *argv])."
    return run


def _plugins_show(argv: list[str]) -> int:
    _warn("moeframe.cli.plugins_show_command(argv)", "moeframe.cli.main(['plugins', 'show', *argv])")
    from moeframe.commands.main import main

    return main(["plugins", "show", *argv])


def old_name(module: str, name: str) -> Any:
    """What ``module.name`` used to be, with its deprecation warning; AttributeError if it never was."""
    command = COMMAND_FUNCTIONS.get(module, {}).get(name)
    if command is not None:
        return _command_function(module, name, command)
    if module == "moeframe.cli" and name == "plugins_show_command":
        return _plugins_show
    if module == "moeframe.cli" and name in MOVED_FROM_CLI:
        _warn(f"moeframe.cli.{name}", f"moeframe.commands.train.{name}")
        return getattr(importlib.import_module("moeframe.commands.train"), name)
    raise AttributeError(f"module {module!r} has no attribute {name!r}")
