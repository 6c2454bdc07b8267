"""The command boundary: how any command ends when something goes wrong.

A bad input ends in one line and exit status 2, a run stopped for a reason the user must act on
(``TrainingFault``) in one line and status 1; anything else is a bug and keeps its traceback.
The line is found by exception type, looking through the exceptions that wrap it (the argument
parser re-raises what a class raised while it was instantiated), never by matching the text of
another library's message.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _parse_error_message(exc: BaseException) -> str:
    """A ConfigError that caused a parser error, else the parser's message in one line."""
    from moeframe.badinput import explain_parse_error
    from moeframe.errors import ConfigError

    ours = [e for e in _chain(exc) if isinstance(e, ConfigError)]
    if ours:
        return str(ours[0])
    explained = explain_parse_error(str(exc))
    if explained:
        return explained
    lines = [
        ln
        for ln in str(exc).splitlines()
        if not ln.strip().startswith(("Given value", "- Expected a <class 'NoneType'>", "Subtypes:"))
    ]
    return " ".join(" ".join(lines).split()) + " (run with --help to see the accepted options)"


def ckpt_path_of(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--ckpt_path="):
            return arg.split("=", 1)[1]
    return None


def user_error(exc: BaseException, argv: list[str]) -> str | None:
    """The one line a bad input gets (see ``moeframe.badinput.user_error_line``), else None."""
    from argparse import ArgumentError

    from moeframe.badinput import user_error_line
    from moeframe.errors import CheckpointError

    line = _parse_error_message(exc) if isinstance(exc, ArgumentError) else user_error_line(exc)
    ckpt = ckpt_path_of(argv)
    if line is not None and ckpt and ckpt not in line and any(isinstance(e, CheckpointError) for e in _chain(exc)):
        line = f"--ckpt_path {ckpt}: {line}"  # raised where the file name is not known (on_load_checkpoint)
    return line


def guarded(prog: str, run: Callable[[], int], argv: list[str]) -> int:
    """Run a command; a bad input ends in one line and exit status 2, a run stopped for a reason
    the user must act on in one line and status 1; anything else is a bug and keeps its traceback."""
    from moeframe.errors import TrainingFault

    try:
        return run()
    except TrainingFault as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        message = user_error(exc, argv)
        if message is None:
            raise
        print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
