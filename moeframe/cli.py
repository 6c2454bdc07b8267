"""The ``moeframe`` program: the console script and ``python -m moeframe.cli``.

The commands themselves live in :mod:`moeframe.commands` (one module per command, parsers built
from typed signatures; the training subcommands are LightningCLI in ``commands.train``). This
module only starts them, and keeps the names older code imports from here.
"""

from __future__ import annotations

import sys
from typing import Any

from moeframe.commands.main import EXTRA_COMMANDS, TRAINER_COMMANDS, main

__all__ = ["EXTRA_COMMANDS", "TRAINER_COMMANDS", "main"]  # and build_cli, imported on first use


def __getattr__(name: str) -> Any:
    # the LightningCLI builder imports lightning: only when asked for
    if name == "build_cli":
        from moeframe.commands.train import build_cli

        return build_cli
    # names of the argparse front-end this module held before moeframe.commands (deprecated)
    from moeframe.deprecated_commands import old_name

    return old_name(__name__, name)


if __name__ == "__main__":
    sys.exit(main())
