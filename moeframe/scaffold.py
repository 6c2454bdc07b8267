"""Deprecated: ``moeframe new-plugin`` lives in :mod:`moeframe.commands.new_plugin` (templates are
real files under ``moeframe/commands/templates``). ``new_plugin_command(argv)`` still runs it, with
one FutureWarning, for one release."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from moeframe.deprecated_commands import old_name

    return old_name(__name__, name)
